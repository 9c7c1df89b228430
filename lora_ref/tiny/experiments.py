"""The chapters' experiments on the tiny model: training runs and what they measure.

The math lives in the chapter modules (``gradient_dynamics``, ``adapter_geometry``,
``low_rank``), which need only NumPy; this module drives the tiny model through the book's one
loop (``lora_ref.tiny.train_steps``, by way of ``standard_fine_tune``) and hands the results to
that math:

* chapter 05: ``FactorNorms``, an ``on_step`` hook that records ||dL/dA||, ||dL/dB||, ||B|| and
  ||A - A_0|| of every LoRA layer before each step; ``recorded_fine_tune`` (a recipe fine-tune
  with it, optionally with LoRA+'s optimizer); ``weight_gradients`` (G = dL/dW of every layer);
  ``step_geometry``; ``loraplus_run`` and ``loraplus_sweep``;
* chapter 06: ``with_updates`` (W0 + ΔW in a copy of the model) and ``truncation_scores``;
* chapter 07: ``lora_factors``, ``train_run``, ``measure_run`` and ``fine_tune_and_measure``;
* chapter 10: ``variant_model`` (a PEFT model with PiSSA, MiLoRA, OLoRA, DoRA, VeRA or LoRA-GA),
  ``variant_fine_tune``, ``effective_weight`` and the ``EffectiveWeights`` hook (DoRA's
  Delta M / Delta D), ``first_step_cosines``, and ``adalora_planted_run`` (PEFT's AdaLoRA on layers
  that need different ranks);
* chapter 11: ``choice_run`` (one fine-tune of the hyperparameter sweeps, full or LoRA, with its
  rank, alpha, targets from ``TARGET_SETS``, dropout, batch size and task, scored) and
  ``first_update_sizes`` (how far full fine-tuning and LoRA move the weights in their first steps).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from .. import adapter_geometry, gradient_dynamics, low_rank, variants
from .. import torch as lt
from .data import example_batches, fact_examples, task_examples
from .model import load_tiny_llama
from .runs import RECIPE, evaluate, held_out_text, standard_fine_tune, training_examples, weight_updates
from .training import adamw, fine_tune, loss_per_byte, text_loss_per_byte, train, train_steps

__all__ = [
    "FactorNorms", "recorded_fine_tune", "recipe_batch", "weight_gradients", "step_geometry", "loraplus_run",
    "loraplus_sweep", "with_updates", "truncation_scores", "lora_factors", "train_run", "measure_run",
    "fine_tune_and_measure", "VARIANT_NAMES", "peft_lora_layers", "variant_model", "variant_fine_tune",
    "effective_weight", "EffectiveWeights", "first_step_cosines", "adalora_planted_run",
    "TARGET_SETS", "choice_run", "first_update_sizes",
]


# --------------------------------------------------------------------------- chapter 05: the first steps


class FactorNorms:
    """An ``on_step`` hook for ``train_steps``: before each optimizer step, for every LoRA layer
    (columns in ``lora_modules`` order),

        grad_A, grad_B: ||dL/dA||_F, ||dL/dB||_F       moved_A: ||A - A_0||_F      norm_B: ||B||_F

    A_0 is read at the first call, before any step has moved A. ``result()`` returns
    {"layers": [names], "grad_A": (steps, n_layers) array, ...}.
    """

    KEYS = ("grad_A", "grad_B", "moved_A", "norm_B")

    def __init__(self):
        self.layers, self.A0 = None, None
        self.rows = {key: [] for key in self.KEYS}

    @torch.no_grad()
    def __call__(self, step, model, loss):
        if self.layers is None:
            self.layers = lt.lora_modules(model)
            if not self.layers:
                raise ValueError("FactorNorms needs a model with LoRA layers (lora_ref.torch.add_lora)")
            self.A0 = [m.lora_A.detach().clone() for m in self.layers.values()]
        ms = list(self.layers.values())
        self.rows["grad_A"].append([float(m.lora_A.grad.norm()) for m in ms])
        self.rows["grad_B"].append([float(m.lora_B.grad.norm()) for m in ms])
        self.rows["moved_A"].append([float((m.lora_A - a0).norm()) for m, a0 in zip(ms, self.A0)])
        self.rows["norm_B"].append([float(m.lora_B.norm()) for m in ms])

    def result(self):
        return {"layers": list(self.layers or {}), **{key: np.asarray(v) for key, v in self.rows.items()}}


def recorded_fine_tune(base, r, steps, *, seed=0, alpha=None, lr=None, loraplus_ratio=None, warmup=10,
                       task="date"):
    """A recipe LoRA fine-tune (``standard_fine_tune``: alpha ``RECIPE.lora_alpha`` unless given,
    every linear layer but the output layer, the recipe's batches for ``seed``) with ``FactorNorms``
    on every step. loraplus_ratio=None: AdamW at ``lr`` (default ``RECIPE.lora_lr``, weight decay 0);
    a number: LoRA+'s groups (``lora_ref.torch.loraplus_optimizer``: eta_A = lr, eta_B = ratio * lr).
    Returns ``(model, record)``, record = ``FactorNorms.result()`` with "loss" (the loss of each step).
    """
    lr = RECIPE.lora_lr if lr is None else lr
    if loraplus_ratio is None:
        def optimizer(model):
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    else:
        def optimizer(model):
            return lt.loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio)
    hook = FactorNorms()
    overrides = {} if alpha is None else {"alpha": alpha}
    model, run = standard_fine_tune(r, seed, task, base=base, steps=steps, optimizer=optimizer, on_step=hook,
                                    warmup=warmup, **overrides)
    return model, {**hook.result(), "loss": run["losses"]}


def recipe_batch(seed=0, task="date", batch_size=None):
    """The first training batch of the recipe's fine-tune with ``seed`` (``batch_size`` pairs,
    default the recipe's 32), as ``make_batch`` builds it."""
    size = RECIPE.batch_size if batch_size is None else batch_size
    return next(example_batches(training_examples(task), size, seed))


def weight_gradients(model, batch, names=None):
    """{name: G = dL/dW (d, k), float64} of the model's loss on one batch, for the nn.Linear layers
    ``names``. Default: in a LoRA model, the base layer of every LoRA layer (keyed by the LoRA
    layer's name; dL/dW0 = dL/dW since W = W0 + s B A); otherwise every layer LoRA would adapt
    (every linear layer but the output layer). The requires_grad flags are restored and every .grad
    is cleared."""
    if names is None:
        lora = lt.lora_modules(model)
        names = {n: n + ".base_layer" for n in lora} if lora else \
            {n: n for n in lt.target_names(model, RECIPE.target_modules)}
    else:
        names = {n: n for n in names}
    weights = {key: model.get_submodule(n).weight for key, n in names.items()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        model.train()
        model(**batch).loss.backward()
        return {n: w.grad.detach().double().clone() for n, w in weights.items()}
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
        model.train(was_training)


def step_geometry(grads, model):
    """``gradient_dynamics.first_step_geometry``'s measures for a LoRA model as it stands (B != 0
    after training): per LoRA layer, the cosine of its SGD step with G (``step_cosine``) and the
    fraction of G it can express (``expressible_fraction``). grads: {LoRA layer name: G}, as
    ``weight_gradients(model, batch)`` returns. Returns {"layers", "cosine", "fraction"}."""
    layers = lt.lora_modules(model)
    row = {"layers": list(grads), "cosine": [], "fraction": []}
    for name, G in grads.items():
        m = layers[name]
        A, B = (t.detach().double().numpy() for t in (m.lora_A, m.lora_B))       # (r, k), (d, r)
        G = np.asarray(G, dtype=np.float64)
        row["cosine"].append(gradient_dynamics.step_cosine(G, A, B, m.scaling))
        row["fraction"].append(gradient_dynamics.expressible_fraction(G, A, B))
    return row


def loraplus_run(base, r, lr_ratio, seed=0, steps=100, lr=None, alpha=None, warmup=10, task="date",
                 n_test=None):
    """``recorded_fine_tune`` with LoRA+'s groups at eta_A = lr, eta_B = lr_ratio * lr, scored on
    held-out pairs. Returns {"loss": [training loss per step], "test_loss": held-out loss per answer
    byte (nats)}."""
    model, rec = recorded_fine_tune(base, r, steps, seed=seed, alpha=alpha, lr=lr, loraplus_ratio=lr_ratio,
                                    warmup=warmup, task=task)
    test = task_examples("test", RECIPE.n_test if n_test is None else n_test, seed=1, task=task)
    return {"loss": rec["loss"], "test_loss": loss_per_byte(model, test)}


def loraplus_sweep(base, r, ratios, seeds, steps, lr, alpha=None, **kwargs):
    """``loraplus_run`` for every ratio and seed: {ratio: {seed: run}}."""
    return {lam: {seed: loraplus_run(base, r, lam, seed=seed, steps=steps, lr=lr, alpha=alpha, **kwargs)
                  for seed in seeds} for lam in ratios}


# --------------------------------------------------------------------------- chapter 06: truncated updates


def with_updates(base, updates, rest=None):
    """A copy of ``rest`` (default ``base``) whose named linear layers hold W0 + ΔW, W0 from ``base``.

    updates: {module name: ΔW (d, k)}, a NumPy array or tensor of each layer's weight shape.
    rest: the model that gives every other parameter (for example the full fine-tune, whose
    embeddings, norms and output layer moved too); neither model is modified.
    The sum is formed in float64 and stored in the layer's dtype.
    """
    checked = {}
    for name, dW in updates.items():                                        # check all before copying
        w0 = base.get_submodule(name).weight                                # (d, k)
        dW = torch.as_tensor(np.asarray(dW.detach().cpu() if hasattr(dW, "detach") else dW, dtype=np.float64))
        if tuple(dW.shape) != tuple(w0.shape):
            raise ValueError(f"updates[{name!r}] has shape {tuple(dW.shape)}, the layer's weight {tuple(w0.shape)}")
        if not bool(torch.isfinite(dW).all()):
            raise ValueError(f"updates[{name!r}] has non-finite entries")
        checked[name] = dW
    model = copy.deepcopy(base if rest is None else rest)
    with torch.no_grad():
        for name, dW in checked.items():
            w0 = base.get_submodule(name).weight
            model.get_submodule(name).weight.copy_((w0.double() + dW).to(w0.dtype))   # W0 + ΔW
    return model


def truncation_scores(base, updates, ranks, task="date", rest=None):
    """{r: ``evaluate`` scores of W0 + ΔW_r on every layer of ``updates``} for each r in ``ranks``,
    ΔW_r = ``low_rank.truncate_updates(updates, r)``.

    rest=None: every other parameter is the base's, so the model differs from the base in exactly
    the layers LoRA adapts. rest=model: the other parameters are that model's (the full fine-tune).
    """
    return {r: evaluate(with_updates(base, low_rank.truncate_updates(updates, r), rest), task) for r in ranks}


# --------------------------------------------------------------------------- chapter 07: trained adapters


def lora_factors(model):
    """{layer name: A (r, k)} as float64 NumPy, for every LoRA layer of a lora_ref model."""
    return {name: m.lora_A.detach().double().numpy() for name, m in lt.lora_modules(model).items()}


def train_run(r, seed=0, base=None, task_scores=True, steps=None):
    """One standard fine-tune of the tiny model (``standard_fine_tune``: r=None is full
    fine-tuning, r=int LoRA at rank r), reduced to what the measurements need:

    {"dw": {layer name: ΔW (d, k) float64 tensor}, "A": lora_factors (LoRA only), "scores":
    ``evaluate``'s dict (only "text_loss_per_byte" when task_scores=False, which skips the
    slower task evaluation), "losses": the training loss of every step, "loss": the last one,
    "sec": training time}.
    ``steps`` (default: the recipe's 300) only for quick checks.
    """
    base = load_tiny_llama() if base is None else base
    model, run = standard_fine_tune(r, seed=seed, base=base, steps=steps)
    scores = (evaluate(model) if task_scores
              else {"text_loss_per_byte": text_loss_per_byte(model, held_out_text())})
    return {"dw": weight_updates(base, model), "A": lora_factors(model) if r is not None else {},
            "scores": scores, "losses": run["losses"], "loss": run["losses"][-1], "sec": run["seconds"]}


def measure_run(base, run, r, top_k=10, eps=0.5):
    """{layer name: ``adapter_geometry.measure_update``(W0 of ``base``, ΔW of ``run``, r)} for a
    ``train_run`` output."""
    return {name: adapter_geometry.measure_update(base.get_submodule(name).weight.detach(), dw, r, top_k, eps)
            for name, dw in run["dw"].items()}


def fine_tune_and_measure(r, seed=0, base=None, task_scores=True, top_k=10, eps=0.5, steps=None):
    """``train_run`` followed by ``measure_run``: the run's dict with "layers" added."""
    base = load_tiny_llama() if base is None else base
    run = train_run(r, seed, base, task_scores, steps)
    return {**run, "layers": measure_run(base, run, r, top_k, eps)}


# --------------------------------------------------------------------------- chapter 10: the variants


# init_lora_weights of PEFT's LoraConfig for each variant that is a LoRA init; MiLoRA (not in PEFT)
# starts from PEFT's default and has its factors replaced by lora_ref.torch.milora_init.
_PEFT_INIT = {"lora": True, "pissa": "pissa", "olora": "olora", "milora": True, "dora": True, "loraga": "lora_ga"}
VARIANT_NAMES = tuple(_PEFT_INIT) + ("vera",)


def peft_lora_layers(model):
    """{name: PEFT LoRA layer} of a PEFT model, in model order (the layers with ``lora_A``)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and "default" in getattr(m, "lora_A", {})}


def variant_model(base, variant, r, *, alpha=None, target_modules=None, seed=0, batch=None):
    """A PEFT model of a copy of ``base`` (never modified) with ``variant`` at rank r:

        "lora", "pissa", "olora", "dora"  ``LoraConfig`` with PEFT's init_lora_weights / use_dora
        "milora"                         PEFT's LoRA with A, B and the base replaced by ``milora_init``
        "loraga"                         ``preprocess_loraga`` on the loss of ``batch`` (default: the
                                         recipe's first batch for ``seed``), then ``init_lora_weights="lora_ga"``
        "vera"                           ``VeraConfig(r, projection_prng_key=seed)``
    alpha defaults to ``RECIPE.lora_alpha`` and target_modules to the recipe's ("all-linear"); the
    seed draws A (torch's generator, as PEFT does).
    """
    from peft import LoraConfig, VeraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    if variant not in VARIANT_NAMES:
        raise ValueError(f"variant must be one of {VARIANT_NAMES}, got {variant!r}")
    alpha = RECIPE.lora_alpha if alpha is None else alpha
    target_modules = RECIPE.target_modules if target_modules is None else target_modules
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if variant == "vera":
        return get_peft_model(model, VeraConfig(r=r, target_modules=target_modules, projection_prng_key=seed))
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=_PEFT_INIT[variant],
                        use_dora=variant == "dora", lora_ga_config=LoraGAConfig() if variant == "loraga" else None)
    if variant == "loraga":
        # preprocess_loraga matches target_modules by name and does not expand "all-linear" as
        # get_peft_model does: name the layers (the same ones, by lora_ref's copy of PEFT's rule)
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in lt.target_names(model, target_modules)})
        batch = recipe_batch(seed) if batch is None else batch
        with warnings.catch_warnings():               # PEFT's full backward hook on inputs without grads
            warnings.simplefilter("ignore", UserWarning)
            preprocess_loraga(model, config, lambda: model(**batch).loss.backward())
    model = get_peft_model(model, config)
    if variant == "milora":
        with torch.no_grad():
            for layer in peft_lora_layers(model).values():
                W0 = layer.base_layer.weight
                A, B, W_res = lt.milora_init(W0, r, layer.scaling["default"])
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
                W0.copy_(W_res)
    return model


def variant_fine_tune(variant, r, steps, *, seed=0, base=None, lr=None, alpha=None, target_modules=None,
                      task="date", on_step=None, after_step=None):
    """``variant_model`` trained with the recipe's batches and schedule (``lora_ref.tiny.train``):
    AdamW at ``lr`` (default ``RECIPE.lora_lr``), warm-up then cosine decay. Returns (model, run)."""
    base = load_tiny_llama() if base is None else base
    model = variant_model(base, variant, r, alpha=alpha, target_modules=target_modules, seed=seed)
    run = train(model, training_examples(task), steps, batch_size=RECIPE.batch_size,
                lr=RECIPE.lora_lr if lr is None else lr, seed=seed, on_step=on_step, after_step=after_step)
    return model, run


@torch.no_grad()
def effective_weight(module):
    """The (d, k) weight a linear module applies, whatever it is made of: nn.Linear, a LoRA or DoRA
    layer of PEFT or lora_ref (W0 + s B A, or diag(m / ||V||) V): module(I_k)^T minus its bias."""
    base = getattr(module, "base_layer", module)
    k = base.in_features
    eye = torch.eye(k, dtype=base.weight.dtype, device=base.weight.device)
    was_training = module.training
    module.eval()
    try:
        W = module(eye).T                                # (d, k)
    finally:
        module.train(was_training)
    return W - base.bias[:, None] if base.bias is not None else W


def _submodule(model, name):
    """``model.get_submodule(name)``, or the same module inside a PEFT model ("base_model.model." + name)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule("base_model.model." + name)


class EffectiveWeights:
    """An ``on_step`` hook that keeps the effective weight (``effective_weight``) of the modules
    ``names`` (named as in the plain model, also inside a PEFT model) at the steps in ``at``
    (before that step's update), float64 NumPy. ``result()`` returns {step: {name: W (d, k)}}."""

    def __init__(self, names, at):
        self.names, self.at, self.weights = list(names), set(at), {}

    def __call__(self, step, model, loss):
        if step in self.at:
            self.weights[step] = {n: effective_weight(_submodule(model, n)).double().numpy() for n in self.names}

    def result(self):
        return dict(sorted(self.weights.items()))


def first_step_cosines(model, grads):
    """For each PEFT LoRA layer as initialised, the cosine of the first SGD step of Delta W with the
    full fine-tuning step -G (``gradient_dynamics.step_cosine``, ch05's projected-step view).
    grads: {layer name without PEFT's prefix: G (d, k)}, from ``weight_gradients(base, batch)``.
    The model's output is the base's at init for every variant here, so G is the same for all.
    Returns {name: cosine}."""
    out = {}
    for name, layer in peft_lora_layers(model).items():
        key = name.removeprefix("base_model.model.")
        A = layer.lora_A["default"].weight.detach().double().numpy()       # (r, k)
        B = layer.lora_B["default"].weight.detach().double().numpy()       # (d, r)
        out[key] = gradient_dynamics.step_cosine(np.asarray(grads[key]), A, B, layer.scaling["default"])
    return out


class _PlantedLayers(torch.nn.Module):
    """n independent (w, w) linear layers side by side: y = [W_1 x_1, ..., W_n x_n]; forward(x, y)
    returns an object with ``.loss`` (the mean squared error), so PEFT's AdaLoRA adds its
    orthogonality penalty (it does only when the output has a loss, PEFT #432)."""

    def __init__(self, n, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(n))

    def forward(self, x, y):
        chunks = x.chunk(len(self.layers), dim=-1)
        out = torch.cat([layer(c) for layer, c in zip(self.layers, chunks)], dim=-1)
        return _Output(torch.nn.functional.mse_loss(out, y))


class _Output:
    def __init__(self, loss):
        self.loss = loss


def adalora_planted_run(needed=(1, 2, 6), width=32, init_r=6, steps=400, lr=2e-2, seed=0, record_every=10,
                        tinit=40, tfinal=80, delta_t=10, batch_size=64, allocate=True):
    """PEFT's AdaLoRA on layers that need different ranks: layer i's target is W0_i + Delta_i with
    rank(Delta_i) = needed[i] (Delta_i = U_i V_i^T, N(0, 1) / sqrt(width) factors). Every layer
    starts at init_r; the budget falls to target_r = sum(needed) / n per layer on average
    (``AdaLoraConfig``), and ``update_and_allocate`` runs after every optimizer step (PEFT's order);
    allocate=False leaves it out, and every layer keeps init_r (PEFT #1801).
    Returns {"steps": [...], "ranks": {step: [rank per layer]}, "needed", "losses", "budget", "scores":
    {layer: [``variants.adalora_triplet_scores`` at the final allocation, step steps - tfinal]}}."""
    from peft import AdaLoraConfig, get_peft_model

    n = len(needed)
    if sum(needed) % n:
        raise ValueError(f"AdaLoRA's budget is target_r per layer: sum(needed) = {sum(needed)} must divide by {n}")
    net = _PlantedLayers(n, width, seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = [layer.weight.detach() + torch.randn(width, q, generator=g) @ torch.randn(q, width, generator=g) / width**0.5
               for layer, q in zip(net.layers, needed)]

    def batches():
        while True:
            x = torch.randn(batch_size, n * width, generator=g)
            y = torch.cat([c @ W.T for c, W in zip(x.chunk(n, dim=-1), targets)], dim=-1)
            yield {"x": x, "y": y}

    config = AdaLoraConfig(init_r=init_r, target_r=sum(needed) // n, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                           total_step=steps, lora_alpha=init_r, target_modules=[f"layers.{i}" for i in range(n)])
    model = get_peft_model(net, config)
    ranks, scores = {}, {}

    def after_step(step, model):
        if allocate and step == steps - tfinal:     # the final allocation masks by these scores, then resets them
            allocator = model.base_model.rankallocator
            score = lambda name: (allocator.exp_avg_ipt[name] * allocator.exp_avg_unc[name]).double().numpy()
            for i in range(n):
                key = f"layers.{i}.%s.default"
                scores[i] = variants.adalora_triplet_scores(score(key % "lora_A"), score(key % "lora_E"),
                                                            score(key % "lora_B")).tolist()
        if allocate:
            model.base_model.update_and_allocate(step)
        if step % record_every == 0 or step == steps - 1:
            ranks[step] = [int((m.lora_E["default"] != 0).sum()) for m in peft_lora_layers(model).values()]

    run = train_steps(model, batches(), steps, optimizer=adamw(lr), warmup=0, min_lr_frac=1.0, after_step=after_step)
    return {"steps": sorted(ranks), "ranks": ranks, "needed": list(needed), "losses": run["losses"],
            "budget": sum(needed), "scores": scores}


# --------------------------------------------------------------------------- chapter 11: choosing hyperparameters


# Chapter 11's named target sets for PEFT's target_modules (lora_ref.targets' names and rules).
TARGET_SETS = {"qv": "qv", "attention": "attention", "mlp": ("gate_proj", "up_proj", "down_proj"),
               "all-linear": "all-linear"}


def _task_pairs(task, n_train=None):
    """(train pairs, scoring pairs) of a chapter 11 task: "date" or "iso" (the recipe's training
    pairs, or the first ``n_train`` of them; scored on the recipe's held-out pairs), or
    "facts-N" (``fact_examples(N)``, scored on the same N facts: memorisation)."""
    if task.startswith("facts-"):
        facts = fact_examples(int(task.split("-", 1)[1]))
        return facts, facts
    train_pairs = training_examples(task)
    if n_train is not None:
        if not 1 <= n_train <= len(train_pairs):
            raise ValueError(f"n_train must be in 1..{len(train_pairs)}, got n_train={n_train}")
        train_pairs = train_pairs[:n_train]
    return train_pairs, task_examples("test", RECIPE.n_test, seed=1, task=task)


def choice_run(base=None, *, r=None, lr, alpha=None, rslora=False, targets="all-linear", dropout=0.0,
               steps=100, batch_size=None, seed=0, task="date", n_train=None):
    """One fine-tune of chapter 11's sweeps: ``lora_ref.tiny.fine_tune`` of the tiny model, scored.

    r=None is full fine-tuning at ``lr``; r=int is LoRA at rank r with ``alpha`` (default
    ``RECIPE.lora_alpha``, so s = alpha / r; alpha / sqrt(r) with rslora) on ``targets`` (a key of
    TARGET_SETS or PEFT's target_modules) with ``dropout`` on the adapter's input. AdamW without
    weight decay, warm-up over the first tenth of the steps, cosine decay to 0, ``batch_size``
    pairs a step (default the recipe's 32). task: "date", "iso" or "facts-N" (``_task_pairs``),
    ``n_train`` the first pairs of the training set only.
    Returns {"loss": the training loss of each step, "test_loss": the loss per answer byte (nats) on
    the scoring pairs, "trainable": the number of trained parameters}.
    """
    base = load_tiny_llama() if base is None else base
    train_pairs, score_pairs = _task_pairs(task, n_train)
    kwargs = {}
    if r is not None:
        kwargs = dict(alpha=RECIPE.lora_alpha if alpha is None else alpha, rslora=rslora, dropout=dropout,
                      target_modules=TARGET_SETS.get(targets, targets))
    elif alpha is not None or rslora or dropout:
        raise ValueError("alpha, rslora and dropout are LoRA's: they need r (r=None is full fine-tuning)")
    model, run = fine_tune(base, train_pairs, steps, r=r, seed=seed, lr=lr, warmup=max(1, round(steps / 10)),
                           batch_size=RECIPE.batch_size if batch_size is None else batch_size, **kwargs)
    loss = run["losses"]
    return {"loss": loss, "test_loss": loss_per_byte(model, score_pairs),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def first_update_sizes(base, lrs, *, r=4, alpha=None, steps=5, seed=0, task="date"):
    """||W_t - W_0||_F over all adapted layers together after ``steps`` steps of full fine-tuning
    and of LoRA (rank r, alpha; ΔW = s B A) at each lr of ``lrs``, on the same batches, without
    warm-up: how far each method moves the weights at the start, per unit of learning rate.
    Returns {"full": [size at each lr], "lora": [...]}."""
    out = {"full": [], "lora": []}
    for method, rank in (("full", None), ("lora", r)):
        kwargs = {} if rank is None else dict(alpha=RECIPE.lora_alpha if alpha is None else alpha)
        for lr in lrs:
            model, _ = fine_tune(base, training_examples(task), steps, r=rank, seed=seed, lr=lr, warmup=0,
                                 batch_size=RECIPE.batch_size, **kwargs)
            dw = weight_updates(base, model)                        # {name: ΔW (d, k)}, the same layers
            out[method].append(float(torch.sqrt(sum((w**2).sum() for w in dw.values()))))
    return out
