"""lora_ref.torch against PEFT, the oracle: forward, init distribution, scaling, merge."""

import copy
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from scipy import stats
from torch import nn

from lora_ref import oracles
from lora_ref import torch as lt


class MLP(nn.Module):
    def __init__(self, k=48, hidden=40, d=24):
        super().__init__()
        self.up = nn.Linear(k, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _peft_and_ours(r=4, alpha=8, rslora=False, targets=("up", "down"), seed=0):
    """The same base model wrapped by PEFT and by lora_ref, with the same nonzero A and B."""
    torch.manual_seed(seed)
    base = MLP()
    ours = lt.add_lora(copy.deepcopy(base), list(targets), r=r, alpha=alpha, rslora=rslora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lt.lora_modules(ours).values():
            layer.lora_B.normal_(0, 0.5, generator=g)                 # nonzero B: the bypass matters
    peft_model = oracles.peft_twin(base, ours)
    for name in lt.lora_modules(ours):
        assert isinstance(peft_model.base_model.model.get_submodule(name), PeftLoraLinear)
    return peft_model, ours, base


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_peft_lora_linear(rslora):
    peft_model, ours, base = _peft_and_ours(r=4, alpha=8, rslora=rslora)
    x = torch.randn(5, 3, 48, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)
        # and the bypass really contributes: the base model alone gives other outputs
        assert (ours(x) - base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("r, alpha, rslora", [(1, 1, False), (8, 16, False), (8, 16, True), (64, 8, True)])
def test_scaling_matches_peft(r, alpha, rslora):
    peft_model = get_peft_model(MLP(k=64, hidden=64), LoraConfig(r=r, lora_alpha=alpha, target_modules=["up"], use_rslora=rslora))
    expected = peft_model.base_model.model.up.scaling["default"]
    assert lt.scaling(alpha, r, rslora) == pytest.approx(expected, rel=1e-15)
    assert lt.LoRALinear(nn.Linear(64, 64), r, alpha, rslora=rslora).scaling == pytest.approx(expected, rel=1e-15)
    assert expected == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)


def _peft_A(init, k=256, r=16, n_layers=8):
    model = nn.Sequential(*[nn.Linear(k, k) for _ in range(n_layers)])
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=[str(i) for i in range(n_layers)],
                     init_lora_weights=True if init == "kaiming" else "gaussian")
    pm = get_peft_model(model, cfg)
    return torch.cat([m.lora_A["default"].weight.detach().flatten() for m in pm.modules()
                      if isinstance(m, PeftLoraLinear)]).numpy()


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_default_init_has_peft_distribution(init):
    """KS tests: our A against the closed-form law and against PEFT's own draws; B is exactly zero."""
    k, r = 256, 16
    torch.manual_seed(0)
    ours = np.concatenate([lt.LoRALinear(nn.Linear(k, k), r, r, init=init).lora_A.detach().flatten().numpy()
                           for _ in range(8)])
    seeded = lt.init_lora(k, k, r, seed=0, init=init)[0].flatten().numpy()
    peft = _peft_A(init, k, r)
    law = stats.uniform(-1 / math.sqrt(k), 2 / math.sqrt(k)) if init == "kaiming" else stats.norm(0, 1 / r)
    for sample in (ours, seeded, peft):
        assert stats.kstest(sample, law.cdf).pvalue > 1e-3
    assert stats.ks_2samp(ours, peft).pvalue > 1e-3
    # the test has power: the other init's law is rejected outright
    wrong = stats.norm(0, 1 / r) if init == "kaiming" else stats.uniform(-1 / math.sqrt(k), 2 / math.sqrt(k))
    assert stats.kstest(ours, wrong.cdf).pvalue < 1e-6
    assert np.var(peft) == pytest.approx(law.var(), rel=0.05)
    assert torch.count_nonzero(lt.LoRALinear(nn.Linear(k, k), r, r).lora_B) == 0


def test_merge_lora_matches_merge_and_unload():
    peft_model, ours, _ = _peft_and_ours(r=4, alpha=16)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_adapted = ours(x)
        merged_peft = peft_model.merge_and_unload()
        merged_ours = lt.merge_lora(ours)
        assert not lt.lora_modules(merged_ours)
        assert type(merged_ours.up) is nn.Linear and type(merged_ours.down) is nn.Linear
        for name in ("up", "down"):
            torch.testing.assert_close(merged_ours.get_submodule(name).weight,
                                       merged_peft.get_submodule(name).weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged_ours(x), y_adapted, rtol=1e-5, atol=1e-5)


def test_layer_merge_then_unmerge_restores_W0_and_output():
    torch.manual_seed(0)
    layer = lt.LoRALinear(nn.Linear(32, 16).double(), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    W0 = layer.base_layer.weight.clone()
    x = torch.randn(3, 32, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_add_lora_trains_the_same_parameters_as_peft():
    peft_model, ours, _ = _peft_and_ours(targets=("up",))
    trainable = lambda m: sorted(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(ours) == trainable(peft_model) == sorted([4 * 48, 40 * 4])
    assert peft_model.get_nb_trainable_parameters()[0] == sum(trainable(ours))
    assert not ours.down.weight.requires_grad and not ours.up.base_layer.bias.requires_grad


def test_add_lora_selects_modules_by_name_suffix_as_peft_does():
    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "xq_proj": nn.Linear(8, 8)}))
    model.add_module("lm_head", nn.Linear(8, 4))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLinear)}
    ours = lt.add_lora(copy.deepcopy(model), ["q_proj", "v_proj"], r=2, alpha=2)
    assert set(lt.lora_modules(ours)) == peft_names == {"attn.q_proj", "attn.v_proj"}
    # "all-linear" leaves out only what get_output_embeddings() returns; a plain nn.Module has no
    # such method, so PEFT adapts its lm_head too, and so do we.
    peft_all = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    peft_all = {n.removeprefix("base_model.model.") for n, m in peft_all.named_modules() if isinstance(m, PeftLoraLinear)}
    all_linear = lt.add_lora(copy.deepcopy(model), "all-linear", r=2, alpha=2)
    assert set(lt.lora_modules(all_linear)) == peft_all == {"attn.q_proj", "attn.v_proj", "attn.xq_proj", "lm_head"}


