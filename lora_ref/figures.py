"""Plotly figures shared by the chapters: one theme, and sliders that run in the static book.

A slider here never calls back into Python. Every step's traces are computed in
advance and added to the figure; a step only switches which traces are visible
and sets the title (``{"title.text": ...}``), so the figure works in the static
HTML of the book exactly as in a live kernel.

This module needs plotly (the ``book`` extra) and never imports torch.
"""

from __future__ import annotations

import math
import re

import plotly.graph_objects as go

__all__ = [
    "COLORS", "themed", "stepped_figure", "log_axis", "wrap_title", "finish_layout", "show",
    "lora_params_figure", "memory_figure",
    "forward_cost_figure", "merge_error_figure",
    "rank_sweep_figure",
    "ba_entry_law_figure",
    "gradient_norms_figure", "step_projection_figure", "loraplus_figure",
    "eckart_young_gd_figure", "update_spectra_figure", "truncation_vs_lora_figure",
    "subspace_similarity_figure", "effective_rank_figure", "intruders_forgetting_figure",
    "codebook_figure", "blocksize_figure", "loss_curves_figure", "code_frequency_figure", "merge_regimes_figure",
    "task_arithmetic_figure", "swap_drift_figure", "multi_adapter_figure",
    "VARIANT_LABELS", "residual_energy_figure", "planted_race_figure", "variant_curves_figure", "md_scatter_figure",
    "first_step_cosine_figure", "adalora_ranks_figure",
    "lr_ucurves_figure", "capacity_figure", "targets_figure", "alpha_figure", "dropout_figure", "batch_size_figure",
    "comm_bytes_figure", "gpus_memory_figure", "step_time_figure",
]

# One palette for the whole book (colour-blind safe: Okabe & Ito 2008).
COLORS = {
    "blue": "#0072B2",
    "orange": "#E69F00",
    "green": "#009E73",
    "red": "#D55E00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
PALETTE = list(COLORS.values())


def themed(fig, height=420):
    """The book's look: white background, light grid, the palette above, compact margins."""
    fig.update_layout(
        template="plotly_white",
        colorway=PALETTE,
        height=height,
        margin=dict(l=70, r=30, t=70, b=60),
        font=dict(family="Helvetica, Arial, sans-serif", size=13),
        title=dict(x=0.0, xanchor="left", font=dict(size=15)),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0.0),
        hoverlabel=dict(namelength=-1),
    )
    return fig


def stepped_figure(steps, slider_label, active=0, height=460, **layout):
    """A figure with one slider whose steps switch between precomputed sets of traces.

    steps: list of (label, traces, title), one per slider position; every step must
    have the same number of traces, in the same roles (trace i of each step is drawn
    the same way). layout: passed to ``fig.update_layout`` (axis titles with units!).
    """
    if not steps:
        raise ValueError("stepped_figure needs at least one step")
    n = len(steps[0][1])
    if any(len(traces) != n for _, traces, _ in steps):
        raise ValueError(f"every step must have {n} traces, got {[len(t) for _, t, _ in steps]}")
    if not 0 <= active < len(steps):
        raise ValueError(f"active={active} must index one of the {len(steps)} steps")
    fig = go.Figure()
    for i, (_, traces, _) in enumerate(steps):
        for trace in traces:
            trace.visible = i == active
            fig.add_trace(trace)
    slider_steps = []
    for i, (label, _, title) in enumerate(steps):
        visible = [j // n == i for j in range(n * len(steps))]
        slider_steps.append(dict(method="update", label=str(label),
                                 args=[{"visible": visible}, {"title.text": title}]))
    fig.update_layout(
        title_text=steps[active][2],
        sliders=[dict(active=active, steps=slider_steps, pad=dict(t=50),
                      currentvalue=dict(prefix=f"{slider_label} = ", font=dict(size=13)))],
        **layout,
    )
    return themed(fig, height=height + 60)


def log_axis(title, values, pad=0.15):
    """A log axis with a fixed range over every slider step (so bars do not jump) and decade ticks."""
    lo, hi = min(v for v in values if v > 0), max(values)
    return dict(title=title, type="log", range=[math.log10(lo) - pad, math.log10(hi) + pad], dtick=1,
                exponentformat="SI", minor=dict(showgrid=False))


# The shared layout, applied by ``show`` to every figure of the book. From the top: the title (wrapped
# to the text column), the legend (left-aligned, just above the plot), the plot, the x-axis title,
# then the slider, so that no two of them overlap. book/_static/lora-figures.js redoes the wrapping
# and the margins in the browser for the width the page really has (a 390 px phone, say), stacks
# side-by-side panels there, and follows the page's dark theme.
TITLE_CHARS = 84          # characters of 15 px Helvetica in one line of the book's text column
LEGEND_WIDTH = 650        # px of that column for legend entries (a margin for wider glyphs)
TITLE_LINE, LEGEND_ROW = 20, 22


def wrap_title(text, width=TITLE_CHARS):
    """The title with a <br> wherever a line would pass ``width`` characters (markup not counted)."""
    lines = []
    for part in str(text).split("<br>"):
        line, visible = "", 0
        for word in part.split(" "):
            n = len(re.sub(r"<[^>]+>", "", word))
            if line and visible + 1 + n > width:
                lines.append(line)
                line, visible = word, n
            else:
                visible += (1 if line else 0) + n
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "<br>".join(lines)


def _legend_rows(fig):
    """How many rows the horizontal legend takes in the text column (entries of one slider step)."""
    if fig.layout.showlegend is False:
        return 0
    shown = [t for t in fig.data if t.showlegend is not False and t.name and t.visible is not False]
    widths, seen = [], set()
    for trace in shown:
        key = trace.legendgroup or trace.name
        if key not in seen:
            seen.add(key)
            widths.append(44 + 8 * len(re.sub(r"<[^>]+>", "", trace.name)))
    if not widths:
        return 0
    rows, used = 1, 0
    for w in widths:
        if used and used + w > LEGEND_WIDTH:
            rows, used = rows + 1, 0
        used += w
    return rows


def finish_layout(fig):
    """Apply the shared layout (see above) to a figure and return it. Idempotent."""
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=wrap_title(title))
    lines = [wrap_title(title).count("<br>") + 1 if title else 0]
    for slider in fig.layout.sliders or ():
        for step in slider.steps:
            args = list(step.args)
            if len(args) > 1 and "title.text" in (args[1] or {}):
                args[1] = dict(args[1], **{"title.text": wrap_title(args[1]["title.text"])})
                step.args = args
                lines.append(args[1]["title.text"].count("<br>") + 1)
    rows = _legend_rows(fig)
    legend_on_top = fig.layout.legend.y is None or fig.layout.legend.y >= 1
    top = 12 + TITLE_LINE * max(lines) + (LEGEND_ROW * rows + 8 if rows and legend_on_top else 0) + 8
    fig.update_layout(
        margin=dict(t=top),
        title=dict(yref="container", y=1, yanchor="top", pad=dict(t=12, l=10), x=0, xanchor="left", xref="container"),
    )
    if legend_on_top:
        fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=1, yanchor="bottom", yref="paper"))
    if fig.layout.sliders:
        # below the x-axis tick labels and title: their lines, and rotated tick labels need more room
        axes = [a for name, a in fig.layout.to_plotly_json().items() if name.startswith("xaxis")]
        title_lines = max([str((a.get("title") or {}).get("text", "")).count("<br>") + 1 for a in axes] or [1])
        rotated = any(a.get("tickangle") not in (None, 0) for a in axes)
        pad = 36 + 18 * title_lines + (44 if rotated else 0)
        fig.update_layout(sliders=[dict(s.to_plotly_json(), y=0, yanchor="top", pad=dict(t=pad, b=10))
                                   for s in fig.layout.sliders])
    return fig


def show(fig):
    """Display a figure in a notebook (the book build sets PLOTLY_RENDERER=notebook_connected)."""
    finish_layout(fig).show(config={"displaylogo": False, "responsive": True})


# --------------------------------------------------------------------------- chapter 01


def lora_params_figure(configs, r_values, target_sets=("qv", "attention", "all-linear"), active_r=16):
    """Trainable LoRA parameters per model and target set; the slider picks r.

    configs: {model name: config dict}. Bars are computed by lora_ref.budget.
    """
    from . import budget

    names = list(configs)
    steps, all_counts = [], []
    for r in r_values:
        traces = []
        for i, ts in enumerate(target_sets):
            counts = [budget.lora_param_count(configs[n], r, ts) for n in names]
            all_counts += counts
            pct = [100 * c / budget.base_param_count(configs[n]) for n, c in zip(names, counts)]
            traces.append(go.Bar(
                x=names, y=counts, name=ts, marker_color=PALETTE[i], customdata=pct,
                hovertemplate="%{x}<br>" + ts + ": %{y:,} trainable<br>%{customdata:.3f}% of the base<extra></extra>",
            ))
        big = max(names, key=lambda n: budget.base_param_count(configs[n]))
        share = 100 * budget.lora_param_count(configs[big], r, target_sets[-1]) / budget.base_param_count(configs[big])
        steps.append((r, traces, f"At r = {r}, LoRA on {target_sets[-1]} layers trains {share:.3g}% of {big}"))
    return stepped_figure(
        steps, "r", active=list(r_values).index(active_r), barmode="group",
        xaxis_title="model", yaxis=log_axis("trainable parameters (count, log scale)", all_counts),
    )


def memory_figure(configs, r_values, target_modules="all-linear", active_r=16):
    """Training memory (weights, gradients, Adam state; no activations) of full FT, LoRA, QLoRA; slider over r."""
    from . import budget

    names = list(configs)
    full = [budget.full_finetune_memory(configs[n]).gb for n in names]
    steps, all_gb = [], list(full)
    for r in r_values:
        lora = [budget.lora_memory(configs[n], r, target_modules).gb for n in names]
        qlora = [budget.qlora_memory(configs[n], r, target_modules).gb for n in names]
        all_gb += lora + qlora
        traces = [
            go.Bar(x=names, y=full, name="full fine-tuning", marker_color=COLORS["red"],
                   hovertemplate="%{x}: %{y:.1f} GB<extra>full</extra>"),
            go.Bar(x=names, y=lora, name="LoRA (bf16 base)", marker_color=COLORS["blue"],
                   hovertemplate="%{x}: %{y:.1f} GB<extra>LoRA</extra>"),
            go.Bar(x=names, y=qlora, name="QLoRA (NF4 base)", marker_color=COLORS["green"],
                   hovertemplate="%{x}: %{y:.1f} GB<extra>QLoRA</extra>"),
        ]
        i = names.index(max(names, key=lambda n: budget.base_param_count(configs[n])))
        steps.append((r, traces, f"At r = {r}, {names[i]} needs {full[i]:.0f} GB to fine-tune fully, "
                                 f"{lora[i]:.0f} GB with LoRA, {qlora[i]:.0f} GB with QLoRA"))
    return stepped_figure(
        steps, "r", active=list(r_values).index(active_r), barmode="group",
        xaxis_title="model", yaxis=log_axis("memory before activations (GB, log scale)", all_gb),
    )


