"""The gradients of LoRA and what they imply for training (chapter 05).

Conventions (PEFT's, and the book's): W0: (d, k), A: (r, k), B: (d, r), s the scaling,
G = dL/dW (d, k) the gradient at the weight, the step of full fine-tuning.
The factor gradients are ``lora_ref.numpy.lora_grads``; this module holds what the chapter
derives from them:

* the geometry of one SGD step: how much of G LoRA's step can express (a projection onto the
  tangent space of {s B A}), the cosine between LoRA's step and full fine-tuning's, and the
  Eckart-Young bound for a rank-r step;
* the cost of the backward pass of one layer: multiply-accumulates and the activations saved;
* the tiny model's first steps (the gradient norms of A and B per layer) and the LoRA+ sweep.

The closed forms need only NumPy; the training functions import torch and ``lora_ref.tiny``
when called.
"""

from __future__ import annotations

import math
import random

import numpy as np

from . import _checks
from . import numpy as ln

__all__ = [
    "central_difference_grads", "row_space_projector", "tangent_projection", "expressible_fraction",
    "step_cosine", "best_rank_fraction", "random_init_fraction_sq", "training_macs", "saved_activations",
    "lora_model", "task_batches", "train_recorded", "weight_gradients", "loraplus_run", "loraplus_sweep",
    "first_step_reaching", "adam_first_step", "total_norm", "first_step_geometry", "step_geometry",
]


def _as2d(name, M):
    M = np.asarray(M, dtype=np.float64)
    _checks.check_ndim(name, M.shape, 2)
    return M


# --------------------------------------------------------------------------- gradients


def central_difference_grads(loss, A, B, h=1e-6):
    """(dL/dA, dL/dB) of a scalar ``loss(A, B)`` by central differences, entry by entry:

        dL/dA_ij ~ (L(A + h e_ij, B) - L(A - h e_ij, B)) / (2h),   error O(h^2) + O(eps / h).

    An oracle for ``lora_grads`` that knows nothing of the chain rule. A: (r, k), B: (d, r), float64.
    """
    A, B = _as2d("A", A).copy(), _as2d("B", B).copy()
    _checks.check_factors(A.shape, B.shape)
    _checks.check_finite_scalar("h", h)
    grads = []
    for M in (A, B):
        g = np.zeros_like(M)
        for idx in np.ndindex(M.shape):
            old = M[idx]
            M[idx] = old + h
            plus = float(loss(A, B))
            M[idx] = old - h
            minus = float(loss(A, B))
            M[idx] = old
            g[idx] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads[0], grads[1]


def adam_first_step(beta1=0.9, beta2=0.999, t=1):
    """|Adam's step| / lr, entry by entry (eps -> 0), for a parameter whose gradient is exactly 0 for
    its first t - 1 steps and g != 0 at step t: then m_t = (1 - beta1) g and v_t = (1 - beta2) g^2,
    and the bias corrections divide them by 1 - beta1^t and 1 - beta2^t, so

        |step| / lr = [(1 - beta1) / (1 - beta1^t)] / sqrt[(1 - beta2) / (1 - beta2^t)],

    whatever the size of g. t = 1: 1 (B's first step from B = 0); t = 2: sqrt(1 + beta2) / (1 + beta1),
    A's first step (0.744 for PyTorch's betas).

    Book: eq-ch05-adam-a (notebooks/05_gradients).
    """
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        _checks.check_finite_scalar(name, b)
        if not 0 <= b < 1:
            raise ValueError(f"{name} must be in [0, 1), got {name}={b}")
    _checks.check_dim("t", t)
    return ((1 - beta1) / (1 - beta1**t)) / math.sqrt((1 - beta2) / (1 - beta2**t))


# --------------------------------------------------------------------------- one step's geometry


def row_space_projector(M, rtol=1e-10):
    """The orthogonal projector onto the row space of M (m, n): an (n, n) matrix V V^T, with V the
    right singular vectors of the singular values above rtol * sigma_1 (0 when M = 0)."""
    M = _as2d("M", M)
    _, sigma, Vt = np.linalg.svd(M, full_matrices=False)      # Vt: (min(m, n), n)
    keep = sigma > rtol * sigma[0] if sigma.size and sigma[0] > 0 else np.zeros(sigma.shape, bool)
    V = Vt[keep].T                                            # (n, rank)
    return V @ V.T                                            # (n, n)


