"""Checkers for the figures students draw with matplotlib in the assignments.

A plot question asks for a function that draws on a matplotlib ``Axes``. Its checker reads back what
was drawn, through the Axes and never the pixels, and compares it with what ``lora_ref`` computes:

- the data of each line: ``ax.get_lines()[i].get_xdata()``, ``get_ydata()``;
- its label, as the legend shows it: ``get_label()``;
- the axes' titles and scales: ``ax.get_xlabel()``, ``ax.get_ylabel()``, ``ax.get_yscale()``.

Each checker returns an ``exercises.Verdict``: truthy when the figure is right, else it names the
first thing that is wrong. This module never imports matplotlib: it only reads the Axes it is given.

    from matplotlib.figure import Figure
    ax = Figure().subplots()
    plot_energy_kept(ax, sigma)                       # the student's function
    plot_checks.ch06_energy_kept(ax, sigma)           # ✓, or ✗ with what differs
"""

from __future__ import annotations

import numpy as np

from . import low_rank, spectral
from .exercises import Verdict

__all__ = ["ch05_loss_curves", "ch06_energy_kept", "ch07_spectrum"]


def _lines(ax):
    """[(label, x, y)] of the lines drawn on ax, as float arrays."""
    return [(line.get_label(), np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for line in ax.get_lines()]


def _same(x, expected):
    return x.shape == expected.shape and bool(np.allclose(x, expected, rtol=1e-9, atol=1e-12))


def _find_line(ax, x, y):
    """The first line whose data are (x, y), or None."""
    return next(((label, lx, ly) for label, lx, ly in _lines(ax) if _same(lx, x) and _same(ly, y)), None)


def _verdict(name, problems):
    if problems:
        return Verdict(False, f"✗ {name}: {problems[0]}")
    return Verdict(True, f"✓ {name}: the figure shows the right data, labelled.")


def _axis_titles(ax, x_words, y_words):
    """Problems with the axis titles: each must contain one of its words (case ignored)."""
    problems = []
    for axis, title, words in (("x", ax.get_xlabel(), x_words), ("y", ax.get_ylabel(), y_words)):
        if not any(w in title.lower() for w in words):
            problems.append(f"the {axis}-axis title {title!r} should say what it shows (one of {list(words)})")
    return problems


def ch05_loss_curves(ax, runs):
    """One line per run of ``runs`` ({name: [loss at step 0, 1, ...]}): x the step 0..T-1, y the loss,
    labelled with the run's name, a legend, and axis titles naming the step and the loss."""
    problems = []
    for name, losses in runs.items():
        y = np.asarray(losses, float)
        line = _find_line(ax, np.arange(len(y), dtype=float), y)
        if line is None:
            problems.append(f"no line shows run {name!r}: x = steps 0..{len(y) - 1}, y = its losses")
        elif line[0] != name:
            problems.append(f"the line of run {name!r} is labelled {line[0]!r}")
    if len(ax.get_lines()) != len(runs):
        problems.append(f"{len(ax.get_lines())} lines drawn for {len(runs)} runs")
    if ax.get_legend() is None:
        problems.append("no legend: call ax.legend() so the runs can be told apart")
    problems += _axis_titles(ax, ("step",), ("loss",))
    return _verdict("loss curves", problems)


def ch06_energy_kept(ax, sigma):
    """The share of ||W||_F^2 that the best rank-r approximation keeps, E_r (eq-ch06-energy), against
    r = 1..n for W with singular values ``sigma``: one line, y within [0, 1], axis titles naming the
    rank and the energy (or share) kept."""
    E = low_rank.energy_curve(sigma)
    problems = []
    if _find_line(ax, np.arange(1, len(E) + 1, dtype=float), E) is None:
        problems.append(f"no line shows E_r against r = 1..{len(E)} (sorted singular values, squared, "
                        "cumulated, over their sum)")
    problems += _axis_titles(ax, ("rank",), ("energy", "share", "fraction", "kept"))
    return _verdict("energy kept", problems)


def ch07_spectrum(ax, delta_w):
    """The singular values of ``delta_w`` (a matrix), largest first, sigma_i against i = 1..min(d, k),
    as one line on a logarithmic y-axis, with axis titles naming the index and the singular value."""
    sigma = spectral.singular_values(np.asarray(delta_w, float))
    problems = []
    if _find_line(ax, np.arange(1, len(sigma) + 1, dtype=float), sigma) is None:
        problems.append(f"no line shows sigma_i, largest first, against i = 1..{len(sigma)}")
    if ax.get_yscale() != "log":
        problems.append(f"the y-axis is {ax.get_yscale()!r}: a spectrum spans decades, use ax.set_yscale('log')")
    problems += _axis_titles(ax, ("index",), ("singular", "sigma", "σ"))
    return _verdict("spectrum", problems)
