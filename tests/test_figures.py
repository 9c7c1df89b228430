"""The shared plotly builders: sliders switch precomputed traces and titles, axes are labelled."""

import ast
import inspect
import math
import re

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
    assert all(f > lo > q for f, lo, q in zip(full.y, lora.y, qlora.y))
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


def test_crossover_label_sits_at_t_star_on_the_log_axis():
    """plotly puts an annotation on a log axis at 10^x: the label's x must be log10(T*)."""
    fig = figures.forward_cost_figure([1, 16, 256], {4: {"base": [1, 2, 3], "factored": [2, 3, 4],
                                                         "materialised": [9, 8, 4]}}, 64, 64, 32.0)
    (label,) = [a for a in fig.layout.annotations if "T*" in a.text]
    assert label.x == pytest.approx(math.log10(32.0)) and label.xref == "x"
    assert [s.x0 for s in fig.layout.shapes] == [32.0]                  # the line itself in data units


def test_wrap_title_keeps_lines_short_and_markup_whole():
    text = "r = 4: " + " ".join(["‖B‖<sub>F</sub>"] * 30)
    lines = figures.wrap_title(text, width=40).split("<br>")
    assert len(lines) > 1 and all(len(re.sub(r"<[^>]+>", "", line)) <= 40 for line in lines)
    assert figures.wrap_title(figures.wrap_title(text)) == figures.wrap_title(text)        # idempotent
    assert all(line.count("<sub>") == line.count("</sub>") for line in lines)


def test_shared_layout_stacks_title_legend_plot_and_slider():
    T = [1, 16, 256]
    times = {r: {"base": [1, 2, 3], "factored": [2, 3, 4], "materialised": [9, 8, 4]} for r in (4, 16)}
    fig = figures.finish_layout(figures.forward_cost_figure(T, times, 64, 64, 32.0))
    lines = max(s.args[1]["title.text"].count("<br>") + 1 for s in fig.layout.sliders[0].steps)
    # the top margin holds every step's title and the legend's row(s); the title hangs from the top
    assert fig.layout.margin.t >= 12 + figures.TITLE_LINE * lines + figures.LEGEND_ROW
    assert (fig.layout.title.yref, fig.layout.title.yanchor, fig.layout.legend.y, fig.layout.legend.yanchor) == \
        ("container", "top", 1, "bottom")
    slider = fig.layout.sliders[0]
    assert slider.y == 0 and slider.yanchor == "top" and slider.pad.t >= 50       # below the x-axis title


def test_figure_text_uses_real_subscripts():
    """No raw ‖B‖_F, P_A, η_B, c_j in a string the figures draw (docstrings and comments may say them)."""
    tree = ast.parse(inspect.getsource(figures))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.Module)) and n.body and isinstance(n.body[0], ast.Expr)}
    raw = re.compile(r"(‖|²|\b[PcηℰσWE])_[A-Za-z0-9{]")
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and id(n) not in docstrings and raw.search(n.value)]
    assert found == [], found


def test_every_drawn_trace_has_a_legend_entry_or_shares_one():
    runs = {opt: {rule: {r: {"loss": [1.0, 0.5], "grad_norm": [0.1 * r]} for r in (1, 4)}
                  for rule in ("alpha/r", "alpha/sqrt(r)")} for opt in ("sgd", "adam")}
    fig = figures.rank_sweep_figure([1, 4], runs, active_r=4)
    shown = {t.legendgroup or t.name for t in fig.data if t.showlegend is not False}
    silent = [t.name for t in fig.data if t.showlegend is False and (t.legendgroup or t.name) not in shown]
    assert silent == []


# --------------------------------------------------------------------------- chapter 10


def test_planted_race_figure_has_a_step_per_subspace_and_names_the_winner():
    errors = {"principal": {"lora": [1.0, 0.5], "pissa": [1.0, 1e-9]}, "minor": {"lora": [1.0, 0.5], "pissa": [1.0, 1.0]}}
    fig = figures.planted_race_figure(errors)
    _check_slider(fig, 2, 2)
    assert "PiSSA gets there first" in fig.layout.sliders[0].steps[0].args[1]["title.text"]
    assert "LoRA gets there first" in fig.layout.sliders[0].steps[1].args[1]["title.text"]
    assert fig.layout.yaxis.type == "log"


