"""QLoRA's 4-bit NormalFloat (NF4) in plain PyTorch, byte for byte as bitsandbytes stores it.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, Sec. 3) keeps the frozen base weights in 4 bits:

    W0: (d, k)  ->  flatten to w: (n,), n = d k  ->  blocks of b = 64 weights (the last may be partial)
    c_j  = max_i |w_ji|                           absmax of block j: the fp32 quantisation constant
    q_ji = nearest q to w_ji / c_j among v_0..v_15  v = the 16 NF4 levels in [-1, 1]
    w_ji ~ v[q_ji] * c_j                          dequantisation

Storage per weight: 4 bits of code + 32/b bits of constant = 4.5 bits at b = 64.
Double quantisation stores the constants c in 8 bits (blocks of 256, after subtracting
their mean), so the overhead falls to 8/64 + 32/(64*256) and the total to ~4.127 bits.

Byte layout, as bitsandbytes 0.50 (``bitsandbytes.functional.quantize_4bit``) writes it:
  - codes are the indices 0..15 into the sorted codebook; code 7 is the exact zero;
  - two codes per uint8, the FIRST element of each pair in the HIGH nibble:
    byte = (q[2i] << 4) | q[2i + 1];
  - an odd number of elements pads the last LOW nibble with code 7 (bitsandbytes pads the
    scaled values with a 0.0 before bucketing, and 0 falls in the bucket of the zero level);
  - packed holds ceil(n/2) bytes and absmax ceil(n/b) fp32 values (bitsandbytes' packed
    tensor has shape (ceil(n/2), 1); here it is flat).

The layer ``NF4LoRALinear`` is ``lora_ref.torch.LoRALinear`` with its ``nn.Linear`` base
replaced by an ``NF4Linear`` that dequantises W0 on the fly: the same lora_A (r, k),
lora_B (d, r), scaling and forward y = base(x) + s B (A dropout(x)).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from . import torch as _lt

__all__ = [
    "NF4_OFFSET",
    "HALF_BIN_OFFSET",
    "nf4_codebook",
    "dynamic_map",
    "fp4_codebook",
    "int4_codebook",
    "fake_quantize",
    "fake_quantize_mse",
    "block_scaled",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_codes",
    "code_frequencies",
    "nf4_design_frequencies",
    "entropy_bits",
    "DoubleQuant",
    "double_quantize_absmax",
    "dequantize_absmax",
    "NF4Linear",
    "NF4LoRALinear",
    "quantize_model_nf4",
    "nf4_merge",
    "merged_weight",
    "merge_error",
    "merge_error_curve",
    "merged_copy",
]

# The outermost quantile of NF4 is bitsandbytes' literal 0.9677083, the default offset of
# create_normal_map(offset=0.9677083, use_extra_value=True). Neither source derives it: the
# QLoRA paper (Sec. 3, eq. 4 and Appendix E) builds quantile quantization from averages of
# neighbouring quantiles, q_i = (Q(i/(2^k+1)) + Q((i+1)/(2^k+1))) / 2, lists NF4's 16 values and
# never states an offset; bitsandbytes' code had no comment on it, and its 0.50 docstring calls
# the default "empirically optimized". We use the literal, so our levels, midpoints and bytes
# are exactly theirs.
NF4_OFFSET = 0.9677083
# A reading of the literal that circulates in write-ups on NF4 (we found it in no primary
# source): the mean of 1 - 1/(2*15) and 1 - 1/(2*16), half a bin in from 1 for 15 and for 16
# bins. It reproduces the literal's 7 digits; in float32 the two are neighbouring numbers
# (0.96770835 vs 0.96770829), and the codebooks they give differ by up to 3e-7.
HALF_BIN_OFFSET = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))    # 0.96770833...

_NF4_ZERO_CODE = 7            # index of the exact 0 in the sorted codebook: 7 negative levels before it
_ABSMAX_FLOOR = 1e-38         # bitsandbytes divides by max(c, 1e-38): a zero block gives 0 * 1e38 = 0, not nan


# ----------------------------------------------------------------------------- codebooks


def nf4_codebook(offset=NF4_OFFSET):
    """The 16 NF4 levels, float32 (16,), sorted, in [-1, 1], with an exact 0 (QLoRA, Sec. 3).

    NF4 is a lookup table of normal quantiles, not a float format. With 4 bits there are
    16 codes. Zero must be exact (zero-padded inputs, pruned or tiny weights), and a grid that
    is symmetric AND has an exact zero has an odd number of levels (0 and pairs +-v), so it
    leaves one of the 16 codes unused (int4's j/7 uses 15). QLoRA's answer is an asymmetric
    grid that uses all 16:
        8 positive levels  Phi^-1(p), p = linspace(offset, 1/2, 9)[:-1]   (9 points, drop 1/2)
        7 negative levels -Phi^-1(p), p = linspace(offset, 1/2, 8)[:-1]   (8 points, drop 1/2)
        1 exact zero                                                      8 + 7 + 1 = 16
    then all divided by the largest, Phi^-1(offset), so the ends are -1 and +1.
    Phi^-1 is the standard normal quantile (``torch.special.ndtri``, equal to
    ``scipy.stats.norm.ppf`` to float64 precision, so scipy is not needed at run time).

    The steps follow bitsandbytes' ``create_normal_map(offset=0.9677083, use_extra_value=True)``
    exactly (float32 linspace, float64 quantiles, float32 normalisation), so the result
    equals ``bitsandbytes.functional.get_4bit_type("nf4")`` bit for bit.

    Book: eq-ch08-nf4 (notebooks/08_qlora).
    """
    _checks.check_finite_scalar("offset", offset)
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be a probability in (0.5, 1), got offset={offset}")
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()           # (8,) float32 points, as bitsandbytes
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()           # (7,)
    pos = torch.special.ndtri(p_pos)                                # (8,)  Phi^-1(p) > 0
    neg = -torch.special.ndtri(p_neg)                               # (7,)  < 0
    zero = torch.zeros(1, dtype=torch.float64)                      # (1,)  the exact zero
    v = torch.cat([neg, zero, pos]).float().sort().values          # (16,) float32, ascending
    return v / v.max()                                              # normalise: v_15 = 1, v_0 = -1


def dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """bitsandbytes' 8-bit "dynamic" map, float32 (256,), sorted (Dettmers 2015, arXiv:1511.04561).

    This is the codebook of the nested quantisation of the absmax constants
    (``quantize_blockwise``'s default: ``create_dynamic_map(signed=True)``). Each level is
    10^e * m: for the exponents e = -6..0 (i = 0..6) there are 2^i mantissas m, the midpoints
    of linspace(0.1, 1, 2^i + 1) (float32), each with both signs, plus 0 and 1:
    2 * (1 + 2 + ... + 64) + 2 = 256 levels, dense near zero and sparse near +-1.
    Written with the same float32 operations as bitsandbytes, so it equals theirs bit for bit.
    """
    non_sign_bits = total_bits - 1
    data = []
    for i in range(max_exponent_bits):
        scale = 10 ** (i - (max_exponent_bits - 1))                 # 1e-6, 1e-5, ..., 1e0
        bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        bounds = torch.linspace(0.1, 1, 2**bits + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0                     # (2^bits,) float32 mantissas in (0.1, 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1             # 0 for the default 8-bit map
    if extra > 0:                                                   # levels of the top exponent, as bitsandbytes
        bounds = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    if len(data) > 2**total_bits:
        raise ValueError(
            f"max_exponent_bits={max_exponent_bits}, signed={signed} give {len(data)} levels, "
            f"more than the 2^{total_bits} codes of total_bits={total_bits}"
        )
    data += [0.0] * (2**total_bits - len(data))                     # unused codes (never for the default map)
    return torch.tensor(sorted(data), dtype=torch.float32)


def fp4_codebook():
    """bitsandbytes' FP4 levels, float32 (15,), sorted, in [-1, 1]: a tiny float, not quantiles.

    One sign bit, two exponent bits and one mantissa bit (E2M1). bitsandbytes' magnitudes are
    0, 0.0625 (the subnormal), 2, 3, 4, 6, 8, 12, i.e. 2^e * (1 + m/2) for e = 1..3 and the
    subnormal, divided by the largest, 12. +0 and -0 are the same level, so 15 distinct values.
    """
    mags = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0   # (8,)
    return torch.cat([-mags[1:], mags]).sort().values                          # (15,)


def int4_codebook():
    """Symmetric absmax int4, float32 (15,): the levels j/7 for j = -7..7 (code -8 unused).

    Evenly spaced, as round(7 x / c) / 7 gives them: the uniform grid NF4 is compared with.
    """
    return torch.arange(-7, 8, dtype=torch.float32) / 7.0


def fake_quantize(w, codebook, blocksize=64):
    """Quantise and dequantise w blockwise with any sorted codebook in [-1, 1]: the round trip.

    Per block j of ``blocksize`` elements: c_j = max |w| over the block, each weight w goes to the
    nearest level v_q of w / c_j, and comes back as v_q c_j. With ``nf4_codebook()`` this equals
    dequantize_nf4(*quantize_nf4(w)) (up to bitsandbytes' partial-block rounding quirk).
    Returns a float32 tensor of w's shape.
    """
    _check_float_tensor("w", w)
    _check_blocksize(blocksize)
    _checks.check_finite_count("w", int((~torch.isfinite(w)).sum()), w.shape)
    code = codebook.float().reshape(-1)
    if code.numel() < 2 or not bool((code[1:] > code[:-1]).all()):
        raise ValueError(f"codebook must be strictly increasing with >= 2 levels, got {code.tolist()}")
    scaled, c = block_scaled(w, blocksize)                          # (n_blocks, b) w / c_j, (n_blocks, 1) c_j
    j = torch.bucketize(scaled, _midpoints(code))                   # nearest level of w / c
    return (code[j] * c).reshape(-1)[: w.numel()].view(w.shape)     # v_q c_j


def block_scaled(w, blocksize=64):
    """Blockwise absmax scaling: (w / c_j, c_j), the values that get quantised, and the constants.

    w is flattened and cut into blocks of ``blocksize`` (the last zero-padded): returns
    scaled (n_blocks, blocksize) in [-1, 1] and c (n_blocks, 1), c_j = max |w| over block j
    (0 for an all-zero block, whose scaled values are 0). Scaling multiplies by 1 / c_j, as
    bitsandbytes does.
    """
    _check_float_tensor("w", w)
    _check_blocksize(blocksize)
    x = w.detach().reshape(-1).float()                               # (n,)
    n = x.numel()
    n_blocks = _n_blocks(n, blocksize)
    blocks = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)   # (n_blocks, blocksize)
    c = blocks.abs().amax(dim=1, keepdim=True)                                   # (n_blocks, 1)  c_j
    # bitsandbytes divides by max(c, 1e-38): an all-zero block gives 0 * 1e38 = 0, not nan
    return blocks * (1.0 / c.clamp_min(_ABSMAX_FLOOR)), c


def fake_quantize_mse(w, codebook, blocksize=64):
    """Mean squared error of the blockwise round trip, mean((fake_quantize(w) - w)^2), as a float.

    The errors are float32 differences, computed elementwise (the same bits on every CPU); their
    squares are exact in float64 and summed in float64, so the result's relative error is below
    n * 2^-53 (6e-11 for n = 2^19) whatever order the summation takes: to 5 decimals it does not
    depend on the SIMD path or the thread count, unless it lies within that much of a rounding
    boundary (the chapter checks that it does not).
    """
    err = (fake_quantize(w, codebook, blocksize) - w.detach().float()).double()
    return float(err.pow(2).mean())


_CACHE = {}


def _cached(name, device, build):
    """Small constant tables (codebooks, midpoints, lookup tables), built once per device."""
    key = (name, str(device))
    if key not in _CACHE:
        _CACHE[key] = build().to(device)
    return _CACHE[key]


def _midpoints(code):
    """Bucket edges of a sorted codebook: (v_j + v_{j+1}) / 2 in float32, (len - 1,).

    torch.bucketize(x, edges) (right=False) returns the j with edges[j-1] < x <= edges[j]: the
    nearest level, a tie going to the lower one. bitsandbytes 0.50 quantises NF4 this way,
    on x * (1 / c); argmin |x - v_j| or x / c can land on the other side of an edge.
    """
    return (code[:-1] + code[1:]) / 2


def _nf4_tables(device):
    """(midpoints (15,), byte table (256,) int64) of NF4 on ``device``.

    The byte table decodes a whole packed byte b at once: its row is the pair
    (v[b >> 4], v[b & 15]) of float32 values, first element from the high nibble, stored as
    ONE 8-byte word (a (256, 2) float32 table viewed as int64). Gathering 8-byte words from
    a 1-D table is a tight loop, about twice as fast on CPU as gathering 2-float rows; the
    words are only copied, never read as integers, so viewing the result as float32 gives
    back the pairs exactly.
    """
    mids = _cached("nf4-mid", device, lambda: _midpoints(nf4_codebook()))
    words = _cached("nf4-byte", device, lambda: torch.stack(
        [nf4_codebook().repeat_interleave(16), nf4_codebook().repeat(16)], dim=1   # (256, 2) float32
    ).contiguous().view(torch.int64).view(-1))                                      # (256,) 8-byte words
    return mids, words


# ----------------------------------------------------------------------------- validation


def _check_blocksize(blocksize, name="blocksize"):
    _checks.check_dim(name, blocksize)


def _check_float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_shape(shape):
    """shape: a tuple of non-negative ints with at least one element in all."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got shape={shape!r}") from None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must hold non-negative integers, got shape={shape}")
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"shape={shape} has no elements: there is nothing to dequantise")
    return tuple(int(s) for s in shape), n


def _n_blocks(n, blocksize):
    return -(-n // blocksize)                                       # ceil(n / blocksize)


# ----------------------------------------------------------------------------- NF4


def quantize_nf4(w, blocksize=64):
    """Blockwise NF4 quantisation of a tensor of any shape -> (packed, absmax).

    w: any shape, n elements, float16/bfloat16/float32 (float64 is rounded to float32 first).
    packed: uint8 (ceil(n/2),)  two 4-bit codes per byte, the first in the high nibble;
            an odd n pads the last low nibble with code 7 (the zero level), as bitsandbytes.
    absmax: float32 (ceil(n/blocksize),)  c_j = max |w| over block j; 0 for an all-zero block.

    Per block: x = w * (1 / c_j) (``block_scaled``), then the code is the bucket of x among the
    float32 midpoints of the codebook (nearest level). This reproduces bitsandbytes 0.50's bytes
    exactly, including its one quirk, patched below: the last, partial block is divided,
    x = w / c, not multiplied by 1 / c (the two can differ by one rounding, rarely by one code).
    Where bitsandbytes stores 1e-38 as the absmax of an all-zero partial block, this stores 0.
    """
    _check_float_tensor("w", w)
    _check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"w has no elements (shape {tuple(w.shape)}): there is nothing to quantise")
    _checks.check_finite_count("w", int((~torch.isfinite(w)).sum()), w.shape)
    scaled, c = block_scaled(w, blocksize)                          # (n_blocks, b) w / c_j, (n_blocks, 1) c_j
    n, rem = w.numel(), w.numel() % blocksize                       # rem: elements of a partial last block
    if rem:
        # bitsandbytes' one quirk: it divides the partial last block, x = w / c, where the full
        # blocks are multiplied by 1 / c (the two can differ by one rounding, rarely by one code)
        tail = w.detach().reshape(-1)[n - rem:].float()              # (rem,)
        scaled[-1, :rem] = tail / c[-1].clamp_min(_ABSMAX_FLOOR)
    absmax = c.squeeze(1)                                           # (n_blocks,)  c_j, 0 for a zero block
    mids, _ = _nf4_tables(scaled.device)
    codes = torch.bucketize(scaled.reshape(-1)[:n], mids, out_int32=True).to(torch.uint8)   # (n,) in 0..15
    codes = F.pad(codes, (0, n % 2), value=_NF4_ZERO_CODE)         # (2 ceil(n/2),)  pad nibble = code 7
    packed = (codes[0::2] << 4) | codes[1::2]                       # (ceil(n/2),)  first element: high nibble
    return packed, absmax


def _check_packed(packed, absmax, n, blocksize, shape):
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor of 4-bit code pairs, got {got}")
    _check_float_tensor("absmax", absmax)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape={shape} has n={n} elements, "
            f"which pack into ceil(n/2) = {(n + 1) // 2} bytes"
        )
    if absmax.numel() != _n_blocks(n, blocksize):
        raise ValueError(
            f"absmax has {absmax.numel()} values but n={n} elements (shape={shape}) in blocks of "
            f"blocksize={blocksize} make ceil(n/blocksize) = {_n_blocks(n, blocksize)} blocks"
        )


