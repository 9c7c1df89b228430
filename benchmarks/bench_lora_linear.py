"""Time a LoRA linear layer: lora_ref vs PEFT vs the bare base layer vs a naive merge.

What is measured
----------------
One layer y = x W0^T + b + s (x A^T) B^T with W0: (d, k), A: (r, k), B: (d, r),
x: (T, k), float32, in four implementations that compute the same thing:

  lora_ref  ``lora_ref.torch.LoRALinear``                       (two thin matmuls)
  peft      ``peft.tuners.lora.Linear``, built by get_peft_model (two thin matmuls)
  base      the frozen ``nn.Linear`` alone: the floor the adapter is measured against
  naive     forms W = W0 + s B A on every call, then F.linear(x, W, b)

All four share one W0 and bias (the same ``nn.Linear``) and get copies of the same
A and B; B is small random nonzero, so the bypass really contributes and its
gradients are not trivially zero. Before anything is timed, every variant's
output and gradients (x, A, B) are checked against a float64 reference: the
benchmark fails loudly if the variants do not compute the same numbers.

Two timings per variant:
  fwd  forward under ``torch.no_grad()`` (inference);
  f+b  forward + ``y.backward(grad)`` with a fixed grad tensor, x.requires_grad=True
       as inside a network (so dL/dx is computed too), grads set to None between calls.

Why the naive variant is slower in training even though its forward looks cheap:
its backward must form the full (d, k) gradient of W (a T*d*k matmul, as big as the
forward itself) and push it through B A, while the factored form only needs
dL/dA (r, k) and dL/dB (d, r), i.e. T*r*(d+k) extra work. Its forward also
rebuilds the (d, k) matrix W on every call, which dominates at small T.

Method: warm up, pick an inner loop count per (variant, mode) so one repetition
takes about 30 ms (one call when a call is slower than that), then run the
repetitions round-robin (for rep: for mode: for variant) so that the noise of a
shared machine hits all variants alike; report the median over repetitions of
time per call (``time.perf_counter``). Slow shapes get fewer repetitions (at
least 4) so that the whole run stays near 10 minutes on 2 cores.

The table's ratios are ratios of medians. The target summary also shows the
"paired" ratio (median over repetitions of the ratio within one repetition), and
the table's last column, spread%, is the typical (max - min) / median of a shape's
samples: when it is large the machine was busy and the row deserves less trust.

Two forms of the forward without gradients. ``LoRALinear`` runs the bypass, W0 x + s B (A x), on
small batches, and forms W0 + s B A for the batch (one GEMM over x, which is then read once) when it
has more than ``lora_ref.torch.MATERIALISE_AT`` times T* = d k / (d + k) rows, the multiply-add
crossover of chapter 02. ``--crossover`` times both forms against the base layer at n = 1 .. 6 T*
and checks that the constant sits where they cross. ``--profile`` prints torch.profiler's table of
both forms at d = k = 1024, r = 8, T = 4096: where the time of the bypass goes (the base GEMM,
the bias, the skinny x A^T that reads x a second time, the in-place addmm_ of s B z).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_linear.py [--quick] [--reps N] [--json PATH]
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_linear.py --crossover [--quick]
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_linear.py --profile
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lora_ref import oracles
from lora_ref import torch as lt
from lora_ref.budget import materialise_crossover_tokens
from lora_ref.timing import time_interleaved
from lora_ref.torch import LoRALinear, init_lora

import _cli

VARIANTS = ("lora_ref", "peft", "base", "naive")
MODES = ("fwd", "fb")

DIMS = (1024, 4096)
RANKS = (8, 16, 64)
TOKENS = (1, 16, 128, 4096)
ALPHA = 16.0          # s = alpha / r, as in PEFT's LoraConfig(lora_alpha=16)
B_STD = 0.01          # B ~ N(0, B_STD^2): small but nonzero
TARGET_REP_S = 0.03   # aim for ~30 ms per repetition


class MismatchError(AssertionError):
    """Two variants that should compute the same numbers do not."""


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One implementation of the layer: the module to call and its trainable factors."""

    name: str
    module: nn.Module
    A: torch.Tensor | None = None      # the parameter holding A (r, k), None for the base layer
    B: torch.Tensor | None = None      # the parameter holding B (d, r)
    has_adapter: bool = True           # False: computes the base layer only

    @property
    def params(self):
        return [p for p in (self.A, self.B) if p is not None]


