"""Time forward + backward of a LoRA layer against a fully trained linear layer of the same shape.

What is measured
----------------
One (d, k) layer on x: (T, k), float32, with x.requires_grad=True as inside a network (so dL/dx is
computed in both), and a fixed upstream gradient dL/dy: (T, d):

  lora  ``lora_ref.torch.LoRALinear``: W0 and bias frozen, A: (r, k) and B: (d, r) trained
  full  ``nn.Linear`` with its weight and bias trained: the layer full fine-tuning trains

Both share one W0 and bias. Before any timing, each variant's output and gradients are checked
against a float64 reference computed by autograd on the formula (y, dL/dx, and dL/dA, dL/dB or dL/dW):
the benchmark stops if they disagree, since it would then compare unequal work.

Next to the measured time ratio lora / full, each row shows the ratio of multiply-accumulates from
``lora_ref.gradient_dynamics.training_macs``,

    MAC ratio = (2 d k + 3 r (d + k)) / (3 d k) = 2/3 + r (d + k) / (d k),

and the ratio of activations saved for the backward pass, (T k + T r) / (T k)
(``saved_activations``). The time ratio is above the MAC ratio because LoRA's extra work is thin
products (one dimension r) that run far below the machine's peak, plus more autograd nodes and
kernel launches; both matter most at small T, where no product is large enough to be compute-bound.

Method (``lora_ref.timing.time_interleaved``, as ``bench_lora_linear.py``): warm up, pick an inner loop
count so one repetition takes about 30 ms, run the repetitions round-robin (lora, full, lora, full, ...)
so that a noisy machine slows both alike, report medians and the paired ratio (median over
repetitions of the ratio within one repetition).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_backward.py [--quick] [--reps N] [--threads N] [--json PATH]
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from lora_ref import gradient_dynamics as gd
from lora_ref.timing import time_interleaved
from lora_ref.torch import LoRALinear, init_lora

import _cli

VARIANTS = ("lora", "full")
DIMS = (1024, 4096)
RANKS = (8, 64)
TOKENS = (16, 512, 4096)
ALPHA = 16.0          # s = alpha / r
B_STD = 0.01          # B ~ N(0, B_STD^2): small, nonzero, so the bypass and its gradients are not trivial
TARGET_REP_S = 0.03   # about 30 ms per repetition
TARGET_TIME_RATIO = 1.0   # at the largest shapes LoRA's forward + backward should take less time than full's


class MismatchError(AssertionError):
    """A variant does not compute what the float64 reference computes."""


def make_setup(d, r, T, k=None, seed=0, dtype=torch.float32):
    """The shared W0, bias, A, B, x and dL/dy of one shape, and the two variants
    {name: (module, trained parameters, kind)}, kind "lora" or "full" (what the reference computes)."""
    k = d if k is None else k
    torch.manual_seed(seed)
    base = nn.Linear(k, d, dtype=dtype)                                 # W0: (d, k), bias: (d,)
    A, B = init_lora(d, k, r, seed=seed, b_std=B_STD, dtype=dtype)      # (r, k) kaiming, (d, r) small
    lora = LoRALinear(base, r, ALPHA)                                   # freezes base's weight and bias
    with torch.no_grad():
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B)
    full = nn.Linear(k, d, dtype=dtype)
    with torch.no_grad():
        full.weight.copy_(base.weight)
        full.bias.copy_(base.bias)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, k, generator=g, dtype=dtype).requires_grad_(True)
    grad = torch.randn(T, d, generator=g, dtype=dtype)
    variants = {"lora": (lora, [lora.lora_A, lora.lora_B], "lora"), "full": (full, [full.weight, full.bias], "full")}
    return dict(d=d, k=k, r=r, T=T, scaling=lora.scaling, W0=base.weight.detach(), bias=base.bias.detach(),
                A=A, B=B, x=x, grad=grad, variants=variants)


def _reference(setup, kind, rows):
    """y and the gradients (x, then the trained parameters of a ``kind`` layer) in float64, by autograd."""
    W0 = setup["W0"].double().requires_grad_(kind == "full")
    b = setup["bias"].double().requires_grad_(kind == "full")
    x = setup["x"].detach()[:rows].double().requires_grad_(True)
    if kind == "lora":
        A = setup["A"].double().requires_grad_(True)
        B = setup["B"].double().requires_grad_(True)
        y = x @ W0.T + b + setup["scaling"] * ((x @ A.T) @ B.T)
        params = [A, B]
    else:
        y = x @ W0.T + b
        params = [W0, b]
    y.backward(setup["grad"][:rows].double())
    return [y.detach(), x.grad] + [p.grad for p in params]


def check_same_outputs(setup, variants=None, rows=64):
    """Forward + backward of each variant on the first ``rows`` tokens against the float64 reference:
    y, dL/dx and the trained parameters' gradients, to 1e-4 of each reference's largest entry."""
    variants = setup["variants"] if variants is None else variants
    for name, (module, params, kind) in variants.items():
        ref = _reference(setup, kind, rows)
        x = setup["x"].detach()[:rows].clone().requires_grad_(True)
        for p in params:
            p.grad = None
        y = module(x)
        y.backward(setup["grad"][:rows])
        got = [y.detach(), x.grad] + [p.grad for p in params]
        for what, a, b in zip(["y", "x.grad"] + [f"param{i}.grad" for i in range(len(params))], got, ref):
            atol = 1e-4 * float(b.abs().max()) + 1e-12
            if a is None or a.shape != b.shape or not torch.allclose(a.double(), b, rtol=1e-3, atol=atol):
                raise MismatchError(f"variant {name!r} disagrees with the float64 reference on {what} at "
                                    f"d={setup['d']}, k={setup['k']}, r={setup['r']}, T={setup['T']}")
        for p in params:
            p.grad = None


def _fwd_bwd(setup, module, params, kind):
    x, grad = setup["x"], setup["grad"]

    def call():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad)
    return call


def bench_shape(d, r, T, reps, k=None, target_rep_s=None, max_seconds=None, min_reps=4):
    """Check, then time forward + backward of both variants, interleaved. Returns a record with the
    medians (ms), every sample, the time ratio lora / full (of medians, and paired) and the counted ratios."""
    setup = make_setup(d, r, T, k)
    check_same_outputs(setup)
    fns = {name: _fwd_bwd(setup, *setup["variants"][name]) for name in VARIANTS}
    t = time_interleaved(fns, reps=reps, target_rep_s=TARGET_REP_S if target_rep_s is None else target_rep_s,
                         max_seconds=max_seconds, min_reps=min_reps)
    k = setup["k"]
    macs = {name: gd.training_macs(T, d, k, r if name == "lora" else None)["total"] for name in VARIANTS}
    saved = {name: gd.saved_activations(T, k, r if name == "lora" else None) for name in VARIANTS}
    median = {name: 1e3 * v for name, v in t.median.items()}
    return {"d": d, "k": k, "r": r, "T": T, "reps": t.reps, "number": t.calls,
            "samples_ms": {name: [1e3 * v for v in s] for name, s in t.samples.items()},
            "median_ms": median, "time_ratio": median["lora"] / median["full"],
            "paired_time_ratio": t.paired_ratio("lora", "full"),
            "mac_ratio": macs["lora"] / macs["full"], "saved_ratio": saved["lora"] / saved["full"],
            "spread": statistics.median((max(s) - min(s)) / statistics.median(s) for s in t.samples.values())}


TABLE_HEADER = (f"{'d':>5} {'r':>3} {'T':>5} | {'lora ms':>9} {'full ms':>9} | {'time':>6} {'paired':>6} "
                f"{'MACs':>6} {'saved':>6} | {'spread%':>7}")


def format_row(rec):
    m = rec["median_ms"]
    return (f"{rec['d']:>5} {rec['r']:>3} {rec['T']:>5} | {m['lora']:>9.3f} {m['full']:>9.3f} | "
            f"{rec['time_ratio']:>6.3f} {rec['paired_time_ratio']:>6.3f} {rec['mac_ratio']:>6.3f} "
            f"{rec['saved_ratio']:>6.3f} | {100 * rec['spread']:>7.1f}")


def check_targets(records):
    """lora f+b faster than full f+b at the largest T of each (d, r); PASS/MISS/SKIP with one line per case."""
    if not records:
        return [{"name": "lora f+b < full f+b at the largest T", "status": "SKIP", "lines": ["no shapes"]}]
    T_max = max(rec["T"] for rec in records)
    lines, ok = [], True
    for rec in (rec for rec in records if rec["T"] == T_max):
        hit = rec["paired_time_ratio"] < TARGET_TIME_RATIO
        ok &= hit
        lines.append(f"d={rec['d']:>4} r={rec['r']:>2} T={T_max}: time {rec['paired_time_ratio']:.3f} "
                     f"(MACs {rec['mac_ratio']:.3f})  {'PASS' if hit else 'MISS'}")
    return [{"name": f"lora f+b < {TARGET_TIME_RATIO:g}x full f+b at T={T_max} (each d, r)",
             "status": "PASS" if ok else "MISS", "lines": lines}]


def shapes_for(quick):
    dims = DIMS[:1] if quick else DIMS
    return [(d, r, T) for d in dims for r in RANKS for T in TOKENS]


def main(argv=None):
    ap = _cli.parser(__doc__, reps="repetitions per shape (default 15, --quick 5)", quick="d=1024 only, fewer reps (smoke run)",
                     max_shape_seconds=20.0)
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (5 if args.quick else 15)
    max_seconds = None if args.reps is not None else args.max_shape_seconds
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch"],
                          f"float32, alpha={ALPHA:g} (s = alpha/r), B ~ N(0, {B_STD}^2), bias=True, x.requires_grad=True; "
                          f"forward + backward, median of reps, {TARGET_REP_S * 1e3:.0f} ms per rep target",
                          "ratios are lora / full: time (of medians), paired (median of per-rep ratios), MACs and saved "
                          "activations (counted)\n")
        records = _cli.table(TABLE_HEADER, shapes_for(args.quick),
                             lambda shape: bench_shape(*shape, reps, max_seconds=max_seconds), format_row)
        targets = check_targets(records)
        _cli.print_targets(targets)
        _cli.finish(args.json, t0, records=records, targets=targets)
    return records, targets


if __name__ == "__main__":
    main()
