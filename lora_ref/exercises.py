"""Checkers for the book's exercises.

Each checker computes the expected answer with ``lora_ref`` (never a number typed
in), compares it with the reader's, and returns a ``Verdict``: it shows one line in a
notebook, ``✓`` with the value or ``✗`` with a hint, and it is truthy only when
the answer is right, so an instructor's test can ``assert`` on it.

    from lora_ref import exercises as ex
    ex.ch01_lora_params(answer=...)

This module imports torch only for chapter 8's checkers, when they are called.
"""

from __future__ import annotations

import math

import numpy as np

from . import budget
from . import numpy as ln

__all__ = [
    "Verdict",
    "check",
    "ch01_lora_params",
    "ch01_full_finetune_gb",
    "ch01_rank_for_equal_size",
    "ch02_forward_by_hand",
    "ch02_crossover_tokens",
    "ch02_bf16_spacing",
    "ch03_lr_B_factor",
    "ch03_rank_exponent",
    "ch03_retune_factor",
    "ch04_kaiming_variance",
    "ch04_false_init_std",
    "ch04_first_step_exponent",
    "ch05_grad_A_by_hand",
    "ch05_adam_first_step",
    "ch05_backward_mac_ratio",
    "ch05_loraplus_alpha",
    "ch06_eckart_young_error",
    "ch06_rank_for_energy",
    "ch06_saddle_loss",
    "ch07_effective_rank",
    "ch07_random_similarity",
    "ch07_random_amplification",
    "ch08_bits_per_weight",
    "ch08_nf4_code",
    "ch09_linear_cross_term",
    "ch09_adapters_that_fit",
    "ch09_padding_overhead",
    "ch10_residual_norms",
    "ch10_conversion_config",
    "ch10_vera_rank_for_lora_budget",
    "ch10_stuck_error",
    "ch11_predicted_lr",
    "ch11_dropout_variance",
    "ch11_equal_scale_rank",
    "ch11_equal_budget_rank",
    "ch12_ddp_bytes",
    "ch12_ring_bytes",
    "ch12_fsdp_gather_bytes",
    "ch12_gpus_needed",
]


def _fmt(value):
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    arr = np.asarray(value)
    return np.array2string(arr, precision=6, suppress_small=True) if arr.ndim else str(value)


class Verdict:
    """The outcome of a check: truthy when right; shows its one-line message in a notebook."""

    def __init__(self, ok, message):
        self.ok, self.message = bool(ok), message

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return self.message


def _as_expected_shape(a, e):
    """a, reshaped to e's shape when the book's conventions allow it, else None.

    A vector may be given as a row or as a column: the text writes column vectors
    (x in R^k), the code rows (x: (k,)). Nothing else is reshaped.
    """
    if a.shape == e.shape:
        return a
    if e.ndim == 1 and a.ndim == 2 and a.size == e.size and 1 in a.shape:
        return a.reshape(e.shape)
    return None


def _half_unit(expected, sig_figs):
    """Half a unit in the sig_figs-th significant figure of each expected value: a correctly
    rounded answer is never further than this from the exact one."""
    mag = np.floor(np.log10(np.maximum(np.abs(expected), np.finfo(np.float64).tiny)))
    return 0.5 * 10.0 ** (mag - sig_figs + 1)