class NaiveLoRALinear(nn.Module):
    """Merge on every call: W = W0 + s B A (one fused addmm), then F.linear(x, W, bias).

    Autograd then has to form dL/dW, a full (d, k) matrix, in the backward pass.
    """

    def __init__(self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(A.detach().clone())           # (r, k)
        self.lora_B = nn.Parameter(B.detach().clone())           # (d, r)
        self.scaling = scaling

    def forward(self, x):
        W = torch.addmm(self.base_layer.weight, self.lora_B, self.lora_A, alpha=self.scaling)  # (d, k)
        return F.linear(x, W, self.base_layer.bias)


class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one nn.Linear named "proj"."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _import_peft():
    # bitsandbytes (imported by peft) warns about an optional CPU kernel; not our concern here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft

    return peft


@dataclass
class Setup:
    """The shared tensors of one shape, and the four variants built on them."""

    d: int
    k: int
    r: int
    T: int
    scaling: float
    base: nn.Linear
    A: torch.Tensor                   # (r, k) float32, plain tensor (the source of every copy)
    B: torch.Tensor                   # (d, r)
    x: torch.Tensor                   # (T, k), requires_grad
    grad: torch.Tensor                # (T, d), the fixed dL/dy
    variants: dict = field(default_factory=dict)


def make_setup(d, r, T, k=None, alpha=ALPHA, seed=0, dtype=torch.float32):
    """Build W0, bias, A, B (B small nonzero), x, grad and the four variants for one shape."""
    k = d if k is None else k
    torch.manual_seed(seed)
    base = nn.Linear(k, d, dtype=dtype)                          # W0 (d, k), bias (d,)
    base.requires_grad_(False)
    A, B = init_lora(d, k, r, seed=seed, b_std=B_STD, dtype=dtype)  # A kaiming, B ~ N(0, 0.01^2)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, k, generator=g, dtype=dtype).requires_grad_(True)
    grad = torch.randn(T, d, generator=g, dtype=dtype)

    ours = LoRALinear(base, r, alpha)
    with torch.no_grad():
        ours.lora_A.copy_(A)
        ours.lora_B.copy_(B)

    _import_peft()
    twin = oracles.peft_twin(_Holder(base), _Holder(ours))      # PEFT on a copy of W0, the same A and B
    theirs = twin.base_model.model.proj                          # the peft.tuners.lora.Linear
    theirs.base_layer = base                                     # all variants share one W0 in memory

    scaling = ours.scaling
    naive = NaiveLoRALinear(base, A, B, scaling)
    variants = {
        "lora_ref": Variant("lora_ref", ours, ours.lora_A, ours.lora_B),
        "peft": Variant("peft", theirs, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight),
        "base": Variant("base", base, has_adapter=False),
        "naive": Variant("naive", naive, naive.lora_A, naive.lora_B),
    }
    return Setup(d, k, r, T, scaling, base, A, B, x, grad, variants)


# --------------------------------------------------------------------------- equality check


def _reference(setup, x, grad, with_adapter):
    """Output and gradients (x, A, B) in float64, by autograd on the formula itself."""
    W0 = setup.base.weight.detach().double()
    b = setup.base.bias.detach().double() if setup.base.bias is not None else 0.0
    A = setup.A.double().requires_grad_(True)
    B = setup.B.double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    y = x @ W0.T + b
    if with_adapter:
        y = y + setup.scaling * ((x @ A.T) @ B.T)
    y.backward(grad.double())
    return {"y": y.detach(), "x.grad": x.grad, "A.grad": A.grad, "B.grad": B.grad}


def _close(got, ref, rtol=1e-3, atol_rel=1e-4):
    """float32 vs float64: agree to ~1e-4 of the reference's largest entry."""
    atol = atol_rel * float(ref.abs().max()) + 1e-12
    return torch.allclose(got.double(), ref, rtol=rtol, atol=atol)


def check_same_outputs(setup, variants=None, rows=64):
    """Run forward + backward of every variant on the first ``rows`` tokens and compare
    output, dL/dx, dL/dA and dL/dB with a float64 reference. Raises MismatchError."""
    variants = setup.variants if variants is None else variants
    x = setup.x.detach()[:rows]
    grad = setup.grad[:rows]
    refs = {flag: _reference(setup, x, grad, flag) for flag in (True, False)}
    for v in variants.values():
        ref = refs[v.has_adapter]
        xv = x.clone().requires_grad_(True)
        for p in v.params:
            p.grad = None
        y = v.module(xv)
        y.backward(grad)
        got = {"y": y.detach(), "x.grad": xv.grad}
        if v.has_adapter:
            got["A.grad"] = v.A.grad if v.A is not None else None
            got["B.grad"] = v.B.grad if v.B is not None else None
        for key, tensor in got.items():
            if tensor is None or tensor.shape != ref[key].shape or not _close(tensor, ref[key]):
                err = "missing" if tensor is None else f"max |diff| = {(tensor.double() - ref[key]).abs().max():.3g}"
                raise MismatchError(
                    f"variant {v.name!r} disagrees with the float64 reference on {key} "
                    f"at d={setup.d}, k={setup.k}, r={setup.r}, T={setup.T} ({err}, "
                    f"max |ref| = {ref[key].abs().max():.3g}): the benchmark would compare unequal computations"
                )
        for p in v.params:
            p.grad = None


# --------------------------------------------------------------------------- timing


def _call(v, setup, mode):
    """The function timed for (variant, mode): one call, no arguments."""
    module, x, grad, params = v.module, setup.x, setup.grad, v.params

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                module(x)
        return fwd

    def fwd_bwd():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad)
    return fwd_bwd


