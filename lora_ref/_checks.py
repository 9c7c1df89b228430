"""Input validation shared by both backends.

Every check works on plain Python values and on ``.shape`` tuples, so it never
imports numpy or torch. Each error names the argument and the value or shape at
fault, so that a reader who passes ``A`` transposed is told exactly that.
"""

from __future__ import annotations

import math
import numbers


def check_rank(r, d=None, k=None):
    """r must be an integer with 1 <= r <= min(d, k).

    A rank-r update ``B A`` of a (d, k) matrix has rank at most min(d, k), so a
    larger r only adds parameters that can never be used.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an integer, got r={r!r} of type {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got r={r}")
    if d is not None and k is not None and r > min(d, k):
        raise ValueError(
            f"r={r} exceeds min(d, k) = min({d}, {k}) = {min(d, k)}: "
            f"the update B A of a ({d}, {k}) matrix has rank at most {min(d, k)}"
        )


def check_dim(name, value):
    """A matrix dimension: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {name}={value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {name}={value}")


def check_finite_scalar(name, value):
    """alpha, scaling, a standard deviation: a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {name}={value}")


def check_finite_count(name, n_nonfinite, shape):
    """An array or tensor with no nan or inf; the caller counts the non-finite entries."""
    if n_nonfinite:
        raise ValueError(f"{name} has {n_nonfinite} non-finite value(s) (nan or inf) in shape {tuple(shape)}")


def resolve_dtype(dtype, library, dtype_type):
    """A dtype or its name -> the dtype: 'float64' or torch.float64 -> torch.float64.

    library is the module that names its dtypes (torch), dtype_type their class (torch.dtype);
    passed in, so that this module imports neither numpy nor torch.
    """
    if isinstance(dtype, dtype_type):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(library, dtype, None), dtype_type):
        return getattr(library, dtype)
    raise TypeError(f"dtype must be a {library.__name__} dtype or its name such as 'float32', got {dtype!r}")


def check_ndim(name, shape, ndim):
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(shape)}")


def check_factors(A_shape, B_shape):
    """A: (r, k) and B: (d, r) must share r.  Returns (d, r, k)."""
    check_ndim("A", A_shape, 2)
    check_ndim("B", B_shape, 2)
    r, k = A_shape
    d, r_b = B_shape
    if r_b != r:
        raise ValueError(
            f"A is {tuple(A_shape)} = (r, k) and B is {tuple(B_shape)} = (d, r): "
            f"B has {r_b} columns but A has {r} rows"
        )
    if r == 0:
        raise ValueError(f"r must be a positive integer, got A of shape {tuple(A_shape)} (r=0)")
    return d, r, k


def check_weight_and_factors(W_shape, A_shape, B_shape, W_name="W0"):
    """W: (d, k), A: (r, k), B: (d, r).  Returns (d, r, k)."""
    d, r, k = check_factors(A_shape, B_shape)
    check_ndim(W_name, W_shape, 2)
    if tuple(W_shape) != (d, k):
        raise ValueError(
            f"{W_name} is {tuple(W_shape)} but B A is ({d}, {k}) "
            f"(B {tuple(B_shape)} @ A {tuple(A_shape)}); expected {W_name} of shape ({d}, {k})"
        )
    return d, r, k


def check_inputs(x_shape, k, name="x"):
    """x: (..., k), the last axis must match the input width k."""
    if len(x_shape) == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    if x_shape[-1] != k:
        raise ValueError(
            f"{name} has shape {tuple(x_shape)}; its last axis must be k={k}, the input width of A (r, k)"
        )


def check_grad_output(g_shape, x_shape, d):
    """grad_y must have the shape of y = (..., d), with the leading axes of x."""
    expected = tuple(x_shape[:-1]) + (d,)
    if tuple(g_shape) != expected:
        raise ValueError(
            f"grad_y has shape {tuple(g_shape)} but y = lora_forward(x, ...) has shape {expected} "
            f"(x {tuple(x_shape)}, d={d})"
        )


def check_init_options(init, a_std, b_std):
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got init={init!r}")
    if a_std is not None:
        check_finite_scalar("a_std", a_std)
        if init != "gaussian":
            raise ValueError("a_std sets the std of a Gaussian A; pass init='gaussian' with it")
        if a_std < 0:
            raise ValueError(f"a_std must be >= 0, got a_std={a_std}")
    if b_std is not None:
        check_finite_scalar("b_std", b_std)
        if b_std < 0:
            raise ValueError(f"b_std must be >= 0, got b_std={b_std}")


def check_batched_lora(x_shape, W_shape, As_shape, Bs_shape, s_shape, index_shape):
    """A mixed batch: x (n, k), W0 (d, k), As (m, r, k), Bs (m, d, r), scalings (m,), index (n,).

    Returns (n, d, r, k, m).
    """
    check_ndim("x", x_shape, 2)
    check_ndim("W0", W_shape, 2)
    check_ndim("As", As_shape, 3)
    check_ndim("Bs", Bs_shape, 3)
    (n, k), (d, k_w), (m, r, k_a) = x_shape, W_shape, As_shape
    if k_w != k:
        raise ValueError(f"x is {tuple(x_shape)} = (n, k) but W0 is {tuple(W_shape)} = (d, k): k differs ({k} != {k_w})")
    if k_a != k:
        raise ValueError(f"As is {tuple(As_shape)} = (m, r, k) but x is {tuple(x_shape)} = (n, k): k differs ({k_a} != {k})")
    if tuple(Bs_shape) != (m, d, r):
        raise ValueError(f"Bs is {tuple(Bs_shape)}; with As {tuple(As_shape)} = (m, r, k) and W0 {tuple(W_shape)} = (d, k) "
                         f"it must be (m, d, r) = ({m}, {d}, {r})")
    if m == 0 or r == 0:
        raise ValueError(f"As is {tuple(As_shape)}: need at least one adapter (m >= 1) of rank r >= 1")
    if tuple(s_shape) != (m,):
        raise ValueError(f"scalings has shape {tuple(s_shape)}; expected (m,) = ({m},), one scale per adapter")
    if tuple(index_shape) != (n,):
        raise ValueError(f"index has shape {tuple(index_shape)}; expected (n,) = ({n},), one adapter per row of x")
    return n, d, r, k, m


def check_adapter_index(is_integer, lo, hi, m):
    """index: integers in [-1, m), -1 meaning the base model alone; lo, hi are its min and max."""
    if not is_integer:
        raise TypeError("index must hold integers (the adapter of each row, -1 for the base model)")
    if lo < -1 or hi >= m:
        raise ValueError(f"index must be in [-1, m) = [-1, {m}) (-1: base model only), got values from {lo} to {hi}")


def check_choice(name, value, choices):
    """value must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {name}={value!r}")


def check_adapter_list(A_shapes, B_shapes, r=None):
    """Adapters j = 1..m with A_j (r_j, k) and B_j (d, r_j), one (d, k) for all; r >= every r_j.

    Returns (ranks, d, k).
    """
    if len(A_shapes) == 0 or len(A_shapes) != len(B_shapes):
        raise ValueError(f"need one B per A and at least one adapter, got {len(A_shapes)} A's and {len(B_shapes)} B's")
    dks = []
    for j, (A_shape, B_shape) in enumerate(zip(A_shapes, B_shapes)):
        try:
            d_j, _, k_j = check_factors(A_shape, B_shape)
        except ValueError as exc:
            raise ValueError(f"adapter {j}: {exc}") from None
        dks.append((d_j, k_j))
    if len(set(dks)) != 1:
        raise ValueError(f"adapters must all update one (d, k) weight, got (d, k) = {dks}")
    ranks = [tuple(s)[0] for s in A_shapes]
    if r is not None:
        check_rank(r)
        if r < max(ranks):
            raise ValueError(f"r={r} is below the largest adapter rank {max(ranks)}: padding cannot shrink an adapter")
    return ranks, dks[0][0], dks[0][1]


# --------------------------------------------------------------------------- variants of LoRA (chapter 10)


def check_weight(shape, name="W0"):
    """A weight matrix (d, k).  Returns (d, k)."""
    check_ndim(name, shape, 2)
    d, k = shape
    if d == 0 or k == 0:
        raise ValueError(f"{name} is {tuple(shape)}: a weight needs d >= 1 rows and k >= 1 columns")
    return d, k


def check_positive_scaling(scaling):
    """PiSSA takes sqrt(sigma / s), so s = alpha / r must be finite and positive."""
    check_finite_scalar("scaling", scaling)
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got scaling={scaling}: the init takes sqrt(sigma / s), s = alpha / r")


def check_double_rank(r, d, k):
    """LoRA-GA reads 2 r singular triplets of the gradient: 2 r <= min(d, k)."""
    check_rank(r, d, k)
    if 2 * r > min(d, k):
        raise ValueError(
            f"r={r} needs 2r = {2 * r} singular triplets of the ({d}, {k}) gradient, "
            f"but it has min(d, k) = {min(d, k)}: choose r <= {min(d, k) // 2}"
        )


def check_vector(name, shape, length, meaning):
    """A per-row or per-rank vector: shape (length,)."""
    if tuple(shape) != (length,):
        raise ValueError(f"{name} has shape {tuple(shape)}; expected ({length},), {meaning}")


def check_no_zero_rows(n_zero, d, name="W0 + s B A"):
    """DoRA divides each output row by its norm: no row may be 0."""
    if n_zero:
        raise ValueError(f"{n_zero} of the {d} rows of {name} are zero: DoRA divides each row by its norm")