def check(name, answer, expected, *, rtol=0.0, atol=0.0, sig_figs=None, hint=""):
    """Compare ``answer`` with ``expected`` and return a Verdict.

    ``sig_figs=n`` accepts any answer within half a unit of the n-th significant
    figure of the exact value, so the answer rounded to n figures passes and so does
    any more precise one; a value off by one unit in that figure fails. Otherwise the
    answer must agree to ``rtol``/``atol`` (exact when both are 0, for integers).
    """
    if answer is None or answer is ...:
        return Verdict(False, f"… {name}: no answer yet. Replace `answer = None` with your computation.")
    try:
        a = np.asarray(answer, dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
        a = _as_expected_shape(a, e)
        if a is None or not np.all(np.isfinite(a)):
            ok = False
        elif sig_figs is not None:
            ok = bool(np.all(np.abs(a - e) <= _half_unit(e, sig_figs) * (1 + 1e-12)))
        else:
            ok = bool(np.allclose(a, e, rtol=rtol, atol=atol))
    except (TypeError, ValueError):
        ok = False
    if ok:
        return Verdict(True, f"✓ {name}: {_fmt(answer)} is right.")
    return Verdict(False, f"✗ {name}: {_fmt(answer)} is not right. Hint: {hint}")


# --------------------------------------------------------------------------- chapter 01


def ch01_lora_params(answer, model="llama-3.1-70b", r=8, target_modules="attention"):
    """LoRA trainable parameters of a shipped model for r and a target set."""
    expected = budget.lora_param_count(budget.load_config(model), r, target_modules)
    return check(
        f"LoRA parameters of {model}, r={r}, {target_modules} (an exact integer)", answer, expected, rtol=0,
        hint="sum r (d + k) over the targeted projections of one layer (W0 is (d, k)), times num_hidden_layers; "
        "k_proj and v_proj map hidden -> num_key_value_heads * head_dim.",
    )


def ch01_full_finetune_gb(answer, model="mistral-7b"):
    """Memory of full fine-tuning with mixed-precision Adam, in GB (1e9 bytes), activations excluded."""
    expected = budget.full_finetune_memory(budget.load_config(model)).gb
    return check(
        f"full fine-tuning memory of {model} in GB (4 significant figures)", answer, expected, sig_figs=4,
        hint="16 bytes per parameter (2 weights + 2 gradients + 4 master + 4 m + 4 v), "
        "times base_param_count; GB means 1e9 bytes.",
    )


def ch01_rank_for_equal_size(answer, model="llama-3.1-8b", r_small=64, small="qv", large="all-linear"):
    """The r on the `large` target set whose adapter has as many parameters as r_small on `small`."""
    cfg = budget.load_config(model)
    target = budget.lora_param_count(cfg, r_small, small)
    per_rank = budget.lora_param_count(cfg, 1, large)          # the count is linear in r
    expected = target / per_rank
    return check(
        f"r on {large} matching r={r_small} on {small} for {model} (4 significant figures)", answer, expected,
        sig_figs=4,
        hint="the count is linear in r: divide the small set's count by the large set's count at r = 1. "
        "The answer need not be an integer.",
    )


# --------------------------------------------------------------------------- chapter 02

WORKED_EXAMPLE = dict(
    W0=np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]),   # (d, k) = (2, 3)
    A=np.array([[1.0, 1.0, 0.0]]),                      # (r, k) = (1, 3)
    B=np.array([[2.0], [-1.0]]),                        # (d, r) = (2, 1)
    x=np.array([1.0, 2.0, 3.0]),                        # (k,)
    alpha=2.0,
    r=1,
)


def ch02_forward_by_hand(answer, x=(0.0, 1.0, -1.0)):
    """y = W0 x + (alpha/r) B (A x) with the worked example's W0, A, B, alpha, r and a new input x."""
    e = WORKED_EXAMPLE
    x = np.asarray(x, dtype=np.float64)
    expected = ln.lora_forward(x, e["W0"], e["A"], e["B"], ln.scaling(e["alpha"], e["r"]))
    return check(
        f"y for x = {x.tolist()} (exact)", answer, expected, rtol=0, atol=0,
        hint="first z = A x (one number), then W0 x, then add (alpha/r) * B z; give y as a vector of two numbers.",
    )


def ch02_crossover_tokens(answer, d=4096, k=11008):
    """Tokens above which forming B A once costs fewer MACs than the bypass (any r)."""
    expected = budget.materialise_crossover_tokens(d, k)
    return check(
        f"crossover T* for d={d}, k={k} (5 significant figures)", answer, expected, sig_figs=5,
        hint="set T r (d + k) = d r k and solve for T; r cancels.",
    )


def ch02_bf16_spacing(answer, mantissa_bits=7):
    """The spacing of consecutive floats in [1, 2) with p = mantissa_bits stored bits, exact: 2^-p
    (bf16: p = 7, fp16: 10, fp32: 23)."""
    if not (isinstance(mantissa_bits, (int, np.integer)) and 1 <= mantissa_bits <= 52):
        raise ValueError(f"mantissa_bits must be an integer in 1..52, got {mantissa_bits!r}")
    expected = math.ldexp(1.0, -int(mantissa_bits))            # 1 + m 2^-p for the 2^p values m of p stored bits
    hint = "numbers in [1, 2) are 1 + m * 2^-p for the 2^p values m of the p stored mantissa bits."
    try:
        if float(answer) == expected / 2:                      # half the spacing: the largest rounding error
            hint = "that is half the spacing, the largest error of one rounding in [1, 2); we ask for the spacing."
    except (TypeError, ValueError):
        pass
    fmt = "bf16 numbers" if mantissa_bits == 7 else f"floats with {int(mantissa_bits)} stored mantissa bits"
    return check(f"the spacing of {fmt} in [1, 2) (exact)", answer, expected, rtol=0, hint=hint)