def time_setup(setup, reps, target_rep_s=None, max_seconds=None, min_reps=4, warmup=1):
    """Median seconds per call for every (variant, mode), repetitions interleaved round-robin
    (``lora_ref.timing.time_interleaved``: modes outer, variants inner).

    With ``max_seconds``, the number of repetitions is cut (down to ``min_reps``) so that
    the shape takes about that long; small shapes keep all ``reps``.
    Returns {"reps", "number": {v: {mode: n}}, "samples": {v: {mode: [s, ...]}}, "median": {...}}.
    """
    target_rep_s = TARGET_REP_S if target_rep_s is None else target_rep_s
    calls = {(name, mode): _call(v, setup, mode) for mode in MODES for name, v in setup.variants.items()}
    t = time_interleaved(calls, reps=reps, target_rep_s=target_rep_s, warmup=warmup,
                         max_seconds=max_seconds, min_reps=min_reps)
    setup.x.grad = None
    for v in setup.variants.values():
        for p in v.params:
            p.grad = None

    nested = lambda f: {name: {mode: f((name, mode)) for mode in MODES} for name in setup.variants}
    median = t.median
    return {
        "reps": t.reps,
        "number": nested(lambda key: t.calls[key]),
        "samples": nested(lambda key: t.samples[key]),
        "median": nested(lambda key: median[key]),
    }


def bench_shape(d, r, T, reps, max_seconds=None, check=True, **time_kwargs):
    """Build, check and time one shape. Returns a JSON-able record (times in ms)."""
    setup = make_setup(d, r, T)
    if check:
        check_same_outputs(setup)
    t = time_setup(setup, reps, max_seconds=max_seconds, **time_kwargs)
    def ms(tree):                                     # seconds -> milliseconds, numbers or lists
        scale = lambda v: [1e3 * s for s in v] if isinstance(v, list) else 1e3 * v
        return {name: {mode: scale(v) for mode, v in modes.items()} for name, modes in tree.items()}

    return {
        "d": d, "k": setup.k, "r": r, "T": T, "scaling": setup.scaling,
        "reps": t["reps"], "number": t["number"],
        "median_ms": ms(t["median"]), "samples_ms": ms(t["samples"]),
    }


RATIOS = {                                   # name: (numerator, denominator) as (variant, mode)
    "ref/peft_fb": (("lora_ref", "fb"), ("peft", "fb")),
    "ref/peft_fwd": (("lora_ref", "fwd"), ("peft", "fwd")),
    "ref/base_fwd": (("lora_ref", "fwd"), ("base", "fwd")),
    "naive/ref_fb": (("naive", "fb"), ("lora_ref", "fb")),
}


