"""Low-rank approximation of weight updates: Eckart-Young in practice.

* ``fit_low_rank`` trains a rank-r factorisation s B A onto a given update W* by plain
  gradient descent from LoRA's start (B = 0), and returns its error at every step, to
  compare with ``spectral.eckart_young_error``;
* ``energy_curve`` and ``rank_for_energy`` read how much of an update rank r keeps off
  its singular values;
* ``critical_loss`` is the loss at a critical point of the factorised problem;
* ``relative_tail`` is the Eckart-Young error of truncating every layer at once, relative to
  the whole update, from the layers' singular values alone;
* ``truncate_updates`` truncates every ΔW of a fine-tune to rank r (the tiny model's
  ``tiny.experiments.with_updates`` and ``truncation_scores`` put W0 + ΔW_r into a copy of the
  model and score it).

The SVD is ``lora_ref.spectral``'s (never redone here). Everything takes NumPy arrays or
torch tensors, returns float64 NumPy and never imports torch.
"""

from __future__ import annotations

import numpy as np

from . import _checks, spectral
from . import numpy as ln

__all__ = ["fit_low_rank", "energy_curve", "rank_for_energy", "critical_loss", "truncate_updates", "relative_tail"]


def _matrix(M, name):
    """A torch tensor or array-like -> a finite float64 (d, k) NumPy array."""
    if hasattr(M, "detach"):                          # torch.Tensor, without importing torch
        M = M.detach().cpu().double().numpy()
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.size == 0 or not np.all(np.isfinite(M)):
        raise ValueError(f"{name} must be a finite, non-empty 2-D matrix, got shape {M.shape}")
    return M


