"""The shared plotly builders: sliders switch precomputed traces and titles, axes are labelled."""

import math

import plotly.graph_objects as go
import pytest

from lora_ref import budget, figures

CONFIGS = {n: budget.load_config(n) for n in ("llama-3.1-8b", "llama-3.1-70b")}


def _check_slider(fig, n_steps, n_per_step):
    assert len(fig.data) == n_steps * n_per_step
    steps = fig.layout.sliders[0].steps
    assert len(steps) == n_steps
    for i, step in enumerate(steps):
        visible, layout = step.args
        assert list(layout) == ["title.text"], "slider steps set title.text, not a plain title"
        assert visible["visible"] == [j // n_per_step == i for j in range(n_steps * n_per_step)]
    active = fig.layout.sliders[0].active
    assert [t.visible for t in fig.data] == [j // n_per_step == active for j in range(len(fig.data))]
    assert fig.layout.title.text == steps[active].args[1]["title.text"]


def test_lora_params_figure_steps_show_budget_counts():
    r_values = [4, 16, 64]
    fig = figures.lora_params_figure(CONFIGS, r_values)
    _check_slider(fig, 3, 3)
    step_16 = fig.data[3:6]
    assert list(step_16[2].y) == [budget.lora_param_count(c, 16, "all-linear") for c in CONFIGS.values()]
    assert fig.layout.yaxis.title.text and fig.layout.xaxis.title.text
    lo, hi = fig.layout.yaxis.range
    assert 10**lo <= min(min(t.y) for t in fig.data) and 10**hi >= max(max(t.y) for t in fig.data)


def test_memory_figure_orders_full_lora_qlora():
    fig = figures.memory_figure(CONFIGS, [8, 16])
    _check_slider(fig, 2, 3)
    full, lora, qlora = fig.data[3:6]
    assert all(f > l > q for f, l, q in zip(full.y, lora.y, qlora.y))
    assert "GB" in fig.layout.yaxis.title.text


def test_forward_cost_figure_draws_three_series_per_r():
    T = [1, 16, 256]
    times = {r: {"base": [1, 2, 3], "factored": [2, 3, 4], "materialised": [9, 8, 4]} for r in (4, 16)}
    fig = figures.forward_cost_figure(T, times, 64, 64, 32.0)
    _check_slider(fig, 2, 3)
    assert fig.layout.xaxis.type == "log" and "tokens" in fig.layout.xaxis.title.text
    assert "4.5×" in fig.layout.sliders[0].steps[0].args[1]["title.text"]


def test_merge_error_figure_has_one_line_per_dtype():
    fig = figures.merge_error_figure([0.01, 0.1], {"float32": [1e-8, 1e-7], "bfloat16": [1e-3, 1e-2]})
    assert [t.name for t in fig.data] == ["float32", "bfloat16"]
    assert fig.layout.yaxis.type == "log"
    assert "zeros" not in fig.layout.title.text


def test_merge_error_figure_says_so_only_when_it_leaves_out_exact_zeros():
    fig = figures.merge_error_figure([0.01, 0.1], {"float32": [0.0, 1e-7], "bfloat16": [1e-3, 1e-2]})
    assert "exact zeros are not drawn" in fig.layout.title.text


def test_stepped_figure_rejects_ragged_steps_and_bad_active():
    a = [go.Scatter(y=[1])]
    with pytest.raises(ValueError, match=r"every step must have 1 traces, got \[1, 2\]"):
        figures.stepped_figure([("a", a, "t"), ("b", a + a, "t")], "r")
    with pytest.raises(ValueError, match=r"active=3 must index one of the 1 steps"):
        figures.stepped_figure([("a", a, "t")], "r", active=3)
    with pytest.raises(ValueError, match="at least one step"):
        figures.stepped_figure([], "r")


def test_log_axis_range_covers_the_values():
    axis = figures.log_axis("x", [3.0, 3000.0])
    assert axis["type"] == "log" and axis["range"][0] < math.log10(3) and axis["range"][1] > math.log10(3000)


def test_code_frequency_figure_has_a_step_per_block_size():
    freqs = {16: [1 / 16] * 16, 64: [0.02] + [0.96 / 14] * 14 + [0.02]}
    fig = figures.code_frequency_figure([16, 64], freqs, {16: 4.0, 64: 3.9}, [1 / 16] * 16)
    _check_slider(fig, 2, 3)
    assert fig.layout.sliders[0].active == 1                        # blocks of 64, QLoRA's size
    title = fig.layout.title.text
    assert "Blocks of 64" in title and "2.0% to 6.9%" in title and "3.90 bits" in title
    assert list(fig.data[3].y) == [100 * f for f in freqs[64]]      # percent
    assert "%" in fig.layout.yaxis.title.text and "code" in fig.layout.xaxis.title.text


def test_merge_regimes_figure_is_log_log_with_a_statement_title():
    sizes = [1e-4, 1e-3, 1e-2, 1.0]
    errors = {"NF4": [1.07, 1.07, 1.0, 0.13], "bf16": [0.95, 0.75, 0.16, 0.002], "fp32": [6e-4, 6e-5, 6e-6, 0.0]}
    fig = figures.merge_regimes_figure(sizes, errors, at=1e-3, adapter_range=(0.25, 0.64))
    assert [t.name for t in fig.data] == list(errors)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "NF4 107%, bf16 75%, fp32 0.006%" in fig.layout.title.text
    lo, hi = fig.layout.yaxis.range
    assert 10**lo <= 6e-6 and 10**hi >= 1.07                        # zeros are left out of the range
    # annotations on log axes take log10 coordinates: both sit inside the plotted ranges
    for a in fig.layout.annotations:
        assert fig.layout.xaxis.range[0] <= a.x <= fig.layout.xaxis.range[1]
        assert lo <= a.y <= hi