# --------------------------------------------------------------------------- chapter 02


def forward_cost_figure(T_values, times_ms, d, k, crossover):
    """Measured forward time of the factored and the materialised layer against T; slider over r.

    times_ms: {r: {"factored": [ms per T], "materialised": [...], "base": [...]}}.
    crossover: T* = d k / (d + k), where the MAC counts cross, drawn as a vertical line.
    """
    styles = {
        "base": dict(color=COLORS["black"], dash="dot"),
        "factored": dict(color=COLORS["blue"]),
        "materialised": dict(color=COLORS["orange"]),
    }
    labels = {"base": "base x W0ᵀ only", "factored": "factored: x W0ᵀ + s (x Aᵀ) Bᵀ",
              "materialised": "materialised: x (W0 + s B A)ᵀ"}
    steps = []
    for r, series in times_ms.items():
        traces = [go.Scatter(x=list(T_values), y=series[key], name=labels[key], mode="lines+markers",
                             line=styles[key], hovertemplate="T=%{x}: %{y:.3g} ms<extra>" + key + "</extra>")
                  for key in ("base", "factored", "materialised")]
        ratio = [m / f for m, f in zip(series["materialised"], series["factored"])]
        steps.append((r, traces, f"r = {r}: at T = {T_values[0]} the bypass is {ratio[0]:.1f}× faster "
                                 f"than forming B A; at T = {T_values[-1]} the ratio is {ratio[-1]:.2f}×"))
    fig = stepped_figure(
        steps, "r", active=min(1, len(steps) - 1),
        xaxis=log_axis("tokens T in one forward pass (log scale)", list(T_values)),
        yaxis=log_axis("median time (ms, log scale)", [t for s in times_ms.values() for v in s.values() for t in v]),
    )
    # On a log axis a shape takes x in data units, an annotation in log10 units (plotly's rule), so the
    # label is placed by hand: add_vline's own annotation would land at 10^T*.
    fig.add_vline(x=crossover, line=dict(color=COLORS["purple"], dash="dash"))
    fig.add_annotation(x=math.log10(crossover), xref="x", y=1, yref="paper", yanchor="top", xanchor="right",
                       text=f"T* = dk/(d+k) = {crossover:g}", showarrow=False, font=dict(color=COLORS["purple"]))
    return fig


def merge_error_figure(ratios, errors):
    """Error of unmerge(merge(W0)) against W0 in each dtype, as the update grows.

    ratios: values of ||s B A||_max / ||W0||_max; errors: {dtype name: [max |W0' - W0| per ratio]}.
    """
    fig = go.Figure()
    for i, (name, errs) in enumerate(errors.items()):
        fig.add_trace(go.Scatter(x=list(ratios), y=errs, name=name, mode="lines+markers",
                                 marker_color=PALETTE[i],
                                 hovertemplate="ratio %{x:.3g}: error %{y:.3g}<extra>" + name + "</extra>"))
    nonzero = [e for errs in errors.values() for e in errs if e > 0]
    zeros = len(nonzero) < sum(len(errs) for errs in errors.values())      # a log axis cannot draw 0
    fig.update_layout(
        title_text="Merge then unmerge misses W0 by at most one rounding step of W"
        + (" (exact zeros are not drawn)" if zeros else ""),
        xaxis=log_axis("size of the update, max|s B A| / max|W0| (log scale)", list(ratios)),
        yaxis=dict(log_axis("max |unmerge(merge(W0)) − W0| (log scale)", nonzero), exponentformat="power"),
    )
    return themed(fig)


# --------------------------------------------------------------------------- chapter 03


def rank_sweep_figure(ranks, runs, active_r=64):
    """Loss curves of the rank sweep (left) and the adapters' gradient norm at step 0 against r (right);
    the slider picks r. runs: {optimizer: {rule: {r: {"loss": [...], "grad_norm": [...]}}}}
    (lora_ref.rank_scaling.rank_sweep, or the chapter's JSON with string keys r)."""

    styles = {"alpha/r": dict(dash="solid"), "alpha/sqrt(r)": dict(dash="dot")}
    colors = {"sgd": COLORS["blue"], "adam": COLORS["orange"]}
    grad = {rule: [runs["sgd"][rule][r]["grad_norm"][0] for r in ranks] for rule in runs["sgd"]}
    all_loss = [v for opt in runs.values() for by_r in opt.values() for r in ranks for v in by_r[r]["loss"]]
    steps = []
    for r in ranks:
        traces, finals = [], {}
        for opt, by_rule in runs.items():
            for rule, by_r in by_rule.items():
                loss = by_r[r]["loss"]
                finals[(opt, rule)] = loss[-1]
                traces.append(go.Scatter(x=list(range(len(loss))), y=loss, mode="lines", name=f"{opt}, s = {rule}",
                                         line=dict(color=colors[opt], **styles[rule]), xaxis="x", yaxis="y",
                                         hovertemplate="step %{x}: loss %{y:.4g}<extra>" + f"{opt}, {rule}</extra>"))
        for j, (rule, g) in enumerate(grad.items()):
            traces.append(go.Scatter(x=list(ranks), y=g, mode="lines+markers", name=f"gradient norm at step 0, s = {rule}",
                                     line=dict(color=COLORS["green"], **styles[rule]), xaxis="x2", yaxis="y2",
                                     hovertemplate="r = %{x}: %{y:.3g}<extra>" + rule + "</extra>"))
            traces.append(go.Scatter(x=[r], y=[g[list(ranks).index(r)]], mode="markers", name="the slider's r",
                                     legendgroup="slider", showlegend=j == 0,
                                     marker=dict(size=12, color=COLORS["red"]), xaxis="x2", yaxis="y2", hoverinfo="skip"))
        title = (f"r = {r}: after {len(loss) - 1} steps, SGD reaches {finals[('sgd', 'alpha/r')]:.3g} with α/r "
                 f"and {finals[('sgd', 'alpha/sqrt(r)')]:.3g} with α/√r;<br>Adam {finals[('adam', 'alpha/r')]:.3g} "
                 f"and {finals[('adam', 'alpha/sqrt(r)')]:.3g}")
        steps.append((r, traces, title))
    all_grad = [v for g in grad.values() for v in g]
    fig = stepped_figure(
        steps, "r", active=list(ranks).index(active_r),
        xaxis=dict(title="optimizer step", domain=[0, 0.55]),
        yaxis=dict(title="loss ½‖sBA − W*‖²<sub>F</sub>", range=[0, 1.05 * max(all_loss)]),
        xaxis2=dict(log_axis("rank r (log scale)", list(ranks)), domain=[0.68, 1], anchor="y2", dtick=math.log10(2) * 2),
        yaxis2=dict(log_axis("‖(∂L/∂A, ∂L/∂B)‖<sub>F</sub> at step 0 (log)", all_grad), anchor="x2"),
    )
    return fig


# --------------------------------------------------------------------------- chapter 04


def ba_entry_law_figure(r_values, samples, kurtosis_closed, bins=60, span=4.0):
    """The law of one standardised entry of B A against N(0, 1), with a slider over r.

    samples: {r: (n,) draws of (BA)_ij}; kurtosis_closed: {r: excess kurtosis from the closed form}.
    Each step: a density histogram of (x - mean) / sd over [-span, span] and the normal density.
    """
    import numpy as np

    edges = np.linspace(-span, span, bins + 1)
    mids = 0.5 * (edges[:-1] + edges[1:])
    grid = np.linspace(-span, span, 241)
    normal = np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi)
    steps = []
    for r in r_values:
        x = np.asarray(samples[r], dtype=float)
        t = (x - x.mean()) / x.std()
        dens, _ = np.histogram(t, bins=edges)
        dens = dens / (t.size * (edges[1] - edges[0]))          # a density over the whole sample
        traces = [go.Bar(x=mids, y=dens, name="entry of B A, standardised", marker_color=COLORS["blue"],
                         opacity=0.7, hovertemplate="%{x:.2f}: density %{y:.3f}<extra></extra>"),
                  go.Scatter(x=grid, y=normal, name="N(0, 1)", mode="lines", line=dict(color=COLORS["red"]),
                             hovertemplate="%{x:.2f}: %{y:.3f}<extra>N(0, 1)</extra>")]
        steps.append((r, traces, f"r = {r}: an entry of B A is " + ("one product" if r == 1 else f"a sum of {r} products") + "; "
                                 f"excess kurtosis {float(kurtosis_closed[r]):.3g} → 0 as r grows"))
    return stepped_figure(steps, "r", active=0, bargap=0,
                          xaxis=dict(title="standardised entry ((BA)ᵢⱼ − mean) / sd (dimensionless)",
                                     range=[-span, span]),
                          yaxis=dict(title="probability density (per unit)", range=[0, 1.0]))


# --------------------------------------------------------------------------- chapter 05


def _layer_label(name):
    """'model.layers.2.self_attn.q_proj' -> '2.q', 'model.layers.0.mlp.gate_proj' -> '0.gate'."""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1].replace('_proj', '')}" if layer else parts[-1]


