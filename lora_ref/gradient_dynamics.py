"""The gradients of LoRA and what they imply for training (chapter 05).

Conventions (PEFT's, and the book's): W0: (d, k), A: (r, k), B: (d, r), s the scaling,
G = dL/dW (d, k) the gradient at the weight, the step of full fine-tuning.
The factor gradients are ``lora_ref.numpy.lora_grads``; this module holds what the chapter
derives from them:

* the geometry of one SGD step: how much of G LoRA's step can express (a projection onto the
  tangent space of {s B A}), the cosine between LoRA's step and full fine-tuning's, and the
  Eckart-Young bound for a rank-r step;
* the cost of the backward pass of one layer: multiply-accumulates and the activations saved;
* ``total_norm`` and ``first_step_reaching``, to read the per-layer records of a run.

Everything here needs only NumPy. The runs on the tiny model (the recorded first steps, the
weight gradients, the LoRA+ sweep) are ``lora_ref.tiny.experiments``.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks
from . import numpy as ln

__all__ = [
    "central_difference_grads", "row_space_projector", "tangent_projection", "expressible_fraction",
    "step_cosine", "best_rank_fraction", "random_init_fraction_sq", "training_macs", "saved_activations",
    "first_step_reaching", "adam_first_step", "total_norm", "first_step_geometry",
]


def _as2d(name, M):
    M = np.asarray(M, dtype=np.float64)
    _checks.check_ndim(name, M.shape, 2)
    return M


# --------------------------------------------------------------------------- gradients


def central_difference_grads(loss, A, B, eps=1e-6):
    """(dL/dA, dL/dB) of a scalar ``loss(A, B)`` by central differences, entry by entry:

        dL/dA_ij ~ (L(A + eps e_ij, B) - L(A - eps e_ij, B)) / (2 eps),   error O(eps^2) + O(u / eps),

    u the float64 rounding unit (eps is the step, not Adam's epsilon; h is the hidden size).

    An oracle for ``lora_grads`` that knows nothing of the chain rule. A: (r, k), B: (d, r), float64.
    """
    A, B = _as2d("A", A).copy(), _as2d("B", B).copy()
    _checks.check_factors(A.shape, B.shape)
    _checks.check_finite_scalar("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps, the finite-difference step, must be > 0, got eps={eps}")
    grads = []
    for M in (A, B):
        g = np.zeros_like(M)
        for idx in np.ndindex(M.shape):
            old = M[idx]
            M[idx] = old + eps
            plus = float(loss(A, B))
            M[idx] = old - eps
            minus = float(loss(A, B))
            M[idx] = old
            g[idx] = (plus - minus) / (2 * eps)
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


def total_norm(per_layer):
    """sqrt(sum over layers of norm^2): the Frobenius norm of all layers' matrices together, at each step.
    per_layer: (steps, n_layers), as ``tiny.experiments.FactorNorms`` records -> (steps,)."""
    a = np.asarray(per_layer, dtype=np.float64)
    _checks.check_ndim("per_layer", a.shape, 2)
    return np.sqrt((a**2).sum(axis=1))


def first_step_reaching(values, threshold):
    """The first index t with values[t] >= threshold (None if none): how long a quantity stays below it."""
    for t, v in enumerate(values):
        if v >= threshold:
            return t
    return None