# --------------------------------------------------------------------------- chapter 03


def ch03_lr_B_factor(answer, c=4, optimizer="adam"):
    """Raising alpha by c, with PEFT's init (A0, B0 = 0) and lr kept, gives the Delta W trajectory of the
    old alpha with B's learning rate (only B's) multiplied by this factor."""
    from . import rank_scaling

    # (c s, A0, 0, lr, lr) -> rescale B by b = c: (s, A0, 0, lr, c^p lr)
    expected = rank_scaling.equivalent_settings(float(c), 1.0, 1.0, 1.0, float(c), optimizer)["lr_B"]
    return check(
        f"factor on B's learning rate equivalent to alpha x {c} under {optimizer} (exact)", answer, expected,
        rtol=1e-12,
        hint="Delta W = s B A is unchanged by s -> s / c, B -> c B, and B0 = 0 stays 0; find how B's gradient "
        "scales, then how the optimizer turns a gradient into a step (SGD: linearly; Adam: not at all).",
    )


def ch03_rank_exponent(answer, e=-0.25, optimizer="sgd"):
    """Exponent of r in the expected first-step loss decrease from B = 0, for s = alpha r^e."""
    from fractions import Fraction

    from . import rank_scaling

    expected = float(rank_scaling.first_step_rank_exponent(Fraction(e).limit_denominator(1000), optimizer))
    return check(
        f"exponent of r in the first-step decrease, s = alpha r^({e}), {optimizer} (exact)", answer, expected,
        rtol=0, atol=1e-12,
        hint="write the decrease with G A^T: SGD gives lr s^2 ||G A^T||_F^2, Adam lr s sum |G A^T|; "
        "each of the r rows of A adds the same expected amount.",
    )


def ch03_retune_factor(answer, r_from=16, r_to=64, rule="alpha/r", optimizer="sgd"):
    """The factor on lr that keeps the expected first-step decrease when r changes at fixed alpha."""
    from . import rank_scaling

    expected = rank_scaling.retune_factor(r_from, r_to, rule, optimizer)
    return check(
        f"lr factor from r={r_from} to r={r_to}, s = {rule}, {optimizer} (3 significant figures)", answer, expected,
        sig_figs=3,
        hint="the decrease grows like lr r^E; find E for this rule and optimizer, then keep lr r^E fixed.",
    )


# --------------------------------------------------------------------------- chapter 04


def ch04_kaiming_variance(answer, k=4096):
    """Var(A_ij) of PEFT's default A init, kaiming_uniform_(a=sqrt(5)), for fan_in k."""
    from . import initialization

    expected = initialization.a_variance("kaiming", k, 1)
    return check(f"Var(A_ij) of PEFT's default init at k={k} (4 significant figures)", answer, expected,
                 sig_figs=4, hint="the bound is gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + a^2)), a = sqrt(5); "
                 "then Var U(-b, b) = (1 / 2b) * integral of x^2 from -b to b.")


def ch04_false_init_std(answer, k=4096):
    """Standard deviation of (BA)_ij under PEFT's init_lora_weights=False, fan_in k."""
    from . import initialization

    expected = math.sqrt(initialization.peft_false_ba_variance(k))
    return check(f"sd of (BA)_ij with init_lora_weights=False, k={k} (4 significant figures)", answer, expected,
                 sig_figs=4, hint="both factors keep nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B's fan_in is r. "
                 "Multiply the variance of a product by r, then take the square root.")


def ch04_first_step_exponent(answer, optimizer="adam", init="gaussian", rule="alpha/sqrt(r)"):
    """The exponent e of r in the size of the adapter's output after the first step from B = 0."""
    from . import initialization

    expected = float(initialization.first_step_exponent(optimizer, init, rule))
    return check(f"exponent of r, {optimizer}, {init} A, s = {rule} (exact)", answer, expected, atol=1e-12,
                 hint="write the first step's output size with s, r and Var(A_ij), then put in how each depends on r.")


# --------------------------------------------------------------------------- chapter 05