def gradient_norms_figure(rec, steps_shown):
    """The first steps from B = 0: per layer, ||dL/dA||_F and ||dL/dB||_F at a step (left, log scale),
    and over all steps the ratio of the total norms with ||A - A0||_F / ||B||_F (right); the slider
    picks the step. rec: the output of lora_ref.gradient_dynamics.train_recorded."""
    import numpy as np

    labels = [_layer_label(n) for n in rec["layers"]]
    gA, gB = np.asarray(rec["grad_A"]), np.asarray(rec["grad_B"])            # (steps, layers)
    total = lambda a: np.sqrt((np.asarray(a) ** 2).sum(axis=1))
    ratio = total(gA) / total(gB)
    norm_B = total(rec["norm_B"])
    moved = np.divide(total(rec["moved_A"]), norm_B, out=np.full(norm_B.shape, np.nan), where=norm_B > 0)
    t_all = list(range(len(ratio)))
    positive = [v for v in np.concatenate([gA.ravel(), gB.ravel()]) if v > 0]
    floor = 0.5 * min(positive)
    steps = []
    for t in steps_shown:
        traces = [
            go.Bar(x=labels, y=np.maximum(gB[t], floor), name="‖∂L/∂B‖<sub>F</sub>", marker_color=COLORS["blue"],
                   xaxis="x", yaxis="y", hovertemplate="%{x}: %{y:.3g}<extra>‖∂L/∂B‖</extra>"),
            go.Bar(x=labels, y=np.maximum(gA[t], floor), name="‖∂L/∂A‖<sub>F</sub>", marker_color=COLORS["orange"],
                   xaxis="x", yaxis="y", hovertemplate="%{x}: %{y:.3g}<extra>‖∂L/∂A‖</extra>"),
            go.Scatter(x=t_all, y=ratio, mode="lines", name="‖∂L/∂A‖ / ‖∂L/∂B‖ (all layers)",
                       line=dict(color=COLORS["orange"]), xaxis="x2", yaxis="y2",
                       hovertemplate="step %{x}: %{y:.3f}<extra>gradient ratio</extra>"),
            go.Scatter(x=t_all, y=moved, mode="lines", name="‖A − A₀‖ / ‖B‖ (all layers)",
                       line=dict(color=COLORS["green"], dash="dot"), xaxis="x2", yaxis="y2",
                       hovertemplate="step %{x}: %{y:.3f}<extra>A moved / B</extra>"),
            go.Scatter(x=[t], y=[ratio[t]], mode="markers", name="the slider's step", marker=dict(size=11, color=COLORS["red"]),
                       xaxis="x2", yaxis="y2", hoverinfo="skip"),
        ]
        title = (f"Step {t}: ‖∂L/∂A‖ is {100 * ratio[t]:.0f}% of ‖∂L/∂B‖ over all layers, "
                 f"with ‖B‖<sub>F</sub> = {norm_B[t]:.2g}")
        steps.append((t, traces, title))
    fig = stepped_figure(
        steps, "step", active=0, barmode="group",
        xaxis=dict(title="LoRA layer (decoder layer . projection)", domain=[0, 0.58], tickangle=-60),
        yaxis=dict(log_axis("gradient norm (Frobenius, log scale)", positive), dtick=1),
        xaxis2=dict(title="optimizer step", domain=[0.68, 1], anchor="y2"),
        yaxis2=dict(title="ratio (dimensionless)", anchor="x2", range=[0, 1.05 * float(np.nanmax(np.r_[ratio, moved]))]),
    )
    fig.update_layout(margin=dict(b=90))
    return fig


def step_projection_figure(ranks, per_rank, widths, active_r=8):
    """LoRA's first SGD step from B = 0 against full fine-tuning's, per layer; the slider picks r.

    per_rank: {r: {"cosine": [...], "fraction": [...], "best": [...], "layers": [names]}}, one value per
    layer (lora_ref.gradient_dynamics.step_cosine, expressible_fraction, best_rank_fraction);
    widths: the input width k of each layer, for the random-subspace expectation sqrt(r / k).
    """
    steps = []
    for r in ranks:
        row = per_rank[r]
        labels = [_layer_label(n) for n in row["layers"]]
        expected = [math.sqrt(r / k) for k in widths]
        traces = [
            go.Bar(x=labels, y=row["best"], name="best rank-r step (Eckart–Young)", marker_color=COLORS["sky"],
                   hovertemplate="%{x}: %{y:.3f}<extra>best rank r</extra>"),
            go.Bar(x=labels, y=row["fraction"], name="‖G P<sub>A</sub>‖ / ‖G‖ (random A)", marker_color=COLORS["blue"],
                   hovertemplate="%{x}: %{y:.3f}<extra>fraction</extra>"),
            go.Bar(x=labels, y=row["cosine"], name="cos(LoRA step, −G)", marker_color=COLORS["orange"],
                   hovertemplate="%{x}: %{y:.3f}<extra>cosine</extra>"),
            go.Scatter(x=labels, y=expected, mode="markers", name="√(r/k)", marker=dict(symbol="line-ew-open", size=14,
                       color=COLORS["red"], line=dict(width=2)), hovertemplate="%{x}: %{y:.3f}<extra>√(r/k)</extra>"),
        ]
        mean = lambda v: sum(v) / len(v)
        title = (f"r = {r}: LoRA's first step reaches cosine {mean(row['cosine']):.2f} with full fine-tuning's "
                 f"(mean over layers);<br>a random A keeps {100 * mean(row['fraction']):.0f}% of ‖G‖, "
                 f"the best rank-{r} subspace {100 * mean(row['best']):.0f}%")
        steps.append((r, traces, title))
    fig = stepped_figure(steps, "r", active=list(ranks).index(active_r), barmode="group",
                         xaxis=dict(title="LoRA layer (decoder layer . projection)", tickangle=-60),
                         yaxis=dict(title="cosine or fraction of ‖G‖<sub>F</sub> (dimensionless)", range=[0, 1.02]))
    fig.update_layout(margin=dict(b=90))
    return fig


def loraplus_figure(ratios, test_loss, curves, active=1):
    """The LoRA+ sweep: held-out loss after training against lambda = eta_B / eta_A, every seed and their
    mean (left), and the seed-mean training loss of the chosen lambda against lambda = 1 (right); the
    slider picks lambda. test_loss: {lambda: [one per seed]}; curves: {lambda: [mean loss per step]}."""
    import numpy as np

    ratios = list(ratios)
    means = [float(np.mean(test_loss[lam])) for lam in ratios]
    seeds_x = [lam for lam in ratios for _ in test_loss[lam]]
    seeds_y = [v for lam in ratios for v in test_loss[lam]]
    all_curves = [v for lam in ratios for v in curves[lam]]
    steps = []
    for i, lam in enumerate(ratios):
        traces = [
            go.Scatter(x=seeds_x, y=seeds_y, mode="markers", name="one seed", marker=dict(color=COLORS["sky"], size=7),
                       xaxis="x", yaxis="y", hovertemplate="λ = %{x}: %{y:.4f}<extra>seed</extra>"),
            go.Scatter(x=ratios, y=means, mode="lines+markers", name="mean of the seeds",
                       line=dict(color=COLORS["blue"]), xaxis="x", yaxis="y",
                       hovertemplate="λ = %{x}: %{y:.4f}<extra>mean</extra>"),
            go.Scatter(x=[lam], y=[means[i]], mode="markers", name="the slider's λ", marker=dict(size=13, color=COLORS["red"]),
                       xaxis="x", yaxis="y", hoverinfo="skip"),
            go.Scatter(x=list(range(len(curves[ratios[0]]))), y=curves[ratios[0]], mode="lines", name="training loss, λ = 1",
                       line=dict(color=COLORS["black"], dash="dot"), xaxis="x2", yaxis="y2",
                       hovertemplate="step %{x}: %{y:.3f}<extra>λ = 1</extra>"),
            go.Scatter(x=list(range(len(curves[lam]))), y=curves[lam], mode="lines", name="training loss, chosen λ",
                       line=dict(color=COLORS["orange"]), xaxis="x2", yaxis="y2",
                       hovertemplate="step %{x}: %{y:.3f}<extra>" + f"λ = {lam:g}</extra>"),
        ]
        title = (f"λ = {lam:g}: held-out loss {means[i]:.3f} nats per byte against {means[0]:.3f} at λ = 1 "
                 f"(mean of {len(test_loss[lam])} seeds)")
        steps.append((lam, traces, title))
    fig = stepped_figure(
        steps, "λ", active=active,
        xaxis=dict(log_axis("λ = η<sub>B</sub> / η<sub>A</sub> (log scale)", ratios), domain=[0, 0.45], dtick=math.log10(2) * 2),
        yaxis=dict(title="held-out loss (nats per answer byte)"),
        xaxis2=dict(title="optimizer step", domain=[0.57, 1], anchor="y2"),
        yaxis2=dict(log_axis("training loss (nats per answer byte, log)", all_curves), anchor="x2"),
    )
    return fig


# --------------------------------------------------------------------------- chapter 06


def _g4(values):
    """Values rounded to 4 significant figures: what a figure shows, at a third of the bytes."""
    import numpy as np

    return [float(f"{v:.4g}") for v in np.asarray(values, dtype=float)]


def eckart_young_gd_figure(ranks, errors, bounds, active_r=None, stride=10):
    """Gradient descent on s B A from B = 0 against the Eckart-Young bound; the slider picks r.

    errors: {r: [||s B A - W*||_F before each step]} (``low_rank.fit_low_rank``); bounds: {r: the
    Eckart-Young error}. Left: the error and the bound; right: the excess, error - bound, on a log
    scale (floored at 1e-16, the rounding of float64). Every ``stride``-th step is drawn.
    """
    import numpy as np

    ranks = list(ranks)
    steps = []
    for r in ranks:
        e = np.asarray(errors[r], dtype=float)
        t = np.unique(np.r_[np.arange(0, e.size, stride), e.size - 1])
        excess = np.maximum(e[t] - bounds[r], 1e-16)
        traces = [
            go.Scatter(x=t, y=_g4(e[t]), mode="lines", name="‖sBA − W*‖<sub>F</sub>, gradient descent", xaxis="x", yaxis="y",
                       line=dict(color=COLORS["blue"]), hovertemplate="step %{x}: %{y:.4g}<extra></extra>"),
            go.Scatter(x=[0, int(t[-1])], y=[bounds[r]] * 2, mode="lines", name="Eckart–Young bound", xaxis="x",
                       yaxis="y", line=dict(color=COLORS["red"], dash="dash"),
                       hovertemplate="bound %{y:.4g}<extra></extra>"),
            go.Scatter(x=t, y=_g4(excess), mode="lines", name="excess over the bound", xaxis="x2", yaxis="y2",
                       line=dict(color=COLORS["green"]), hovertemplate="step %{x}: %{y:.2e}<extra></extra>"),
        ]
        gap = e[-1] - bounds[r]
        where = (f"{gap:.1e} above it" if gap > 1e-14 else
                 "on it to float64 rounding" + (f" ({gap:.0e})" if gap else ""))      # a rounding error may be < 0
        title = (f"r = {r}: from B = 0, gradient descent falls to the Eckart–Young bound {bounds[r]:.3f}"
                 f"<br>({where} after {e.size - 1} steps)")
        steps.append((r, traces, title))
    top = max(max(errors[r]) for r in ranks)
    fig = stepped_figure(
        steps, "r", active=ranks.index(active_r) if active_r is not None else 0,
        xaxis=dict(title="gradient-descent step", domain=[0, 0.46]),
        yaxis=dict(title="‖sBA − W*‖<sub>F</sub> (same units as W*)", range=[0, 1.05 * top]),
        xaxis2=dict(title="gradient-descent step", domain=[0.58, 1], anchor="y2"),
        yaxis2=dict(title="error − bound (log scale)", type="log", range=[-16, math.log10(top) + 0.2],
                    dtick=2, exponentformat="power", anchor="x2"),
    )
    return fig


