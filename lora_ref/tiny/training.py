"""Training and evaluation of the tiny model: one loop for pretraining, full fine-tuning and LoRA.

* ``lr_factor`` is the schedule: linear warm-up, then cosine decay to a floor.
* ``train_steps`` is the loop, the only one in the book: any optimizer (a factory; ``adamw``
  by default) over batches from any iterator, with the schedule, optional gradient clipping
  and an ``on_step`` hook that sees each step's gradients. ``tools/make_tiny_model.py``
  pretrains the shipped model with it, ``lora_ref.hub`` QLoRA-trains a hub model with it, and
  ``lora_ref.tiny.experiments`` records gradient norms through its hook.
* ``train`` fine-tunes on (prompt, answer) pairs from ``example_batches``;
  ``fine_tune`` is what a chapter calls: a full fine-tune, or LoRA at rank r, of a copy.
* ``loss_per_byte``, ``generate`` and ``exact_match`` evaluate on held-out pairs;
  ``text_loss_per_byte`` on raw text.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from .data import example_batches, make_batch
from .model import EOS_ID, decode, encode

__all__ = ["lr_factor", "adamw", "train_steps", "train", "fine_tune", "loss_per_byte", "text_loss_per_byte",
           "generate", "exact_match"]


# --------------------------------------------------------------------------- evaluation


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def loss_per_byte(model, examples, batch_size: int = 256) -> float:
    """Mean cross-entropy (nats) per answer byte, ``"\\n"`` included, over all ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in _batches(list(examples), batch_size):
        b = make_batch(chunk)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), b["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def text_loss_per_byte(model, text: str, seq_len: int = 256, max_windows: int = 8) -> float:
    """Mean next-byte cross-entropy (nats) over up to ``max_windows`` consecutive windows of
    ``seq_len`` bytes of ``text``. Uniform guessing gives log(256) = 5.545."""
    was_training = model.training
    model.eval()
    data = encode(text)
    n = min(max_windows, len(data) // seq_len)
    x = data[: n * seq_len].view(n, seq_len)
    logits = model(input_ids=x).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    model.train(was_training)
    return float(loss)


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 16, batch_size: int = 256):
    """Greedy continuations of ``prompts`` (strings), each cut at the first ``"\\n"``.

    Prompts of equal length are decoded together as one batch with a KV cache, so no
    padding (and no attention mask or position bookkeeping) is needed.
    """
    was_training = model.training
    model.eval()
    out = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.encode("utf-8")), []).append(i)
    for idx_all in by_len.values():
        for idx in _batches(idx_all, batch_size):
            ids = torch.stack([encode(prompts[i]) for i in idx])
            res = model(input_ids=ids, use_cache=True)
            past = res.past_key_values
            tok = res.logits[:, -1].argmax(-1)
            gen = [tok]
            done = tok == EOS_ID
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    break
                res = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = res.logits[:, -1].argmax(-1)
                gen.append(tok)
                done |= tok == EOS_ID
            gen = torch.stack(gen, 1).tolist()
            for i, g in zip(idx, gen):
                if EOS_ID in g:
                    g = g[: g.index(EOS_ID)]
                out[i] = decode(g)
    model.train(was_training)
    return out


def exact_match(model, examples, max_new_tokens: int | None = None) -> float:
    """Fraction of (prompt, answer) pairs whose greedy continuation is exactly ``answer``
    (generation stops at ``"\\n"``; by default after len(answer) + 1 bytes)."""
    examples = list(examples)
    if max_new_tokens is None:
        max_new_tokens = max(len(a.encode("utf-8")) for _, a in examples) + 1
    preds = generate(model, [p for p, _ in examples], max_new_tokens=max_new_tokens)
    return sum(p == a for p, (_, a) in zip(preds, examples)) / len(examples)


# --------------------------------------------------------------------------- training


def _quiet():
    """True in the book build, under nbval and in CI: LORA_BOOK_QUIET=1 (``make`` exports it for
    the build, nbval and ``make execute``) or CI=true (set by GitHub Actions and most CI systems)."""
    import os

    return os.environ.get("LORA_BOOK_QUIET") == "1" or os.environ.get("CI", "").lower() in ("true", "1")


def _live_reader():
    """True only where a person watches: Colab, a kernel started by a Jupyter server (JupyterLab,
    Notebook 7 and VS Code's server mode set JPY_SESSION_NAME for each kernel), or a terminal.

    A kernel that nbval, nbclient or the book build starts through jupyter_client directly has
    none of these, so with no environment set at all it draws no bar: a widget bar's messages
    can stall nbval's 5 s output reader, and a text bar changes a cell's output on every run.
    """
    import os
    import sys

    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return True
    if os.environ.get("JPY_SESSION_NAME"):
        return True
    stderr = sys.stderr
    return bool(stderr is not None and getattr(stderr, "isatty", None) and stderr.isatty())


def _progress_bar(steps, enabled):
    """A tqdm.auto bar (a widget in Jupyter, text in a terminal) for a live reader (_live_reader);
    None when not ``enabled``, when quiet (_quiet) or when nobody watches, so the committed and
    checked outputs hold no bar.
    """
    if not enabled or _quiet() or not _live_reader():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="training", leave=False)