def tangent_projection(grad_W, A, B):
    """P_T(G): the orthogonal projection of G onto the directions ΔW = s B A can move in one step,

        T = {U A + B V : U (d, r), V (r, k)},    P_T(G) = G P_A + P_B G - P_B G P_A,

    with P_A (k, k) the projector onto the row space of A and P_B (d, d) onto the column space of B.
    At B = 0, P_B = 0 and P_T(G) = G P_A.

    Book: eq-ch05-tangent (notebooks/05_gradients).
    """
    G = _as2d("grad_W", grad_W)
    _checks.check_weight_and_factors(G.shape, np.shape(A), np.shape(B), W_name="grad_W")
    P_A = row_space_projector(A)                              # (k, k)
    P_B = row_space_projector(np.asarray(B, dtype=np.float64).T)   # (d, d): the row space of B^T
    GP = G @ P_A                                              # (d, k)
    return GP + P_B @ G - P_B @ GP                            # (d, k)


def expressible_fraction(grad_W, A, B):
    """||P_T(G)||_F / ||G||_F in [0, 1]: the largest cosine any first-order change of s B A can have
    with G (Cauchy-Schwarz), so an upper bound on ``step_cosine``.

    Book: eq-ch05-tangent, prop-ch05-projected (notebooks/05_gradients).
    """
    G = _as2d("grad_W", grad_W)
    norm = np.linalg.norm(G)
    if norm == 0:
        raise ValueError("grad_W is zero: the fraction of it a step expresses is undefined")
    return float(np.linalg.norm(tangent_projection(G, A, B)) / norm)


def step_cosine(grad_W, A, B, scaling):
    """The cosine between LoRA's first-order SGD step on Delta W and full fine-tuning's step -lr G:

        cos = <-(G A^T A + B B^T G), -G> / (||G A^T A + B B^T G||_F ||G||_F),

    from ``delta_w_sgd_step`` (the positive factor lr s^2 cancels). Zero when the step is zero.

    Book: eq-ch03-sgd-step (notebooks/03_scaling). Book: prop-ch05-projected (notebooks/05_gradients).
    """
    G = _as2d("grad_W", grad_W)
    step = ln.delta_w_sgd_step(G, np.asarray(A, np.float64), np.asarray(B, np.float64), scaling, 1.0)  # (d, k)
    denom = np.linalg.norm(step) * np.linalg.norm(G)
    return 0.0 if denom == 0 else float(np.sum(step * -G) / denom)


def best_rank_fraction(grad_W, r):
    """The largest ||P(G)||_F / ||G||_F over rank-r matrices P(G) (Eckart-Young):
    sqrt(sum_{i<=r} sigma_i^2 / sum_i sigma_i^2), sigma the singular values of G. A step from B = 0
    is G P_A, of rank <= r, so this bounds ``expressible_fraction`` there.

    Book: eq-ch05-fractions (notebooks/05_gradients).
    """
    G = _as2d("grad_W", grad_W)
    _checks.check_rank(r, *G.shape)
    sigma2 = np.linalg.svd(G, compute_uv=False) ** 2
    return float(math.sqrt(sigma2[:r].sum() / sigma2.sum()))


def random_init_fraction_sq(r, k):
    """E ||G P_A||_F^2 / ||G||_F^2 = r / k for A with i.i.d. entries of a symmetric law (PEFT's init),
    whatever G: E[P_A] = (r / k) I by symmetry.

    Book: eq-ch05-fractions (notebooks/05_gradients).
    """
    _checks.check_dim("k", k)
    _checks.check_rank(r, k, k)
    return r / k


def first_step_geometry(grads, ranks, seed=0):
    """LoRA's first SGD step from B = 0 against full fine-tuning's, layer by layer, for each rank.

    grads: {layer: G (d, k)}. For each r and layer i, A is drawn as PEFT draws it (``init_lora`` with
    seed ``seed + i``, so A at rank r is the first r rows of A at a larger rank) and B = 0.
    Returns {r: {"layers", "cosine", "fraction", "best"}}, one value per layer: ``step_cosine``,
    ``expressible_fraction`` and ``best_rank_fraction``, computed at B = 0 where they simplify to
    cos(G A^T A, G), ||G P_A|| / ||G|| and the singular values of G (found once per layer).
    """
    Gs = [_as2d("G", G) for G in grads.values()]
    energy = [np.cumsum(np.linalg.svd(G, compute_uv=False) ** 2) for G in Gs]   # sum_{i<=r} sigma_i^2, once
    out = {}
    for r in ranks:
        row = {"layers": list(grads), "cosine": [], "fraction": [], "best": []}
        for i, (G, e) in enumerate(zip(Gs, energy)):
            _checks.check_rank(r, *G.shape)
            A = ln.init_lora(G.shape[0], G.shape[1], r, seed=seed + i)[0]   # (r, k) kaiming; B = 0
            GAtA = (G @ A.T) @ A                                           # (d, k): the step, up to -lr s^2
            row["cosine"].append(float(np.sum(GAtA * G) / (np.linalg.norm(GAtA) * np.linalg.norm(G))))
            row["fraction"].append(float(np.linalg.norm(G @ row_space_projector(A)) / np.linalg.norm(G)))
            row["best"].append(float(math.sqrt(e[r - 1] / e[-1])))         # best_rank_fraction(G, r)
        out[r] = row
    return out