def _module_type(name):
    return name.rsplit(".", 1)[-1]


def update_spectra_figure(spectra, ranks, active_r=8):
    """The spectra of a fine-tune's ΔW and the energy rank r keeps, by module type; the slider picks r.

    spectra: {layer name: singular values of its ΔW}. Left: sigma_i / sigma_1 against i, the mean over
    the layers of one module type (q_proj, ...); right: the energy E_r of each type (mean over its
    layers), with the value at the slider's r marked. The title gives the range over all layers.
    """
    import numpy as np

    from . import low_rank

    types = list(dict.fromkeys(_module_type(n) for n in spectra))
    color = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(types)}
    norm = {t: np.mean([np.asarray(s) / s[0] for n, s in spectra.items() if _module_type(n) == t], axis=0) for t in types}
    energy = {n: low_rank.energy_curve(s) for n, s in spectra.items()}
    mean_e = {t: np.mean([e for n, e in energy.items() if _module_type(n) == t], axis=0) for t in types}
    steps = []
    for r in ranks:
        traces = []
        for t in types:
            i = np.arange(1, norm[t].size + 1)
            traces.append(go.Scatter(x=i, y=_g4(norm[t]), mode="lines", name=t, legendgroup=t, xaxis="x", yaxis="y",
                                     line=dict(color=color[t]), hovertemplate="i = %{x}: %{y:.3g}<extra>" + t + "</extra>"))
        for t in types:
            i = np.arange(1, mean_e[t].size + 1)
            traces.append(go.Scatter(x=i, y=_g4(mean_e[t]), mode="lines", name=t, legendgroup=t, showlegend=False,
                                     xaxis="x2", yaxis="y2", line=dict(color=color[t]),
                                     hovertemplate="r = %{x}: %{y:.3f}<extra>" + t + "</extra>"))
        at = [float(mean_e[t][min(r, mean_e[t].size) - 1]) for t in types]
        traces.append(go.Scatter(x=[r] * len(types), y=at, mode="markers", name="energy kept at the slider's r", xaxis="x2", yaxis="y2",
                                 marker=dict(size=10, color=[color[t] for t in types], line=dict(color="black", width=1)),
                                 customdata=types, hovertemplate="%{customdata}: ℰ<sub>r</sub> = %{y:.3f}<extra></extra>"))
        kept = [float(e[min(r, e.size) - 1]) for e in energy.values()]
        steps.append((r, traces, f"At r = {r}, truncating ΔW keeps {100 * min(kept):.0f}–{100 * max(kept):.0f}% "
                                 f"of ‖ΔW‖²<sub>F</sub> across the {len(kept)} layers"))
    n_max = max(len(s) for s in spectra.values())
    fig = stepped_figure(
        steps, "r", active=list(ranks).index(active_r),
        xaxis=dict(title="index i of the singular value", domain=[0, 0.46]),
        yaxis=dict(title="σᵢ / σ₁ (mean over layers, log scale)", type="log", exponentformat="power"),
        xaxis2=dict(title="rank r (log scale)", type="log", domain=[0.58, 1], anchor="y2", range=[0, math.log10(n_max)]),
        yaxis2=dict(title="energy kept ℰᵣ = Σᵢ≤ᵣ σᵢ² / Σ σᵢ² (fraction)", range=[0, 1.02], anchor="x2"),
    )
    return fig


def truncation_vs_lora_figure(ranks, curves, references, active_r=8):
    """Held-out loss per answer byte (left, log scale) and exact match (right) against r; the slider marks r.

    curves: {label: {r: [score dicts, one per seed]}} (``tiny.evaluate``'s keys), drawn as the seed
    mean with bars from the lowest to the highest seed; a curve may lack some r.
    references: {label: [score dicts]}, drawn as horizontal lines at the seed mean.
    """
    import numpy as np

    ranks = list(ranks)
    styles = [dict(color=COLORS["red"]), dict(color=COLORS["orange"], dash="dot"), dict(color=COLORS["blue"])]
    ref_styles = [dict(color=COLORS["black"], dash="dash"), dict(color="#888888", dash="dot")]
    metrics = [("loss_per_byte", "x", "y", "loss {:.3g}"), ("exact_match", "x2", "y2", "exact match {:.3f}")]

    def stats(runs, key):
        v = np.asarray([s[key] for s in runs], dtype=float)
        return v.mean(), v.mean() - v.min(), v.max() - v.mean()

    steps = []
    for r in ranks:
        traces = []
        for key, xa, ya, _fmt in metrics:
            for (label, by_r), style in zip(curves.items(), styles):
                rs_ = [q for q in ranks if q in by_r]
                m = [stats(by_r[q], key) for q in rs_]
                traces.append(go.Scatter(
                    x=rs_, y=[a for a, _, _ in m], mode="lines+markers", name=label, legendgroup=label,
                    showlegend=key == "loss_per_byte", line=style, xaxis=xa, yaxis=ya,
                    error_y=dict(type="data", symmetric=False, array=[c for _, _, c in m],
                                 arrayminus=[b for _, b, _ in m], thickness=1, width=3),
                    hovertemplate="r = %{x}: %{y:.4g}<extra>" + label + "</extra>"))
                at = [stats(by_r[r], key)[0]] if r in by_r else []
                traces.append(go.Scatter(x=[r] * len(at), y=at, mode="markers", name="the slider's r", legendgroup="slider",
                                         showlegend=not any(tr.legendgroup == "slider" for tr in traces), xaxis=xa, yaxis=ya,
                                         marker=dict(size=13, color=style["color"], line=dict(color="black", width=1)),
                                         hoverinfo="skip"))
            for (label, runs), style in zip(references.items(), ref_styles):
                a = stats(runs, key)[0]
                traces.append(go.Scatter(x=[ranks[0], ranks[-1]], y=[a, a], mode="lines", name=label, legendgroup=label,
                                         showlegend=key == "loss_per_byte", line=style, xaxis=xa, yaxis=ya,
                                         hovertemplate=f"{label}: %{{y:.4g}}<extra></extra>"))
        parts = [f"{label} {stats(by_r[r], 'exact_match')[0]:.2f}" for label, by_r in curves.items() if r in by_r]
        steps.append((r, traces, f"r = {r}: exact match " + ", ".join(parts) + "<br>(mean over seeds; bars: lowest to highest)"))
    losses = [s["loss_per_byte"] for by_r in curves.values() for runs in by_r.values() for s in runs]
    losses += [s["loss_per_byte"] for runs in references.values() for s in runs]
    xaxis = dict(type="log", tickvals=ranks, ticktext=[str(r) for r in ranks])
    fig = stepped_figure(
        steps, "r", active=ranks.index(active_r),
        xaxis=dict(xaxis, title="rank r (log scale)", domain=[0, 0.46]),
        yaxis=dict(log_axis("held-out loss (nats per answer byte, log)", losses), exponentformat="power"),
        xaxis2=dict(xaxis, title="rank r (log scale)", domain=[0.58, 1], anchor="y2"),
        yaxis2=dict(title="held-out exact match (fraction of 200 dates)", range=[-0.03, 1.03], anchor="x2"),
    )
    return fig


# --------------------------------------------------------------------------- chapter 07


def subspace_similarity_figure(frames, left_title, right_title, active=0):
    """Two heatmaps of the LoRA paper's phi(A1, A2, i, j) side by side; the slider picks the layer
    and module. frames: [(label, left (I, J) grid, right (I', J') grid, title)], grids in [0, 1]
    (lora_ref.adapter_geometry.similarity_grid); left_title, right_title: what each panel compares."""
    import numpy as np

    steps = []
    for label, left, right, title in frames:
        traces = []
        for n, (grid, xa, ya) in enumerate(((left, "x", "y"), (right, "x2", "y2"))):
            z = np.rint(100 * np.asarray(grid, dtype=float)).astype(np.uint8)     # hundredths: a small page
            traces.append(go.Heatmap(
                z=z, x=list(range(1, z.shape[1] + 1)), y=list(range(1, z.shape[0] + 1)),
                zmin=0, zmax=100, colorscale="Viridis", xaxis=xa, yaxis=ya, showscale=n == 0,
                colorbar=dict(title="φ", len=0.8, tickvals=[0, 25, 50, 75, 100],
                              ticktext=["0", "0.25", "0.5", "0.75", "1"]),
                name=(left_title, right_title)[n],
                hovertemplate="i = %{y}, j = %{x}: φ = %{z}/100<extra></extra>"))
        steps.append((label, traces, title))
    fig = stepped_figure(
        steps, "layer, module", active=active, height=470,
        xaxis=dict(title=f"j (top directions of the 2nd A)<br>{left_title}", domain=[0, 0.4]),
        yaxis=dict(title="i (top directions of the 1st A)", autorange="reversed"),
        xaxis2=dict(title=f"j (top directions of the 2nd A)<br>{right_title}", domain=[0.5, 0.9], anchor="y2"),
        yaxis2=dict(autorange="reversed", anchor="x2"),
    )
    fig.update_layout(margin=dict(b=90))
    return fig


