"""What the scale s does to training: equivalent settings, first-step sizes, and a small rank sweep.

The experiment of the chapter is a regression of the update itself onto a target,

    L(A, B) = 1/2 ||s B A - W*||_F^2,      so      G = dL/dW = s B A - W*   (d, k),

trained with SGD or Adam on A: (r, k) and B: (d, r). It is the simplest loss whose
gradient at the weight is a given G, and it keeps every claim of the chapter exact.
Training uses torch; the closed forms take plain arrays.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from . import _checks
from . import numpy as ln

__all__ = ["SCALE_RULES", "scale_for_rule", "equivalent_settings", "first_step_decrease",
           "first_step_rank_exponent", "retune_factor", "target_update", "train_regression", "rank_sweep",
           "loglog_slope"]

# s as a function of r for a fixed alpha: the exponent e in s = alpha * r^e
SCALE_RULES = {"alpha/r": Fraction(-1), "alpha/sqrt(r)": Fraction(-1, 2), "alpha=2r": Fraction(0)}
OPTIMIZERS = ("sgd", "adam")


def _check_optimizer(optimizer):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def scale_for_rule(rule, alpha, r):
    """s for one of SCALE_RULES: alpha/r, alpha/sqrt(r), or alpha = 2r (so s = 2 whatever r; alpha is ignored).

    Book: eq-ch03-rules (notebooks/03_scaling).
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"rule must be one of {list(SCALE_RULES)}, got {rule!r}")
    _checks.check_rank(r)
    _checks.check_finite_scalar("alpha", alpha)
    if rule == "alpha=2r":
        return ln.scaling(2 * r, r)              # s = (2r) / r = 2, whatever r
    return ln.scaling(alpha, r, rslora=rule == "alpha/sqrt(r)")


def equivalent_settings(scaling, lr_A, lr_B, a, b, optimizer, eps=1e-8):
    """Settings that give the same trajectory of Delta W = s B A after rescaling A by a and B by b.

    (s, A0, B0, lr_A, lr_B)  ->  (s / (a b), a A0, b B0, a^p lr_A, b^p lr_B),   p = 2 (SGD), 1 (Adam);
    Adam's eps scales with the gradient: eps_A -> eps / a, eps_B -> eps / b.
    Returns a dict with scaling, a, b, lr_A, lr_B, eps_A, eps_B.

    Book: prop-ch03-equivalence (notebooks/03_scaling).
    """
    _check_optimizer(optimizer)
    for name, v in (("scaling", scaling), ("lr_A", lr_A), ("lr_B", lr_B), ("a", a), ("b", b), ("eps", eps)):
        _checks.check_finite_scalar(name, v)
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive rescalings of A and B, got a={a}, b={b}")
    p = 2 if optimizer == "sgd" else 1
    return dict(scaling=scaling / (a * b), a=a, b=b, lr_A=lr_A * a**p, lr_B=lr_B * b**p,
                eps_A=eps / a, eps_B=eps / b)


def first_step_decrease(grad_W, A, scaling, lr, optimizer):
    """First-order decrease of the loss, -<G, Delta W_1>, after one step from B = 0.

    At B = 0 only B moves (dL/dA = s B^T G = 0):
        SGD:  Delta B = -lr s G A^T           ->  -<G, s Delta B A> = lr s^2 ||G A^T||_F^2
        Adam: Delta B = -lr sign(G A^T)       ->  -<G, s Delta B A> = lr s   sum |G A^T|
    (Adam's first step is m/sqrt(v) = g/|g| entry by entry, eps neglected.)

    Book: eq-ch03-first-step (notebooks/03_scaling).
    """
    _check_optimizer(optimizer)
    _checks.check_ndim("grad_W", np.shape(grad_W), 2)
    _checks.check_ndim("A", np.shape(A), 2)
    if np.shape(grad_W)[1] != np.shape(A)[1]:
        raise ValueError(f"grad_W is {np.shape(grad_W)} = (d, k) and A is {np.shape(A)} = (r, k): k differs")
    _checks.check_finite_scalar("scaling", scaling)
    _checks.check_finite_scalar("lr", lr)
    GA = np.asarray(grad_W, dtype=np.float64) @ np.asarray(A, dtype=np.float64).T     # (d, r)
    if optimizer == "sgd":
        return float(lr * scaling**2 * np.sum(GA**2))
    return float(lr * scaling * np.sum(np.abs(GA)))


def first_step_rank_exponent(rule, optimizer):
    """The exponent of r in the first-step decrease for a scale rule s = alpha r^e, A of fixed entry scale.

    rule: a name in SCALE_RULES, or the exponent e itself (a Fraction or int).

    ||G A^T||_F^2 and sum |G A^T| both grow like r (r independent rows of A), so
        SGD:  s^2 r  ->  2e + 1;        Adam:  s r  ->  e + 1.

    Book: eq-ch03-exponents (notebooks/03_scaling).
    """
    _check_optimizer(optimizer)
    if isinstance(rule, str):
        if rule not in SCALE_RULES:
            raise ValueError(f"rule must be one of {list(SCALE_RULES)} or an exponent e, got {rule!r}")
        e = SCALE_RULES[rule]
    else:
        e = Fraction(rule)                        # s = alpha r^e for any rational e
    return 2 * e + 1 if optimizer == "sgd" else e + 1