def lr_factor(step, steps, warmup, min_lr_frac=0.0):
    """The learning rate at ``step`` as a fraction of its peak.

    step < warmup:  (step + 1) / warmup                                   linear warm-up
    afterwards:     f + (1 - f) (1 + cos(pi t)) / 2,  t = (step - warmup) / (steps - warmup)
    with f = min_lr_frac: cosine decay from 1 to f over the remaining steps.
    """
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def adamw(lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), decay_matrices_only: bool = False):
    """An optimizer factory for ``train_steps``: ``model -> torch.optim.AdamW`` over the model's
    trainable parameters at peak learning rate ``lr``.

    decay_matrices_only: weight decay on parameters with ndim >= 2 only (not norms, biases)
    """
    def make(model):
        params = [p for p in model.parameters() if p.requires_grad]
        if decay_matrices_only:
            groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        else:
            groups = [{"params": params, "weight_decay": weight_decay}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    return make


def train_steps(model, batches, steps: int, *, optimizer, warmup: int = 10, min_lr_frac: float = 0.0,
                clip_norm: float | None = None, on_step=None, after_step=None, log_every: int = 0,
                progress: bool = False):
    """``steps`` optimizer steps on ``model``, one batch each: the book's one training loop.

    batches:   an iterator of dicts of model inputs with ``labels`` (``model(**batch).loss``)
    optimizer: a factory ``model -> torch.optim.Optimizer`` over the parameters to train, at their
               peak learning rates: ``adamw(lr)``, ``lora_ref.torch.loraplus_optimizer`` in a
               lambda, or bitsandbytes' PagedAdamW8bit (``lora_ref.hub``)
    schedule:  every group's lr times ``lr_factor(step, steps, warmup, min_lr_frac)``
               (warmup=0, min_lr_frac=1: constant)
    clip_norm: clip the global gradient norm to this value before each step
    on_step:   ``on_step(step, model, loss)``, called after the backward pass (and the clipping),
               before the optimizer step: the gradients are this step's, the parameters still
               those the loss was computed with
    after_step: ``after_step(step, model)``, called after the optimizer step, while the gradients
               are still there: AdaLoRA's ``update_and_allocate`` goes here, as PEFT's docs order it
    Returns ``{"losses": [loss of each step], "seconds": wall time}``; the model ends in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
    if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a factory model -> torch.optim.Optimizer (for example "
                        f"lora_ref.tiny.adamw(lr)), got {type(optimizer).__name__}")
    opt = optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warmup, min_lr_frac))
    model.train()
    losses, t0 = [], time.perf_counter()
    bar = _progress_bar(steps, progress)
    for step in range(steps):
        loss = model(**next(batches)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model, losses[-1])
        opt.step()
        if after_step is not None:
            after_step(step, model)
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.1f} s", flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0}


def train(model, examples, steps: int, batch_size: int = 32, lr: float = 5e-3,
          weight_decay: float = 0.0, warmup: int = 10, seed: int = 0, log_every: int = 0,
          progress: bool = False, optimizer=None, on_step=None, after_step=None):
    """Fine-tune ``model`` (all its trainable parameters: a PEFT or lora_ref model trains only
    the LoRA factors) on (prompt, answer) pairs with ``train_steps``.

    Batches of ``batch_size`` pairs come from ``example_batches(examples, batch_size, seed)``;
    warm-up then cosine decay to 0. The optimizer is AdamW at ``lr`` with ``weight_decay``, or
    the factory ``optimizer`` (then ``lr`` and ``weight_decay`` are the factory's business and
    must stay at their defaults). ``on_step`` and ``after_step`` go to ``train_steps``.
    Returns ``{"losses": [...], "seconds": s}``. ``progress=True`` shows a tqdm.auto bar,
    except in the book build, nbval and CI (see _quiet).
    """
    if optimizer is None:
        optimizer = adamw(lr, weight_decay)
    elif (lr, weight_decay) != (5e-3, 0.0):
        raise ValueError(f"pass lr and weight_decay to the optimizer factory, not to train "
                         f"(got lr={lr}, weight_decay={weight_decay} with optimizer=...)")
    return train_steps(model, example_batches(examples, batch_size, seed), steps, optimizer=optimizer,
                       warmup=warmup, on_step=on_step, after_step=after_step, log_every=log_every,
                       progress=progress)


def fine_tune(model, examples, steps: int, *, r: int | None = None, alpha: float | None = None,
              target_modules="all-linear", rslora: bool = False, dropout: float = 0.0, seed: int = 0,
              **train_kwargs):
    """A fine-tuned COPY of ``model`` and its run: ``(model, {"losses", "seconds"})``.

    r=None: full fine-tuning, every parameter trains.
    r=int:  LoRA (``lora_ref.torch.add_lora``) at rank r with alpha (default 2 r) on
            ``target_modules``, ``dropout`` on the adapter's input (PEFT's ``lora_dropout``);
            A is drawn from torch's generator seeded with ``seed``.
    The same ``seed`` also orders the batches, so one seed fixes the whole run on one machine.
    """
    from .. import torch as lt

    if r is None and dropout:
        raise ValueError(f"dropout={dropout} is LoRA's lora_dropout: it needs r (full fine-tuning has no adapter)")
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    if r is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lt.add_lora(model, target_modules, r=r, alpha=2 * r if alpha is None else alpha, dropout=dropout,
                    rslora=rslora)
    run = train(model, examples, steps, seed=seed, **train_kwargs)
    return model, run
