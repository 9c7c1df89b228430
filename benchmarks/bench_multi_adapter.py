"""Serve m adapters in one batch: one mixed batch (two ways) vs one batch per adapter vs merging per request.

What is measured
----------------
One linear layer W0: (d, k), d = k, float32, with m adapters A_j: (r, k), B_j: (d, r), s_j = 2,
and a batch x: (n, k) whose row i asks for adapter i mod m (so min(n, m) adapters are used).
Three ways to compute the n outputs y_i = W0 x_i + s_a B_a A_a x_i, side by side
(``lora_ref.serving.serving_strategies``, which chapter 09 times too):

  gathered     one mixed batch, ``lora_ref.torch.batched_lora_forward``: one product x W0^T for the
               whole batch, then the shrink (A_a x_i) and expand (B_a z_i) of every row over gathered
               copies of its factors (Punica's BGMV, without a fused kernel)
  segmented    one mixed batch as PEFT runs ``adapter_names=``: x W0^T once, then each adapter's
               bypass on its own rows (Punica's SGMV, as a loop over the adapters)
  per adapter  for each adapter in turn, its rows as a batch of their own through
               ``lora_ref.torch.lora_forward``: W0 is read once per adapter
  merge        for each adapter in turn: W += s B A, its rows through W, W -= s B A (in place,
               as a server that merges per request would): 2 d r k MACs per adapter and two
               passes over W
  base         x W0^T alone, the floor under all three

Before timing, the three strategies are checked against a float64 reference; the benchmark
fails loudly if they do not compute the same numbers. Method as in bench_lora_linear.py:
``lora_ref.timing.time_interleaved`` runs the strategies round-robin in every repetition and we
report medians, so the noise of a shared machine falls on all of them alike. Ratios are times
over the segmented mixed batch: > 1 means slower than it. The last column, spread%, is the
typical (max - min) / median of a shape's samples.

Threads: one by default (``--threads``). The strategies differ in how many small products they
run (up to 3 m per call); with two threads on a busy 2-core machine, waking the second thread for
each small product cost more than the product itself, and the ratios measured that, not the
strategies.

Usage:
    python benchmarks/bench_multi_adapter.py [--quick] [--threads N] [--reps N] [--json PATH]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from lora_ref import serving
from lora_ref import torch as lt
from lora_ref.timing import time_interleaved

import _cli

STRATEGIES = ("gathered", "segmented", "per adapter", "merge", "base")
ADAPTERS = (1, 4, 16, 64)
BATCHES = (8, 64, 512)
DIMS = (1024, 4096)
RANK = 16
SCALING = 2.0          # alpha = 2 r
B_STD = 0.01
TARGET_REP_S = 0.02


class MismatchError(AssertionError):
    """Two strategies that should compute the same outputs do not."""


@dataclass
class Setup:
    d: int
    r: int
    m: int
    n: int
    W0: torch.Tensor                  # (d, k)
    As: list                          # m tensors (r, k)
    Bs: list                          # m tensors (d, r)
    x: torch.Tensor                   # (n, k)
    index: torch.Tensor               # (n,) adapter of each row
    strategies: dict = field(default_factory=dict)


def make_setup(d, r, m, n, seed=0):
    """W0, m adapters, a batch whose row i uses adapter i mod m, and the four strategies
    (``lora_ref.serving.serving_strategies``, the code the chapter times too)."""
    g = torch.Generator().manual_seed(seed)
    k = d
    W0 = torch.randn(d, k, generator=g) / k**0.5                               # (d, k)
    factors = [lt.init_lora(d, k, r, seed=seed + 1 + j, b_std=B_STD, dtype="float32") for j in range(m)]
    As, Bs = [A for A, _ in factors], [B for _, B in factors]
    x = torch.randn(n, k, generator=g)                                         # (n, k)
    index = torch.arange(n) % m                                                # (n,)
    setup = Setup(d, r, m, n, W0, As, Bs, x, index)
    setup.strategies = serving.serving_strategies(x, W0, As, Bs, [SCALING] * m, index)
    return setup


def _reference(setup, rows):
    """y_i = W0 x_i + s B_a A_a x_i in float64, one row at a time, for the first ``rows`` rows."""
    W0, x = setup.W0.double(), setup.x.double()
    out = [W0 @ x[i] + SCALING * setup.Bs[a].double() @ (setup.As[a].double() @ x[i])
           for i, a in enumerate(setup.index[:rows].tolist())]
    return torch.stack(out)


def check_same_outputs(setup, strategies=None, rows=64):
    """Each adapter strategy against the float64 reference on the first ``rows`` rows; raises MismatchError."""
    strategies = setup.strategies if strategies is None else strategies
    ref = _reference(setup, rows)
    atol = 1e-4 * float(ref.abs().max())
    for name, fn in strategies.items():
        if name == "base":
            continue
        got = fn()[:rows].double()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=atol):
            raise MismatchError(f"strategy {name!r} disagrees with the float64 reference at d={setup.d}, "
                                f"m={setup.m}, n={setup.n}: the benchmark would compare unequal computations")


def bench_shape(d, r, m, n, reps, max_seconds=None, target_rep_s=None):
    setup = make_setup(d, r, m, n)
    check_same_outputs(setup)
    t = time_interleaved(setup.strategies, reps=reps, target_rep_s=target_rep_s or TARGET_REP_S,
                         max_seconds=max_seconds, min_reps=3)
    return {"d": d, "r": r, "m": m, "n": n, "reps": t.reps,
            "median_ms": {k: 1e3 * v for k, v in t.median.items()},
            "samples_ms": {k: [1e3 * s for s in v] for k, v in t.samples.items()}}


RATIOS = {"gathered / segm.": ("gathered", "segmented"), "per adapter / segm.": ("per adapter", "segmented"),
          "merge / segm.": ("merge", "segmented"), "segm. / base": ("segmented", "base")}


def ratios(rec):
    m = rec["median_ms"]
    return {name: m[a] / m[b] for name, (a, b) in RATIOS.items()}


def spread(rec):
    rel = [(max(v) - min(v)) / statistics.median(v) for v in rec["samples_ms"].values()]
    return 100 * statistics.median(rel)


HEADER = (f"{'d':>5} {'m':>3} {'n':>4} {'reps':>4} | {'segm. ms':>9} {'base ms':>9} | "
          + " ".join(f"{name:>19}" for name in RATIOS) + f" | {'spread%':>7}")


def format_row(rec):
    q = ratios(rec)
    return (f"{rec['d']:>5} {rec['m']:>3} {rec['n']:>4} {rec['reps']:>4} | {rec['median_ms']['segmented']:>9.3f} "
            f"{rec['median_ms']['base']:>9.3f} | " + " ".join(f"{q[name]:>19.2f}" for name in RATIOS)
            + f" | {spread(rec):>7.0f}")


def shapes_for(quick):
    """(d, r, m, n) of every row of the table."""
    if quick:
        return [(256, 8, m, n) for m in (1, 4, 16) for n in (16, 64)]
    return [(d, RANK, m, n) for d in DIMS for m in ADAPTERS for n in BATCHES]


def main(argv=None):
    ap = _cli.parser(__doc__, reps="repetitions per shape (default 9, --quick 3)", quick="d=256, r=8, m up to 16: a smoke run",
                     max_shape_seconds=20.0, threads=1,
                     threads_help="torch.set_num_threads (default 1: the strategies make up to 3 m small products, and on "
                                  "a shared machine waking a second thread for each can cost more than the product)")
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (3 if args.quick else 9)
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch"],
                          f"float32, d = k, s = {SCALING:g}, B ~ N(0, {B_STD}^2); row i uses adapter i mod m; median of reps",
                          "ratios: time over the segmented mixed batch (x W0^T once, each adapter's bypass on its rows)\n")
        records = _cli.table(HEADER, shapes_for(args.quick),
                             lambda shape: bench_shape(*shape, reps, max_seconds=args.max_shape_seconds), format_row)
        _cli.finish(args.json, t0, records=records, ratios=[ratios(rec) for rec in records])
    return records


if __name__ == "__main__":
    main()