def test_variant_curves_figure_compares_each_variant_with_lora():
    curves = {"lora": [3.0, 2.0, 1.0], "pissa": [2.5, 1.5, 1.2], "dora": [3.0, 2.1, 0.9]}
    fig = figures.variant_curves_figure(curves, {"lora": [1.0, 1.2], "pissa": [1.5, 1.5], "dora": [0.9, 0.9]})
    _check_slider(fig, 2, 2)
    assert "PiSSA: held-out loss 1.500 against 1.100 for LoRA" in fig.layout.sliders[0].steps[0].args[1]["title.text"]


def test_md_scatter_figure_accumulates_points_in_three_panels():
    points = {m: {10: [(0.1, 0.2), (0.2, 0.3)], 20: [(0.3, 0.4), (0.4, 0.5)]} for m in ("full", "lora", "dora")}
    fig = figures.md_scatter_figure(points, {"full": -0.5, "lora": 1.0, "dora": 0.2})
    _check_slider(fig, 2, 3)
    assert [len(t.x) for t in fig.data] == [2, 2, 2, 4, 4, 4]                 # step 20 shows both checkpoints
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3"}
    assert "full fine-tuning -0.50" in fig.layout.title.text


def test_adalora_ranks_figure_marks_the_planted_ranks():
    fig = figures.adalora_ranks_figure([0, 10], {0: [6, 6, 6], 10: [1, 2, 6]}, [1, 2, 6], 9)
    _check_slider(fig, 2, 2)
    assert list(fig.data[2].y) == [1, 2, 6] and list(fig.data[3].y) == [1, 2, 6]


def test_residual_energy_and_cosine_figures_label_their_axes():
    fig = figures.residual_energy_figure([1, 2], [0.5, 0.3], [0.99, 0.98], "layer")
    assert fig.layout.yaxis.title.text and fig.layout.xaxis.title.text and len(fig.data) == 2
    fig = figures.first_step_cosine_figure({"lora": [0.1, 0.2], "loraga": [0.9, 1.0]})
    assert [t.name for t in fig.data] == ["LoRA", "LoRA-GA"] and fig.layout.yaxis.title.text


# --------------------------------------------------------------------------- chapter 11


def _stats(xs, mean):
    return {"x": list(xs), "mean": list(mean), "lo": [m * 0.9 for m in mean], "hi": [m * 1.1 for m in mean]}


def test_lr_ucurves_figure_has_a_step_per_rank_and_states_the_ratio():
    full = _stats([1e-4, 1e-3, 1e-2], [0.9, 0.2, 0.8])
    lora = {1: _stats([1e-3, 1e-2, 1e-1], [0.8, 0.3, 2.0]), 16: _stats([1e-3, 1e-2, 1e-1], [0.7, 0.25, 2.1])}
    fig = figures.lr_ucurves_figure(full, lora, {"full": 1e-3, 1: 9e-3, 16: 8e-3}, {1: (9.0, 7.0, 11.0), 16: (8.0, 6.0, 9.5)})
    _check_slider(fig, 2, 3)
    assert fig.layout.sliders[0].active == 1
    assert "r = 16: LoRA's best lr 0.008 is 8.0× full fine-tuning's 0.001 (seed by seed 6.0× to 9.5×)" in fig.layout.title.text
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    band = fig.data[4]                                          # LoRA at r = 16: bars from the seed min to max
    assert list(band.error_y.array) == pytest.approx([0.07, 0.025, 0.21])
    assert list(band.error_y.arrayminus) == pytest.approx([0.07, 0.025, 0.21])


def test_lr_ucurves_figure_axis_range_ignores_diverged_runs():
    full = _stats([1e-3, 1e-2], [0.5, math.inf])
    fig = figures.lr_ucurves_figure(full, {4: _stats([1e-3, 1e-2], [0.4, 0.3])}, {"full": 1e-3, 4: 1e-2},
                                    {4: (10.0, 10.0, 10.0)}, active_r=4)
    assert all(math.isfinite(v) for v in fig.layout.yaxis.range)


