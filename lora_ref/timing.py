"""Side-by-side timing for the chapters: interleaved repetitions, medians.

The machines this book runs on are shared and noisy, so we never time one thing
and then another: each repetition runs every candidate once, round-robin, so
that noise falls on all of them alike, and we report the median.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["compare_ms"]


def _calls_per_rep(fn, min_seconds):
    """How many calls make one repetition last at least min_seconds (fast functions need several)."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_seconds or n >= 1 << 16:
            return n
        n *= 4


def compare_ms(fns, reps=7, min_seconds=0.005):
    """{name: median milliseconds per call} for each zero-argument callable in ``fns``.

    Every function is called once first (warm-up), then ``reps`` interleaved repetitions.
    """
    if not fns:
        raise ValueError("compare_ms needs at least one function")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got reps={reps}")
    calls = {name: _calls_per_rep(fn, min_seconds) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append(1e3 * (time.perf_counter() - t0) / n)
    return {name: statistics.median(s) for name, s in samples.items()}
