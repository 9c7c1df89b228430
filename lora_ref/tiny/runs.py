"""The book's standard fine-tunes of the tiny model: one recipe, one function.

Chapters that compare full fine-tuning with LoRA (the rank of a fine-tune, what trained
adapters look like, combining adapters) all train through ``standard_fine_tune``, so that
their numbers describe the same runs:

* full fine-tuning (r=None): every parameter trains, AdamW at ``RECIPE.full_lr``;
* LoRA at rank r: ``lora_ref.torch.add_lora`` on every linear layer but the output layer,
  alpha = ``RECIPE.lora_alpha`` at every r (so s = alpha / r), AdamW at ``RECIPE.lora_lr``.

Why alpha is fixed rather than 2r: under Adam each entry of A and B moves by about the
learning rate per step, so the first steps change ΔW = s B A by about s * r * lr per entry
of the sum over r. Keeping s * r = alpha fixed keeps that size fixed across r (chapter 03's
argument); with alpha = 2r the r = 64 run at the same learning rate diverges.

``weight_updates`` returns the ΔW of every adapted layer, W_ft - W0 for a full fine-tune and
s B A for LoRA, keyed by the same layer names, and ``evaluate`` scores a model on the task's
held-out split and on held-out pretraining text (forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import corpus, task_examples
from .model import load_tiny_llama
from .training import exact_match, fine_tune, loss_per_byte, text_loss_per_byte

__all__ = ["Recipe", "RECIPE", "training_examples", "standard_fine_tune", "weight_updates", "evaluate", "held_out_text"]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of the standard runs (300 steps of 32 examples: 12 s on 2 cores)."""
    steps: int = 300
    batch_size: int = 32
    n_train: int = 4000          # training pairs drawn with data seed 0
    n_test: int = 200            # held-out pairs drawn with data seed 1
    full_lr: float = 1e-3
    lora_lr: float = 5e-3
    lora_alpha: float = 16.0
    target_modules: str = "all-linear"


RECIPE = Recipe()


def training_examples(task: str = "date", recipe: Recipe = RECIPE):
    """The recipe's training pairs of ``task``: ``recipe.n_train`` pairs drawn with data seed 0, the
    same for every run seed (the run seed orders them, in ``example_batches``)."""
    return task_examples("train", recipe.n_train, seed=0, task=task)


def standard_fine_tune(r: int | None = None, seed: int = 0, task: str = "date", *, base=None,
                       steps: int | None = None, recipe: Recipe = RECIPE, **overrides):
    """Fine-tune a copy of the tiny model on ``task`` with the book's recipe.

    r=None is full fine-tuning, r=int is LoRA at rank r (alpha = recipe.lora_alpha).
    ``seed`` draws A and orders the batches; the training pairs are the same for every seed.
    ``base`` (default: the shipped tiny model) is never modified. ``overrides`` go to
    ``lora_ref.tiny.fine_tune`` (for example ``lr=``, ``alpha=``, ``target_modules=``, or
    ``optimizer=`` and ``on_step=``, as ``lora_ref.tiny.experiments`` passes them).
    Returns ``(model, run)`` with run = {"losses", "seconds"}.
    """
    if r is not None and (not isinstance(r, int) or r < 1):
        raise ValueError(f"r must be None (full fine-tuning) or a positive int, got {r!r}")
    base = load_tiny_llama() if base is None else base
    kwargs = dict(batch_size=recipe.batch_size)
    if "optimizer" not in overrides:                  # a factory brings its own learning rates
        kwargs["lr"] = recipe.full_lr if r is None else recipe.lora_lr
    if r is not None:
        kwargs.update(alpha=recipe.lora_alpha, target_modules=recipe.target_modules)
    kwargs.update(overrides)
    return fine_tune(base, training_examples(task, recipe), recipe.steps if steps is None else steps, r=r, seed=seed, **kwargs)


@torch.no_grad()
def weight_updates(base, tuned) -> dict[str, torch.Tensor]:
    """{layer name: ΔW (d, k), float64} for every layer that ``tuned`` adapts.

    LoRA model (has LoRALinear layers): ΔW = s B A of each adapter, from its factors.
    Full fine-tune: ΔW = W_ft - W0 of every nn.Linear that ``recipe.target_modules`` would
    adapt (all linear layers but the output layer), so the two kinds share keys.
    """
    from .. import torch as lt

    adapters = lt.lora_modules(tuned)
    if adapters:
        return {name: (m.scaling * (m.lora_B.double() @ m.lora_A.double())) for name, m in adapters.items()}
    w0 = dict(base.named_modules())
    names = lt.target_names(base, RECIPE.target_modules)
    out = {}
    for name in names:
        w_ft = tuned.get_submodule(name).weight.double()
        out[name] = w_ft - w0[name].weight.double()
    return out


def held_out_text(n_bytes: int = 20_000) -> str:
    """Pretraining-style text the tiny model was not trained on (corpus seed 1, as in
    ``tools/make_tiny_model.py``'s held-out score), for measuring forgetting."""
    return corpus(n_bytes, seed=1)


def evaluate(model, task: str = "date", recipe: Recipe = RECIPE) -> dict[str, float]:
    """Held-out scores: the task's loss per answer byte and exact match, and the loss per byte
    on held-out pretraining text (a rise is forgetting)."""
    test = task_examples("test", recipe.n_test, seed=1, task=task)
    return {"loss_per_byte": loss_per_byte(model, test), "exact_match": exact_match(model, test),
            "text_loss_per_byte": text_loss_per_byte(model, held_out_text())}
