"""Serve m adapters in one batch: four mixed-batch formulations vs one batch per adapter vs merging per request.

What is measured
----------------
One linear layer W0: (d, k), d = k, float32, with m adapters A_j: (r, k), B_j: (d, r), s_j = 2,
and a batch x: (n, k) whose row i asks for adapter i mod m (so min(n, m) adapters are used).
Ways to compute the n outputs y_i = W0 x_i + s_a B_a A_a x_i, side by side
(``lora_ref.serving.serving_strategies``, which chapter 09 times too):

  gathered, segmented, padded, stacked
               one mixed batch, ``lora_ref.torch.batched_lora_forward(..., method=...)``: x W0^T once,
               the bypasses over gathered copies of the factors (BGMV without its kernel), a GEMM pair
               per adapter on sorted rows (SGMV as a loop), two grouped bmm over padded segments, or
               every row through all m adapters with its own block kept
  auto         what batched_lora_forward runs by default: the cheapest by budget.mixed_batch_costs
  per adapter  for each adapter in turn, its rows as a batch of their own through ``lora_forward``
  merge        for each adapter in turn: W += s B A, its rows through W, W -= s B A
  one adapter  all n rows through adapter 0: the same multiply-adds with no bookkeeping, the mark
  base         x W0^T alone, the floor

Before timing, the strategies are checked against a float64 reference; the benchmark fails
loudly if they do not compute the same numbers. Method as in bench_lora_linear.py:
``lora_ref.timing.time_interleaved`` runs the strategies round-robin in every repetition and we
report medians. Ratios are times over "one adapter": > 1 means slower than it. Targets: auto with
16 adapters at d = 1024, n = 512 within 1.5 x one adapter, and auto within 1.15 x the fastest of
the four methods on every shape (paired: the median over repetitions of auto's time over the
fastest's in the same repetition). The last column, spread%, is the typical (max - min) / median.

Threads: two by default (``--threads``), as bench_lora_linear.py.

--fit times the four methods and the base on d = k in 256 .. 4096, m in 1 .. 64, n in 8 .. 512,
and fits the constants of budget.mixed_batch_costs to them: nonnegative least squares of each
method's time beyond the base product on the counted terms of budget.mixed_batch_terms, weighted by
one over the method's time (relative errors), in units of the base GEMM's time per multiply-add.
It prints the fitted constants beside MIXED_BATCH_CONSTANTS and how close "auto" comes to the
fastest method under each: the way to refit them on another machine.

Usage:
    python benchmarks/bench_multi_adapter.py [--quick] [--fit] [--threads N] [--reps N] [--json PATH]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls

from lora_ref import budget, serving
from lora_ref import torch as lt
from lora_ref.timing import time_interleaved

import _cli

STRATEGIES = ("gathered", "segmented", "padded", "stacked", "auto", "per adapter", "merge", "one adapter", "base")
METHODS = ("gathered", "segmented", "padded", "stacked")
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


def _reference(setup, rows, index=None):
    """y_i = W0 x_i + s B_a A_a x_i in float64, one row at a time, for the first ``rows`` rows
    (a = index[i], the batch's own index by default)."""
    W0, x = setup.W0.double(), setup.x.double()
    index = setup.index if index is None else index
    out = [W0 @ x[i] + SCALING * setup.Bs[a].double() @ (setup.As[a].double() @ x[i])
           for i, a in enumerate(index[:rows].tolist())]
    return torch.stack(out)


def check_same_outputs(setup, strategies=None, rows=64):
    """Each adapter strategy against the float64 reference on the first ``rows`` rows; raises MismatchError."""
    strategies = setup.strategies if strategies is None else strategies
    refs = {"mixed": _reference(setup, rows), "one adapter": _reference(setup, rows, torch.zeros_like(setup.index))}
    for name, fn in strategies.items():
        if name == "base":
            continue
        ref = refs["one adapter" if name == "one adapter" else "mixed"]
        atol = 1e-4 * float(ref.abs().max())
        got = fn()[:rows].double()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=atol):
            raise MismatchError(f"strategy {name!r} disagrees with the float64 reference at d={setup.d}, "
                                f"m={setup.m}, n={setup.n}: the benchmark would compare unequal computations")


def bench_shape(d, r, m, n, reps, max_seconds=None, target_rep_s=None, names=STRATEGIES):
    """The strategies ``names`` on one shape, checked against the reference, then timed interleaved."""
    setup = make_setup(d, r, m, n)
    fns = {name: setup.strategies[name] for name in names}
    check_same_outputs(setup, fns)
    t = time_interleaved(fns, reps=reps, target_rep_s=target_rep_s or TARGET_REP_S,
                         max_seconds=max_seconds, min_reps=3)
    return {"d": d, "r": r, "m": m, "n": n, "reps": t.reps,
            "median_ms": {k: 1e3 * v for k, v in t.median.items()},
            "samples_ms": {k: [1e3 * s for s in v] for k, v in t.samples.items()}}


