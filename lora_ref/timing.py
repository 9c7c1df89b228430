"""Side-by-side timing for the chapters and the benchmarks: interleaved repetitions, medians.

The machines this book runs on are shared and noisy, so we never time one thing
and then another: each repetition runs every candidate once, round-robin, so
that noise falls on all of them alike, and we report the median. This module is
the one implementation: chapter 02 calls ``compare_ms``, chapter 09 ``time_single_thread``,
and the benchmarks in ``benchmarks/`` call ``time_interleaved``.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

__all__ = ["Timings", "calls_per_rep", "time_interleaved", "compare_ms", "time_single_thread"]

MAX_CALLS_PER_REP = 1 << 16


def _seconds_per_call(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def calls_per_rep(fn, target_rep_s, warmup=1, max_calls=MAX_CALLS_PER_REP):
    """(calls, seconds per call): how many calls make one repetition last about target_rep_s.

    The first call warms up and gives a first estimate. A call slower than the target is
    made once per repetition and needs no more warm-up; a fast one gets ``warmup`` more
    calls and a better estimate from a batch of calls.
    """
    t1 = _seconds_per_call(fn, 1)
    if t1 < target_rep_s:
        for _ in range(warmup):
            fn()
        t1 = _seconds_per_call(fn, 1)
        if t1 < target_rep_s / 10:
            n = max(1, int(target_rep_s / 10 / max(t1, 1e-7)))
            _seconds_per_call(fn, n)
            t1 = _seconds_per_call(fn, n)
    return max(1, min(max_calls, round(target_rep_s / max(t1, 1e-9)))), t1


@dataclass
class Timings:
    """Seconds per call of each candidate, one sample per repetition."""

    reps: int
    calls: dict            # {name: calls per repetition}
    samples: dict          # {name: [seconds per call, one per repetition]}

    @property
    def median(self):
        """{name: median seconds per call}"""
        return {name: statistics.median(s) for name, s in self.samples.items()}

    def paired_ratio(self, a, b):
        """Median over repetitions of time(a) / time(b) within the same repetition."""
        return statistics.median(x / y for x, y in zip(self.samples[a], self.samples[b]))


def time_interleaved(fns, reps=7, target_rep_s=0.005, warmup=1, max_seconds=None, min_reps=1):
    """Time each zero-argument callable of ``fns`` ({name: fn}), repetitions interleaved.

    Every repetition calls each candidate ``calls[name]`` times, in the order of ``fns``.
    With ``max_seconds`` the repetitions are cut (not below ``min_reps``) so that the whole
    run takes about that long. The garbage collector is off while timing.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one function")
    if reps < 1 or min_reps < 1:
        raise ValueError(f"reps and min_reps must be >= 1, got reps={reps}, min_reps={min_reps}")
    if target_rep_s <= 0:
        raise ValueError(f"target_rep_s must be > 0, got {target_rep_s}")
    calls, per_call = {}, {}
    for name, fn in fns.items():
        calls[name], per_call[name] = calls_per_rep(fn, target_rep_s, warmup)
    if max_seconds is not None:
        rep_s = sum(calls[name] * per_call[name] for name in fns)
        reps = max(min(reps, min_reps), min(reps, int(max_seconds / max(rep_s, 1e-9))))
    samples = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                samples[name].append(_seconds_per_call(fn, calls[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timings(reps=reps, calls=calls, samples=samples)


def compare_ms(fns, reps=7, min_seconds=0.005):
    """{name: median milliseconds per call} for each zero-argument callable in ``fns``.

    Every function is warmed up first, then ``reps`` interleaved repetitions of at least
    about ``min_seconds`` each.
    """
    if not fns:
        raise ValueError("compare_ms needs at least one function")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got reps={reps}")
    t = time_interleaved(fns, reps=reps, target_rep_s=min_seconds)
    return {name: 1e3 * s for name, s in t.median.items()}


def time_single_thread(fns, reps=3, min_seconds=0.002):
    """{name: median ms per call} of zero-argument callables, timed interleaved (``compare_ms``)
    on one torch thread; the thread count is restored afterwards.

    One thread, for candidates that differ in how many small products they run (chapter 09's
    serving strategies): with a second thread on a busy machine, waking it for each small
    product can cost more than the product, and the comparison would measure that instead.
    Imports torch when called.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare_ms(fns, reps=reps, min_seconds=min_seconds)
    finally:
        torch.set_num_threads(threads)
