"""Choosing LoRA's hyperparameters by measurement (notebooks/11_choosing).

The chapter sweeps the tiny model (``lora_ref.tiny.experiments.choice_run`` and the shipped
``lora_ref/data/ch11_*.json``); this module holds the formulas it reads the sweeps with:

* dropout at rate rho on the adapter's input, as PEFT applies it (``y = W0 x + s B A drop(x)``): the
  mean and covariance of the adapter's output (``dropout_moments``), the penalty it adds to a squared
  loss (``dropout_penalty``), and the noise it adds to the first gradient of B (``dropout_b_grad_noise``);
* the learning rate: chapter 03's first-step rule carried across r, alpha and the scale rule
  (``predicted_lr``), and the optimum of a swept U-curve (``lr_optimum``, ``optima_per_seed``);
* the targets at one budget: the rank each target set needs to train about as many numbers as
  another (``equal_budget_ranks``, counted with ``lora_ref.budget``).

NumPy and the standard library only; it never imports torch.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks, budget
from . import numpy as ln

__all__ = ["seed_stats", "dropout_moments", "dropout_penalty", "dropout_b_grad_noise", "step_size", "predicted_lr",
           "lr_optimum", "optima_per_seed", "equal_budget_ranks"]


def _check_rate(dropout):
    _checks.check_finite_scalar("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"the dropout rate must be in [0, 1) (PEFT's lora_dropout), got dropout={dropout}")


def _as_2d(name, a):
    a = np.asarray(a, dtype=np.float64)
    _checks.check_ndim(name, a.shape, 2)
    return a


def seed_stats(runs, key="test_loss"):
    """A swept quantity over its seeds: runs {x: {seed: {key: value}}} (as the shipped sweeps hold them)
    or {x: {seed: value}} -> {"x": the sorted x, "mean", "lo", "hi": the seed mean, min and max at each x}.
    A diverged run (NaN or inf) makes its x's mean and max inf."""
    xs = sorted(runs)
    vals = [[v[key] if isinstance(v, dict) else v for v in runs[x].values()] for x in xs]
    arr = [np.where(np.isfinite(np.asarray(v, dtype=np.float64)), v, np.inf) for v in vals]
    return {"x": xs, "mean": [float(np.mean(a)) for a in arr], "lo": [float(np.min(a)) for a in arr],
            "hi": [float(np.max(a)) for a in arr]}


# --------------------------------------------------------------------------- dropout


def dropout_moments(x, delta_W, dropout):
    """Mean and covariance of the adapter's output Δy = ΔW drop(x) over the dropout mask.

    drop(x) = ξ ⊙ x / (1 - rho), ξ_j ~ Bernoulli(1 - rho) independently, rho = ``dropout``
    (inverted dropout, as torch.nn.Dropout and PEFT's ``lora_dropout``), ΔW = s B A: (d, k),
    x: (k,). Then

        E[Δy]   = ΔW x                                          the update is unbiased
        Cov[Δy] = rho / (1 - rho) · ΔW diag(x ⊙ x) ΔWᵀ            (d, d)

    because E[ξ_j / (1 - rho)] = 1 and Var[ξ_j / (1 - rho)] = rho / (1 - rho), independently over j.

    Book: eq-ch11-dropout-moments (notebooks/11_choosing).
    """
    _check_rate(dropout)
    M = _as_2d("delta_W", delta_W)                                          # (d, k)
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (M.shape[1],):
        raise ValueError(f"x has shape {x.shape}, delta_W is {M.shape} = (d, k): x must be ({M.shape[1]},)")
    mean = M @ x                                                            # (d,)
    cov = dropout / (1.0 - dropout) * (M * x**2) @ M.T                      # (d, d)  ΔW diag(x²) ΔWᵀ
    return mean, cov


def dropout_penalty(X, delta_W, dropout):
    """What dropout adds to a squared loss, averaged over the rows of X: (n, k).

    For L = ½ ||W0 x + Δy - t||² and Δy = ΔW drop(x), the mean over masks is the loss without
    dropout plus ½ tr Cov[Δy]:

        E_ξ[L] = ½ ||W0 x + ΔW x - t||²  +  ½ rho / (1 - rho) Σ_j ||ΔW[:, j]||² x_j²

    a ridge penalty on the columns of ΔW weighted by the inputs' second moments (Wager, Wang and
    Liang 2013; Srivastava et al. 2014, section 9). Returns the mean over rows of the second term.

    Book: eq-ch11-dropout-penalty (notebooks/11_choosing).
    """
    _check_rate(dropout)
    M = _as_2d("delta_W", delta_W)
    X = _as_2d("X", X)
    if X.shape[1] != M.shape[1]:
        raise ValueError(f"X is {X.shape} = (n, k) and delta_W is {M.shape} = (d, k): k differs")
    col_sq = np.sum(M**2, axis=0)                                           # (k,)  ||ΔW[:, j]||²
    return float(0.5 * dropout / (1.0 - dropout) * np.mean(X**2 @ col_sq))