def step_geometry(grads, model):
    """The same for a LoRA model as it stands (B != 0 after training): per LoRA layer, the cosine of its
    SGD step with G and the fraction of G it can express. grads: {LoRA layer name: G}, as
    ``weight_gradients(model, batch)`` returns. Returns {"layers", "cosine", "fraction"}."""
    from . import torch as lt

    layers = lt.lora_modules(model)
    row = {"layers": list(grads), "cosine": [], "fraction": []}
    for name, G in grads.items():
        m = layers[name]
        A, B = (np.asarray(t.detach().double().numpy()) for t in (m.lora_A, m.lora_B))    # (r, k), (d, r)
        G = np.asarray(G, dtype=np.float64)
        row["cosine"].append(step_cosine(G, A, B, m.scaling))
        row["fraction"].append(expressible_fraction(G, A, B))
    return row


# --------------------------------------------------------------------------- backward cost


def training_macs(T, d, k, r=None, input_grad=True):
    """Multiply-accumulates of one forward and backward pass of a (d, k) linear layer on T tokens.

    r=None, the layer trained in full:     forward T d k;  backward  dL/dx = Ybar W (T d k, if
                                            input_grad)  +  dL/dW = Ybar^T x (T d k)
    r=int, LoRA with W0 frozen:            forward T d k + T r (k + d);  backward  dL/dx = Ybar W0 +
                                            (s Ybar B) A (T d k + T r k, if input_grad)  +
                                            dL/dB = s Ybar^T z (T d r) + dL/dz = s Ybar B (T d r) +
                                            dL/dA = (dL/dz)^T x (T r k);  no dL/dW0 (T d k saved)
    Returns {"forward", "backward_input", "backward_weights", "total"} in MACs (a FLOP counter
    counts 2 FLOPs per MAC).

    Book: eq-ch05-macs (notebooks/05_gradients).
    """
    for name, v in (("T", T), ("d", d), ("k", k)):
        _checks.check_dim(name, v)
    if r is not None:
        _checks.check_rank(r, d, k)
    base = T * d * k
    if r is None:
        out = {"forward": base, "backward_input": base if input_grad else 0, "backward_weights": base}
    else:
        out = {"forward": base + T * r * (k + d),
               "backward_input": base + T * r * k if input_grad else 0,
               "backward_weights": 2 * T * d * r + T * r * k}
    out["total"] = out["forward"] + out["backward_input"] + out["backward_weights"]
    return out


def saved_activations(T, k, r=None):
    """Elements of activations one linear layer keeps for its backward pass (weights not counted).

    r=None (trained in full): x (T, k), for dL/dW = Ybar^T x.
    r=int (LoRA, W0 frozen):  x (T, k), for dL/dA; and z = A x (T, r), for dL/dB. The frozen W0
                              needs no x: dL/dx = Ybar W0 uses the weight only.

    Book: eq-ch05-memory (notebooks/05_gradients).
    """
    _checks.check_dim("T", T)
    _checks.check_dim("k", k)
    if r is not None:
        _checks.check_rank(r)
    return T * k + (0 if r is None else T * r)


# --------------------------------------------------------------------------- the tiny model


def lora_model(base, r, alpha=None, seed=0, target_modules=None, rslora=False):
    """A LoRA copy of ``base`` as ``lora_ref.tiny.fine_tune`` makes it: a deep copy, torch's generator
    seeded with ``seed``, then ``lora_ref.torch.add_lora`` (defaults: the recipe's alpha and targets)."""
    import copy

    import torch

    from . import torch as lt
    from .tiny import RECIPE

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    return lt.add_lora(model, RECIPE.target_modules if target_modules is None else target_modules, r=r,
                       alpha=RECIPE.lora_alpha if alpha is None else alpha, rslora=rslora)


def task_batches(seed=0, task="date", batch_size=None, n_train=None):
    """Endless training batches of the task, in the order ``lora_ref.tiny.train`` uses for ``seed``:
    the recipe's training pairs (data seed 0), shuffled once with random.Random(seed), cycled."""
    from .tiny import RECIPE, make_batch, task_examples

    batch_size = RECIPE.batch_size if batch_size is None else batch_size
    examples = task_examples("train", RECIPE.n_train if n_train is None else n_train, seed=0, task=task)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pos = 0
    while True:
        yield make_batch([examples[order[(pos + i) % len(order)]] for i in range(batch_size)])
        pos += batch_size


