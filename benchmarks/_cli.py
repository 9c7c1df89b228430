"""What every benchmark in this folder shares: its arguments, the machine header, the table,
the targets and the JSON file.

A benchmark defines what it times (``bench_shape``), one row of its table (``format_row``) and,
if it has them, its targets; ``main`` is then::

    args = _cli.parser(__doc__, reps="...").parse_args(argv)
    with _cli.threads(args.threads):
        t0 = time.perf_counter()
        _cli.print_header(["torch", "peft"], "float32, ... what the ratios mean")
        records = _cli.table(HEADER, shapes, lambda shape: bench_shape(*shape, ...), format_row)
        _cli.print_targets(targets)
        _cli.finish(args.json, t0, records=records, ...)

The header names the library versions, the thread settings and the CPU, since every number
below it depends on them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import time

import torch

__all__ = ["parser", "threads", "cpu_model", "machine_header", "print_header", "table", "print_targets", "finish"]


def parser(doc, *, reps, threads=2, threads_help=None, quick=None, max_shape_seconds=None):
    """An ArgumentParser with the shared options: --threads, --reps, --json, and where given --quick
    and --max-shape-seconds (when --reps is not given, slow shapes get fewer repetitions)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--reps", type=int, default=None, help=reps)
    if max_shape_seconds is not None:
        ap.add_argument("--max-shape-seconds", type=float, default=max_shape_seconds,
                        help="when --reps is not given, cut the reps of slow shapes to about this many seconds")
    ap.add_argument("--threads", type=int, default=threads, help=threads_help or f"torch.set_num_threads (default {threads})")
    ap.add_argument("--json", metavar="PATH", help="write every record, samples included, to this file")
    return ap


@contextlib.contextmanager
def threads(n):
    """torch.set_num_threads(n) inside, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(libraries=("torch",)):
    """Three lines: the versions of ``libraries`` and Python, the thread settings, the CPU."""
    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in libraries)
    return [f"{versions}, python {platform.python_version()}",
            f"threads: torch.get_num_threads()={torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
            f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible)"]


def print_header(libraries, *notes):
    """The machine header, then one line per note (what is measured, what the ratios mean)."""
    for line in machine_header(libraries) + list(notes):
        print(line)


def table(header, shapes, bench, format_row):
    """Print ``header`` and a rule, then one row per shape as soon as it is measured; returns the
    records ``bench(shape)`` gave."""
    print(header)
    print("-" * len(header))
    records = []
    for shape in shapes:
        rec = bench(shape)
        records.append(rec)
        print(format_row(rec), flush=True)
    return records


def print_targets(targets):
    """Each target as ``[PASS] name`` or ``[MISS] name`` with its lines indented below."""
    print("\nTargets")
    for t in targets:
        print(f"  [{t['status']}] {t['name']}")
        for line in t["lines"]:
            print(f"         {line}")


def finish(json_path, t0, libraries=("torch",), **payload):
    """Print the wall time since ``t0``; with a path, write the machine header, the wall time and
    ``payload`` (records, ratios, targets) to it as JSON."""
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": machine_header(libraries), "wall_s": wall, **payload}, f, indent=1)
        print(f"results written to {json_path}")
    return wall