def ch05_grad_A_by_hand(answer, grad_y=(1.0, 1.0)):
    """dL/dA (r = 1: one row of k = 3 numbers) for chapter 02's worked example and an upstream gradient ybar."""
    e = WORKED_EXAMPLE
    ybar = np.asarray(grad_y, dtype=np.float64)
    dA, _ = ln.lora_grads(e["x"][None, :], ybar[None, :], e["A"], e["B"], ln.scaling(e["alpha"], e["r"]))
    return check(
        f"dL/dA for ybar = {ybar.tolist()} (exact, three numbers)", answer, dA.reshape(-1), rtol=0, atol=0,
        hint="dL/dA = s B^T ybar x^T: B^T ybar is one number here; multiply x by s and by it.",
    )


def ch05_adam_first_step(answer, beta1=0.9, beta2=0.999):
    """|A's first Adam step| / lr, at step 2 from B = 0 (its gradient was exactly 0 at step 1), eps -> 0."""
    from . import gradient_dynamics

    expected = gradient_dynamics.adam_first_step(beta1, beta2, t=2)
    return check(
        f"A's first Adam step / lr, betas ({beta1}, {beta2}) (4 significant figures)", answer, expected, sig_figs=4,
        hint="write m_2 and v_2 with g_1 = 0, divide by the bias corrections 1 - beta^2, and take m_hat / sqrt(v_hat); "
        "the size of g cancels.",
    )


def ch05_backward_mac_ratio(answer, d=4096, k=4096, r=16):
    """MACs of one training step (forward + backward, dL/dx included) of a LoRA layer over a fully trained one."""
    from . import gradient_dynamics

    expected = gradient_dynamics.training_macs(1, d, k, r)["total"] / gradient_dynamics.training_macs(1, d, k)["total"]
    return check(
        f"training MACs of LoRA / full, d={d}, k={k}, r={r} (4 significant figures)", answer, expected, sig_figs=4,
        hint="full: forward, dL/dx and dL/dW, each T d k. LoRA: no dL/dW, but the bypass adds T r (d + k) "
        "forward and 2 T r (d + k) backward. T cancels.",
    )


def ch05_loraplus_alpha(answer, alpha=16.0, ratio=16.0, r=8):
    """The alpha of a plain LoRA run (Adam, PEFT's init B = 0, eps neglected) equal to LoRA+ at (alpha, ratio)."""
    from . import rank_scaling

    # (s, A0, 0, lr, ratio lr) -> rescale B by b = 1 / ratio: (ratio s, A0, 0, lr, lr), and alpha = s r
    expected = rank_scaling.equivalent_settings(alpha / r, 1.0, ratio, 1.0, 1.0 / ratio, "adam")["scaling"] * r
    return check(
        f"alpha of the plain run equal to LoRA+ with ratio {ratio:g} at alpha = {alpha:g}, r = {r} (exact)", answer,
        expected, rtol=1e-12,
        hint="rescale B by b = 1 / ratio: B0 = 0 stays 0, Adam's step on B scales by b, and Delta W = s B A "
        "needs s / b.",
    )


# --------------------------------------------------------------------------- chapter 06


def ch06_eckart_young_error(answer, sigma=(5.0, 3.0, 2.0, 1.0), r=2):
    """min over rank-r X of ||W - X||_F for W = diag(sigma), 4 significant figures."""
    from . import spectral

    expected = spectral.eckart_young_error(np.diag(np.asarray(sigma, dtype=np.float64)), r, "fro")
    return check(
        f"Frobenius error of the best rank-{r} approximation of diag{tuple(float(x) for x in sigma)} "
        "(4 significant figures)", answer, expected, sig_figs=4,
        hint="keep the r largest singular values; the error is the root of the sum of the squares of the others "
        "(not their sum, and not the largest of them: that is the spectral norm).",
    )


def ch06_rank_for_energy(answer, rho=0.9, n=128, tau=0.9):
    """The smallest r whose truncation keeps a share tau of ||W||_F^2 when sigma_i = rho^(i-1), i = 1..n (exact)."""
    from . import low_rank

    expected = low_rank.rank_for_energy(rho ** np.arange(n, dtype=np.float64), tau)
    return check(
        f"smallest r keeping {tau:g} of the energy, sigma_i = {rho:g}^(i-1), n = {n} (an exact integer)", answer,
        expected, rtol=0,
        hint="the energy kept at rank r is a ratio of two geometric sums in rho^2: (1 - rho^(2r)) / (1 - rho^(2n)); "
        "solve for the smallest integer r that reaches tau.",
    )


