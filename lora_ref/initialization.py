"""The initialisation of A and B: the variance and the law of an entry of BA, PEFT's inits,
what a symmetric (both random) init costs, and the size of the first step from B = 0.

Conventions (PEFT's): A: (r, k), B: (d, r), y = W0 x + s B A x with s the scaling. Every
formula here is the closed form a chapter derives; the Monte Carlo helpers only draw samples
and summarise them, and say how precise the summary is.

This module needs only NumPy.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import _checks, rank_scaling
from . import numpy as ln

__all__ = [
    "ba_second_moment", "a_variance", "excess_kurtosis_of", "ba_excess_kurtosis", "peft_false_ba_variance",
    "symmetric_output_rms", "first_step_delta_y", "first_step_size", "first_step_exponent",
    "sample_ba_entries", "mean_with_ci", "sample_excess_kurtosis", "ks_distance_to_normal",
]

# Excess kurtosis E[X^4]/Var(X)^2 - 3 of the laws an init draws from.
_EXCESS_KURTOSIS = {"gaussian": Fraction(0), "uniform": Fraction(-6, 5)}
_INITS = ("kaiming", "gaussian")
_RULES = tuple(rank_scaling.SCALE_RULES)          # "alpha/r", "alpha/sqrt(r)", "alpha=2r"
_OPTIMIZERS = ("sgd", "adam")


def _check_var(name, v):
    _checks.check_finite_scalar(name, v)
    if v < 0:
        raise ValueError(f"{name} must be a variance >= 0, got {name}={v}")


def ba_second_moment(r, var_a, var_b):
    """E[(BA)_ij^2] = r var_a var_b for independent zero-mean entries (= Var((BA)_ij)).

    Book: eq-ch04-var, prop-ch04-var (notebooks/04_initialisation).
    """
    _checks.check_rank(r)
    _check_var("var_a", var_a)
    _check_var("var_b", var_b)
    return r * var_a * var_b            # sum over l = 1..r of E[B_il^2] E[A_lj^2]


def a_variance(init, k, r):
    """Var(A_ij) of PEFT's A init for fan_in k and rank r.

    "kaiming" (the default, kaiming_uniform_(a=sqrt(5))): U(-b, b) with b = 1/sqrt(k), so b^2/3 = 1/(3k).
    "gaussian": N(0, (1/r)^2), so 1/r^2 (not 1/r).

    Book: eq-ch04-kaiming, eq-ch04-gaussian (notebooks/04_initialisation).
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    _checks.check_dim("k", k)
    _checks.check_rank(r)
    if init == "kaiming":
        return ln.kaiming_a_bound(k) ** 2 / 3      # Var U(-b, b) = b^2 / 3
    return ln.gaussian_a_std(r) ** 2


def excess_kurtosis_of(law):
    """Excess kurtosis of a zero-mean law: 0 for "gaussian", -6/5 for "uniform" (exact Fractions)."""
    if law not in _EXCESS_KURTOSIS:
        raise ValueError(f"law must be one of {sorted(_EXCESS_KURTOSIS)}, got {law!r}")
    return _EXCESS_KURTOSIS[law]


def ba_excess_kurtosis(r, kurt_a, kurt_b):
    """Excess kurtosis of (BA)_ij = sum of r i.i.d. products B_il A_lj of independent zero-mean factors.

    One product: E[(BA)^4] / Var^2 = (kurt_a + 3)(kurt_b + 3), so its excess is
    (kurt_a + 3)(kurt_b + 3) - 3; excess kurtosis (the 4th cumulant over Var^2) of a sum of
    r i.i.d. terms is that of one term divided by r. Exact when given Fractions.

    Book: eq-ch04-kurtosis (notebooks/04_initialisation).
    """
    _checks.check_rank(r)
    return ((kurt_a + 3) * (kurt_b + 3) - 3) / r


def peft_false_ba_variance(k):
    """Var((BA)_ij) for PEFT's init_lora_weights=False: nn.Linear's own init for both factors,
    A ~ U(+-1/sqrt(k)) (fan_in k) and B ~ U(+-1/sqrt(r)) (fan_in r), so r (1/(3k)) (1/(3r)) = 1/(9k),
    whatever r. (The layer's update s B A has s^2 times this.)

    Book: eq-ch04-false (notebooks/04_initialisation).
    """
    _checks.check_dim("k", k)
    return Fraction(1, 9 * k)


def symmetric_output_rms(r, var_a, var_b, x_norm, scaling):
    """RMS over the d outputs of s B A x when A and B are both random: s sqrt(r var_a var_b) ||x||.

    E||B A x||^2 = sum_i E[(B z)_i^2] = d var_b E||z||^2 and E||z||^2 = E||A x||^2 = r var_a ||x||^2.

    Book: eq-ch04-symmetric (notebooks/04_initialisation).
    """
    _checks.check_finite_scalar("x_norm", x_norm)
    _checks.check_finite_scalar("scaling", scaling)
    return abs(scaling) * math.sqrt(ba_second_moment(r, var_a, var_b)) * x_norm


