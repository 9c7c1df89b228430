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
* chapter 07: ``lora_factors``, ``train_run``, ``measure_run`` and ``fine_tune_and_measure``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .. import adapter_geometry, gradient_dynamics, low_rank
from .. import torch as lt
from .data import example_batches, task_examples
from .model import load_tiny_llama
from .runs import RECIPE, evaluate, held_out_text, standard_fine_tune, training_examples, weight_updates
from .training import loss_per_byte, text_loss_per_byte

__all__ = [
    "FactorNorms", "recorded_fine_tune", "recipe_batch", "weight_gradients", "step_geometry", "loraplus_run",
    "loraplus_sweep", "with_updates", "truncation_scores", "lora_factors", "train_run", "measure_run",
    "fine_tune_and_measure",
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