def ratios(rec, paired=False):
    """The four ratios of the table for one record: ratio of the medians or, with
    ``paired``, the median over repetitions of the ratio within each repetition (the
    two calls ran moments apart, so a burst of load on the machine mostly cancels)."""
    out = {}
    for name, ((va, ma), (vb, mb)) in RATIOS.items():
        if paired:
            a, b = rec["samples_ms"][va][ma], rec["samples_ms"][vb][mb]
            out[name] = statistics.median(x / y for x, y in zip(a, b))
        else:
            out[name] = rec["median_ms"][va][ma] / rec["median_ms"][vb][mb]
    return out


def spread(rec):
    """How noisy a shape was: the median over (variant, mode) of (max - min) / median, in %."""
    rel = [(max(v) - min(v)) / statistics.median(v) for modes in rec["samples_ms"].values() for v in modes.values()]
    return 100 * statistics.median(rel)


# --------------------------------------------------------------------------- report


TABLE_HEADER = (
    f"{'d':>5} {'r':>3} {'T':>5} {'reps':>4} | {'ref fwd ms':>10} {'ref f+b ms':>10} | "
    f"{'ref/PEFT f+b':>12} {'ref/PEFT fwd':>12} {'ref/base fwd':>12} {'naive/ref f+b':>13} | {'spread%':>7}"
)


def format_row(rec):
    q, m = ratios(rec), rec["median_ms"]["lora_ref"]
    return (
        f"{rec['d']:>5} {rec['r']:>3} {rec['T']:>5} {rec['reps']:>4} | {m['fwd']:>10.4f} {m['fb']:>10.4f} | "
        f"{q['ref/peft_fb']:>12.3f} {q['ref/peft_fwd']:>12.3f} {q['ref/base_fwd']:>12.3f} {q['naive/ref_fb']:>13.2f} | "
        f"{spread(rec):>7.0f}"
    )


def _paired(rec, key, fmt=".3f"):
    """' (paired 1.234)' when the record has its samples, else ''."""
    return f" (paired {ratios(rec, paired=True)[key]:{fmt}})" if "samples_ms" in rec else ""


def check_targets(records):
    """The three targets, each {"name", "status": PASS/MISS/SKIP, "lines": [...]}.

    Verdicts use the ratio of the medians (the table's numbers); the paired ratio is
    shown beside it as a check on how much the machine's noise moved the verdict.
    """
    out = []

    # 1. lora_ref f+b <= 1.00x PEFT: the median over shapes, worst case reported.
    q = [(ratios(rec)["ref/peft_fb"], rec) for rec in records]
    med = statistics.median(x for x, _ in q)
    worst, wrec = max(q, key=lambda t: t[0])
    paired = [ratios(rec, paired=True)["ref/peft_fb"] for rec in records if "samples_ms" in rec]
    paired_txt = f" (paired {statistics.median(paired):.3f})" if paired else ""
    out.append({
        "name": "lora_ref f+b <= 1.00x PEFT (median over shapes)",
        "status": "PASS" if med <= 1.00 else "MISS",
        "value": med,
        "lines": [f"median ratio {med:.3f}{paired_txt} over {len(q)} shapes; "
                  f"{sum(x <= 1.0 for x, _ in q)}/{len(q)} shapes <= 1.00",
                  f"worst {worst:.3f}{_paired(wrec, 'ref/peft_fb')} at d={wrec['d']} r={wrec['r']} T={wrec['T']}"],
    })

    # 2. lora_ref forward <= FLOP floor + slack at T=4096, each (d, r).
    cases = [rec for rec in records if rec["T"] == 4096]
    lines, ok = [], True
    for rec in cases:
        x = ratios(rec)["ref/base_fwd"]
        floor = flop_floor(rec["d"], rec["k"], rec["r"])
        bound = floor + fwd_slack(rec["r"])
        ok &= x <= bound
        lines.append(f"d={rec['d']:>4} r={rec['r']:>2}: {x:.3f}  {'PASS' if x <= bound else 'MISS'}"
                     f"{_paired(rec, 'ref/base_fwd')}   FLOP floor 1 + r(d+k)/(dk) = {floor:.3f}, bound {bound:.3f}")
    out.append({"name": "lora_ref fwd <= FLOP floor + 0.05 (r <= 16) or + 0.06 (r > 16) x base at T=4096 (each d, r)",
                "status": ("PASS" if ok else "MISS") if cases else "SKIP", "lines": lines or ["no T=4096 shapes"]})

    # 3. naive f+b >= 1.3x lora_ref at d=4096, each (r, T).
    cases = [rec for rec in records if rec["d"] == 4096]
    lines, ok = [], True
    for rec in cases:
        x = ratios(rec)["naive/ref_fb"]
        ok &= x >= 1.3
        lines.append(f"r={rec['r']:>2} T={rec['T']:>4}: {x:.2f}  {'PASS' if x >= 1.3 else 'MISS'}"
                     f"{_paired(rec, 'naive/ref_fb', '.2f')}")
    out.append({"name": "naive f+b >= 1.3x lora_ref at d=4096 (each r, T)",
                "status": ("PASS" if ok else "MISS") if cases else "SKIP", "lines": lines or ["no d=4096 shapes"]})
    return out