def first_step_delta_y(x, grad_y, A, scaling, lr, optimizer="sgd"):
    """The adapter's output s B1 A x after one step from B = 0 on a loss with dL/dy = grad_y (g) at input x.

    x: (k,);  g: (d,);  A: (r, k)  ->  (d,).  The gradient is dL/dB = s g z^T with z = A x (dL/dA = 0).
      sgd:  B1 = -lr s g z^T                        ->  s B1 z = -lr s^2 ||z||_2^2 g
      adam: B1 = -lr sign(g z^T) (first step, eps -> 0)  ->  s B1 z = -lr s ||z||_1 sign(g)

    Book: eq-ch04-sgd-step, eq-ch04-adam-step (notebooks/04_initialisation).
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    x, g, A = (np.asarray(v, dtype=np.float64) for v in (x, grad_y, A))
    if x.ndim != 1 or g.ndim != 1 or A.ndim != 2 or A.shape[1] != x.shape[0]:
        raise ValueError(f"need x: (k,), g: (d,), A: (r, k); got x{x.shape}, g{g.shape}, A{A.shape}")
    z = A @ x                                                  # (r,)
    if optimizer == "sgd":
        return -lr * scaling**2 * float(z @ z) * g             # (d,)
    return -lr * abs(scaling) * float(np.abs(z).sum()) * np.sign(scaling * g)   # (d,)


def first_step_size(optimizer, r, var_a, scaling, lr, x_norm, g_norm, d=None):
    """Expected size ||s B1 A x|| of the adapter's output after the first step from B = 0.

      sgd:  lr s^2 r var_a ||x||^2 ||g||                      (E||z||^2 = r var_a ||x||^2)
      adam: lr s sqrt(d) r sqrt(var_a) ||x|| sqrt(2/pi)       (E|z_l| for Gaussian z_l; every g_i != 0)

    Book: eq-ch04-sgd-size, eq-ch04-adam-size (notebooks/04_initialisation).
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    _checks.check_rank(r)
    _check_var("var_a", var_a)
    if optimizer == "sgd":
        return lr * scaling**2 * r * var_a * x_norm**2 * g_norm
    _checks.check_dim("d", d)
    return lr * abs(scaling) * math.sqrt(d) * r * math.sqrt(var_a) * x_norm * math.sqrt(2 / math.pi)


def first_step_exponent(optimizer, init, rule):
    """The exponent e in ||first-step output|| ∝ r^e, for PEFT's A init and a scale rule.

    ``rank_scaling.first_step_rank_exponent`` gives it for A of fixed entry scale (kaiming:
    var_a does not depend on r): 2e + 1 under SGD, e + 1 under Adam, for s = alpha r^e. The
    "gaussian" init adds its own r-dependence, var_a = 1/r^2: r^-2 under SGD (var_a), r^-1 under
    Adam (sqrt(var_a)). Rules: those of ``rank_scaling.SCALE_RULES`` ("alpha/r", "alpha/sqrt(r)",
    "alpha=2r"). Exact Fraction.

    Book: eq-ch04-exponent (notebooks/04_initialisation).
    """
    if optimizer not in _OPTIMIZERS or init not in _INITS or rule not in _RULES:
        raise ValueError(f"need optimizer in {_OPTIMIZERS}, init in {_INITS}, rule in {tuple(_RULES)}; "
                         f"got {optimizer!r}, {init!r}, {rule!r}")
    var_a_exp = Fraction(0) if init == "kaiming" else Fraction(-2)
    return rank_scaling.first_step_rank_exponent(rule, optimizer) + (var_a_exp if optimizer == "sgd" else var_a_exp / 2)


def sample_ba_entries(r, n, law_a="uniform", law_b="gaussian", seed=0):
    """n independent draws of one entry (BA)_ij = sum_l B_il A_lj, with unit-variance factors.

    law_a, law_b: "uniform" (U(-sqrt 3, sqrt 3)) or "gaussian" (N(0, 1)). Returns (n,) float64.
    Rescale by sigma_A sigma_B for other variances: the law's shape does not change.
    """
    _checks.check_rank(r)
    _checks.check_dim("n", n)
    for name, law in (("law_a", law_a), ("law_b", law_b)):
        if law not in _EXCESS_KURTOSIS:
            raise ValueError(f"{name} must be one of {sorted(_EXCESS_KURTOSIS)}, got {law!r}")
    rng = np.random.default_rng(seed)

    def draw(law):                                             # (n, r), unit variance
        if law == "uniform":
            return rng.uniform(-math.sqrt(3), math.sqrt(3), size=(n, r))
        return rng.standard_normal((n, r))

    return (draw(law_a) * draw(law_b)).sum(axis=1)             # (n,) row l of A times column l of B


def mean_with_ci(samples, z=4.0):
    """(mean, half-width) of a z-sigma CLT confidence interval for the mean of i.i.d. samples."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"need at least 2 samples, got {x.size}")
    return float(x.mean()), float(z * x.std(ddof=1) / math.sqrt(x.size))


def sample_excess_kurtosis(samples, batches=20):
    """(m4 / m2^2 - 3 of the samples, its standard error): the error is the spread of the same
    statistic over ``batches`` equal parts, divided by sqrt(batches)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size < 4 * batches:
        raise ValueError(f"need at least {4 * batches} samples for {batches} batches, got {x.size}")

    def kurt(v):
        c = v - v.mean()
        return float((c**4).mean() / (c**2).mean() ** 2 - 3)

    parts = [kurt(v) for v in np.array_split(x, batches)]
    return kurt(x), float(np.std(parts, ddof=1) / math.sqrt(batches))


def ks_distance_to_normal(samples):
    """Kolmogorov–Smirnov distance sup |F_n - Phi| between the standardised samples and N(0, 1)."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    if x.size < 2:
        raise ValueError(f"need at least 2 samples, got {x.size}")
    t = (x - x.mean()) / x.std()
    phi = 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))          # Phi(t)
    n = x.size
    return float(max((np.arange(1, n + 1) / n - phi).max(), (phi - np.arange(n) / n).max()))
