"""LoRA in NumPy: the formulas of the book, one short function each.

Shapes follow the LoRA paper and PEFT (and PyTorch's ``nn.Linear``):

    W0: (d, k)  frozen weight, maps k inputs to d outputs
    A:  (r, k)  down-projection, trained
    B:  (d, r)  up-projection, trained, zero at init
    x:  (..., k) rows of inputs          y: (..., d) rows of outputs

    y = x W0^T + s (x A^T) B^T,   the row form of   y = W0 x + s B (A x),   s = alpha / r.

``lora_ref.torch`` has the same names, signatures and numbers; a chapter switches
backend by changing one import. This module never imports torch.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks

__all__ = ["scaling", "kaiming_a_bound", "gaussian_a_std", "init_lora", "lora_forward", "delta_w", "merge",
           "unmerge", "lora_grads", "delta_w_sgd_step", "pad_adapters", "batched_lora_forward"]


def _shape(a):
    return tuple(np.shape(a))


def _check_finite(name, a):
    a = np.asarray(a)
    _checks.check_finite_count(name, int(a.size - np.count_nonzero(np.isfinite(a))), a.shape)


def _index_range(index):
    """(holds integers, min, max) of an adapter index, for _checks.check_adapter_index."""
    index = np.asarray(index)
    integer = bool(np.issubdtype(index.dtype, np.integer))
    return (integer, int(index.min()), int(index.max())) if index.size else (integer, 0, 0)


def _zeros(like, shape):
    """Zeros of ``shape`` in the dtype of ``like``."""
    return np.zeros(shape, dtype=np.asarray(like).dtype)


def scaling(alpha, r, rslora=False):
    """The LoRA scale s that multiplies B A.

    s = alpha / r           (LoRA, Hu et al. 2021)
    s = alpha / sqrt(r)     (rsLoRA, Kalajdzievski 2023: keeps the update's scale stable as r grows)

    Book: eq-ch02-forward (notebooks/02_forward_pass).
    """
    _checks.check_finite_scalar("alpha", alpha)
    _checks.check_rank(r)
    return alpha / math.sqrt(r) if rslora else alpha / r


def kaiming_a_bound(k):
    """Half-width of PEFT's default A init, kaiming_uniform_(a=sqrt(5)), for fan_in k.

    gain  = sqrt(2 / (1 + a^2)) = sqrt(2 / 6) = 1/sqrt(3)
    std   = gain / sqrt(k)
    bound = sqrt(3) * std = 1 / sqrt(k)        so A_ij ~ U(-1/sqrt(k), 1/sqrt(k)),
    Var(A_ij) = bound^2 / 3 = 1 / (3k).
    """
    _checks.check_dim("k", k)
    a = math.sqrt(5.0)
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return math.sqrt(3.0) * gain / math.sqrt(k)


def gaussian_a_std(r):
    """PEFT's init_lora_weights="gaussian": A_ij ~ N(0, (1/r)^2), a standard deviation of 1/r
    (variance 1/r^2, not 1/r)."""
    _checks.check_rank(r)
    return 1.0 / r


def init_lora(d, k, r, seed=0, *, init="kaiming", a_std=None, b_std=None, dtype="float64"):
    """Initial factors (A, B) for a (d, k) weight.

    init="kaiming" (PEFT's default):  A_ij ~ U(-1/sqrt(k), 1/sqrt(k)),  Var = 1/(3k)
    init="gaussian" (PEFT's "gaussian"): A_ij ~ N(0, a_std^2), a_std = 1/r unless given
    B = 0 (so B A = 0 and the adapted model starts as the base model), unless
    b_std is given: then B_ij ~ N(0, b_std^2), for studying the variance of B A.

    Both backends draw from ``numpy.random.default_rng(seed)``, so the same seed
    gives the same numbers in either. seed=None draws fresh randomness.
    Returns A: (r, k), B: (d, r).
    """
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    _checks.check_rank(r, d, k)
    _checks.check_init_options(init, a_std, b_std)
    rng = np.random.default_rng(seed)
    if init == "kaiming":
        bound = kaiming_a_bound(k)             # 1/sqrt(k)
        A = rng.uniform(-bound, bound, size=(r, k))          # (r, k)
    else:
        std = gaussian_a_std(r) if a_std is None else a_std
        A = rng.normal(0.0, 1.0, size=(r, k)) * std          # (r, k)
    if b_std is None:
        B = np.zeros((d, r))                                 # (d, r)
    else:
        B = rng.normal(0.0, 1.0, size=(d, r)) * b_std        # (d, r)
    return A.astype(dtype), B.astype(dtype)


def lora_forward(x, W0, A, B, scaling):
    """y = W0 x + s B (A x), through the r-dimensional bottleneck.

    x: (..., k);  W0: (d, k);  A: (r, k);  B: (d, r)  ->  y: (..., d)
    Cost per token: d k (base) + r (k + d) (bypass), never the d k r of forming B A.

    Book: eq-ch02-rows, eq-ch02-macs (notebooks/02_forward_pass).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_finite_scalar("scaling", scaling)
    z = x @ A.T                                   # (..., r)   z = A x, the bottleneck
    return x @ W0.T + scaling * (z @ B.T)         # (..., d)   y = W0 x + s B z


def delta_w(A, B, scaling):
    """The weight update Delta W = s B A, a (d, k) matrix of rank <= r.

    Book: eq-ch02-forward, prop-ch02-rank (notebooks/02_forward_pass).
    """
    _checks.check_factors(_shape(A), _shape(B))
    _checks.check_finite_scalar("scaling", scaling)
    return scaling * (B @ A)                      # (d, r) @ (r, k) -> (d, k)


def merge(W0, A, B, scaling):
    """W = W0 + s B A: fold the adapter into the weight (zero extra latency afterwards).

    Book: eq-ch02-merge (notebooks/02_forward_pass).
    """
    _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    for name, a in (("W0", W0), ("A", A), ("B", B)):
        _check_finite(name, a)
    return W0 + delta_w(A, B, scaling)            # (d, k)


def unmerge(W, A, B, scaling):
    """W0 = W - s B A: recover the base weight (exact in exact arithmetic).

    Book: eq-ch02-merge, prop-ch02-roundtrip (notebooks/02_forward_pass).
    """
    _checks.check_weight_and_factors(_shape(W), _shape(A), _shape(B), W_name="W")
    for name, a in (("W", W), ("A", A), ("B", B)):
        _check_finite(name, a)
    return W - delta_w(A, B, scaling)             # (d, k)


def lora_grads(x, grad_y, A, B, scaling):
    """Hand-derived gradients of a loss L through the LoRA bypass.

    Column convention (the paper's), X: (k, n), Ybar = dL/dY: (d, n), G = dL/dW = Ybar X^T: (d, k):
        dL/dB = s Ybar (A X)^T = s G A^T          (d, r)
        dL/dA = s B^T Ybar X^T = s B^T G          (r, k)
    Row convention used here, x = X^T: (n, k), g = Ybar^T: (n, d):
        dL/dB = s g^T (x A^T)        (d, n) @ (n, r)
        dL/dA = s (g B)^T x          (r, n) @ (n, k)
    At B = 0, dL/dA = 0: only B moves on the first step.
    Leading axes of x (..., k) are flattened into n.  Returns (dA, dB).

    Book: eq-ch05-grads, eq-ch05-rows (notebooks/05_gradients).
    """
    d, r, k = _checks.check_factors(_shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_grad_output(_shape(grad_y), _shape(x), d)
    _checks.check_finite_scalar("scaling", scaling)
    x2 = x.reshape(-1, k)                         # (n, k)
    g2 = grad_y.reshape(-1, d)                    # (n, d)
    z = x2 @ A.T                                  # (n, r)   z = A x
    dB = scaling * (g2.T @ z)                     # (d, r)   s Ybar (A X)^T
    dA = scaling * ((g2 @ B).T @ x2)              # (r, k)   s B^T Ybar X^T
    return dA, dB


def delta_w_sgd_step(grad_W, A, B, scaling, lr):
    """First-order change of Delta W = s B A after one SGD step of size lr on A and B.

    With G = dL/dW (d, k), the gradients are dL/dA = s B^T G and dL/dB = s G A^T, so
        Delta W' - Delta W = -lr s^2 (G A^T A + B B^T G) + lr^2 s^3 G A^T B^T G.
    Returns the first-order term  -lr s^2 (G A^T A + B B^T G), a (d, k) matrix.

    Book: eq-ch03-sgd-step (notebooks/03_scaling).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(grad_W), _shape(A), _shape(B), W_name="grad_W")
    _checks.check_finite_scalar("scaling", scaling)
    _checks.check_finite_scalar("lr", lr)
    from_A = (grad_W @ A.T) @ A                   # (d, r) @ (r, k) -> (d, k)   G A^T A: A moves, B fixed
    from_B = B @ (B.T @ grad_W)                   # (d, r) @ (r, k) -> (d, k)   B B^T G: B moves, A fixed
    return -lr * scaling**2 * (from_A + from_B)   # (d, k)


# --------------------------------------------------------------------------- many adapters in one batch


def pad_adapters(As, Bs, r=None):
    """Stack adapters of ranks r_1 .. r_m for one weight, zero-padded to a common rank r.

    As: m factors A_j (r_j, k);  Bs: m factors B_j (d, r_j)  ->  A: (m, r, k), B: (m, d, r),
    r = max r_j unless given. Padding changes no product:
        [B_j 0] [A_j; 0] = B_j A_j,
    the extra rows of A_j and columns of B_j only ever meet zeros.

    Book: eq-ch09-padding (notebooks/09_production).
    """
    ranks, d, k = _checks.check_adapter_list([_shape(A) for A in As], [_shape(B) for B in Bs], r)
    r = max(ranks) if r is None else r
    A_pad = _zeros(As[0], (len(As), r, k))                  # (m, r, k)
    B_pad = _zeros(Bs[0], (len(Bs), d, r))                  # (m, d, r)
    for j, (A, B) in enumerate(zip(As, Bs)):
        A_pad[j, : A.shape[0]] = A                          # rows r_j .. r of A_j stay 0
        B_pad[j, :, : B.shape[1]] = B                       # columns r_j .. r of B_j stay 0
    return A_pad, B_pad


def batched_lora_forward(x, W0, As, Bs, scalings, index):
    """A mixed batch: row i through its own adapter a = index[i] (or none when a = -1).

        y_i = W0 x_i + s_a B_a (A_a x_i),   and  y_i = W0 x_i  when a = -1

    x: (n, k);  W0: (d, k);  As: (m, r, k);  Bs: (m, d, r);  scalings: (m,);
    index: (n,) integers in [-1, m)  ->  y: (n, d).
    One product x W0^T for the whole batch, then two gathered batched products, no loop
    over rows: "shrink" z_i = A_a x_i (r numbers) and "expand" B_a z_i (Punica's BGMV).
    The gathers copy A_a and B_a once per row, (n, r, k) and (n, d, r): a GPU kernel
    reads them in place. Adapters of lower rank are padded with ``pad_adapters``.

    Book: eq-ch09-batched (notebooks/09_production).
    """
    n, d, r, k, m = _checks.check_batched_lora(_shape(x), _shape(W0), _shape(As), _shape(Bs), _shape(scalings),
                                               _shape(index))
    _checks.check_adapter_index(*_index_range(index), m)
    on = index >= 0                               # (n,)   rows served by an adapter
    a = index * on                                # (n,)   their adapter; 0 for base rows, masked below
    z = (As[a] @ x[:, :, None])[:, :, 0]          # (n, r)   shrink: z_i = A_a x_i
    up = (Bs[a] @ z[:, :, None])[:, :, 0]         # (n, d)   expand: B_a z_i
    return x @ W0.T + (scalings[a] * on)[:, None] * up      # (n, d)   W0 x_i + s_a B_a z_i
