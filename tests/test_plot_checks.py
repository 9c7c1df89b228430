"""lora_ref.plot_checks reads a student's matplotlib figure back through the Axes: a right figure
passes, and each kind of wrong one (data, labels, legend, scale) fails, naming what is wrong."""

import numpy as np
import pytest

from lora_ref import low_rank, plot_checks

Figure = pytest.importorskip("matplotlib.figure").Figure

RUNS = {"LoRA": [2.0, 1.5, 1.2, 1.1], "LoRA+, lambda = 16": [2.0, 1.2, 1.0, 0.95]}
SIGMA = [8.0, 4.0, 2.0, 1.0]
DELTA_W = [[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.01, 0.0]]


def _ax():
    return Figure().subplots()


def _loss_curves(ax, runs, label=lambda name: name, legend=True, shift=0):
    for name, losses in runs.items():
        ax.plot(np.arange(len(losses)) + shift, losses, label=label(name))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if legend:
        ax.legend()


def test_loss_curves_right_and_wrong():
    ax = _ax()
    _loss_curves(ax, RUNS)
    assert plot_checks.ch05_loss_curves(ax, RUNS)
    for kwargs, message in [(dict(shift=1), "no line shows run"), (dict(legend=False), "no legend"),
                            (dict(label=lambda n: "run"), "is labelled 'run'")]:
        ax = _ax()
        _loss_curves(ax, RUNS, **kwargs)
        verdict = plot_checks.ch05_loss_curves(ax, RUNS)
        assert not verdict and message in verdict.message, verdict.message
    ax = _ax()
    _loss_curves(ax, {"LoRA": RUNS["LoRA"]})                   # a run missing
    assert not plot_checks.ch05_loss_curves(ax, RUNS)


def test_energy_kept_right_and_wrong():
    E = low_rank.energy_curve(SIGMA)
    ax = _ax()
    ax.plot(np.arange(1, 5), E)
    ax.set_xlabel("rank r")
    ax.set_ylabel("energy kept")
    assert plot_checks.ch06_energy_kept(ax, SIGMA)
    ax = _ax()
    ax.plot(np.arange(1, 5), np.cumsum(SIGMA) / np.sum(SIGMA))         # sigma, not sigma squared
    ax.set_xlabel("rank r")
    ax.set_ylabel("energy kept")
    assert "no line shows E_r" in plot_checks.ch06_energy_kept(ax, SIGMA).message
    ax = _ax()
    ax.plot(np.arange(1, 5), E)                                        # no axis titles
    assert "x-axis title" in plot_checks.ch06_energy_kept(ax, SIGMA).message


def test_spectrum_right_and_wrong():
    sigma = np.linalg.svd(np.asarray(DELTA_W), compute_uv=False)
    ax = _ax()
    ax.plot(np.arange(1, 4), sigma)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value")
    assert not plot_checks.ch07_spectrum(ax, DELTA_W)                  # linear y: a spectrum spans decades
    assert "set_yscale('log')" in plot_checks.ch07_spectrum(ax, DELTA_W).message
    ax.set_yscale("log")
    assert plot_checks.ch07_spectrum(ax, DELTA_W)
    ax = _ax()
    ax.plot(np.arange(1, 4), sigma[::-1])                              # smallest first
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value")
    assert not plot_checks.ch07_spectrum(ax, DELTA_W)


def test_an_empty_axes_fails_every_checker():
    assert not plot_checks.ch05_loss_curves(_ax(), RUNS)
    assert not plot_checks.ch06_energy_kept(_ax(), SIGMA)
    assert not plot_checks.ch07_spectrum(_ax(), DELTA_W)