def ch06_saddle_loss(answer, sigma=(4.0, 3.0, 2.0, 1.0), kept=(1, 3)):
    """The loss 1/2 ||B A - W*||_F^2 at the critical point whose B A keeps the singular directions ``kept``."""
    from . import low_rank

    expected = low_rank.critical_loss(np.asarray(sigma, dtype=np.float64), kept)
    return check(
        f"loss at the critical point keeping directions {tuple(kept)} of diag{tuple(float(x) for x in sigma)} "
        "(exact)", answer, expected, rtol=1e-12,
        hint="at a critical point B A = sum over the kept i of sigma_i u_i v_i^T; the residual holds the other "
        "directions, and the loss is half the sum of their squared singular values.",
    )


# --------------------------------------------------------------------------- chapter 07


def ch07_effective_rank(answer, sigma=(4.0, 2.0, 1.0, 1.0)):
    """The effective rank (Roy & Vetterli) of a matrix with singular values ``sigma``, 4 significant figures."""
    from . import spectral

    expected = spectral.effective_rank_of_spectrum(np.asarray(sigma, dtype=np.float64))
    return check(
        f"effective rank of diag{tuple(float(x) for x in sigma)} (4 significant figures)", answer, expected,
        sig_figs=4,
        hint="normalise the singular values to p_i = sigma_i / sum_j sigma_j, then erank = exp(-sum p_i log p_i) "
        "= prod p_i^(-p_i); with powers of 2 the product is a power of 2.",
    )


def ch07_random_similarity(answer, i=4, j=16, k=128):
    """E[phi] between a fixed i-dimensional and a uniformly random j-dimensional subspace of R^k, exact."""
    from . import adapter_geometry

    expected = adapter_geometry.random_subspace_similarity(i, j, k)
    hint = ("E[V V^T] = (j/k) I for a random j-dimensional V with orthonormal columns; "
            "then E||U^T V||_F^2 = tr(U^T E[V V^T] U), and phi divides by min(i, j).")
    try:
        if math.isclose(float(answer), i * j / k) or math.isclose(float(answer), min(i, j) / k):
            hint = "close: that is E||U^T V||_F^2 or min(i, j)/k; phi divides i j / k by min(i, j)."
    except (TypeError, ValueError):
        pass
    return check(f"E[phi] for random subspaces, i={i}, j={j}, k={k} (exact)", answer, expected, rtol=1e-12,
                 hint=hint)


def ch07_random_amplification(answer, delta_w_fro=3.57, w0_fro=61.95, d=12288, k=12288, r=64):
    """The amplification factor a rank-r update of norm ||Delta W||_F would have if its top-r directions
    were random (the root-mean-square denominator), 3 significant figures."""
    from . import adapter_geometry

    expected = delta_w_fro / adapter_geometry.random_projected_norm(w0_fro, d, k, r)
    return check(
        f"amplification factor of a rank-{r} update of norm {delta_w_fro} in random directions of a "
        f"({d}, {k}) W0 of norm {w0_fro} (3 significant figures)", answer, expected, sig_figs=3,
        hint="for random orthonormal U (d, r) and V (k, r), E[U U^T] = (r/d) I and E[V V^T] = (r/k) I, so "
        "E||U^T W0 V||_F^2 = (r/d)(r/k)||W0||_F^2; divide ||Delta W||_F by its square root.",
    )


# --------------------------------------------------------------------------- chapter 08


def ch08_bits_per_weight(answer, blocksize=32):
    """Bits per weight of NF4 with double quantisation for a given first-level block size."""
    expected = budget.nf4_bits_per_param(blocksize, double_quant=True)
    return check(
        f"NF4 bits per weight with double quantisation, blocksize {blocksize} (5 significant figures)", answer,
        expected, sig_figs=5,
        hint="4 bits of code, plus the 8-bit constant shared by the block, plus one fp32 scale "
        "shared by 256 blocks: 4 + 8/B + 32/(256 B).",
    )