def train_recorded(model, optimizer, batches, steps, warmup=10):
    """``steps`` steps of ``lora_ref.tiny.train_steps``'s loop (its warm-up and cosine schedule, its order
    of operations) with any optimizer over the model's LoRA factors, recording before each step, for
    every LoRA layer (columns in ``lora_modules`` order):

        grad_A, grad_B: ||dL/dA||_F, ||dL/dB||_F          moved_A: ||A - A_0||_F      norm_B: ||B||_F

    Returns {"layers": [names], "loss": [...], "grad_A": (steps, n) array, ...}; the model ends in eval mode.
    """
    import torch

    from . import torch as lt
    from .tiny import lr_factor

    _checks.check_dim("steps", steps)
    layers = lt.lora_modules(model)
    if not layers:
        raise ValueError("train_recorded needs a model with LoRA layers (lora_ref.torch.add_lora)")
    A0 = [m.lora_A.detach().clone() for m in layers.values()]
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, steps, warmup))
    out = {"layers": list(layers), "loss": [], "grad_A": [], "grad_B": [], "moved_A": [], "norm_B": []}
    model.train()
    for _ in range(steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            out["grad_A"].append([float(m.lora_A.grad.norm()) for m in layers.values()])
            out["grad_B"].append([float(m.lora_B.grad.norm()) for m in layers.values()])
            out["moved_A"].append([float((m.lora_A - a0).norm()) for m, a0 in zip(layers.values(), A0)])
            out["norm_B"].append([float(m.lora_B.norm()) for m in layers.values()])
        optimizer.step()
        sched.step()
        out["loss"].append(loss.item())
    model.eval()
    for key in ("grad_A", "grad_B", "moved_A", "norm_B"):
        out[key] = np.asarray(out[key])                       # (steps, n_layers)
    return out


def weight_gradients(model, batch, names=None):
    """{name: G = dL/dW (d, k), float64} of the model's loss on one batch, for the nn.Linear layers
    ``names``. Default: in a LoRA model, the base layer of every LoRA layer (keyed by the LoRA
    layer's name; dL/dW0 = dL/dW since W = W0 + s B A); otherwise every layer LoRA would adapt
    (every linear layer but the output layer). The requires_grad flags are restored and every .grad
    is cleared."""
    from . import torch as lt
    from .tiny import RECIPE

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


def loraplus_run(base, r, lr_ratio, seed=0, steps=100, lr=None, alpha=None, warmup=10, task="date",
                 n_test=None):
    """Fine-tune a LoRA copy of ``base`` for ``steps`` steps of AdamW with LoRA+'s groups
    (``lora_ref.torch.loraplus_optimizer``: eta_A = lr, eta_B = lr_ratio * lr), the recipe's batches
    and schedule otherwise. Returns {"loss": [training loss per step], "test_loss": held-out loss per
    answer byte (nats)}."""
    import torch

    from . import torch as lt
    from .tiny import RECIPE, loss_per_byte, task_examples

    model = lora_model(base, r, alpha=alpha, seed=seed)
    opt = lt.loraplus_optimizer(model, torch.optim.AdamW, lr=RECIPE.lora_lr if lr is None else lr,
                                loraplus_lr_ratio=lr_ratio)
    run = train_recorded(model, opt, task_batches(seed, task), steps, warmup=warmup)
    test = task_examples("test", RECIPE.n_test if n_test is None else n_test, seed=1, task=task)
    return {"loss": run["loss"], "test_loss": loss_per_byte(model, test)}


def loraplus_sweep(base, r, ratios, seeds, steps, lr, alpha=None, **kwargs):
    """``loraplus_run`` for every ratio and seed: {ratio: {seed: run}}."""
    return {lam: {seed: loraplus_run(base, r, lam, seed=seed, steps=steps, lr=lr, alpha=alpha, **kwargs)
                  for seed in seeds} for lam in ratios}


def total_norm(per_layer):
    """sqrt(sum over layers of norm^2): the Frobenius norm of all layers' matrices together, at each step.
    per_layer: (steps, n_layers), as ``train_recorded`` returns -> (steps,)."""
    a = np.asarray(per_layer, dtype=np.float64)
    _checks.check_ndim("per_layer", a.shape, 2)
    return np.sqrt((a**2).sum(axis=1))


def first_step_reaching(values, threshold):
    """The first index t with values[t] >= threshold (None if none): how long a quantity stays below it."""
    for t, v in enumerate(values):
        if v >= threshold:
            return t
    return None
