"""What LoRA's variants change, measured (notebooks/10_variants).

The variants themselves are formulas of both backends (``lora_ref.numpy`` and ``lora_ref.torch``:
``pissa_init``, ``milora_init``, ``olora_init``, ``pissa_to_lora``, ``dora_forward``,
``vera_forward``, ``loraga_init``). This module holds what the chapter measures them with:

* ``trainable_params``: the numbers each variant trains on one (d, k) weight;
* ``planted_target`` and ``init_race``: a target planted in the principal or the minor singular
  subspace of a matrix, and the error of gradient descent from each variant's init;
* ``magnitude_direction_change`` and ``md_slope``: DoRA's Delta M / Delta D analysis
  (Liu et al. 2024, section 2.2 and Fig. 2);
* ``steps_to_reach``: the first step at which a loss curve reaches a threshold.

The tiny-model runs are in ``lora_ref.tiny.experiments`` (``variant_model``,
``variant_fine_tune``, ``EffectiveWeights``). Everything here takes NumPy arrays or torch
tensors, returns float64 NumPy and never imports torch.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from . import _checks, low_rank, spectral
from . import numpy as ln

__all__ = ["VARIANTS", "INITS", "trainable_params", "residual_energy", "planted_target", "init_race",
           "magnitude_direction_change", "md_slope", "steps_to_reach", "adalora_triplet_scores"]

# The variants of chapter 10, in the order of its table.
VARIANTS = ("lora", "pissa", "milora", "olora", "loraga", "dora", "vera", "adalora")

# The inits that only change where A and B start (and the base W_res they leave): name -> init(W0, r, s).
INITS = {"pissa": ln.pissa_init, "milora": ln.milora_init, "olora": ln.olora_init}


def trainable_params(variant, d, k, r):
    """The numbers ``variant`` trains on one (d, k) weight at rank r.

        LoRA, PiSSA, MiLoRA, OLoRA, LoRA-GA   r (d + k)          A (r, k) and B (d, r)
        DoRA                                  r (d + k) + d      plus the magnitude m (d,)
        VeRA                                  r + d              Lambda_d (r,), Lambda_b (d,); A, B frozen, shared
        AdaLoRA                               r (d + k) + r      P (d, r), Q (r, k), Lambda (r,), at its initial rank

    As PEFT counts them (``model.get_nb_trainable_parameters()``); a test checks every row. VeRA's
    r may exceed min(d, k) (its paper uses r up to 1024 and more, since r costs one number per rank);
    every other rank is at most min(d, k).

    Book: eq-ch10-counts (notebooks/10_variants).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    _checks.check_rank(r, *((None, None) if variant == "vera" else (d, k)))
    lora = r * (d + k)
    return {"dora": lora + d, "vera": r + d, "adalora": lora + r}.get(variant, lora)


def planted_target(W0, r, subspace, scale=1.0, seed=0):
    """W* = W0 + Delta with Delta of rank r inside the principal or the minor singular subspace of W0.

        W0 = U S V^T,   Delta = scale * U_I M V_I^T,   M (r, r) ~ N(0, 1) / sqrt(r)
    with I the r largest singular triplets (subspace="principal") or the r smallest ("minor").
    A fine-tune that needs only directions W0 already uses is "principal"; one that needs
    directions W0 barely uses is "minor". Returns W*: (d, k).

    Book: prop-ch10-saddle (notebooks/10_variants).
    """
    W0 = spectral.as_matrix(W0, "W0")
    d, k = W0.shape
    _checks.check_rank(r, d, k)
    if subspace not in ("principal", "minor"):
        raise ValueError(f"subspace must be 'principal' or 'minor', got {subspace!r}")
    _checks.check_finite_scalar("scale", scale)
    U, _, Vh = np.linalg.svd(W0, full_matrices=False)        # (d, p), (p,), (p, k)
    idx = slice(0, r) if subspace == "principal" else slice(min(d, k) - r, min(d, k))
    M = np.random.default_rng(seed).normal(size=(r, r)) / np.sqrt(r)   # (r, r)
    return W0 + scale * U[:, idx] @ M @ Vh[idx]               # (d, k)


def init_race(W0, W_star, r, scaling, steps, lr, inits=("lora", "pissa", "milora"), seed=0):
    """Gradient descent on 1/2 ||W_res + s B A - W*||_F^2 from each variant's init, base W_res frozen.

    "lora" starts at PEFT's default (kaiming A, B = 0, W_res = W0); "pissa", "milora", "olora"
    start at their factors and residual (``INITS``). Each run is ``low_rank.fit_low_rank`` on the
    target W* - W_res from that start, so the only difference is where A and B begin.
    Returns {init: [||W_res + s B A - W*||_F at steps 0 .. steps]}.

    Book: prop-ch10-saddle (notebooks/10_variants).
    """
    W0, W_star = spectral.as_matrix(W0, "W0"), spectral.as_matrix(W_star, "W_star")
    if W0.shape != W_star.shape:
        raise ValueError(f"W0 is {W0.shape} but W_star is {W_star.shape}: the target is a weight of the same shape")
    errors = {}
    for name in inits:
        if name == "lora":
            start, W_res = None, W0
        elif name in INITS:
            A, B, W_res = INITS[name](W0, r, scaling)
            start = (A, B)
        else:
            raise ValueError(f"inits must name 'lora' or one of {tuple(INITS)}, got {name!r}")
        errors[name] = low_rank.fit_low_rank(W_star - W_res, r, steps, lr, scaling, seed=seed, start=start)["error"]
    return errors