def dropout_b_grad_noise(x, grad_y, A, scaling, dropout):
    """At B = 0 (LoRA's start), the gradient of B with dropout on one example, over the mask.

    With B = 0 the output does not depend on the mask, so neither does g = dL/dy: (d,). The
    gradient dL/dB = s g (A drop(x))ᵀ: (d, r) then has

        E[dL/dB]                  = s g (A x)ᵀ                                the same as without dropout
        E||dL/dB - E dL/dB||²_F   = s² ||g||² rho / (1 - rho) Σ_j ||A[:, j]||² x_j²

    Returns (mean (d, r), total variance). Dropout at the start only adds noise, which averaging
    over a batch of n examples divides by n.

    Book: eq-ch11-dropout-grad (notebooks/11_choosing).
    """
    _check_rate(dropout)
    A = _as_2d("A", A)                                                      # (r, k)
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_y, dtype=np.float64)
    if x.shape != (A.shape[1],):
        raise ValueError(f"x has shape {x.shape}, A is {A.shape} = (r, k): x must be ({A.shape[1]},)")
    if g.ndim != 1:
        raise ValueError(f"grad_y must be 1-D (d,), got shape {g.shape}")
    _checks.check_finite_scalar("scaling", scaling)
    mean = scaling * np.outer(g, A @ x)                                      # (d, r)
    var = scaling**2 * float(g @ g) * dropout / (1.0 - dropout) * float(np.sum(A**2, axis=0) @ x**2)
    return mean, var


# --------------------------------------------------------------------------- the learning rate


def step_size(r, alpha, rslora=False):
    """s r: how far the first Adam steps move ΔW = s B A at a learning rate of 1 (chapter 03).

    From B = 0, Adam moves each entry of B by about lr per step and the r rows of A add up, so
    the first-step decrease grows like lr s r (eq-ch03-exponents with E = e + 1). With s = alpha / r
    this is alpha, whatever r; with rsLoRA's s = alpha / sqrt(r) it is alpha sqrt(r); with alpha = 2r
    it is 2r.

    Book: eq-ch11-step-size (notebooks/11_choosing).
    """
    return float(ln.scaling(alpha, r, rslora=rslora) * r)


def predicted_lr(lr, r, alpha, r_new, alpha_new, rslora=False, rslora_new=False):
    """The learning rate at (r_new, alpha_new) that keeps chapter 03's first-step size lr s r:

        lr_new = lr · (s r) / (s_new r_new)

    For one scale rule this is ``rank_scaling.retune_factor``; it also carries a tuned lr across
    rules, for example from alpha = 16 at r = 16 to alpha = 2r at r = 64 (lr / 8).

    Book: eq-ch11-predicted-lr (notebooks/11_choosing).
    """
    _checks.check_finite_scalar("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be positive, got lr={lr}")
    return lr * step_size(r, alpha, rslora) / step_size(r_new, alpha_new, rslora_new)


def lr_optimum(lrs, losses):
    """The minimum of a swept U-curve: a parabola in log10(lr) through the best point and its
    two neighbours, its vertex clipped to their range.

    lrs: increasing learning rates (at least 3); losses: the loss at each (NaN or inf for a
    diverged run, which then counts as worse than any finite loss).
    Returns {"lr": the optimum, "loss": the parabola's value there (the best loss if at an edge),
    "index": the best grid point, "interior": False when the best is the first or last lr, so the
    optimum may lie outside the sweep}.

    Book: eq-ch11-lr-optimum (notebooks/11_choosing).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if lrs.ndim != 1 or y.shape != lrs.shape or lrs.size < 3:
        raise ValueError(f"lrs and losses must be 1-D of one length >= 3, got shapes {lrs.shape} and {y.shape}")
    if not np.all(lrs > 0) or not np.all(np.diff(lrs) > 0):
        raise ValueError(f"lrs must be positive and increasing, got {lrs.tolist()}")
    if not np.isfinite(y).any():
        raise ValueError("every run diverged: no finite loss to take the optimum of")
    y = np.where(np.isfinite(y), y, np.inf)
    i = int(np.argmin(y))
    if i in (0, lrs.size - 1) or not np.isfinite(y[i - 1:i + 2]).all():
        return {"lr": float(lrs[i]), "loss": float(y[i]), "index": i, "interior": False}
    u = np.log10(lrs[i - 1:i + 2])
    c2, c1, c0 = np.polyfit(u, y[i - 1:i + 2], 2)                         # convex: y[i] is the least
    u_star = float(np.clip(-c1 / (2 * c2), u[0], u[2]))
    return {"lr": 10.0**u_star, "loss": float(c0 + c1 * u_star + c2 * u_star**2), "index": i, "interior": True}


def optima_per_seed(curves):
    """``lr_optimum`` of each seed's curve. curves: {lr: {seed: loss}} (as the shipped sweeps hold
    them). Returns {seed: lr_optimum(...)}, the lrs sorted."""
    lrs = sorted(curves)
    seeds = sorted(next(iter(curves.values())))
    for lr in lrs:
        if sorted(curves[lr]) != seeds:
            raise ValueError(f"lr={lr} has seeds {sorted(curves[lr])}, the first lr has {seeds}")
    return {seed: lr_optimum(lrs, [curves[lr][seed] for lr in lrs]) for seed in seeds}


# --------------------------------------------------------------------------- targets at one budget


def equal_budget_ranks(config, target_sets, reference="all-linear", r_reference=4):
    """For each target set, the rank r that trains the nearest number of LoRA parameters to
    ``reference`` at ``r_reference`` (counted by ``budget.lora_param_count``, ties to the smaller r).

    target_sets: {name: target_modules as PEFT takes them}. Returns {name: {"r", "params",
    "ratio": params / the reference's}}: a budget can only be matched to within one rank's worth.

    Book: eq-ch11-equal-budget (notebooks/11_choosing).
    """
    want = budget.lora_param_count(config, r_reference, reference)
    out = {}
    for name, targets in target_sets.items():
        per_rank = budget.lora_param_count(config, 1, targets)             # r (d + k) is linear in r
        lo = max(1, math.floor(want / per_rank))
        r = min((lo, lo + 1), key=lambda q: (abs(q * per_rank - want), q))
        params = budget.lora_param_count(config, r, targets)
        out[name] = {"r": r, "params": params, "ratio": params / want}
    return out