def test_capacity_figure_has_a_step_per_task_and_a_full_finetuning_line():
    lora = {t: _stats([1, 4, 16], [0.5, 0.3, 0.2]) for t in ("facts-64", "facts-512")}
    full = {"facts-64": (0.01, 0.009, 0.011), "facts-512": (0.5, 0.4, 0.6)}
    fig = figures.capacity_figure(["facts-64", "facts-512"], [1, 4, 16], lora, full, active=1)
    _check_slider(fig, 2, 2)
    assert list(fig.data[3].y) == [0.5, 0.5] and fig.data[3].name == "full fine-tuning"
    assert "facts-512: full fine-tuning reaches 0.5; LoRA at r = 16 ends 0.4× that" == fig.layout.title.text


def test_targets_dropout_alpha_and_batch_figures_draw_every_series():
    fig = figures.targets_figure(["qv", "mlp"], [100, 120], {"a": [(1.0, 0.9, 1.1), (2.0, 1.5, 2.5)],
                                                            "b": [(0.5, 0.4, 0.6), (0.7, 0.6, 0.8)]})
    assert [t.xaxis for t in fig.data] == ["x", "x2"] and list(fig.data[0].x) == ["qv<br>100", "mlp<br>120"]
    fig = figures.dropout_figure([0.0, 0.3], {"short": _stats([0.0, 0.3], [0.4, 0.5]), "long": _stats([0.0, 0.3], [0.3, 0.1])})
    assert len(fig.data) == 2 and "ρ" in fig.layout.xaxis.title.text and fig.layout.yaxis2.range[0] < 0.1 * 0.9
    conventions = {4: {"α = 2r": 8.0, "α = 16": 16.0}, 64: {"α = 2r": 128.0, "α = 16": 16.0}}
    by_r = {4: _stats([8.0, 16.0, 128.0], [0.5, 0.4, 0.6]), 64: _stats([8.0, 16.0, 128.0], [0.5, 0.3, 0.45])}
    fig = figures.alpha_figure([8.0, 16.0, 128.0], by_r, conventions, 5e-3)
    marks = [t for t in fig.data if t.mode == "markers"]
    assert [(t.x[0], t.y[0]) for t in marks] == [(8.0, 0.5), (16.0, 0.4), (128.0, 0.45), (16.0, 0.3)]
    assert [t.showlegend for t in marks] == [True, True, False, False]        # one legend entry per convention
    fig = figures.batch_size_figure([8, 32], _stats([8, 32], [0.1, 0.2]), _stats([8, 32], [0.2, 0.3]), 3200)
    assert [t.name for t in fig.data] == ["full fine-tuning", "LoRA, r = 16"] and "3,200" in fig.layout.title.text


def test_chapter_12_figures_state_their_measures_in_the_title():
    from lora_ref import budget, parallelism

    c = budget.load_config("llama-3.1-8b")
    rs = [4, 16]
    ddp = [parallelism.ddp_grad_bytes(budget.lora_param_count(c, r, "all-linear")) for r in rs]
    full = parallelism.ddp_grad_bytes(budget.base_param_count(c), 2)
    fig = figures.comm_bytes_figure(rs, {"8b": {"ddp_lora": ddp, "ddp_full": full, "fsdp_lora": [3e10, 3.1e10]}})
    assert len(fig.data) == 3 and f"{full / ddp[1]:.0f} times fewer" in fig.layout.title.text

    worlds = [1, 2, 4]
    mem = {s: [parallelism.memory_per_gpu(c, s, w) / 1e9 for w in worlds] for s in parallelism.STRATEGIES}
    fig = figures.gpus_memory_figure(worlds, {"8b": mem}, gpu_gb=(12,))
    need = [parallelism.gpus_needed(c, s, 12e9) for s in parallelism.STRATEGIES]
    assert len(fig.data) == 4
    assert all(f"{s} {'never' if n is None else n}" in fig.layout.title.text for s, n in zip(parallelism.STRATEGIES, need))

    fig = figures.step_time_figure(["a", "b"], {"LoRA compute": 1.0, "full FT compute": 2.0},
                                   {"DDP + LoRA all-reduce": [0.01, 0.1], "DDP full FT all-reduce": [0.5, 1.0]})
    assert "DDP + LoRA all-reduce 0.1×" in fig.layout.title.text and "DDP full FT all-reduce 0.5×" in fig.layout.title.text
