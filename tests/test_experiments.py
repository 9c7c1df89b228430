"""The one training loop (lora_ref.tiny.train_steps, its optimizer factory and on_step hook) and the
chapters' experiments on the tiny model (lora_ref.tiny.experiments)."""

import math
import random

import numpy as np
import pytest
import torch

from lora_ref import tiny
from lora_ref import torch as lt
from lora_ref.tiny import experiments

# --------------------------------------------------------------------------- the loop


def _snapshots():
    """An on_step hook that keeps copies of every LoRA factor and its gradient, at every step."""
    seen = []

    def hook(step, m, loss):
        layers = lt.lora_modules(m)
        seen.append({"step": step, "loss": loss,
                     **{f"{n}.{k}": getattr(layer, k).detach().clone() for n, layer in layers.items()
                        for k in ("lora_A", "lora_B")},
                     **{f"{n}.{k}.grad": getattr(layer, k).grad.detach().clone() for n, layer in layers.items()
                        for k in ("lora_A", "lora_B")}})

    return seen, hook


def test_on_step_sees_this_steps_gradients_before_the_optimizer_moves_the_parameters(shipped_tiny):
    seen, hook = _snapshots()
    model, run = tiny.standard_fine_tune(2, seed=0, base=shipped_tiny, steps=3, on_step=hook)
    assert [s["step"] for s in seen] == [0, 1, 2] and [s["loss"] for s in seen] == run["losses"]
    name = "model.layers.0.self_attn.q_proj"
    assert not seen[0][f"{name}.lora_B"].any()                                     # B_0 = 0: before step 0
    assert seen[1][f"{name}.lora_B"].any()                                         # moved by step 0
    assert not seen[0][f"{name}.lora_A.grad"].any() and seen[0][f"{name}.lora_B.grad"].any()   # dL/dA = s B^T G = 0
    # the gradient the hook sees at step t is the one the optimizer then uses: Adam's first step on B is
    # -lr_0 * sign(g) entry by entry (|m / sqrt(v)| = 1 at t = 1)
    lr0 = tiny.RECIPE.lora_lr * tiny.lr_factor(0, 3, 10)
    step_B = seen[1][f"{name}.lora_B"] - seen[0][f"{name}.lora_B"]
    g = seen[0][f"{name}.lora_B.grad"]
    torch.testing.assert_close(step_B[g != 0], -lr0 * torch.sign(g[g != 0]), rtol=1e-3, atol=1e-9)


def test_factor_norms_leave_the_recipe_run_unchanged_bit_for_bit(shipped_tiny):
    """Recording reads and never writes: with FactorNorms (plain AdamW, and LoRA+ at ratio 1, whose groups
    step each entry alike) the run has the losses and weights of standard_fine_tune, bit for bit."""
    ref_model, ref = tiny.standard_fine_tune(r=4, seed=1, base=shipped_tiny, steps=4)
    for ratio in (None, 1.0):
        model, rec = experiments.recorded_fine_tune(shipped_tiny, 4, 4, seed=1, loraplus_ratio=ratio)
        assert rec["loss"] == ref["losses"]
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_factor_norms_are_the_norms_of_the_factors_and_gradients_the_loop_saw(shipped_tiny):
    seen, snap = _snapshots()
    record = experiments.FactorNorms()

    def both(step, model, loss):
        snap(step, model, loss)
        record(step, model, loss)

    tiny.standard_fine_tune(4, seed=1, base=shipped_tiny, steps=4, on_step=both)
    rec = record.result()
    assert rec["grad_A"].shape == (4, 28) and len(rec["layers"]) == 28
    for t, s in enumerate(seen):
        for j, name in enumerate(rec["layers"]):
            assert rec["grad_A"][t, j] == float(s[f"{name}.lora_A.grad"].norm())
            assert rec["grad_B"][t, j] == float(s[f"{name}.lora_B.grad"].norm())
            assert rec["norm_B"][t, j] == float(s[f"{name}.lora_B"].norm())
            assert rec["moved_A"][t, j] == float((s[f"{name}.lora_A"] - seen[0][f"{name}.lora_A"]).norm())
    assert not rec["grad_A"][0].any() and rec["grad_B"][0].all()                 # B_0 = 0
    assert not rec["norm_B"][0].any() and not rec["moved_A"][:2].any() and rec["moved_A"][2].all()   # A lags a step