def effective_rank_figure(eranks, random_erank):
    """The effective rank of every layer's ΔW, one box per fine-tune (all layers and seeds), against
    the rank r (dashes) and a random rank-r product B A of the same shapes (diamonds).

    eranks: {label ("r = 4", ..., "full"): [erank of each layer and seed]};
    random_erank: {label: erank of a random rank-r product} (LoRA labels only)."""
    labels = list(eranks)
    ranks = {lab: int(lab.split("=")[1]) for lab in labels if lab.startswith("r =")}
    fig = go.Figure()
    fig.add_trace(go.Box(x=[lab for lab in labels for _ in eranks[lab]], y=[v for lab in labels for v in eranks[lab]],
                         name="trained ΔW, each layer and seed", boxpoints="all", jitter=0.5, pointpos=0,
                         marker=dict(color=COLORS["blue"], size=4), line=dict(color=COLORS["blue"]),
                         hovertemplate="%{x}: erank %{y:.2f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(ranks), y=list(ranks.values()), mode="markers", name="the rank r",
                             marker=dict(symbol="line-ew-open", size=40, color=COLORS["black"], line=dict(width=2)),
                             hovertemplate="%{x}: r = %{y}<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(random_erank), y=list(random_erank.values()), mode="markers",
                             name="random B A of rank r", marker=dict(symbol="diamond", size=10, color=COLORS["orange"]),
                             hovertemplate="%{x}: random erank %{y:.2f}<extra></extra>"))
    values = [v for lab in labels for v in eranks[lab]] + list(ranks.values())
    import statistics

    median = {lab: statistics.median(v) for lab, v in eranks.items()}
    big = max(ranks, key=ranks.get)
    fig.update_layout(
        title_text=(f"Trained adapters use fewer directions than r: median erank {median[big]:.1f} at {big}"
                    + (f", {median['full']:.1f} for full fine-tuning" if "full" in median else "")),
        xaxis_title="fine-tune", yaxis=log_axis("effective rank of ΔW (log scale)", values),
    )
    return themed(fig, height=440)


def intruders_forgetting_figure(points, base_text_loss):
    """Forgetting against intruder dimensions, one marker per fine-tune.

    points: [(group label, seed, intruders summed over the layers, loss per byte on held-out
    pretraining text after the fine-tune)]; base_text_loss: the same loss before it."""
    groups = list(dict.fromkeys(p[0] for p in points))
    fig = go.Figure()
    for n, g in enumerate(groups):
        pts = [p for p in points if p[0] == g]
        fig.add_trace(go.Scatter(
            x=[p[2] for p in pts], y=[p[3] for p in pts], mode="markers", name=g, customdata=[p[1] for p in pts],
            marker=dict(size=11, color=PALETTE[n % len(PALETTE)], symbol="square" if g == "full" else "circle"),
            hovertemplate=g + ", seed %{customdata}: %{x} intruders, %{y:.3f} nats/byte<extra></extra>"))
    fig.add_hline(y=base_text_loss, line=dict(color=COLORS["black"], dash="dot"),
                  annotation_text=f"pretrained model: {base_text_loss:.3f}", annotation_position="bottom right")
    least = min(points, key=lambda p: p[3])
    lora = [p[2] for p in points if p is not least]
    fig.update_layout(
        title_text=(f"The fine-tune that forgets least ({least[0]}, {least[3]:.2f} nats/byte) has {least[2]} "
                    f"intruders;<br>the others have {min(lora)} to {max(lora)}, and every run forgets"),
        xaxis_title="intruder dimensions, summed over the 28 adapted matrices (count)",
        yaxis_title="loss on held-out pretraining text (nats per byte)",
    )
    return themed(fig, height=440)


# --------------------------------------------------------------------------- chapter 08


def codebook_figure(codebooks, offset):
    """Each 4-bit grid's 16 levels over the N(0, 1) density scaled to [-1, 1]; slider over the grid.

    codebooks: {name: sorted levels in [-1, 1]}. NF4's levels are quantiles of N(0, 1) divided
    by Phi^-1(offset), so the density drawn is that of xi / Phi^-1(offset), xi ~ N(0, 1).
    """
    from statistics import NormalDist

    q = NormalDist().inv_cdf(offset)
    xs = [i / 200 for i in range(-220, 221)]
    dens = [q * NormalDist().pdf(x * q) for x in xs]                 # density of xi / q at x
    top = max(dens)
    steps = []
    for name, levels in codebooks.items():
        lv = [float(v) for v in levels]
        traces = [
            go.Scatter(x=xs, y=dens, mode="lines", name="density of normal weights / Φ⁻¹(offset)",
                       line=dict(color=COLORS["sky"]), fill="tozeroy", hoverinfo="skip"),
            go.Scatter(x=[v for v in lv for _ in (0, 1, 2)], y=[y for _ in lv for y in (0, top * 1.05, None)],
                       mode="lines", name=f"{name} levels", line=dict(color=COLORS["red"], width=1.5),
                       legendgroup=f"{name} levels", hoverinfo="skip"),
            go.Scatter(x=lv, y=[top * 1.05] * len(lv), mode="markers", name=f"{name} level values",
                       marker=dict(color=COLORS["red"], size=7), showlegend=False, legendgroup=f"{name} levels",
                       hovertemplate="level %{x:.4f}<extra>" + name + "</extra>"),
        ]
        gaps = [b - a for a, b in zip(lv, lv[1:])]
        steps.append((name, traces, f"{name}: {len(lv)} levels, gaps from {min(gaps):.3f} to {max(gaps):.3f}"))
    return stepped_figure(
        steps, "grid", active=0,
        xaxis=dict(title="level value v; for the density, ξ / Φ⁻¹(offset) with ξ ~ N(0, 1) (dimensionless)",
                   range=[-1.1, 1.1]),
        yaxis=dict(title="probability density of ξ / Φ⁻¹(offset)", rangemode="tozero"),
    )


def blocksize_figure(blocksizes, scaled_hists, edges, mse, levels):
    """Histogram of w / c_j per block size (slider), with NF4's levels; and the MSE of each grid.

    scaled_hists: {b: counts over ``edges``}; mse: {b: {grid name: mean squared error}};
    levels: NF4's levels, drawn as ticks. Larger blocks have larger absmax c_j, so w / c_j
    crowds near 0 and uses fewer of the 16 levels.
    """
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    top = max(max(h) for h in scaled_hists.values())
    steps = []
    for b in blocksizes:
        errs = mse[b]
        traces = [
            go.Bar(x=centres, y=scaled_hists[b], name="weights / c<sub>j</sub>", marker_color=COLORS["sky"],
                   hovertemplate="%{x:.2f}: %{y}<extra></extra>"),
            go.Scatter(x=[float(v) for v in levels], y=[top * 1.02] * len(levels), mode="markers",
                       name="NF4 levels", marker=dict(symbol="line-ns-open", size=14, color=COLORS["red"])),
        ]
        summary = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        steps.append((b, traces, f"Blocks of {b}: mean squared error {summary}"))
    return stepped_figure(
        steps, "block size", active=list(blocksizes).index(64) if 64 in blocksizes else 0, bargap=0,
        xaxis=dict(title="weight / block absmax (dimensionless)", range=[-1.05, 1.05]),
        yaxis=dict(title="count of weights", rangemode="tozero"),
    )


def loss_curves_figure(curves, title, yaxis_title="training loss (nats per answer byte)"):
    """One line per run: {name: [loss per step]}."""
    fig = go.Figure()
    for i, (name, losses) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=list(range(1, len(losses) + 1)), y=list(losses), name=name,
                                 mode="lines", line=dict(color=PALETTE[i], dash="solid" if i == 0 else "dash"),
                                 hovertemplate="step %{x}: %{y:.4f}<extra>" + name + "</extra>"))
    fig.update_layout(title_text=title, xaxis_title="step", yaxis_title=yaxis_title)
    return themed(fig)


def code_frequency_figure(blocksizes, freqs, entropies, design):
    """How often each NF4 code is used after blockwise absmax scaling; slider over the block size.

    freqs: {b: 16 fractions, one per code 0..15}; entropies: {b: entropy of freqs in bits};
    design: the 16 fractions if w / c_j were xi / Phi^-1(offset), xi ~ N(0, 1) (what the levels
    assume). A dotted line marks 1/16, the uniform use that 4 bits of entropy would need.
    """
    codes = list(range(16))
    steps, top = [], 0.0
    for b in blocksizes:
        f = [100 * float(x) for x in freqs[b]]
        top = max(top, max(f))
        traces = [
            go.Bar(x=codes, y=f, name="measured, N(0, 1) weights", marker_color=COLORS["blue"],
                   hovertemplate="code %{x}: %{y:.2f}% of the weights<extra></extra>"),
            go.Scatter(x=codes, y=[100 * float(x) for x in design], mode="lines+markers",
                       name="if w / c<sub>j</sub> were ξ / Φ⁻¹(offset)", line=dict(color=COLORS["orange"]),
                       hovertemplate="code %{x}: %{y:.2f}%<extra>design assumption</extra>"),
            go.Scatter(x=[-0.5, 15.5], y=[100 / 16] * 2, mode="lines", name="uniform, 1/16: 4 bits",
                       line=dict(color=COLORS["black"], dash="dot"), hoverinfo="skip"),
        ]
        lo, hi = min(f), max(f)
        steps.append((b, traces, f"Blocks of {b}: the 16 codes are used {lo:.1f}% to {hi:.1f}% of the time, "
                                 f"{entropies[b]:.2f} bits of entropy, not 4"))
    fig = stepped_figure(
        steps, "block size", active=list(blocksizes).index(64) if 64 in blocksizes else 0,
        xaxis=dict(title="NF4 code (index into the sorted levels; 7 is the zero)", tickmode="linear", dtick=1),
        yaxis=dict(title="share of the weights (%)", range=[0, 1.05 * top]),
    )
    return fig


def merge_regimes_figure(rel_sizes, errors, at=1e-3, adapter_range=None):
    """How much of an update a merge loses, against the update's size; one line per storage format.

    rel_sizes: ||dW|| / ||W0||; errors: {format: [||merged - (base + dW)|| / ||dW|| per size]}
    (lora_ref.quant.merge_error_curve). Log axes; a dashed line at 1, where the error is as large
    as the update itself. adapter_range: (lo, hi) relative sizes of a trained adapter, shaded.
    The title states each format's error at the size nearest to ``at``.
    """
    fig = go.Figure()
    for i, (name, errs) in enumerate(errors.items()):
        fig.add_trace(go.Scatter(x=list(rel_sizes), y=list(errs), name=name, mode="lines+markers",
                                 marker_color=PALETTE[i],
                                 hovertemplate="update %{x:.1e} of W0: error %{y:.3g} of the update<extra>"
                                 + name + "</extra>"))
    nonzero = [e for errs in errors.values() for e in errs if e > 0]
    # on log axes, annotations take log10 coordinates (shapes take data values)
    fig.add_hline(y=1, line=dict(color=COLORS["black"], dash="dash"))
    fig.add_annotation(x=math.log10(min(rel_sizes)), y=0, text="error = the whole update", showarrow=False, bgcolor="rgba(255,255,255,0.8)",
                       xanchor="left", yanchor="top")
    if adapter_range is not None:
        lo, hi = adapter_range
        fig.add_vrect(x0=lo, x1=hi, fillcolor=COLORS["sky"], opacity=0.25, line_width=0)
        fig.add_annotation(x=math.log10(lo), y=math.log10(min(nonzero)), text="this chapter's adapter",
                           showarrow=False, xanchor="right", yanchor="bottom")
    j = min(range(len(rel_sizes)), key=lambda i: abs(math.log10(rel_sizes[i] / at)))
    pct = lambda e: f"{100 * e:.0f}%" if e >= 0.1 else f"{100 * e:.2g}%"
    parts = ", ".join(f"{name} {pct(errs[j])}" for name, errs in errors.items())
    fig.update_layout(
        title_text=f"The smaller the update, the more of it a merge loses.<br>At ‖ΔW‖ / ‖W0‖ = {rel_sizes[j]:.0e}, "
                   f"error / update:<br>{parts}",
        xaxis=dict(log_axis("size of the update, ‖ΔW‖ / ‖W0‖ (Frobenius, log scale)", list(rel_sizes)),
                   exponentformat="power"),
        yaxis=dict(log_axis("merge error / ‖ΔW‖ (log scale)", nonzero + [1.0]), exponentformat="power"),
    )
    themed(fig, height=480)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0))
    return fig