def dequantize_nf4(packed, absmax, shape, blocksize=64):
    """(packed, absmax) -> float32 tensor of ``shape``: w_ji = v[q_ji] * c_j.

    packed: uint8 with ceil(n/2) elements (any shape, e.g. bitsandbytes' (ceil(n/2), 1));
    absmax: ceil(n/blocksize) constants. One float32 product per element, as bitsandbytes'
    kernels, so the result equals ``bitsandbytes.functional.dequantize_4bit`` exactly. (One
    exception, a bitsandbytes 0.50 bug: its fused CPU kernel mis-scales 2-D shapes whose last
    dimension is a multiple of 16 but not of the blocksize, e.g. (8, 32); this function equals
    bitsandbytes' own reference path there.)

    Decoding gathers one table entry (v[b >> 4], v[b & 15]) per packed byte b, then scales
    each block by its c_j in place.
    """
    _check_blocksize(blocksize)
    shape, n = _check_shape(shape)
    _check_packed(packed, absmax, n, blocksize, shape)
    _, words = _nf4_tables(packed.device)
    idx = packed.reshape(-1).to(torch.int32)                        # (ceil(n/2),)  byte values 0..255
    pairs = torch.index_select(words, 0, idx)                       # (ceil(n/2),)  int64 words
    out = pairs.view(torch.float32)[:n]                             # (n,)  v[q]: both nibbles of each byte
    c = absmax.reshape(-1).float()                                  # (n_blocks,)
    full = n - n % blocksize
    out[:full].view(-1, blocksize).mul_(c[: full // blocksize].unsqueeze(1))   # (n_full, blocksize) * c_j
    if full < n:
        out[full:].mul_(c[-1])                                      # the partial last block
    return out.view(shape)


def nf4_codes(w, blocksize=64):
    """The NF4 code (0..15) of every element of w, uint8 (n,) in w's flattened order.

    The codes that ``quantize_nf4`` packs, unpacked: the high nibble of each byte first.
    """
    packed, _ = quantize_nf4(w, blocksize)
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: w.numel()]


def code_frequencies(codes, n_codes=16):
    """Fraction of the codes equal to each of 0..n_codes-1: float64 (n_codes,), summing to 1."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    _checks.check_dim("n_codes", n_codes)
    c = codes.reshape(-1).long()
    if c.numel() == 0:
        raise ValueError("codes has no elements: there is nothing to count")
    if int(c.min()) < 0 or int(c.max()) >= n_codes:
        raise ValueError(f"codes must lie in 0..{n_codes - 1}, got values in {int(c.min())}..{int(c.max())}")
    return torch.bincount(c, minlength=n_codes).double() / c.numel()


def nf4_design_frequencies(offset=NF4_OFFSET):
    """How often each NF4 code would be used if the scaled weights w / c_j were xi / Phi^-1(offset),
    xi ~ N(0, 1) (the distribution the levels are quantiles of), float64 (16,).

    Code j takes the values nearest to level v_j: the interval between the midpoints around v_j
    (the ends open to +-infinity, where values beyond +-1 would be clipped). Even under this
    assumption the codes are not used equally often (about 5.6% to 7.1%): the levels are
    quantiles, but the rounding edges are midpoints in value, not in probability. And blockwise
    absmax scaling does not produce this distribution: c_j is the largest of b samples, so one
    weight per block sits on +-1 and the rest crowd towards 0 (``nf4_codes`` measures it).
    """
    v = nf4_codebook(offset).double()
    edges = (v[:-1] + v[1:]) / 2 * torch.special.ndtri(torch.tensor(offset, dtype=torch.float64))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(edges),
                     torch.ones(1, dtype=torch.float64)])
    return cdf[1:] - cdf[:-1]


def entropy_bits(freqs):
    """Shannon entropy -sum p log2 p of a frequency vector, in bits (0 log 0 = 0).

    log2(16) = 4 bits when all 16 codes are used equally often: the most a 4-bit code can carry.
    """
    p = torch.as_tensor(freqs, dtype=torch.float64).reshape(-1)
    if p.numel() == 0 or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"freqs must be non-negative and sum to 1, got {p.tolist()}")
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


# ----------------------------------------------------------------------------- double quantisation


class DoubleQuant(NamedTuple):
    """The absmax constants in 8 bits (QLoRA's double quantisation).

    codes:  uint8 (n_blocks,)              index into ``dynamic_map()`` of (c_j - offset) / s_g
    scales: float32 (ceil(n_blocks/256),)  s_g = max |c_j - offset| over group g of 256 constants
    offset: float32 scalar                 the mean of the c_j (they are all > 0, so centring them
                                           uses the signed map's both halves)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor


def double_quantize_absmax(absmax, blocksize=256):
    """Quantise the fp32 absmax constants to 8 bits: DoubleQuant(codes, scales, offset).

        offset = mean(c);  c' = c - offset                       (centre: c > 0 would waste the sign)
        s_g = max |c'| over each group of ``blocksize`` = 256    (second-level fp32 constants)
        code = nearest level of dynamic_map() to c' * (1 / s_g)  (exact nearest, ties to the lower)

    As ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)``: same map, same
    offset (``absmax.mean()``) and same scales s_g. The codes are exact-nearest; bitsandbytes 0.50's
    CPU kernel picks a farther level for about 0.1-0.25% of the constants of Gaussian weights: a
    neighbour of the nearest, or, near 0 where the map's levels are 1e-6 apart, up to 4 codes off
    (the tests bound how many differ, and both reconstruction errors).
    """
    _check_float_tensor("absmax", absmax)
    _check_blocksize(blocksize)
    if absmax.numel() == 0:
        raise ValueError("absmax has no elements: there are no constants to quantise")
    _checks.check_finite_count("absmax", int((~torch.isfinite(absmax)).sum()), absmax.shape)
    c = absmax.detach().reshape(-1).float()                          # (n_blocks,)
    offset = c.mean()                                               # scalar, float32
    centred = c - offset                                            # (n_blocks,)
    m = c.numel()
    groups = _n_blocks(m, blocksize)
    g = F.pad(centred, (0, groups * blocksize - m)).view(groups, blocksize)   # (groups, 256)
    scales = g.abs().amax(dim=1)                                    # (groups,)  s_g
    x = g * (1.0 / scales.clamp_min(_ABSMAX_FLOOR)).unsqueeze(1)    # (groups, 256) in [-1, 1]
    dmid = _cached("dynamic-mid", c.device, lambda: _midpoints(dynamic_map()))
    codes = torch.bucketize(x.reshape(-1)[:m], dmid, out_int32=True).to(torch.uint8)   # (n_blocks,)
    return DoubleQuant(codes, scales, offset)


def dequantize_absmax(codes, scales, offset, blocksize=256):
    """DoubleQuant -> float32 absmax (n_blocks,):  c_j ~ map[code_j] * s_g + offset."""
    _check_blocksize(blocksize)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    _check_float_tensor("scales", scales)
    m = codes.numel()
    if scales.numel() != _n_blocks(m, blocksize):
        raise ValueError(
            f"scales has {scales.numel()} values but {m} codes in groups of blocksize={blocksize} "
            f"need ceil({m}/{blocksize}) = {_n_blocks(m, blocksize)}"
        )
    dmap = _cached("dynamic", codes.device, dynamic_map)
    v = dmap[codes.reshape(-1).long()]                              # (m,)  map[code]
    groups = scales.numel()
    v = F.pad(v, (0, groups * blocksize - m)).view(groups, blocksize) * scales.float().reshape(-1, 1)
    return v.reshape(-1)[:m] + torch.as_tensor(offset, dtype=torch.float32, device=codes.device)


# ----------------------------------------------------------------------------- layers


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight W0: (d, k) is stored as NF4.

    Buffers: ``packed`` uint8 (ceil(dk/2),) and ``absmax`` float32 (ceil(dk/b),), which stays
    float32 under ``.to(dtype)``; ``bias`` (d,) is kept as a frozen parameter. The forward pass dequantises W0 to the
    compute dtype (``compute_dtype``, or the input's dtype when None) and calls F.linear:
    y = x W0q^T + b, with W0q = dequantize_nf4(...). Nothing here is trained.
    """

    def __init__(self, packed, absmax, in_features, out_features, bias=None, blocksize=64, compute_dtype=None):
        super().__init__()
        _checks.check_dim("in_features", in_features)
        _checks.check_dim("out_features", out_features)
        _check_blocksize(blocksize)
        n = in_features * out_features
        _check_packed(packed, absmax, n, blocksize, (out_features, in_features))
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected (out_features,) = ({out_features},)")
        if compute_dtype is not None:
            compute_dtype = _checks.resolve_dtype(compute_dtype, torch, torch.dtype)
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.compute_dtype = blocksize, compute_dtype
        self.register_buffer("packed", packed.detach().reshape(-1).clone())
        self.register_buffer("absmax", absmax.detach().reshape(-1).float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, blocksize=64, compute_dtype=None):
        """Quantise an nn.Linear's weight (d, k) to NF4; the bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        packed, absmax = quantize_nf4(linear.weight, blocksize)
        return cls(packed, absmax, linear.in_features, linear.out_features, linear.bias, blocksize, compute_dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype), .half() etc. cast every floating buffer; the NF4 constants stay
        # float32 (bitsandbytes keeps them outside the module, in its QuantState): only their
        # device follows. The bias is cast like any parameter.
        absmax = self.absmax
        super()._apply(fn, recurse)
        if self.absmax.dtype != torch.float32:
            self.absmax = absmax.to(self.absmax.device)
        return self

    @property
    def shape(self):
        """The shape of W0: (out_features, in_features) = (d, k)."""
        return (self.out_features, self.in_features)

    def dequantize(self, dtype=torch.float32):
        """W0q: (d, k), the weight the layer computes with."""
        return dequantize_nf4(self.packed, self.absmax, self.shape, self.blocksize).to(dtype)

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        W = self.dequantize(dtype)                                  # (d, k)  dequantised on the fly
        b = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), W, b).to(x.dtype)              # (..., d)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}")


class NF4LoRALinear(_lt.LoRALinear):
    """QLoRA's layer: a frozen NF4 base plus a trainable LoRA bypass in higher precision.

        y = NF4Linear(x) + s * B (A dropout(x)) = x W0q^T + b + s (x A^T) B^T

    Built from an ``nn.Linear``: it is ``lora_ref.torch.LoRALinear`` (same checks, same
    ``lora_A`` (r, k) / ``lora_B`` (d, r) init from torch's global generator, same ``scaling``
    and forward), with ``base_layer`` then replaced by ``NF4Linear.from_linear``. The fp32
    copy of W0 is not kept. Only lora_A and lora_B require gradients.

    merge() and unmerge() re-quantise (see ``nf4_merge``): unlike LoRALinear's, they are lossy.
    """

    def __init__(self, base_layer, r, alpha, dropout=0.0, rslora=False, init="kaiming",
                 blocksize=64, compute_dtype=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, init)    # checks, A, B, scaling
        self.base_layer = NF4Linear.from_linear(base_layer, blocksize, compute_dtype)

    @torch.no_grad()
    def merge(self):
        """base <- NF4(W0q + s B A): the bypass is folded in and switched off (re-quantised)."""
        if not self.merged:
            self._set_nf4(*nf4_merge(self))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """base <- NF4(Wq - s B A): the bypass is switched back on. Two roundings from W0q."""
        if self.merged:
            self._set_nf4(*nf4_merge(self, sign=-1.0))
            self.merged = False
        return self

    def _set_nf4(self, packed, absmax):
        self.base_layer.packed.copy_(packed)
        self.base_layer.absmax.copy_(absmax)


@torch.no_grad()
def nf4_merge(layer, sign=1.0):
    """Merging after QLoRA: (packed, absmax) of NF4(W0q + sign * s B A), from an NF4LoRALinear.

    W0q is the dequantised base (fp32); the sum is re-quantised blockwise with the layer's
    blocksize. The result is NOT W0q + s B A: each weight moves to its nearest NF4 level,
    an error of up to half a level gap times c_j, comparable to the size of s B A itself for a
    small adapter. The layer is not changed (``layer.merge()`` stores the result).
    """
    if not isinstance(layer, NF4LoRALinear):
        raise TypeError(f"nf4_merge takes an NF4LoRALinear, got {type(layer).__name__}")
    base = layer.base_layer
    W = base.dequantize(torch.float32)                              # (d, k)  W0q
    A, B = layer.lora_A.detach().float(), layer.lora_B.detach().float()
    W = W + sign * _lt.delta_w(A, B, layer.scaling)                 # (d, k)  W0q +- s B A
    return quantize_nf4(W, base.blocksize)


_MERGE_FORMATS = ("nf4", "float32", "bfloat16", "float16")


def _stored(W, into, blocksize):
    """W (any float dtype) as a weight stored in format ``into`` holds it, back in float32."""
    if into == "nf4":
        return dequantize_nf4(*quantize_nf4(W.float(), blocksize), W.shape, blocksize)
    return W.to(getattr(torch, into)).float()


def merged_weight(W0, dW, into, blocksize=64):
    """(base, merged): the base W0 as stored in format ``into``, and base + dW merged and stored again.

    into: "nf4" (blockwise NF4, re-quantised: what ``NF4LoRALinear.merge`` stores), or a float
    dtype name, "float32", "bfloat16", "float16". The sum base + dW is formed in float64 and
    rounded once to ``into``: the best a merge into that format can do (a merge that rounds dW
    to 16 bits first and adds in 16 bits rounds twice). Both are returned as float32 (d, k).
    For NF4, pass the dequantised base W0q: quantising it again changes nothing.
    """
    if into not in _MERGE_FORMATS:
        raise ValueError(f"into must be one of {_MERGE_FORMATS}, got into={into!r}")
    _check_float_tensor("W0", W0)
    _check_float_tensor("dW", dW)
    if W0.shape != dW.shape:
        raise ValueError(f"W0 and dW must have the same shape, got {tuple(W0.shape)} and {tuple(dW.shape)}")
    base = _stored(W0.detach().float(), into, blocksize)
    return base, _stored(base.double() + dW.detach().double(), into, blocksize)


def merge_error(W0, dW, into, blocksize=64):
    """How much of the update a merge into format ``into`` loses: ||merged - (base + dW)|| / ||dW||.

    base and merged as in ``merged_weight``; base + dW is the exact sum (float64); Frobenius
    norms. 0 means the update survives whole; 1 means an error as large as the update itself
    (e.g. every weight rounded back to the base: the update is gone); above 1, the merge moves
    the weight by more than the update did. Into float32 the error is one float32 rounding of
    the sum, about 2^-24 ||W0|| / ||dW||.
    """
    base, merged = merged_weight(W0, dW, into, blocksize)
    dW = dW.detach().double()
    size = dW.norm()
    if size == 0:
        raise ValueError("dW is zero: there is no update whose loss could be measured")
    return float((merged.double() - (base.double() + dW)).norm() / size)


def merge_error_curve(W0, dW, rel_sizes, into, blocksize=64):
    """``merge_error`` for the update dW rescaled to each relative size ||dW|| / ||W0|| in rel_sizes.

    Keeps dW's direction (its pattern over the weights) and varies only its size: a large update
    and a small one of the same shape. Returns a list of floats, one per size.
    """
    dW = dW.detach().float()
    ratio = float(dW.norm() / W0.detach().float().norm())
    if ratio == 0:
        raise ValueError("dW is zero: it has no direction to rescale")
    return [merge_error(W0, dW * (float(s) / ratio), into, blocksize) for s in rel_sizes]


@torch.no_grad()
def merged_copy(model, into):
    """A copy of a QLoRA model with every NF4LoRALinear's update merged into its base, stored as ``into``.

    into="nf4": each layer's ``merge()``, NF4(W0q + s B A) re-quantised. A float dtype name
    ("float32", "bfloat16", "float16"): the base becomes an ``nn.Linear`` whose weight is
    ``merged_weight(W0q, s B A, into)`` -- rounded to that format once, then held in float32, so
    that the forward pass stays in float32 and the comparison isolates what storing the merged
    weight loses (a model that also computes in 16 bits rounds its activations too). The bypass
    is switched off (``merged = True``); the model passed in is not changed.
    """
    import copy

    if into not in _MERGE_FORMATS:
        raise ValueError(f"into must be one of {_MERGE_FORMATS}, got into={into!r}")
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, NF4LoRALinear)]
    if not layers:
        raise ValueError("model has no NF4LoRALinear layer: there is nothing to merge")
    for layer in layers:
        if layer.merged:
            raise ValueError("a layer is already merged: merge a model whose adapters are separate")
        if into == "nf4":
            layer.merge()
            continue
        base = layer.base_layer
        dW = _lt.delta_w(layer.lora_A.detach().float(), layer.lora_B.detach().float(), layer.scaling)
        _, W = merged_weight(base.dequantize(torch.float32), dW, into, base.blocksize)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None)
        linear.weight.copy_(W)
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
        linear.requires_grad_(False)
        layer.base_layer = linear
        layer.merged = True
    return out


def quantize_model_nf4(model, target_modules, r, alpha, dropout=0.0, rslora=False, init="kaiming",
                       blocksize=64, compute_dtype=None):
    """QLoRA for a model: replace each targeted nn.Linear by an NF4LoRALinear.

    ``target_modules`` is matched as in ``lora_ref.torch.add_lora`` (name suffixes, or
    "all-linear": every nn.Linear but the output layer). Every parameter of the model is
    frozen except the LoRA factors (new ones and any already present). In place; returns model.
    """
    _checks.check_finite_scalar("alpha", alpha)
    _check_blocksize(blocksize)
    return _lt.replace_linears(model, target_modules, r, lambda linear: NF4LoRALinear(
        linear, r, alpha, dropout, rslora, init, blocksize, compute_dtype))