def flop_floor(d, k, r):
    """The bypass's forward over the base layer's in multiply-adds: (T d k + T r (d + k)) / (T d k)."""
    return 1 + r * (d + k) / (d * k)


def fwd_slack(r):
    """How far above the FLOP floor the forward may sit: memory traffic the count does not see
    (the bias, a second read of x, the (T, r) bottleneck), larger for the larger bottleneck."""
    return 0.05 if r <= 16 else 0.06


# --------------------------------------------------------------------------- the two forward forms


CROSS_DIMS = (1024, 2048, 4096)
CROSS_RANKS = (8, 64)
CROSS_FACTORS = (1, 2, 3, 4, 6)            # n = factor * T*


def _forced(layer, x, at):
    """LoRALinear's no-grad forward with MATERIALISE_AT set to ``at`` for the call: inf keeps the
    bypass, 0 materialises W0 + s B A (both as the layer runs them, nothing re-implemented)."""
    def call():
        before, lt.MATERIALISE_AT = lt.MATERIALISE_AT, at
        try:
            with torch.no_grad():
                layer(x)
        finally:
            lt.MATERIALISE_AT = before
    return call


def bench_crossover(d, r, factor, reps, target_rep_s=0.05, seed=0):
    """Bypass vs materialised vs base at n = factor * T* rows. Times in ms and the paired ratio
    bypass / materialised (> 1: materialising is faster)."""
    n = int(factor * materialise_crossover_tokens(d, d))
    torch.manual_seed(seed)
    base = nn.Linear(d, d).requires_grad_(False)
    layer = LoRALinear(base, r, ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_(0, B_STD)
    x = torch.randn(n, d)

    def base_call():
        with torch.no_grad():
            base(x)

    t = time_interleaved({"bypass": _forced(layer, x, math.inf), "materialised": _forced(layer, x, 0.0),
                          "base": base_call}, reps=reps, target_rep_s=target_rep_s)
    med = t.median
    return {"d": d, "r": r, "factor": factor, "n": n, "reps": t.reps,
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "bypass/base": med["bypass"] / med["base"], "materialised/base": med["materialised"] / med["base"],
            "paired bypass/materialised": t.paired_ratio("bypass", "materialised")}


CROSS_HEADER = (f"{'d':>5} {'r':>3} {'n/T*':>4} {'n':>5} {'reps':>4} | {'bypass/base':>11} {'mater./base':>11} | "
                f"{'bypass/mater. (paired)':>22} | form LoRALinear runs")


def format_crossover_row(rec):
    form = "materialised" if rec["factor"] > lt.MATERIALISE_AT else "bypass"
    return (f"{rec['d']:>5} {rec['r']:>3} {rec['factor']:>4g} {rec['n']:>5} {rec['reps']:>4} | "
            f"{rec['bypass/base']:>11.3f} {rec['materialised/base']:>11.3f} | "
            f"{rec['paired bypass/materialised']:>22.3f} | {form}")


def check_crossover(records, tolerance=0.05):
    """MATERIALISE_AT is where the forms cross: at or below it the bypass is never more than 5 %
    slower than materialising (paired), and from 1.5 x it on materialising is never more than 5 %
    slower than the bypass."""
    at = lt.MATERIALISE_AT
    lines, ok = [], True
    for rec in records:
        q = rec["paired bypass/materialised"]
        if rec["factor"] <= at:
            good, rule = q <= 1 + tolerance, f"bypass kept: bypass/mater. {q:.3f} <= {1 + tolerance:.2f}"
        elif rec["factor"] >= 1.5 * at:
            good, rule = q >= 1 - tolerance, f"materialised: bypass/mater. {q:.3f} >= {1 - tolerance:.2f}"
        else:
            continue
        ok &= good
        lines.append(f"d={rec['d']:>4} r={rec['r']:>2} n={rec['factor']:g} T*: {rule}  {'PASS' if good else 'MISS'}")
    return [{"name": f"MATERIALISE_AT = {at:g} sits where the two forms cross (5 % either side)",
             "status": ("PASS" if ok else "MISS") if lines else "SKIP", "lines": lines or ["no shapes"]}]


def profile_forms(d=1024, r=8, T=4096, rows=12):
    """torch.profiler's operator table for the two no-grad forms at one shape: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    base = nn.Linear(d, d).requires_grad_(False)
    layer = LoRALinear(base, r, ALPHA)
    x = torch.randn(T, d)
    for name, at in (("bypass", math.inf), ("materialised", 0.0)):
        call = _forced(layer, x, at)
        call()                                                   # warm up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                call()
        print(f"\n{name} form, d = k = {d}, r = {r}, T = {T}, 5 calls:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def shapes_for(quick):
    dims = DIMS[:1] if quick else DIMS
    return [(d, r, T) for d in dims for r in RANKS for T in TOKENS]


def main(argv=None):
    ap = _cli.parser(__doc__, reps="repetitions per shape (default 15, --quick 5); taken as given, not cut for big shapes",
                     quick="d=1024 only, fewer reps (smoke run)", max_shape_seconds=25.0)
    ap.add_argument("--crossover", action="store_true", help="time the bypass against the materialised forward "
                                                              "at n = 1 .. 6 T* and check MATERIALISE_AT")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table of both forward forms")
    args = ap.parse_args(argv)
    if args.profile:
        with _cli.threads(args.threads):
            profile_forms()
        return [], []
    if args.crossover:
        return crossover_main(args)
    reps = args.reps if args.reps is not None else (5 if args.quick else 15)
    max_seconds = None if args.reps is not None else args.max_shape_seconds
    _import_peft()
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch", "peft"],
                          f"float32, alpha={ALPHA:g} (s = alpha/r), B ~ N(0, {B_STD}^2), bias=True, x.requires_grad=True; "
                          f"median of reps, {TARGET_REP_S * 1e3:.0f} ms per rep target",
                          "ratios < 1 mean lora_ref is faster; naive/ref > 1 means the naive merge is slower\n")
        records = _cli.table(TABLE_HEADER, shapes_for(args.quick),
                             lambda shape: bench_shape(*shape, reps, max_seconds=max_seconds), format_row)
        targets = check_targets(records)
        _cli.print_targets(targets)
        _cli.finish(args.json, t0, ["torch", "peft"], records=records, ratios=[ratios(rec) for rec in records],
                    paired_ratios=[ratios(rec, paired=True) for rec in records], targets=targets)
    return records, targets


def crossover_main(args):
    reps = args.reps if args.reps is not None else (3 if args.quick else 9)
    dims = CROSS_DIMS[:1] if args.quick else CROSS_DIMS
    shapes = [(d, r, f) for d in dims for r in CROSS_RANKS for f in CROSS_FACTORS]
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch"], f"float32, no grad, alpha={ALPHA:g}, bias=True; n = factor * T*, "
                                     f"T* = dk/(d+k); MATERIALISE_AT = {lt.MATERIALISE_AT:g}",
                          "bypass/mater. > 1: materialising W0 + s B A for the batch is faster\n")
        records = _cli.table(CROSS_HEADER, shapes, lambda shape: bench_crossover(*shape, reps), format_crossover_row)
        targets = check_crossover(records)
        _cli.print_targets(targets)
        _cli.finish(args.json, t0, records=records, targets=targets)
    return records, targets


if __name__ == "__main__":
    main()