# --------------------------------------------------------------------------- chapter 09


def _best_scores_title(by_method, tasks, scale, percent):
    """"the best scores are date 87.5% (cat), ..." naming a method only where one leads alone."""
    unit = "%" if percent else ""
    parts = []
    for t in tasks:
        top = max(by_method[m][t] for m in by_method)
        leaders = [m for m in by_method if by_method[m][t] == top]
        if len(leaders) == len(by_method):
            parts.append(f"{t} {scale * top:.3g}{unit} (every method)")
        else:
            parts.append(f"{t} {scale * top:.3g}{unit} ({', '.join(leaders)})")
    return "the best scores are " + ", ".join(parts)


def task_arithmetic_figure(steps_values, scores, tasks, active=0, slider_label="γ", percent=True,
                           yaxis_title="held-out exact match (% of 200 prompts)"):
    """Each task's score under each combination method; the slider picks the mix (``slider_label``).

    scores: {value: {method: {task: score}}}, scores in [0, 1] when ``percent`` (drawn as %).
    """
    colors = [COLORS["blue"], COLORS["orange"], COLORS["green"], COLORS["purple"]]
    scale = 100 if percent else 1
    symbol = slider_label.split()[0]
    steps = []
    for v in steps_values:
        methods = list(scores[v])
        traces = [go.Bar(x=methods, y=[scale * scores[v][m][t] for m in methods], name=t, marker_color=colors[i],
                         hovertemplate="%{x}: %{y:.3g}<extra>" + t + "</extra>")
                  for i, t in enumerate(tasks)]
        steps.append((v, traces, f"{symbol} = {v:g}: " + _best_scores_title(scores[v], tasks, scale, percent)))
    top = max(scale * x for v in steps_values for by_task in scores[v].values() for x in by_task.values())
    return stepped_figure(steps, slider_label, active=active, barmode="group",
                          xaxis_title="combination method (PEFT's combination_type)",
                          yaxis=dict(title=yaxis_title, range=[0, max(1e-9, 1.05 * top)]))


def swap_drift_figure(cycles, curves, bounds):
    """max |W0' - W0| after K merge/unmerge cycles, one line per (format, scenario); dashed: the bounds.

    curves: {label: [drift after each K]}; bounds: {label: [bound after each K]}.
    """
    fig = go.Figure()
    colors = {"fp32": COLORS["blue"], "bf16": COLORS["orange"], "fp16": COLORS["green"]}
    for label, ys in curves.items():
        color = next((c for key, c in colors.items() if label.startswith(key)), COLORS["black"])
        fig.add_trace(go.Scatter(x=list(cycles), y=ys, name=label, mode="lines",
                                 line=dict(color=color, dash="solid" if "one" in label else "dot"),
                                 hovertemplate="K = %{x}: %{y:.3g}<extra>" + label + "</extra>"))
    for label, ys in bounds.items():
        color = next((c for key, c in colors.items() if label.startswith(key)), COLORS["black"])
        fig.add_trace(go.Scatter(x=list(cycles), y=ys, name=f"{label}: bound", mode="lines",
                                 line=dict(color=color, dash="dash", width=1), opacity=0.6,
                                 hovertemplate="K = %{x}: %{y:.3g}<extra>" + label + " bound</extra>"))
    values = [v for ys in list(curves.values()) + list(bounds.values()) for v in ys if v > 0]
    fig.update_layout(
        title_text="Swapping among adapters keeps moving W0; one adapter moves it once",
        xaxis=log_axis("merge/unmerge cycles K (log scale)", list(cycles)),
        yaxis=dict(log_axis("max |W0 after K cycles − W0| (log scale)", values), exponentformat="power"),
    )
    return themed(fig, height=460)


def multi_adapter_figure(batch_sizes, times_ms, active=None):
    """Time of one layer's forward for a batch with m adapters, by strategy, against the batch size n;
    the slider picks m. times_ms: {m: {strategy: [median ms per n]}} with the strategies of
    ``lora_ref.serving.serving_strategies`` (all but "base" and "auto" are drawn)."""
    styles = {"gathered": dict(color=COLORS["sky"]), "segmented": dict(color=COLORS["blue"]),
              "padded": dict(color=COLORS["green"]), "stacked": dict(color=COLORS["purple"]),
              "per adapter": dict(color=COLORS["orange"]), "merge": dict(color=COLORS["red"]),
              "one adapter": dict(color=COLORS["black"], dash="dot")}
    labels = {"gathered": "mixed, gathered", "segmented": "mixed, segmented", "padded": "mixed, padded",
              "stacked": "mixed, stacked", "per adapter": "one batch per adapter",
              "merge": "merge, run, unmerge per adapter", "one adapter": "every row one adapter (the mark)"}
    steps = []
    for m, series in times_ms.items():
        traces = [go.Scatter(x=list(batch_sizes), y=series[key], name=labels[key], mode="lines+markers",
                             line=styles[key], hovertemplate="n = %{x}: %{y:.3g} ms<extra>" + key + "</extra>")
                  for key in labels]
        q = [a / o for a, o in zip(series["auto"], series["one adapter"])]
        steps.append((m, traces, f"m = {m} adapter{'' if m == 1 else 's'}: the mixed batch (method=\"auto\") takes "
                                 f"{min(q):.2g}× to {max(q):.2g}× the time of one adapter"))
    all_ms = [t for s in times_ms.values() for key, v in s.items() if key in labels for t in v]
    return stepped_figure(steps, "m (adapters in the batch)", active=len(steps) - 1 if active is None else active,
                          xaxis=log_axis("rows in the batch n (log scale)", list(batch_sizes)),
                          yaxis=log_axis("median time of one layer (ms, log scale)", all_ms))


# --------------------------------------------------------------------------- chapter 10


VARIANT_LABELS = {"lora": "LoRA", "pissa": "PiSSA", "milora": "MiLoRA", "olora": "OLoRA", "loraga": "LoRA-GA",
                  "dora": "DoRA", "vera": "VeRA", "full": "full fine-tuning"}


def residual_energy_figure(ranks, pissa, milora, layer):
    """||W_res||_F^2 / ||W0||_F^2 against r for PiSSA (the smallest residual, Eckart-Young) and MiLoRA (the
    largest): the two ends of the spectrum."""
    fig = go.Figure([
        go.Scatter(x=list(ranks), y=list(pissa), name="PiSSA: W<sub>res</sub> lacks the r largest σ<sub>i</sub>", mode="lines+markers",
                   line=dict(color=COLORS["blue"]), hovertemplate="r = %{x}: %{y:.3f}<extra>PiSSA</extra>"),
        go.Scatter(x=list(ranks), y=list(milora), name="MiLoRA: W<sub>res</sub> lacks the r smallest σ<sub>i</sub>", mode="lines+markers",
                   line=dict(color=COLORS["orange"]), hovertemplate="r = %{x}: %{y:.3f}<extra>MiLoRA</extra>"),
    ])
    fig.update_layout(title_text=f"{layer}: the share of ‖W<sub>0</sub>‖²<sub>F</sub> left in the frozen base W<sub>res</sub>, by rank",
                      xaxis_title="rank r", yaxis=dict(title="‖W<sub>res</sub>‖²<sub>F</sub> / ‖W<sub>0</sub>‖²<sub>F</sub>", range=[0, 1.05]))
    return themed(fig)


def planted_race_figure(errors, active=0, floor=1e-10):
    """Gradient descent on ||W_res + s B A - W*||_F from each init, relative to the start, with W* planted in
    the principal or the minor subspace of W0; the slider picks the subspace. errors: {subspace: {init:
    [error per step]}}. Relative errors below ``floor`` (float64 rounding) are drawn at the floor."""
    styles = {"lora": dict(color=COLORS["black"], dash="dot"), "pissa": dict(color=COLORS["blue"]),
              "milora": dict(color=COLORS["orange"]), "olora": dict(color=COLORS["green"], dash="dash")}
    steps = []
    for subspace, by_init in errors.items():
        traces = [go.Scatter(x=list(range(len(e))), y=[max(v / e[0], floor) for v in e], name=VARIANT_LABELS[init],
                             mode="lines", line=styles[init],
                             hovertemplate="step %{x}: %{y:.3g}<extra>" + VARIANT_LABELS[init] + "</extra>")
                  for init, e in by_init.items()]
        last = {VARIANT_LABELS[i]: e[-1] / e[0] for i, e in by_init.items()}
        best = min(last, key=last.get)
        steps.append((subspace, traces, f"target planted in the {subspace} subspace of W<sub>0</sub>: {best} gets there "
                                        f"first; an init whose factors are orthogonal to the target never moves"))
    return stepped_figure(steps, "target subspace", active=active, xaxis=dict(title="gradient step"),
                          yaxis=dict(log_axis(f"error / error at the start (log; floor {floor:.0e})", [floor, 1.0]),
                                     exponentformat="power"))