def ch08_nf4_code(answer, w=0.3, absmax=1.2):
    """The NF4 code (0..15) of weight w in a block with absmax c: the nearest level of w / c.

    The expected code comes from the library's quantiser (``quant.nf4_codes``, bitsandbytes'
    bucketing in float32) on a block that holds w and a weight of size c, so c is its absmax.
    """
    import torch

    from . import quant

    if not 0 < absmax or not abs(w) <= absmax:
        raise ValueError(f"need 0 < absmax and |w| <= absmax (absmax is the block's largest |w|), "
                         f"got w={w}, absmax={absmax}")
    expected = int(quant.nf4_codes(torch.tensor([w, absmax], dtype=torch.float32), blocksize=2)[0])
    return check(
        f"NF4 code of w={w} with absmax {absmax} (an integer, 0-15)", answer, expected, rtol=0,
        hint="divide w by the block's absmax, then find the index of the nearest of the 16 sorted levels "
        "of quant.nf4_codebook() (index 7 is the zero).",
    )


# --------------------------------------------------------------------------- chapter 09


def ch09_linear_cross_term(answer, w=(0.3, -0.6), s=(2.0, 0.5)):
    """The coefficient of B_1 A_2 in the update that PEFT's "linear" combination of two adapters gives."""
    import torch

    from .adapters import combine_factors

    # unit factors, so that B_i A_j is the matrix unit E_ij: entry (0, 1) of the combined B A is the coefficient
    As = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]        # (1, 2)
    Bs = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])]    # (2, 1)
    A, B = combine_factors(As, Bs, list(s), list(w), "linear")
    expected = float((B @ A)[0, 1])
    return check(
        f"coefficient of B_1 A_2 in Delta W of 'linear', w = {tuple(w)}, s = {tuple(s)} (4 significant figures)",
        answer, expected, sig_figs=4,
        hint="write the combined B and A as sums of sqrt|w_i s_i| B_i and sign(w_i s_i) sqrt|w_i s_i| A_i, multiply "
        "them out and read off the term B_1 A_2; the sign goes on A only.",
    )


def ch09_adapters_that_fit(answer, model="llama-3.1-8b", r=16, memory_gb=80, reserved_gb=20):
    """Adapters of rank r on all linear layers, in bf16, that fit beside the bf16 base in memory_gb (1e9 bytes)
    with reserved_gb kept for the KV cache and activations."""
    from . import serving

    expected = serving.adapters_that_fit(budget.load_config(model), r, "all-linear", memory_gb * 1e9,
                                         reserved_bytes=reserved_gb * 1e9)
    return check(
        f"rank-{r} adapters of {model} that fit in {memory_gb} GB with {reserved_gb} GB reserved (an exact integer)",
        answer, expected, rtol=0,
        hint="subtract 2 bytes per base parameter and the reserve from the memory, then divide by 2 bytes per "
        "adapter parameter (lora_param_count) and round down.",
    )


def ch09_padding_overhead(answer, ranks=(4, 8, 64), rows=(1, 1, 1)):
    """The share of a padded mixed batch's bypass multiply-adds that multiply zeros."""
    from . import serving

    expected = serving.padding_overhead(list(ranks), list(rows))
    return check(
        f"share of the bypass MACs on zeros, ranks {tuple(ranks)}, rows {tuple(rows)} (4 significant figures)",
        answer, expected, sig_figs=4,
        hint="every row pays for the largest rank; the useful work of a row is its own rank. Divide the useful "
        "total by the paid total and subtract from 1.",
    )


# --------------------------------------------------------------------------- chapter 10


def ch10_residual_norms(answer, sigma=(5.0, 3.0, 2.0, 1.0), r=2):
    """(||W_res||_F after PiSSA, after MiLoRA) at rank r for W0 = diag(sigma), 4 significant figures."""
    W0 = np.diag(np.asarray(sigma, dtype=np.float64))
    expected = tuple(float(np.linalg.norm(init(W0, r, 1.0)[2])) for init in (ln.pissa_init, ln.milora_init))
    return check(
        f"(PiSSA's, MiLoRA's) ||W_res||_F at r = {r} for diag{tuple(float(x) for x in sigma)} (4 significant figures)",
        answer, expected, sig_figs=4,
        hint="PiSSA moves the r largest singular triplets into s B A and MiLoRA the r smallest; W_res keeps the "
        "others, and its Frobenius norm is the root of the sum of their squares.",
    )