def _spectrum(sigma):
    """A non-empty 1-D array of finite singular values >= 0, not all zero."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 1 or sigma.size == 0:
        raise ValueError(f"singular values must be a non-empty 1-D array, got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"singular values must be finite and >= 0, got {sigma}")
    if not np.any(sigma > 0):
        raise ValueError("all singular values are 0: the zero matrix has no energy to capture")
    return sigma


def fit_low_rank(W_star, r, steps, lr, scaling=1.0, seed=0, start=None):
    """Gradient descent on L(A, B) = 1/2 ||s B A - W*||_F^2 from PEFT's init (kaiming A, B = 0),
    or from ``start`` = (A, B), the factors a variant such as PiSSA starts from.

    With R = s B A - W* (d, k), the gradients are dL/dB = s R A^T (d, r) and dL/dA = s B^T R (r, k);
    both factors step at once: B <- B - lr dL/dB, A <- A - lr dL/dA (float64 throughout).
    W_star: (d, k). Returns {"error": [||s B A - W*||_F before each step, then after the last]
    (steps + 1 values), "A": (r, k), "B": (d, r)}.

    Book: eq-ch06-gd (notebooks/06_eckart_young).
    """
    W_star = _matrix(W_star, "W_star")
    d, k = W_star.shape
    _checks.check_rank(r, d, k)
    _checks.check_dim("steps", steps)
    for name, value in (("lr", lr), ("scaling", scaling)):
        _checks.check_finite_scalar(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {name}={value}")
    if start is None:
        A, B = ln.init_lora(d, k, r, seed=seed)      # (r, k) kaiming, (d, r) zeros
    else:
        A, B = (_matrix(M, name) for M, name in zip(start, ("A", "B")))
        _checks.check_weight_and_factors(W_star.shape, A.shape, B.shape, W_name="W_star")
        _checks.check_rank(A.shape[0], d, k)
        if A.shape[0] != r:
            raise ValueError(f"start has rank {A.shape[0]} (A {A.shape}) but r={r}")
    error = []
    for step in range(steps + 1):
        R = scaling * (B @ A) - W_star                # (d, k) residual s B A - W*
        error.append(float(np.linalg.norm(R)))        # ||R||_F
        if step == steps:
            break
        grad_B = scaling * R @ A.T                    # (d, r)  s R A^T
        grad_A = scaling * B.T @ R                    # (r, k)  s B^T R
        B, A = B - lr * grad_B, A - lr * grad_A
    return {"error": error, "A": A, "B": B}


def energy_curve(sigma):
    """E_r = sum_{i <= r} sigma_i^2 / sum_i sigma_i^2 for r = 1 .. len(sigma): the share of
    ||M||_F^2 that the best rank-r approximation keeps, E_r = 1 - ||M - M_r||_F^2 / ||M||_F^2.

    sigma: the singular values of M (``spectral.singular_values(M)``), any order.
    Book: eq-ch06-energy (notebooks/06_eckart_young).
    """
    sq = np.sort(_spectrum(sigma))[::-1] ** 2         # sigma_1^2 >= sigma_2^2 >= ...
    return np.cumsum(sq) / sq.sum()


def rank_for_energy(sigma, tau):
    """The smallest r with E_r >= tau (eq-ch06-energy): the rank that keeps a share tau of ||M||_F^2.

    sigma: singular values of M; 0 < tau <= 1.
    Book: eq-ch06-energy (notebooks/06_eckart_young).
    """
    _checks.check_finite_scalar("tau", tau)
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got tau={tau}")
    e = energy_curve(sigma)
    # e is nondecreasing and ends at 1 up to rounding: the first index where it reaches tau
    # (a relative 1e-12 of slack, so that tau = 1 or an exact share is not missed by a rounding error)
    return int(np.searchsorted(e, tau * (1 - 1e-12), side="left")) + 1


def critical_loss(sigma, kept):
    """The loss 1/2 ||B A - W*||_F^2 at the critical point whose B A keeps the singular
    directions ``kept`` (1-based indices i, distinct) of W*: 1/2 sum_{i not kept} sigma_i^2.

    Keeping 1..r is the global minimum (Eckart-Young); any other set, when sigma_r > sigma_{r+1},
    is a saddle. sigma: singular values of W*, sorted descending.
    Book: eq-ch06-critical (notebooks/06_eckart_young).
    """
    sigma = _spectrum(sigma)
    if np.any(np.diff(sigma) > 0):
        raise ValueError(f"sigma must be sorted in descending order, got {sigma}")
    kept = list(kept)
    if len(set(kept)) != len(kept) or not all(isinstance(i, (int, np.integer)) and 1 <= i <= sigma.size
                                              for i in kept):
        raise ValueError(f"kept must hold distinct indices in 1..{sigma.size}, got {kept}")
    dropped = np.ones(sigma.size, dtype=bool)
    dropped[np.asarray(kept, dtype=int) - 1] = False
    return float(0.5 * np.sum(sigma[dropped] ** 2))


def truncate_updates(updates, r):
    """{layer name: ΔW_r (d, k) float64}: every update cut to its best rank-r approximation.

    updates: {name: ΔW (d, k)} (``tiny.weight_updates``). Where r >= min(d, k) the rank
    constraint is void and ΔW is returned unchanged (as float64).
    Book: eq-ch06-truncate (notebooks/06_eckart_young).
    """
    _checks.check_rank(r)
    out = {}
    for name, dW in updates.items():
        dW = _matrix(dW, f"updates[{name!r}]")
        out[name] = dW if r >= min(dW.shape) else spectral.best_rank_r(dW, r)   # U_r diag(sigma_r) V_r^T
    return out


def relative_tail(spectra, r):
    """The relative distance of the layer-by-layer truncation from the whole update, over all layers:

        sqrt( sum_layers sum_{i > r} sigma_i^2 / sum_layers sum_i sigma_i^2 )
          = || (ΔW_l - ΔW_l,r)_l ||_F / || (ΔW_l)_l ||_F,

    by eq-ch06-eym in each layer (the squared Frobenius norms add over layers). No set of rank-r
    updates is closer. spectra: {layer: singular values, descending}; r >= len(sigma) keeps all.
    Book: eq-ch06-eym (notebooks/06_eckart_young).
    """
    _checks.check_rank(r)
    tail = total = 0.0
    for name, sigma in spectra.items():
        sigma = np.asarray(sigma, dtype=np.float64)
        _checks.check_ndim(f"spectra[{name!r}]", sigma.shape, 1)
        if np.any(sigma < 0) or np.any(np.diff(sigma) > 0) or not np.all(np.isfinite(sigma)):
            raise ValueError(f"spectra[{name!r}] must be finite, >= 0 and descending, got {sigma}")
        tail += float(np.sum(sigma[r:] ** 2))
        total += float(np.sum(sigma ** 2))
    if total == 0:
        raise ValueError("every update is zero: the relative tail is undefined")
    return float(np.sqrt(tail / total))