def variant_curves_figure(curves, test_loss, reference="lora", active=1):
    """The seed-mean training loss of each variant against LoRA's (the slider picks the variant), titled with
    the held-out losses. curves: {variant: [mean loss per step]}; test_loss: {variant: [one per seed]}."""
    import numpy as np

    names = [v for v in curves if v != reference]
    ref = curves[reference]
    values = [x for c in curves.values() for x in c]
    steps = []
    for v in names:
        traces = [
            go.Scatter(x=list(range(len(ref))), y=ref, name=VARIANT_LABELS[reference], mode="lines",
                       line=dict(color=COLORS["black"], dash="dot"),
                       hovertemplate="step %{x}: %{y:.3f}<extra>" + VARIANT_LABELS[reference] + "</extra>"),
            go.Scatter(x=list(range(len(curves[v]))), y=curves[v], name=VARIANT_LABELS[v], mode="lines",
                       line=dict(color=COLORS["blue"]),
                       hovertemplate="step %{x}: %{y:.3f}<extra>" + VARIANT_LABELS[v] + "</extra>"),
        ]
        title = (f"{VARIANT_LABELS[v]}: held-out loss {np.mean(test_loss[v]):.3f} against "
                 f"{np.mean(test_loss[reference]):.3f} for {VARIANT_LABELS[reference]} (mean of {len(test_loss[v])} seeds)")
        steps.append((VARIANT_LABELS[v], traces, title))
    return stepped_figure(steps, "variant", active=min(active, len(steps) - 1), xaxis=dict(title="optimizer step"),
                          yaxis=log_axis("training loss (nats per answer byte, log, mean of seeds)", values))


def md_scatter_figure(points, slopes, active=None):
    """DoRA's Delta M against Delta D (Liu et al. 2024, Fig. 2), one panel per method, one point per q_proj and
    v_proj; the slider shows the points up to a training step. points: {method: {step: [(dD, dM) per layer]}};
    slopes: {method: least-squares slope over all points}."""
    methods = list(points)
    checkpoints = list(points[methods[0]])
    width = 1.0 / len(methods)
    axes, steps = {}, []
    for j, method in enumerate(methods):
        suffix = "" if j == 0 else str(j + 1)
        xs = [p[0] for rows in points[method].values() for p in rows]
        ys = [p[1] for rows in points[method].values() for p in rows]
        axes[f"xaxis{suffix}"] = dict(title=f"ΔD, {VARIANT_LABELS[method]}", domain=[j * width + 0.06, (j + 1) * width - 0.02],
                                      range=[0, max(xs) * 1.08], anchor=f"y{suffix}")
        axes[f"yaxis{suffix}"] = dict(title="ΔM" if j == 0 else None, range=[0, max(ys) * 1.08], anchor=f"x{suffix}")
    palette = [COLORS["sky"], COLORS["blue"], COLORS["green"], COLORS["orange"], COLORS["red"], COLORS["purple"],
               COLORS["black"]]
    for i, step in enumerate(checkpoints):
        traces = []
        for j, method in enumerate(methods):
            suffix = "" if j == 0 else str(j + 1)
            shown = checkpoints[: i + 1]
            traces.append(go.Scatter(
                x=[p[0] for t in shown for p in points[method][t]], y=[p[1] for t in shown for p in points[method][t]],
                mode="markers", name=VARIANT_LABELS[method], showlegend=False, xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                marker=dict(size=8, color=[palette[checkpoints.index(t) % len(palette)] for t in shown
                                           for _ in points[method][t]]),
                hovertemplate="ΔD %{x:.3g}, ΔM %{y:.3g}<extra>" + VARIANT_LABELS[method] + "</extra>"))
        title = "slope of ΔM on ΔD: " + ", ".join(f"{VARIANT_LABELS[m]} {slopes[m]:+.2f}" for m in methods) + \
                f" (points up to step {step}; colour: step)"
        steps.append((step, traces, title))
    return stepped_figure(steps, "up to step", active=len(steps) - 1 if active is None else active, height=420,
                          **axes)


def first_step_cosine_figure(cosines):
    """The cosine of each variant's first SGD step on Delta W with full fine-tuning's step, per layer, as a
    box over the layers. cosines: {variant: [cosine per layer]}."""
    fig = go.Figure([go.Box(y=list(c), name=VARIANT_LABELS[v], boxpoints="all", jitter=0.4, pointpos=0,
                            marker=dict(color=PALETTE[i % len(PALETTE)]), hovertemplate="%{y:.3f}<extra></extra>")
                     for i, (v, c) in enumerate(cosines.items())])
    fig.update_layout(title_text="The first step of ΔW against full fine-tuning's step −G: one point per layer",
                      yaxis=dict(title="cosine with −G", range=[-0.05, 1.05]), showlegend=False)
    return themed(fig)


def adalora_ranks_figure(steps_recorded, ranks, needed, budget_total):
    """AdaLoRA's rank per layer during training; the slider picks the step. ranks: {step: [rank per layer]};
    needed: the rank each layer's planted target has."""
    layers = [f"layer {i}" for i in range(len(needed))]
    top = max(max(max(r) for r in ranks.values()), max(needed)) + 1
    steps = []
    for step in steps_recorded:
        traces = [go.Bar(x=layers, y=ranks[step], name="AdaLoRA's rank", marker=dict(color=COLORS["blue"]),
                         hovertemplate="%{x}: rank %{y}<extra></extra>"),
                  go.Scatter(x=layers, y=list(needed), name="rank of the planted update", mode="markers",
                             marker=dict(color=COLORS["red"], size=14, symbol="line-ew-open", line=dict(width=3)),
                             hovertemplate="%{x}: needs %{y}<extra></extra>")]
        steps.append((step, traces, f"step {step}: ranks {list(ranks[step])} (budget {sum(ranks[step])} of "
                                    f"{budget_total} at the end), planted {list(needed)}"))
    return stepped_figure(steps, "step", active=len(steps) - 1, xaxis=dict(title="layer"),
                          yaxis=dict(title="rank kept (nonzero λ)", range=[0, top]))


# --------------------------------------------------------------------------- chapter 11


def _band_trace(stats, name, color, dash="solid", xaxis="x", yaxis="y", showlegend=True, x=None, unit="lr"):
    """A seed-mean curve with error bars from the seed min to max. stats: ``hyperparams.seed_stats``."""
    xs = list(stats["x"]) if x is None else list(x)
    mean, lo, hi = stats["mean"], stats["lo"], stats["hi"]
    return go.Scatter(x=xs, y=mean, name=name, mode="lines+markers", line=dict(color=color, dash=dash),
                      marker=dict(size=7), xaxis=xaxis, yaxis=yaxis, showlegend=showlegend, legendgroup=name,
                      error_y=dict(type="data", symmetric=False, array=[h - m for h, m in zip(hi, mean)],
                                   arrayminus=[m - lo_ for m, lo_ in zip(mean, lo)], thickness=1.2, width=3),
                      hovertemplate=unit + " %{x:.3g}: %{y:.3f}<extra>" + name + "</extra>")


def _finite(values):
    return [v for v in values if math.isfinite(v) and v > 0]


def lr_ucurves_figure(full, lora, optima, ratios, active_r=16):
    """Held-out loss against the learning rate: full fine-tuning's U-curve and LoRA's at the slider's r, seed
    means with min-max bars, each optimum marked along the bottom. full, lora[r]: ``hyperparams.seed_stats``;
    optima: {"full": lr, r: lr} (of the seed mean); ratios: {r: (median, lo, hi)} of LoRA's optimum over full's,
    seed by seed."""
    values = _finite([v for st in (full, *lora.values()) for v in st["mean"] + st["hi"] + st["lo"]])
    ymin = min(values)
    lrs = _finite([x for st in (full, *lora.values()) for x in st["x"]])
    steps = []
    for r, st in lora.items():
        _, lo, hi = ratios[r]
        traces = [_band_trace(full, "full fine-tuning", COLORS["black"], dash="dot"),
                  _band_trace(st, "LoRA", COLORS["blue"]),
                  go.Scatter(x=[optima["full"], optima[r]], y=[ymin * 0.8, ymin * 0.8], mode="markers+text",
                             marker=dict(symbol="triangle-up", size=13, color=[COLORS["black"], COLORS["blue"]]),
                             text=["full", "LoRA"], textposition="top center", name="optima (seed mean)",
                             hovertemplate="optimum at lr %{x:.3g}<extra></extra>")]
        title = (f"r = {r}: LoRA's best lr {optima[r]:.2g} is {optima[r] / optima['full']:.1f}× full fine-tuning's "
                 f"{optima['full']:.2g} (seed by seed {lo:.1f}× to {hi:.1f}×)")
        steps.append((r, traces, title))
    return stepped_figure(steps, "r", active=list(lora).index(active_r),
                          xaxis=log_axis("peak learning rate (log scale)", lrs),
                          yaxis=log_axis("held-out loss (nats per answer byte, log)", values + [ymin * 0.6], pad=0.05))


def capacity_figure(tasks, ranks, lora, full, active=0):
    """Loss against r for LoRA (best lr per r) with full fine-tuning as a line, one slider step per task.
    lora[task]: ``seed_stats`` over r; full[task]: (mean, lo, hi)."""
    values = _finite([v for t in tasks for v in lora[t]["mean"] + lora[t]["hi"] + list(full[t])])
    steps = []
    for task in tasks:
        fm, flo, fhi = full[task]
        traces = [_band_trace(lora[task], "LoRA at its best lr", COLORS["blue"], unit="r"),
                  go.Scatter(x=[min(ranks), max(ranks)], y=[fm, fm], mode="lines", name="full fine-tuning",
                             line=dict(color=COLORS["black"], dash="dot"),
                             hovertemplate=f"full fine-tuning: {fm:.3f} (seeds {flo:.3f} to {fhi:.3f})<extra></extra>")]
        gap = lora[task]["mean"][-1] / fm
        title = f"{task}: full fine-tuning reaches {fm:.3g}; LoRA at r = {ranks[-1]} ends {gap:.2g}× that"
        steps.append((task, traces, title))
    return stepped_figure(steps, "task", active=active,
                          xaxis=dict(log_axis("rank r (log scale)", list(ranks)), dtick=math.log10(2) * 2),
                          yaxis=log_axis("loss per answer byte (nats, log)", values))


