"""Time NF4 dequantisation on CPU: lora_ref.quant.dequantize_nf4 vs bitsandbytes.

What is measured
----------------
For n = 1M, 4M and 16M weights (a (n/1024, 1024) float32 matrix, blocksize 64), the time
to turn (packed, absmax) back into the float32 matrix, which QLoRA does for every frozen
layer in every forward and backward pass:

  lora_ref      ``lora_ref.quant.dequantize_nf4``: plain PyTorch, three passes: the bytes
                to int32, index_select of one 8-byte word (v[b >> 4], v[b & 15]) per byte
                from a 256-entry table, then an in-place multiply by the block constants
  bitsandbytes  ``bitsandbytes.functional.dequantize_4bit``: its fused C++ CPU kernel

Both are given the same bytes (bitsandbytes' own quantize_4bit output) and, before any
timing, must return the same float32 numbers (they are equal to the bit; the benchmark
stops otherwise). Repetitions are interleaved (rep 1: lora_ref, bitsandbytes; rep 2: ...),
so a noisy machine slows both alike; each repetition times a few calls; medians are
reported. Both sides allocate their output, so first-touch page faults (which dominate
at 16M: 64 MB per call) are in both times.

Usage:
    python benchmarks/bench_nf4.py [--threads 2] [--reps 15] [--sizes 1048576 4194304 16777216] [--json PATH]
"""

from __future__ import annotations

import logging
import time

import torch

from lora_ref.quant import dequantize_nf4
from lora_ref.timing import time_interleaved

import _cli

SIZES = (1 << 20, 1 << 22, 1 << 24)      # 1M, 4M, 16M weights
BLOCKSIZE = 64
COLS = 1024
TARGET_RATIO = 1.5                       # lora_ref within 1.5x of bitsandbytes
TARGET_REP_S = 0.02                      # about 20 ms of calls per repetition


def _bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # an optional-kernel warning on import
    import bitsandbytes.functional as bnbF

    return bnbF


def make_case(n, seed=0):
    """bitsandbytes' NF4 bytes of an (n/COLS, COLS) Gaussian matrix (or (1, n) when n < COLS)."""
    cols = COLS if n % COLS == 0 else n
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n // cols, cols, generator=g)
    packed, state = _bnb().quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    return w.shape, packed, state


def variants(shape, packed, state):
    bnbF = _bnb()
    flat = packed.reshape(-1)
    return {
        "lora_ref": lambda: dequantize_nf4(flat, state.absmax, shape, BLOCKSIZE),
        "bitsandbytes": lambda: bnbF.dequantize_4bit(packed, state),
    }


def check_equal(fns, shape):
    """Both must return the same float32 numbers, or the timings compare different work."""
    ours, theirs = fns["lora_ref"](), fns["bitsandbytes"]().reshape(shape)
    if ours.dtype != torch.float32 or not torch.equal(ours, theirs):
        raise AssertionError(f"lora_ref and bitsandbytes dequantise shape {tuple(shape)} differently")


def bench_size(n, reps=15, threads=2, target_rep_s=TARGET_REP_S):
    """Median ms per call of both variants at n weights, interleaved reps. Returns a record."""
    torch.set_num_threads(threads)
    shape, packed, state = make_case(n)
    fns = variants(shape, packed, state)
    check_equal(fns, shape)
    t = time_interleaved(fns, reps=reps, target_rep_s=target_rep_s)
    samples = {name: [1e3 * x for x in xs] for name, xs in t.samples.items()}
    number = t.calls
    median = {name: 1e3 * x for name, x in t.median.items()}
    return {
        "n": n, "shape": tuple(shape), "threads": threads, "reps": reps, "number": number,
        "samples_ms": samples, "median_ms": median,
        "ratio": median["lora_ref"] / median["bitsandbytes"],
    }


def format_row(rec):
    m = rec["median_ms"]
    gbs = lambda ms: 4 * rec["n"] / (ms * 1e-3) / 1e9 # output GB/s
    verdict = "PASS" if rec["ratio"] <= TARGET_RATIO else "MISS"
    return (f"{rec['n']:>10,} {m['lora_ref']:>10.3f} {m['bitsandbytes']:>14.3f} {rec['ratio']:>7.2f}  "
            f"{gbs(m['lora_ref']):>6.2f} {gbs(m['bitsandbytes']):>6.2f}  {verdict}")


HEADER = f"{'n':>10} {'lora_ref ms':>10} {'bitsandbytes ms':>14} {'ratio':>7}  {'GB/s':>6} {'(bnb)':>6}  target <= {TARGET_RATIO}x"


def main(argv=None):
    ap = _cli.parser(__doc__, reps="interleaved repetitions (default 15)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of weights")
    args = ap.parse_args(argv)
    reps = 15 if args.reps is None else args.reps
    _bnb()
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch", "bitsandbytes"], f"float32 output, blocksize {BLOCKSIZE}, median of {reps} reps")
        records = _cli.table(HEADER, args.sizes, lambda n: bench_size(n, reps, args.threads), format_row)
        _cli.finish(args.json, t0, ["torch", "bitsandbytes"], records=records)
    return records


if __name__ == "__main__":
    main()