def retune_factor(r_from, r_to, rule, optimizer):
    """The factor on lr that keeps the expected first-step decrease when r changes at fixed alpha:
    the decrease grows like lr r^E (E = first_step_rank_exponent), so lr -> lr (r_from / r_to)^E.

    Book: eq-ch03-exponents (notebooks/03_scaling).
    """
    _checks.check_rank(r_from)
    _checks.check_rank(r_to)
    return (r_from / r_to) ** float(first_step_rank_exponent(rule, optimizer))


def target_update(d, k, decay=0.5, seed=0):
    """A (d, k) target W* = U diag(sigma) V^T with sigma_i = i^(-decay), i = 1..min(d, k): a slowly
    decaying spectrum, so that every extra rank of the adapter can fit more of it.
    Returns (W*, sigma)."""
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    _checks.check_finite_scalar("decay", decay)
    rng = np.random.default_rng(seed)
    m = min(d, k)
    U, _ = np.linalg.qr(rng.normal(size=(d, m)))          # (d, m), orthonormal columns
    V, _ = np.linalg.qr(rng.normal(size=(k, m)))          # (k, m)
    sigma = np.arange(1, m + 1, dtype=np.float64) ** (-decay)
    return (U * sigma) @ V.T, sigma


def train_regression(W_star, A0, B0, scaling, lr_A, lr_B, optimizer, steps, eps_A=1e-8, eps_B=1e-8,
                     keep_delta_w=False):
    """Train A, B on L = 1/2 ||s B A - W*||_F^2 with torch's SGD or Adam (betas 0.9, 0.999).

    W_star: (d, k), A0: (r, k), B0: (d, r) torch tensors (copied, never modified).
    Returns a dict of lists, one entry per step before it is taken: loss, grad_norm
    (sqrt(||dL/dA||^2 + ||dL/dB||^2)), and, with keep_delta_w, delta_w (the (d, k) s B A),
    plus the final loss and delta_w after the last step.
    """
    import torch

    _check_optimizer(optimizer)
    d, r, k = _checks.check_weight_and_factors(tuple(W_star.shape), tuple(A0.shape), tuple(B0.shape), W_name="W_star")
    _checks.check_dim("steps", steps)
    A = A0.detach().clone().requires_grad_(True)        # (r, k)
    B = B0.detach().clone().requires_grad_(True)        # (d, r)
    if optimizer == "sgd":
        opt = torch.optim.SGD([{"params": [A], "lr": lr_A}, {"params": [B], "lr": lr_B}])
    else:
        opt = torch.optim.Adam([{"params": [A], "lr": lr_A, "eps": eps_A},
                                {"params": [B], "lr": lr_B, "eps": eps_B}], foreach=False)
    out = {"loss": [], "grad_norm": [], "delta_w": []}
    for _ in range(steps + 1):
        opt.zero_grad()
        dW = scaling * (B @ A)                           # (d, k)   Delta W = s B A
        loss = 0.5 * ((dW - W_star) ** 2).sum()          # 1/2 ||s B A - W*||_F^2
        out["loss"].append(float(loss.detach()))
        if keep_delta_w:
            out["delta_w"].append(dW.detach().clone())
        if len(out["loss"]) > steps:
            break
        loss.backward()
        out["grad_norm"].append(float(torch.sqrt((A.grad**2).sum() + (B.grad**2).sum())))
        opt.step()
    return out


def rank_sweep(ranks, rules, optimizer, alpha, lr, steps, d=256, k=256, decay=0.5, seed=0):
    """The chapter's experiment: for each scale rule and rank, train from PEFT's init (A kaiming with
    seed r, B = 0) on the target ``target_update(d, k, decay, seed)`` in float32, same alpha and lr.
    Returns {rule: {r: {"loss": [...], "grad_norm": [...]}}}."""
    import torch

    from . import torch as lt

    W_star = torch.tensor(target_update(d, k, decay, seed)[0], dtype=torch.float32)     # (d, k)
    result = {}
    for rule in rules:
        result[rule] = {}
        for r in ranks:
            A0, B0 = lt.init_lora(d, k, r, seed=r, dtype="float32")                     # (r, k), (d, r) = 0
            out = train_regression(W_star, A0, B0, scale_for_rule(rule, alpha, r), lr, lr, optimizer, steps)
            result[rule][r] = {"loss": out["loss"], "grad_norm": out["grad_norm"]}
    return result


def loglog_slope(x, y):
    """Least-squares slope of log y against log x: the exponent p in y ~ c x^p."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"x and y must be 1-D of the same length >= 2, got {x.shape} and {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("x and y must be positive for a log-log fit")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