def ch10_conversion_config(answer, r=16, alpha=32.0, rslora=True):
    """(r', alpha') of the plain LoRA adapter converted from a PiSSA adapter of rank r, alpha, rslora."""
    s = ln.scaling(alpha, r, rslora)
    expected = (2 * r, s * (math.sqrt(2 * r) if rslora else 2 * r))
    return check(
        f"(r', alpha') of the converted adapter, r = {r}, alpha = {alpha:g}, rslora = {rslora}", answer, expected,
        rtol=1e-9,
        hint="the converted factors [A; A0] and [B, -B0] have rank 2r and must act at the same s; solve "
        "alpha' / r' (or alpha' / sqrt(r') with rsLoRA) = s for alpha'.",
    )


def ch10_vera_rank_for_lora_budget(answer, model="llama-3.1-8b", target_modules="all-linear"):
    """The smallest VeRA rank r that trains at least as many numbers per decoder layer as LoRA at rank 1."""
    from . import variants

    shapes = [budget.linear_shapes(budget.load_config(model))[m] for m in budget.resolve_targets(target_modules)]
    lora_1 = sum(variants.trainable_params("lora", d, k, 1) for d, k in shapes)
    expected = next(r for r in range(1, 10**6) if sum(variants.trainable_params("vera", d, k, r) for d, k in shapes)
                    >= lora_1)
    return check(
        f"smallest VeRA rank matching LoRA r = 1 on {target_modules} of one {model} layer (an exact integer)", answer,
        expected, rtol=0,
        hint="VeRA trains r + d numbers per layer and LoRA at rank 1 trains d + k: sum both over the layer's "
        "modules and solve n r + sum d >= sum (d + k) for the smallest integer r.",
    )


def ch10_stuck_error(answer, sigma=(4.0, 3.0, 2.0, 1.0), r=1, planted=0.5):
    """||W_res + s B A - W*||_F after any number of gradient steps from PiSSA's init (s = 1) when
    W* = W0 + planted e_p e_p^T adds to the smallest singular direction of W0 = diag(sigma)."""
    from . import variants

    W0 = np.diag(np.asarray(sigma, dtype=np.float64))
    W_star = W0.copy()
    W_star[-1, -1] += planted
    expected = variants.init_race(W0, W_star, r, 1.0, steps=50, lr=0.05, inits=("pissa",))["pissa"][-1]
    return check(
        f"error after gradient descent from PiSSA's init, r = {r}, target adds {planted:g} to the smallest direction "
        "(4 significant figures)", answer, expected, sig_figs=4,
        hint="at PiSSA's init the residual is the planted term alone; compute dL/dB = s R A^T and dL/dA = s B^T R "
        "with A's rows and B's columns in the top-r directions.",
    )


# --------------------------------------------------------------------------- chapter 11


def ch11_predicted_lr(answer, lr=5e-3, r=16, alpha=16.0, r_new=64, alpha_new=128.0, rslora=False, rslora_new=False):
    """The learning rate at (r_new, alpha_new) that keeps the first-step size lr s r of a tuned (lr, r, alpha)."""
    from . import hyperparams

    expected = hyperparams.predicted_lr(lr, r, alpha, r_new, alpha_new, rslora, rslora_new)
    return check(
        f"the lr predicted at r = {r_new}, alpha = {alpha_new:g} from lr {lr:g} at r = {r}, alpha = {alpha:g} "
        "(3 significant figures)", answer, expected, sig_figs=3,
        hint="from B = 0 an Adam step moves each entry of B by about lr, and Delta W = s B A adds r such rows: "
        "the first step's size is about lr s r. Keep lr s r fixed and solve for the new lr.",
    )


def ch11_dropout_variance(answer, delta_W=((1.0, 2.0, 0.0), (0.0, 1.0, -1.0)), x=(1.0, -2.0, 3.0), dropout=0.2):
    """tr Cov[Delta W drop(x)] over the dropout mask: the total variance dropout adds to the adapter's output."""
    from . import hyperparams

    expected = float(np.trace(hyperparams.dropout_moments(x, delta_W, dropout)[1]))
    return check(
        f"tr Cov[ΔW drop(x)] at dropout rate {dropout:g} (4 significant figures)", answer, expected, sig_figs=4,
        hint="drop(x)_j = xi_j x_j / (1 - rho) with xi_j ~ Bernoulli(1 - rho) independent: each coordinate has "
        "variance rho / (1 - rho) x_j^2, and column j of Delta W carries it to the output with ||Delta W[:, j]||^2.",
    )