def test_dropout_is_applied_to_the_bypass_input_only():
    torch.manual_seed(0)
    layer = lt.LoRALinear(nn.Linear(16, 8), r=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T)
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


def test_a_second_add_lora_keeps_the_first_adapters_trainable_and_does_not_nest():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    lt.add_lora(model, ["0"], r=2, alpha=2)
    lt.add_lora(model, "all-linear", r=2, alpha=2)
    assert set(lt.lora_modules(model)) == {"0", "2"}
    assert not isinstance(model[0].base_layer, lt.LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


def _layer_and_peft(d, k, r, dtype=torch.float32, seed=0):
    """A LoRALinear with nonzero B and PEFT's layer on a copy of the same W0, A and B."""
    torch.manual_seed(seed)
    ours = lt.LoRALinear(nn.Linear(k, d, dtype=dtype), r=r, alpha=2 * r)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.05)
    holder = nn.Sequential()
    holder.add_module("proj", ours)
    base = nn.Sequential()
    base.add_module("proj", copy.deepcopy(ours.base_layer))
    theirs = oracles.peft_twin(base, holder).base_model.model.proj
    return ours, theirs


@pytest.mark.parametrize("n_over_crossover", [0.5, 1.5, 2.5, 8])
def test_forward_without_grad_on_either_side_of_the_materialising_threshold_equals_peft(n_over_crossover):
    """Above MATERIALISE_AT * T* rows LoRALinear forms W0 + s B A for the batch (one GEMM over x);
    below, the bypass. Either way the output is PEFT's, to float32 rounding."""
    from lora_ref.budget import materialise_crossover_tokens

    d, k, r = 48, 80, 4
    ours, theirs = _layer_and_peft(d, k, r)
    n = int(n_over_crossover * materialise_crossover_tokens(d, k))
    x = torch.randn(n, k)
    with torch.no_grad():
        y, y_peft = ours(x), theirs(x)
        y_bypass = ours.base_layer(x) + ours.scaling * (x @ ours.lora_A.T) @ ours.lora_B.T
    materialised = n > lt.MATERIALISE_AT * materialise_crossover_tokens(d, k)
    assert materialised == (n_over_crossover > lt.MATERIALISE_AT)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_bypass, rtol=1e-5, atol=1e-5)
    if materialised:                        # a different summation order: not bitwise the bypass
        W = ours.base_layer.weight + ours.scaling * ours.lora_B @ ours.lora_A
        torch.testing.assert_close(y, x @ W.T + ours.base_layer.bias, rtol=1e-6, atol=1e-6)


def test_materialising_keeps_the_exact_base_output_when_B_is_zero():
    """B = 0 (the init): W0 + s 0 A is W0 bit for bit, so the output is the base layer's exactly."""
    layer = lt.LoRALinear(nn.Linear(32, 32), r=4, alpha=8)
    x = torch.randn(200, 32)                                      # 200 > 2 * T* = 32 rows
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_with_grad_runs_the_bypass_and_its_gradients_equal_peft():
    """Under grad the factored form is kept (materialising would need the (d, k) gradient of W)."""
    ours, theirs = _layer_and_peft(24, 24, 2)
    x = torch.randn(100, 24)                                      # 100 > 2 * T* = 24: large enough
    g = torch.randn(100, 24)
    ours(x).backward(g)
    theirs(x).backward(g)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_never_materialises(dtype, monkeypatch):
    """In bf16 or fp16, W0 + s B A would round s B A to W0's format, and merged outputs would
    no longer be PEFT's unmerged ones: the layer keeps the bypass however large the batch."""
    ours, theirs = _layer_and_peft(32, 32, 4, dtype=dtype)
    x = torch.randn(400, 32, dtype=dtype)                        # 400 > 2 * T* = 32 rows
    with torch.no_grad():
        y = ours(x)
        monkeypatch.setattr(lt, "MATERIALISE_AT", math.inf)       # the bypass, whatever the batch
        assert torch.equal(y, ours(x))
        monkeypatch.setattr(lt, "MATERIALISE_AT", 0.0)            # materialise whenever allowed
        assert torch.equal(y, ours(x))                            # ... and in this format it is not
        eps = torch.finfo(dtype).eps                              # PEFT adds B A x after rounding it
        torch.testing.assert_close(y, theirs(x), rtol=2 * eps, atol=2 * eps * float(y.abs().max()))
        ours.float()                                              # the same layer in fp32 does switch
        x32 = x.float()
        monkeypatch.setattr(lt, "MATERIALISE_AT", math.inf)
        y_bypass = ours(x32)
        monkeypatch.setattr(lt, "MATERIALISE_AT", 0.0)
        assert not torch.equal(ours(x32), y_bypass)