def magnitude_direction_change(W0, W):
    """DoRA's Delta M and Delta D of one weight (Liu et al. 2024, eq. 6-7), per output unit i:

        m_i = ||W_i,:||,   Delta M = mean_i |m_i - m0_i|,   Delta D = mean_i (1 - cos(W_i,:, W0_i,:))
    (the paper's column norm ||.||_c, on the book's (d, k) weight whose rows are the output units).
    W0, W: (d, k). Returns (Delta M, Delta D).

    Book: eq-ch10-md (notebooks/10_variants).
    """
    W0, W = spectral.as_matrix(W0, "W0"), spectral.as_matrix(W, "W")
    if W0.shape != W.shape:
        raise ValueError(f"W0 is {W0.shape} but W is {W.shape}")
    m0, m = ln.dora_magnitude(W0), ln.dora_magnitude(W)       # (d,), (d,)
    if np.any(m0 == 0) or np.any(m == 0):
        raise ValueError("a row of W0 or W is zero: its direction is undefined")
    cos = np.sum(W0 * W, axis=1) / (m0 * m)                   # (d,)
    return float(np.mean(np.abs(m - m0))), float(np.mean(1.0 - cos))


def md_slope(delta_m, delta_d):
    """The least-squares slope of Delta M against Delta D, with its correlation and p-value.

    The paper reads the sign: full fine-tuning's points fall (negative slope), LoRA's rise
    (positive): LoRA moves magnitude and direction together. ``scipy.stats.linregress``.
    Returns {"slope", "intercept", "r", "p", "n"}.

    Book: eq-ch10-md (notebooks/10_variants).
    """
    x, y = np.asarray(delta_d, dtype=np.float64), np.asarray(delta_m, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"need two 1-D sequences of >= 3 paired points, got shapes {y.shape} and {x.shape}")
    fit = stats.linregress(x, y)
    return {"slope": float(fit.slope), "intercept": float(fit.intercept), "r": float(fit.rvalue),
            "p": float(fit.pvalue), "n": int(x.size)}


def steps_to_reach(losses, threshold, window=1):
    """The first step t (0-based) at which the mean of the last ``window`` losses, steps
    t - window + 1 .. t, is <= threshold; None if it never is. window > 1 smooths the noise of
    one batch's loss.

    Book: eq-ch10-reach (notebooks/10_variants).
    """
    _checks.check_finite_scalar("threshold", threshold)
    _checks.check_dim("window", window)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1:
        raise ValueError(f"losses must be 1-D, got shape {losses.shape}")
    if losses.size < window:
        return None
    means = np.convolve(losses, np.ones(window) / window, mode="valid")     # means[j]: steps j .. j + window - 1
    hit = np.flatnonzero(means <= threshold)
    return int(hit[0]) + window - 1 if hit.size else None


def residual_energy(W0, r):
    """(||W_res||_F^2 of PiSSA, of MiLoRA) / ||W0||_F^2 at rank r, from the singular values alone:
    sum_{i > r} sigma_i^2 and sum_{i <= p - r} sigma_i^2 over sum_i sigma_i^2 (Eckart-Young: the
    smallest and the largest residual that r singular triplets can leave).

    Book: prop-ch10-residual (notebooks/10_variants)."""
    sigma = spectral.singular_values(spectral.as_matrix(W0, "W0"))
    _checks.check_rank(r, len(sigma), len(sigma))
    total = float(np.sum(sigma**2))
    return float(np.sum(sigma[r:] ** 2)) / total, float(np.sum(sigma[: len(sigma) - r] ** 2)) / total


def adalora_triplet_scores(score_A, score_E, score_B):
    """AdaLoRA's importance of each triplet (B_:,i, Lambda_ii, A_i,:) of one layer (Zhang et al. 2023):

        S_i = s(Lambda_ii) + mean_j s(A_ij) + mean_j s(B_ji),
    where s(w) is an entry's smoothed sensitivity times its uncertainty (PEFT's ``RankAllocator``:
    exp_avg_ipt * exp_avg_unc of |w dL/dw|). score_A: (r, k), score_E: (r,) or (r, 1), score_B: (d, r)
    -> (r,). The allocator zeroes every Lambda_ii whose S_i is among the lowest over all layers, until
    the total rank meets the budget.

    Book: eq-ch10-adalora-score (notebooks/10_variants).
    """
    score_A, score_B = spectral.as_matrix(score_A, "score_A"), spectral.as_matrix(score_B, "score_B")
    score_E = np.asarray(score_E.detach().cpu().double() if hasattr(score_E, "detach") else score_E,
                         dtype=np.float64).reshape(-1)
    _checks.check_factors(score_A.shape, score_B.shape)
    _checks.check_vector("score_E", score_E.shape, score_A.shape[0], "one score per triplet")
    return score_E + score_A.mean(axis=1) + score_B.mean(axis=0)         # (r,)