RATIOS = {f"{name} / one": (name, "one adapter") for name in METHODS + ("auto", "per adapter", "merge")}


def ratios(rec):
    m = rec["median_ms"]
    return {name: m[a] / m[b] for name, (a, b) in RATIOS.items()}


def spread(rec):
    rel = [(max(v) - min(v)) / statistics.median(v) for v in rec["samples_ms"].values()]
    return 100 * statistics.median(rel)


HEADER = (f"{'d':>5} {'m':>3} {'n':>4} {'reps':>4} | {'one ms':>8} {'base ms':>8} | "
          + " ".join(f"{name:>17}" for name in RATIOS) + f" | {'auto runs':>9} | {'spread%':>7}")


def auto_choice(rec):
    """The method batched_lora_forward(method="auto") runs for this record's batch."""
    return budget.mixed_batch_method(_counts(rec), rec["d"], rec["d"], rec["r"], in_order=rec["m"] == 1)


def format_row(rec):
    q = ratios(rec)
    return (f"{rec['d']:>5} {rec['m']:>3} {rec['n']:>4} {rec['reps']:>4} | {rec['median_ms']['one adapter']:>8.3f} "
            f"{rec['median_ms']['base']:>8.3f} | " + " ".join(f"{q[name]:>17.2f}" for name in RATIOS)
            + f" | {auto_choice(rec):>9} | {spread(rec):>7.0f}")


def _paired(rec, a, b):
    """time(a) / time(b): the median over repetitions of the ratio within one repetition (the two
    ran back to back, so the machine's drift cancels), or the ratio of the medians where a record
    has no samples."""
    if "samples_ms" not in rec:
        return rec["median_ms"][a] / rec["median_ms"][b]
    return statistics.median(x / y for x, y in zip(rec["samples_ms"][a], rec["samples_ms"][b]))


def check_targets(records, goal=1.5, slack=1.15):
    """Two targets, each {"name", "status", "lines"}: the mixed batch of 16 adapters at d = 1024,
    n = 512 within ``goal`` x one adapter (ratio of the medians, the table's number); and on every
    shape "auto" within ``slack`` x the method with the lowest median (paired: the median of the
    per-repetition ratios, since the two are often within a few per cent)."""
    out = []
    cases = [rec for rec in records if (rec["d"], rec["m"], rec["n"]) == (1024, 16, 512)]
    lines = [f"auto / one adapter = {ratios(rec)['auto / one']:.2f} (runs {auto_choice(rec)})" for rec in cases]
    ok = all(ratios(rec)["auto / one"] <= goal for rec in cases)
    out.append({"name": f"16 adapters / one adapter <= {goal} at d=1024, n=512",
                "status": ("PASS" if ok else "MISS") if cases else "SKIP", "lines": lines or ["no such shape"]})
    worst, lines = [], []
    for rec in records:
        med = rec["median_ms"]
        best = min(METHODS, key=lambda name: med[name])
        worst.append((_paired(rec, "auto", best), rec, best))
    hits = sum(q <= slack for q, _, _ in worst)
    if worst:
        q, rec, best = max(worst, key=lambda t: t[0])
        lines = [f"{hits}/{len(worst)} shapes within {slack}x; worst {q:.2f} at d={rec['d']} m={rec['m']} n={rec['n']} "
                 f"(auto runs {auto_choice(rec)}, fastest {best})"]
    out.append({"name": f"auto within {slack}x of the fastest method (each shape)",
                "status": ("PASS" if hits == len(worst) else "MISS") if worst else "SKIP", "lines": lines or ["no shapes"]})
    return out


FIT_SHAPES = [(d, RANK, m, n) for d in (256, 1024, 4096) for m in ADAPTERS for n in BATCHES]
TERMS = ("macs", "ops", "copy", "gather")


def _counts(rec):
    """Rows per adapter of a record's batch (row i uses adapter i mod m)."""
    return [len(range(j, rec["n"], rec["m"])) for j in range(rec["m"])]


def fit_constants(records):
    """The constants of budget.mixed_batch_costs that best explain ``records`` (each with
    "median_ms" for the four methods and "base"): {"macs", "op", "copy", "gather"} in multiply-add
    equivalents of the base GEMM, "macs" being the bypass's own multiply-adds (1 in the model).

    time(method) - time(base) = sum_t c_t terms_t, by nonnegative least squares on relative errors;
    the unit is the median time per multiply-add of the base product over the records with
    n d k >= 2^28, or at least half the largest n d k (large GEMMs, near the machine's rate)."""
    if not records:                         # (scipy's nnls on an empty matrix crashes: scipy issue 24861)
        raise ValueError("fit_constants needs at least one record")
    X, y, w = [], [], []
    for rec in records:
        terms = budget.mixed_batch_terms(_counts(rec), rec["d"], rec["d"], rec["r"], in_order=rec["m"] == 1)
        for name in METHODS:
            X.append([terms[name][t] for t in TERMS])
            y.append(rec["median_ms"][name] - rec["median_ms"]["base"])
            w.append(1.0 / rec["median_ms"][name])
    X, y, w = np.array(X, float), np.array(y), np.array(w)
    coef, _ = nnls(X * w[:, None], y * w)                                # ms per counted unit
    macs = [rec["n"] * rec["d"] ** 2 for rec in records]
    big = [rec["median_ms"]["base"] / q for rec, q in zip(records, macs) if q >= min(2**28, max(macs) / 2)]
    unit = statistics.median(big)                                        # ms per MAC of the base GEMM
    return dict(zip(("macs", "op", "copy", "gather"), (float(c / unit) for c in coef)))