def targets_figure(names, params, panels):
    """Held-out loss of each target set at about one parameter budget, one bar panel per task, seed means with
    min-max bars. names: labels; params: trainable numbers of each; panels: {panel title: [(mean, lo, hi)]}."""
    fig = go.Figure()
    n = len(panels)
    width = 1.0 / n
    labels = [f"{name}<br>{p:,}" for name, p in zip(names, params)]
    layout = {}
    for j, (title, rows) in enumerate(panels.items()):
        suffix = "" if j == 0 else str(j + 1)
        mean = [m for m, _, _ in rows]
        fig.add_trace(go.Bar(x=labels, y=mean, name=title, marker=dict(color=PALETTE[j]), xaxis=f"x{suffix}",
                             yaxis=f"y{suffix}", showlegend=False,
                             error_y=dict(type="data", symmetric=False, array=[h - m for m, _, h in rows],
                                          arrayminus=[m - lo for m, lo, _ in rows]),
                             hovertemplate="%{x}: %{y:.3f}<extra>" + title + "</extra>"))
        layout[f"xaxis{suffix}"] = dict(title=title, domain=[j * width + 0.07, (j + 1) * width - 0.02],
                                        anchor=f"y{suffix}", tickangle=0, tickfont=dict(size=11))
        layout[f"yaxis{suffix}"] = dict(title="loss per answer byte (nats)" if j == 0 else None, anchor=f"x{suffix}",
                                        rangemode="tozero")
    fig.update_layout(title_text="LoRA on four target sets at about one budget (target set, trainable numbers)",
                      **layout)
    return themed(fig, height=460)


def alpha_figure(alphas, by_r, conventions, lr):
    """Held-out loss against alpha at a fixed lr for each r (s = alpha / r), with practitioners' conventions
    marked. by_r: {r: ``seed_stats`` over alpha}; conventions: {r: {label: alpha}} (alpha under s = alpha / r)."""
    colors = [COLORS["blue"], COLORS["orange"], COLORS["green"]]
    values = _finite([v for st in by_r.values() for v in st["mean"] + st["hi"] + st["lo"]])
    fig = go.Figure()
    symbols = ["diamond", "square", "star", "x"]
    for i, (r, st) in enumerate(by_r.items()):
        fig.add_trace(_band_trace(st, f"r = {r}", colors[i % 3], unit="α"))
    for i, (r, st) in enumerate(by_r.items()):
        for j, (label, a) in enumerate(conventions[r].items()):
            y = st["mean"][list(st["x"]).index(a)]
            fig.add_trace(go.Scatter(x=[a], y=[y], mode="markers", name=label, legendgroup=label, showlegend=i == 0,
                                     marker=dict(symbol=symbols[j % 4], size=13, color=colors[i % 3],
                                                 line=dict(width=1.5, color=COLORS["black"])),
                                     hovertemplate=f"r = {r}, {label}: α %{{x:g}}, %{{y:.3f}}<extra></extra>"))
    fig.update_layout(title_text=f"Held-out loss against α at lr {lr:g} (s = α / r), conventions marked",
                      xaxis=dict(log_axis("α (log scale)", list(next(iter(by_r.values()))["x"])), dtick=math.log10(2) * 2),
                      yaxis=dict(title="held-out loss (nats per answer byte)", range=[0, 1.05 * max(values)]))
    return themed(fig, height=480)


def dropout_figure(rates, panels):
    """Held-out loss against the lora_dropout rate rho, one panel per run length. panels: {title: ``seed_stats``
    over rho}."""
    fig = go.Figure()
    n = len(panels)
    width = 1.0 / n
    layout = {}
    for j, (title, st) in enumerate(panels.items()):
        suffix = "" if j == 0 else str(j + 1)
        fig.add_trace(_band_trace(st, title, PALETTE[j], xaxis=f"x{suffix}", yaxis=f"y{suffix}", showlegend=False,
                                  unit="ρ"))
        lo, hi = min(st["lo"]), max(st["hi"])
        pad = 0.15 * (hi - lo) or 0.01
        layout[f"xaxis{suffix}"] = dict(title=f"dropout rate ρ, {title}", domain=[j * width + 0.07, (j + 1) * width - 0.02],
                                        anchor=f"y{suffix}", tickvals=list(rates))
        layout[f"yaxis{suffix}"] = dict(title="held-out loss (nats per answer byte)" if j == 0 else None,
                                        anchor=f"x{suffix}", range=[lo - pad, hi + pad])
    fig.update_layout(title_text="Held-out loss against lora_dropout's rate ρ, LoRA at r = 16 (seed means, min-max bars)",
                      **layout)
    return themed(fig, height=440)


def batch_size_figure(batch_sizes, full, lora, examples):
    """Held-out loss at each method's best lr against the batch size, at a fixed number of training examples.
    full, lora: ``seed_stats`` over the batch size."""
    values = _finite([v for st in (full, lora) for v in st["mean"] + st["hi"] + st["lo"]])
    fig = go.Figure([_band_trace(full, "full fine-tuning", COLORS["black"], dash="dot", unit="batch"),
                     _band_trace(lora, "LoRA, r = 16", COLORS["blue"], unit="batch")])
    fig.update_layout(title_text=f"{examples:,} training examples at each batch size, each method at its best lr",
                      xaxis=dict(log_axis("batch size (log scale)", list(batch_sizes)), tickmode="array",
                                 tickvals=list(batch_sizes), ticktext=[str(b) for b in batch_sizes]),
                      yaxis=log_axis("held-out loss (nats per answer byte, log)", values))
    return themed(fig, height=440)


# --------------------------------------------------------------------------- chapter 12


def comm_bytes_figure(r_values, per_model, active=0):
    """Bytes per GPU per step against r: DDP's gradient all-reduce for LoRA and for full fine-tuning, and
    FSDP's parameter all-gather with LoRA; the slider picks the model.
    per_model: {model: {"ddp_lora": [bytes per r], "ddp_full": bytes, "fsdp_lora": [bytes per r]}}."""
    steps, everything = [], []
    for name, series in per_model.items():
        full = [series["ddp_full"]] * len(r_values)
        everything += series["ddp_lora"] + full + series["fsdp_lora"]
        traces = [
            go.Scatter(x=list(r_values), y=full, name="DDP, full fine-tuning: all gradients", mode="lines",
                       line=dict(color=COLORS["red"], dash="dot"), hovertemplate="r = %{x}: %{y:.3s}B<extra>full</extra>"),
            go.Scatter(x=list(r_values), y=series["fsdp_lora"], name="FSDP + LoRA: parameters gathered",
                       mode="lines+markers", line=dict(color=COLORS["orange"]),
                       hovertemplate="r = %{x}: %{y:.3s}B<extra>FSDP gather</extra>"),
            go.Scatter(x=list(r_values), y=series["ddp_lora"], name="DDP + LoRA: LoRA gradients", mode="lines+markers",
                       line=dict(color=COLORS["blue"]), hovertemplate="r = %{x}: %{y:.3s}B<extra>DDP LoRA</extra>"),
        ]
        i16 = list(r_values).index(16) if 16 in r_values else 0
        steps.append((name, traces, f"{name}: at r = {r_values[i16]}, DDP + LoRA all-reduces "
                                    f"{series['ddp_full'] / series['ddp_lora'][i16]:.0f} times fewer bytes than full "
                                    f"fine-tuning; FSDP still gathers {series['fsdp_lora'][i16] / 1e9:.1f} GB a step"))
    return stepped_figure(steps, "model", active=active,
                          xaxis=dict(log_axis("LoRA rank r (log scale)", list(r_values)), tickmode="array",
                                     tickvals=list(r_values), ticktext=[str(r) for r in r_values]),
                          yaxis=log_axis("bytes per GPU per step (log scale)", everything))


def gpus_memory_figure(worlds, per_model, gpu_gb=(80, 24), active=0):
    """Static memory per GPU (no activations) against the number of GPUs W, one line per strategy, with the
    capacity of each GPU in ``gpu_gb`` as a horizontal line; the slider picks the model.
    per_model: {model: {strategy: [GB per W]}}."""
    colors = {"DDP + LoRA": COLORS["red"], "FSDP + LoRA": COLORS["blue"], "FSDP + QLoRA": COLORS["green"]}
    steps, everything = [], list(gpu_gb)
    for name, series in per_model.items():
        traces = [go.Scatter(x=list(worlds), y=gb, name=strategy, mode="lines+markers", line=dict(color=colors[strategy]),
                             hovertemplate="W = %{x}: %{y:.1f} GB per GPU<extra>" + strategy + "</extra>")
                  for strategy, gb in series.items()]
        traces += [go.Scatter(x=[worlds[0], worlds[-1]], y=[g, g], name=f"{g} GB GPU", mode="lines",
                              line=dict(color=COLORS["black"], dash="dash" if i == 0 else "dot", width=1),
                              hovertemplate=f"{g} GB<extra></extra>") for i, g in enumerate(gpu_gb)]
        everything += [v for gb in series.values() for v in gb]
        fits = {s: next((w for w, v in zip(worlds, gb) if v <= gpu_gb[0]), None) for s, gb in series.items()}
        said = ", ".join(f"{s} {'never' if w is None else w}" for s, w in fits.items())
        steps.append((name, traces, f"{name} on {gpu_gb[0]} GB GPUs, GPUs needed: {said}"))
    return stepped_figure(steps, "model", active=active,
                          xaxis=dict(log_axis("GPUs (log scale)", list(worlds)), tickmode="array",
                                     tickvals=list(worlds), ticktext=[str(w) for w in worlds]),
                          yaxis=log_axis("static memory per GPU (GB, log scale)", everything))


def step_time_figure(interconnects, compute_s, comm_s):
    """Seconds per step of compute and of each communication pattern, one group of bars per interconnect.
    comm_s: {pattern: [seconds per interconnect]}; compute_s: {label: seconds}, drawn as horizontal lines."""
    colors = [COLORS["blue"], COLORS["red"], COLORS["orange"]]
    fig = go.Figure([go.Bar(x=list(interconnects), y=s, name=p, marker_color=colors[i % 3],
                            hovertemplate="%{x}: %{y:.3g} s<extra>" + p + "</extra>")
                     for i, (p, s) in enumerate(comm_s.items())])
    for j, (label, t) in enumerate(compute_s.items()):
        fig.add_trace(go.Scatter(x=list(interconnects), y=[t] * len(interconnects), mode="lines", name=label,
                                 line=dict(color=COLORS["black"], dash="dash" if j == 0 else "dot"),
                                 hovertemplate="%{y:.3g} s<extra>" + label + "</extra>"))
    values = [v for s in comm_s.values() for v in s] + list(compute_s.values())
    def own_compute(pattern):                     # full fine-tuning's traffic against its own compute
        return next((t for label, t in compute_s.items() if ("full" in label) == ("full" in pattern)),
                    next(iter(compute_s.values())))

    worst = ", ".join(f"{p} {max(s) / own_compute(p):.2g}×" for p, s in comm_s.items())
    fig.update_layout(title_text=f"Communication over the slowest link, as a multiple of the same run's compute: {worst}",
                      barmode="group", xaxis_title="interconnect", yaxis=log_axis("seconds per step (log scale)", values))
    return themed(fig, height=460)