def ch11_equal_scale_rank(answer, c=2.0, alpha=16.0):
    """The rank at which the convention alpha = c r (s = alpha / r) and rsLoRA at a fixed alpha have the same s."""
    expected = (alpha / c) ** 2                                   # c = alpha / sqrt(r)
    return check(
        f"the rank r at which alpha = {c:g} r under s = alpha / r equals rsLoRA's alpha = {alpha:g} (exact)", answer,
        expected, rtol=1e-9,
        hint="alpha = c r under s = alpha / r gives s = c at every r; rsLoRA gives s = alpha / sqrt(r). "
        "Set them equal and solve for r.",
    )


def ch11_equal_budget_rank(answer, model="llama-3.1-8b", targets="qv", reference="all-linear", r_reference=4):
    """The rank at which LoRA on ``targets`` trains the nearest number of parameters to ``reference`` at
    ``r_reference`` (ties to the smaller rank)."""
    from . import hyperparams

    expected = hyperparams.equal_budget_ranks(budget.load_config(model), {targets: targets}, reference,
                                              r_reference)[targets]["r"]
    return check(
        f"the rank on {targets} with the budget of {reference} at r = {r_reference} in {model} (an exact integer)",
        answer, expected, rtol=0,
        hint="LoRA trains r (d + k) numbers per adapted (d, k) layer, the same in every decoder layer: divide "
        "the reference's per-rank sum of d + k, times its rank, by the targets' and round to the nearest integer.",
    )


# --------------------------------------------------------------------------- chapter 12


def ch12_ddp_bytes(answer, model="llama-3.1-8b", r=16, target_modules="all-linear", bytes_per_grad=4):
    """The bytes DDP all-reduces per step for LoRA at rank r on ``target_modules`` of ``model``."""
    from . import parallelism

    expected = parallelism.ddp_grad_bytes(budget.lora_param_count(budget.load_config(model), r, target_modules),
                                          bytes_per_grad)
    return check(
        f"the gradient bytes DDP all-reduces per step, LoRA r = {r} on {target_modules} of {model}, "
        f"{bytes_per_grad} bytes per gradient (exact)", answer, expected, rtol=0,
        hint="only trainable parameters have gradients, and DDP all-reduces each once per step: count the LoRA "
        "parameters, r (d + k) per adapted (d, k) layer in every decoder layer, and multiply by the bytes per gradient.",
    )


def ch12_ring_bytes(answer, n_bytes=167_772_160, world_size=8):
    """The bytes each rank sends in a ring all-reduce of n_bytes over world_size ranks."""
    from . import parallelism

    expected = parallelism.ring_allreduce_bytes(n_bytes, world_size)
    return check(
        f"bytes sent per rank in a ring all-reduce of {n_bytes:,} bytes over {world_size} ranks (exact)", answer,
        expected, rtol=1e-12,
        hint="cut the buffer into W chunks. A reduce-scatter takes W - 1 steps, each rank sending one chunk per "
        "step; an all-gather of the reduced chunks takes W - 1 more.",
    )


def ch12_fsdp_gather_bytes(answer, r=8, bytes_per_param=4):
    """The bytes FSDP2 all-gathers per step on the tiny model with LoRA at rank r on every linear layer,
    one unit per decoder layer plus the root, resharded after the forward."""
    from . import parallelism
    from .tiny.model import CONFIG

    u = parallelism.fsdp_units(CONFIG, r)
    expected = parallelism.fsdp_gather_bytes(u["layer"], u["n_layers"], u["root"], bytes_per_param)
    return check(
        f"the parameter bytes FSDP gathers per step on the tiny model, LoRA r = {r} on every linear layer (exact)",
        answer, expected, rtol=0,
        hint="the forward gathers every unit once; the backward gathers each decoder layer again (it was resharded "
        "after its forward), but not the root unit. Frozen weights are gathered as well as the LoRA factors.",
    )


def ch12_gpus_needed(answer, model="llama-3.1-70b", strategy="FSDP + QLoRA", gpu_gb=24.0, r=16):
    """The fewest GPUs of gpu_gb GB on which ``strategy`` fits ``model`` (static memory, no activations)."""
    from . import parallelism

    expected = parallelism.gpus_needed(budget.load_config(model), strategy, gpu_gb * 1e9, r)
    return check(
        f"the GPUs of {gpu_gb:g} GB that {strategy} needs for {model} at r = {r} (an exact integer)", answer,
        expected, rtol=0,
        hint="a sharded run keeps 1/W of the whole training state per GPU, plus the gathered decoder layer and the "
        "next one: find the smallest W for which M / W + 2 b N_layer fits.",
    )