def test_factor_norms_need_lora_layers(shipped_tiny):
    batches = tiny.example_batches(tiny.task_examples(n=4), 2)
    model = tiny.build_tiny_llama(seed=0)
    with pytest.raises(ValueError, match="LoRA layers"):
        tiny.train_steps(model, batches, 1, optimizer=tiny.adamw(1e-3), on_step=experiments.FactorNorms())


def test_train_steps_takes_a_factory_and_train_refuses_two_learning_rates(shipped_tiny):
    batches = tiny.example_batches(tiny.task_examples(n=4), 2)
    model = tiny.build_tiny_llama(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"factory model -> torch.optim.Optimizer .* got AdamW"):
        tiny.train_steps(model, batches, 1, optimizer=opt)
    with pytest.raises(ValueError, match="steps must be a positive integer, got steps=0"):
        tiny.train_steps(model, batches, 0, optimizer=tiny.adamw(1e-3))
    with pytest.raises(ValueError, match=r"pass lr and weight_decay to the optimizer factory, not to train \(got lr=0.01"):
        tiny.train(model, tiny.task_examples(n=4), 1, lr=1e-2, optimizer=tiny.adamw(1e-3))


def test_constant_schedule_and_adamw_groups():
    """warmup=0, min_lr_frac=1 is a constant learning rate (the QLoRA path's); decay_matrices_only
    puts norms and biases in a group without weight decay."""
    assert {tiny.lr_factor(t, 50, 0, 1.0) for t in range(50)} == {1.0}
    model = tiny.build_tiny_llama(seed=0)
    opt = tiny.adamw(1e-3, weight_decay=0.1, decay_matrices_only=True)(model)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_example_batches_shuffle_once_and_cycle():
    examples = [(f"{i} -> ", str(i)) for i in range(5)]
    order = list(range(5))
    random.Random(3).shuffle(order)
    batches = tiny.example_batches(examples, 2, seed=3, collate=list)
    got = [next(batches) for _ in range(5)]                                      # 10 pairs: the order twice
    assert sum(got, []) == [examples[i] for i in order + order]
    first = next(tiny.example_batches(examples, 2, seed=3))
    assert torch.equal(first["input_ids"], tiny.make_batch([examples[i] for i in order[:2]])["input_ids"])
    with pytest.raises(ValueError, match="at least one"):
        tiny.example_batches([], 2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got batch_size=0"):
        tiny.example_batches(examples, 0)


# --------------------------------------------------------------------------- chapter 05


def test_weight_gradients_give_the_lora_factor_gradients(shipped_tiny):
    """G from weight_gradients and eq-ch05-grads: dL/dB = s G A^T and dL/dA = s B^T G on every layer."""
    torch.manual_seed(0)
    model = lt.add_lora(tiny.load_tiny_llama(), "all-linear", r=4, alpha=16)
    with torch.no_grad():
        for m in lt.lora_modules(model).values():
            m.lora_B.normal_(0, 0.01)
    batch = experiments.recipe_batch(0, batch_size=4)
    flags = [p.requires_grad for p in model.parameters()]
    G = experiments.weight_gradients(model, batch)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    model(**batch).loss.backward()
    for name, m in lt.lora_modules(model).items():
        A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
        torch.testing.assert_close(m.lora_B.grad.double(), m.scaling * G[name] @ A.T, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(m.lora_A.grad.double(), m.scaling * B.T @ G[name], rtol=1e-3, atol=1e-8)
    assert set(experiments.weight_gradients(shipped_tiny, batch)) == set(G)      # the same layers, unadapted


def test_recipe_batch_is_the_first_batch_of_the_recipe_run():
    seen = []
    base = tiny.load_tiny_llama()
    original = base.forward

    def spy(**batch):
        seen.append(batch["input_ids"].clone())
        return original(**batch)

    base.forward = spy
    tiny.standard_fine_tune(None, seed=5, base=base, steps=1)                   # the copy keeps the spy
    assert torch.equal(seen[0], experiments.recipe_batch(5)["input_ids"])


def test_step_geometry_at_B_zero_is_the_first_step_geometry(shipped_tiny):
    from lora_ref import gradient_dynamics as gd

    torch.manual_seed(0)
    model = lt.add_lora(tiny.load_tiny_llama(), "all-linear", r=4, alpha=16)
    G = experiments.weight_gradients(model, experiments.recipe_batch(0, batch_size=4))
    geo = experiments.step_geometry(G, model)
    for j, (name, g) in enumerate(G.items()):
        A = lt.lora_modules(model)[name].lora_A.detach().double().numpy()
        P = gd.row_space_projector(A)
        assert geo["fraction"][j] == pytest.approx(float(np.linalg.norm(g.numpy() @ P) / np.linalg.norm(g.numpy())))
        assert geo["cosine"][j] <= geo["fraction"][j] + 1e-9


def test_loraplus_sweep_runs_every_ratio_and_seed_and_scores_held_out_pairs(shipped_tiny):
    sweep = experiments.loraplus_sweep(shipped_tiny, 2, [1, 4], [0, 1], steps=2, lr=1e-3, n_test=4)
    assert list(sweep) == [1, 4] and all(list(by_seed) == [0, 1] for by_seed in sweep.values())
    for by_seed in sweep.values():
        for run in by_seed.values():
            assert len(run["loss"]) == 2 and math.isfinite(run["test_loss"]) and run["test_loss"] > 0
    assert sweep[1][0]["loss"][0] == sweep[4][0]["loss"][0]          # same start: the ratio acts from step 1
    assert sweep[1][0]["loss"][1] != sweep[4][0]["loss"][1]


# --------------------------------------------------------------------------- chapter 06


def test_with_updates_checks_every_update_before_it_copies(shipped_tiny):
    name = "model.layers.0.self_attn.k_proj"
    good = np.zeros(tuple(shipped_tiny.get_submodule(name).weight.shape))
    with pytest.raises(ValueError, match=r"has shape \(2, 2\), the layer's weight \(64, 128\)"):
        experiments.with_updates(shipped_tiny, {name: good, "model.layers.1.self_attn.k_proj": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="non-finite"):
        experiments.with_updates(shipped_tiny, {name: np.full_like(good, np.nan)})


# --------------------------------------------------------------------------- chapter 10: the variants


@pytest.mark.parametrize("variant", ["pissa", "milora", "olora", "loraga"])
def test_variant_models_start_as_the_base_model(shipped_tiny, variant):
    """W_res + s B A = W0 on every layer, so the loss at the start is the base's (to float32 rounding)."""
    batch = experiments.recipe_batch(0, batch_size=8)
    model = experiments.variant_model(shipped_tiny, variant, 4, seed=0, batch=batch)
    assert len(experiments.peft_lora_layers(model)) == 28
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(shipped_tiny(**batch).loss.item(), abs=1e-4)
        name = "model.layers.1.mlp.down_proj"
        W = experiments.effective_weight(model.get_submodule("base_model.model." + name))
        torch.testing.assert_close(W, shipped_tiny.get_submodule(name).weight, atol=1e-5, rtol=0)


def test_milora_model_holds_the_minor_triplets(shipped_tiny):
    model = experiments.variant_model(shipped_tiny, "milora", 4, seed=0)
    layer = experiments.peft_lora_layers(model)["base_model.model.model.layers.0.self_attn.k_proj"]
    W0 = shipped_tiny.get_submodule("model.layers.0.self_attn.k_proj").weight.detach()
    sigma = torch.linalg.svdvals(W0.double())
    s = layer.scaling["default"]
    BA = lt.delta_w(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), s)
    torch.testing.assert_close(torch.linalg.svdvals(BA.double())[:4], sigma[-4:], atol=1e-5, rtol=1e-4)


def test_effective_weights_hook_records_w0_first_and_dora_changes_magnitudes(shipped_tiny):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj"]
    hook = experiments.EffectiveWeights(names, at=[0, 3])
    experiments.variant_fine_tune("dora", 4, 4, seed=0, base=shipped_tiny, on_step=hook)
    weights = hook.result()
    assert list(weights) == [0, 3]
    for n in names:
        np.testing.assert_array_equal(weights[0][n], shipped_tiny.get_submodule(n).weight.detach().double().numpy())
        assert np.abs(weights[3][n] - weights[0][n]).max() > 0


def test_variant_model_refuses_an_unknown_variant(shipped_tiny):
    with pytest.raises(ValueError, match="variant must be one of"):
        experiments.variant_model(shipped_tiny, "qlora", 4)


def test_first_step_cosine_of_loraga_is_near_one(shipped_tiny):
    batch = experiments.recipe_batch(0, batch_size=8)
    G = experiments.weight_gradients(shipped_tiny, batch)
    cos = experiments.first_step_cosines(experiments.variant_model(shipped_tiny, "loraga", 4, batch=batch), G)
    lora = experiments.first_step_cosines(experiments.variant_model(shipped_tiny, "lora", 4), G)
    assert set(cos) == set(G) and min(cos.values()) > max(lora.values())


def test_adalora_allocates_the_planted_ranks_only_with_update_and_allocate():
    kwargs = dict(needed=(1, 2, 6), steps=300, tinit=30, tfinal=60)
    ada = experiments.adalora_planted_run(**kwargs)
    assert ada["ranks"][ada["steps"][-1]] == [1, 2, 6]
    # the triplet scores recomputed from PEFT's allocator select exactly what PEFT kept
    scores = np.concatenate([ada["scores"][i] for i in range(3)])
    threshold = np.sort(scores)[::-1][ada["budget"] - 1]
    assert [int(np.sum(np.asarray(ada["scores"][i]) >= threshold)) for i in range(3)] == [1, 2, 6]
    assert experiments.adalora_planted_run(**kwargs, allocate=False)["ranks"][299] == [6, 6, 6]
    with pytest.raises(ValueError, match="must divide by 3"):
        experiments.adalora_planted_run(needed=(1, 2, 4))


def test_train_steps_calls_after_step_after_the_optimizer():
    model = torch.nn.Linear(3, 1)
    seen = []

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def batches():
        while True:
            yield {"x": torch.ones(2, 3)}

    wrapped = torch.nn.Module()
    wrapped.lin = model
    wrapped.forward = lambda x: Out(model(x).pow(2).mean())
    before = model.weight.detach().clone()
    tiny.train_steps(wrapped, batches(), 2, optimizer=tiny.adamw(0.1), warmup=0, min_lr_frac=1.0,
                     after_step=lambda step, m: seen.append((step, m.lin.weight.detach().clone(), m.lin.weight.grad)))
    assert [s for s, _, _ in seen] == [0, 1]
    assert not torch.equal(seen[0][1], before) and seen[0][2] is not None     # moved, gradients still there


# --------------------------------------------------------------------------- chapter 11


def test_choice_run_trains_the_budget_it_counts(shipped_tiny):
    from lora_ref import budget
    for targets, r in (("qv", 21), ("mlp", 7), ("all-linear", 4)):
        out = experiments.choice_run(shipped_tiny, r=r, lr=5e-3, targets=targets, steps=2, batch_size=4)
        want = budget.lora_param_count(tiny.CONFIG, r, experiments.TARGET_SETS[targets])
        assert out["trainable"] == want and len(out["loss"]) == 2 and 0 < out["test_loss"] < 10
    full = experiments.choice_run(shipped_tiny, lr=1e-3, steps=2, batch_size=4)
    assert full["trainable"] == sum(p.numel() for p in shipped_tiny.parameters())
    again = experiments.choice_run(shipped_tiny, lr=1e-3, steps=2, batch_size=4)
    assert again == full                                                      # one seed fixes the run


def test_choice_run_scores_facts_on_themselves_and_dates_held_out(shipped_tiny):
    facts = experiments.choice_run(shipped_tiny, r=4, lr=1e-2, task="facts-16", steps=30, batch_size=16)
    assert facts["test_loss"] < facts["loss"][0]               # memorised: the scoring pairs are the training pairs
    assert facts["test_loss"] == pytest.approx(tiny.loss_per_byte(
        tiny.fine_tune(shipped_tiny, tiny.fact_examples(16), 30, r=4, alpha=16.0, lr=1e-2, warmup=3,
                       batch_size=16)[0], tiny.fact_examples(16)), rel=1e-6)
    with pytest.raises(ValueError, match="need r"):
        experiments.choice_run(shipped_tiny, lr=1e-3, alpha=16, steps=1)
    with pytest.raises(ValueError, match="n_train must be in"):
        experiments.choice_run(shipped_tiny, r=4, lr=1e-3, steps=1, n_train=0)


def test_first_update_sizes_lora_starts_smaller_and_grows_with_lr(shipped_tiny):
    sizes = experiments.first_update_sizes(shipped_tiny, [1e-3, 4e-3], r=4, steps=2)
    full, lora = sizes["full"], sizes["lora"]
    assert full[0] < full[1] and lora[0] < lora[1]
    # Adam moves every full entry by about lr a step; LoRA's B starts at 0 and only its r columns move
    assert all(lo < fu for lo, fu in zip(lora, full))
    assert full[1] / full[0] == pytest.approx(4, rel=0.25)              # sign steps: size ∝ lr