def pick_quality(records, constants=None):
    """For each record, the time of the method budget.mixed_batch_method picks (with ``constants``)
    over the fastest method's: a list of (ratio, record, picked, fastest)."""
    out = []
    for rec in records:
        med = rec["median_ms"]
        consts = None if constants is None else {k: v for k, v in constants.items() if k != "macs"}
        picked = budget.mixed_batch_method(_counts(rec), rec["d"], rec["d"], rec["r"], rec["m"] == 1, consts)
        best = min(METHODS, key=lambda name: med[name])
        out.append((med[picked] / med[best], rec, picked, best))
    return out


FIT_HEADER = f"{'d':>5} {'m':>3} {'n':>4} {'reps':>4} | {'base ms':>8} | " + " ".join(f"{m + ' / base':>17}" for m in METHODS)


def format_fit_row(rec):
    med = rec["median_ms"]
    return (f"{rec['d']:>5} {rec['m']:>3} {rec['n']:>4} {rec['reps']:>4} | {med['base']:>8.3f} | "
            + " ".join(f"{med[name] / med['base']:>17.2f}" for name in METHODS))


def print_fit(records, slack=1.15):
    fitted = fit_constants(records)
    print("\nconstants (multiply-add equivalents of the base GEMM):")
    print(f"  fitted here: bypass MAC {fitted['macs']:.2f}, op {fitted['op']:.3g}, copy {fitted['copy']:.3g}, "
          f"gather {fitted['gather']:.3g}")
    print("  shipped:     bypass MAC 1, " + ", ".join(f"{k} {v:.3g}" for k, v in budget.MIXED_BATCH_CONSTANTS.items()))
    for label, consts in (("fitted", fitted), ("shipped", None)):
        q = pick_quality(records, consts)
        worst = max(q, key=lambda t: t[0])
        print(f"  auto with the {label} constants: {sum(r <= slack for r, *_ in q)}/{len(q)} shapes within {slack}x "
              f"of the fastest; worst {worst[0]:.2f} at d={worst[1]['d']} m={worst[1]['m']} n={worst[1]['n']} "
              f"(picks {worst[2]}, fastest {worst[3]})")
    return fitted


def shapes_for(quick):
    """(d, r, m, n) of every row of the table."""
    if quick:
        return [(256, 8, m, n) for m in (1, 4, 16) for n in (16, 64)]
    return [(d, RANK, m, n) for d in DIMS for m in ADAPTERS for n in BATCHES]


def main(argv=None):
    ap = _cli.parser(__doc__, reps="repetitions per shape (default 9, --quick 3)", quick="d=256, r=8, m up to 16: a smoke run",
                     max_shape_seconds=20.0, threads=2)
    ap.add_argument("--fit", action="store_true", help="time the four methods on 36 shapes and refit MIXED_BATCH_CONSTANTS")
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (3 if args.quick else 9)
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        if args.fit:
            _cli.print_header(["torch"], f"float32, d = k, r = {RANK}; row i uses adapter i mod m; median of reps",
                              "ratios: time over x W0^T alone\n")
            shapes = [(256, 8, m, n) for m in (1, 16) for n in (8, 64)] if args.quick else FIT_SHAPES
            records = _cli.table(FIT_HEADER, shapes,
                                 lambda shape: bench_shape(*shape, reps, max_seconds=args.max_shape_seconds,
                                                           names=METHODS + ("base",)),  # what fit_constants needs
                                 format_fit_row)
            fitted = print_fit(records)
            _cli.finish(args.json, t0, records=records, fitted=fitted)
            return records
        _cli.print_header(["torch"],
                          f"float32, d = k, s = {SCALING:g}, B ~ N(0, {B_STD}^2); row i uses adapter i mod m; median of reps",
                          "ratios: time over one adapter for all n rows (the same multiply-adds, no bookkeeping)\n")
        records = _cli.table(HEADER, shapes_for(args.quick),
                             lambda shape: bench_shape(*shape, reps, max_seconds=args.max_shape_seconds), format_row)
        targets = check_targets(records)
        _cli.print_targets(targets)
        _cli.finish(args.json, t0, records=records, ratios=[ratios(rec) for rec in records], targets=targets)
    return records


if __name__ == "__main__":
    main()
