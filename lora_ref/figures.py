"""Plotly figures shared by the chapters: one theme, and sliders that run in the static book.

A slider here never calls back into Python. Every step's traces are computed in
advance and added to the figure; a step only switches which traces are visible
and sets the title (``{"title.text": ...}``), so the figure works in the static
HTML of the book exactly as in a live kernel.

This module needs plotly (the ``book`` extra) and never imports torch.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

__all__ = [
    "COLORS", "themed", "stepped_figure", "log_axis", "show",
    "lora_params_figure", "memory_figure", "forward_cost_figure", "merge_error_figure",
    "codebook_figure", "blocksize_figure", "loss_curves_figure",
    "code_frequency_figure", "merge_regimes_figure", "rank_sweep_figure",
    "ba_entry_law_figure",
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
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
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


def show(fig):
    """Display a figure in a notebook (the book build sets PLOTLY_RENDERER=notebook_connected)."""
    fig.show(config={"displaylogo": False, "responsive": True})


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
    fig.add_vline(x=crossover, line=dict(color=COLORS["purple"], dash="dash"),
                  annotation_text=f"T* = dk/(d+k) = {crossover:g}", annotation_position="top left")
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
                       hoverinfo="skip"),
            go.Scatter(x=lv, y=[top * 1.05] * len(lv), mode="markers", name=f"{name} level values",
                       marker=dict(color=COLORS["red"], size=7), showlegend=False,
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
            go.Bar(x=centres, y=scaled_hists[b], name="weights / c_j", marker_color=COLORS["sky"],
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
                       name="if w / c_j were ξ / Φ⁻¹(offset)", line=dict(color=COLORS["orange"]),
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
    pct = lambda e: f"{100 * e:.0f}%" if e >= 0.1 else f"{100 * e:.2g}%"      # noqa: E731
    parts = ", ".join(f"{name} {pct(errs[j])}" for name, errs in errors.items())
    fig.update_layout(
        title_text=f"The smaller the update, the more of it a merge loses.<br>At ‖ΔW‖ / ‖W0‖ = {rel_sizes[j]:.0e}, "
                   f"error / update:<br>{parts}",
        xaxis=dict(log_axis("size of the update, ‖ΔW‖ / ‖W0‖ (Frobenius, log scale)", list(rel_sizes)),
                   exponentformat="power"),
        yaxis=dict(log_axis("merge error / ‖ΔW‖ (log scale)", nonzero + [1.0]), exponentformat="power"),
    )
    themed(fig, height=480)
    fig.update_layout(margin=dict(t=110), legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0))
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
        steps.append((r, traces, f"r = {r}: an entry of B A is a sum of {r} products; "
                                 f"excess kurtosis {float(kurtosis_closed[r]):.3g} → 0 as r grows"))
    return stepped_figure(steps, "r", active=0, bargap=0,
                          xaxis=dict(title="standardised entry ((BA)ᵢⱼ − mean) / sd (dimensionless)",
                                     range=[-span, span]),
                          yaxis=dict(title="probability density (per unit)", range=[0, 1.0]))


# --------------------------------------------------------------------------- chapter 03


def rank_sweep_figure(ranks, runs, active_r=64):
    """Loss curves of the rank sweep (left) and the adapters' gradient norm at step 0 against r (right);
    the slider picks r. runs: {optimizer: {rule: {r: {"loss": [...], "grad_norm": [...]}}}}
    (lora_ref.rank_scaling.rank_sweep, or the chapter's JSON with string keys r)."""
    from plotly.subplots import make_subplots

    get = lambda by_r, r: by_r[r] if r in by_r else by_r[str(r)]          # noqa: E731
    styles = {"alpha/r": dict(dash="solid"), "alpha/sqrt(r)": dict(dash="dot")}
    colors = {"sgd": COLORS["blue"], "adam": COLORS["orange"]}
    grad = {rule: [get(runs["sgd"][rule], r)["grad_norm"][0] for r in ranks] for rule in runs["sgd"]}
    all_loss = [v for opt in runs.values() for by_r in opt.values() for r in ranks for v in get(by_r, r)["loss"]]
    steps = []
    for r in ranks:
        traces, finals = [], {}
        for opt, by_rule in runs.items():
            for rule, by_r in by_rule.items():
                loss = get(by_r, r)["loss"]
                finals[(opt, rule)] = loss[-1]
                traces.append(go.Scatter(x=list(range(len(loss))), y=loss, mode="lines", name=f"{opt}, s = {rule}",
                                         line=dict(color=colors[opt], **styles[rule]), xaxis="x", yaxis="y",
                                         hovertemplate="step %{x}: loss %{y:.4g}<extra>" + f"{opt}, {rule}</extra>"))
        for rule, g in grad.items():
            traces.append(go.Scatter(x=list(ranks), y=g, mode="lines+markers", name=f"‖∇‖ at step 0, {rule}",
                                     line=dict(color=COLORS["green"], **styles[rule]), xaxis="x2", yaxis="y2",
                                     showlegend=False, hovertemplate="r = %{x}: %{y:.3g}<extra>" + rule + "</extra>"))
            traces.append(go.Scatter(x=[r], y=[g[list(ranks).index(r)]], mode="markers", showlegend=False,
                                     marker=dict(size=12, color=COLORS["red"]), xaxis="x2", yaxis="y2", hoverinfo="skip"))
        title = (f"r = {r}: after {len(loss) - 1} steps, SGD reaches {finals[('sgd', 'alpha/r')]:.3g} with α/r "
                 f"and {finals[('sgd', 'alpha/sqrt(r)')]:.3g} with α/√r;<br>Adam {finals[('adam', 'alpha/r')]:.3g} "
                 f"and {finals[('adam', 'alpha/sqrt(r)')]:.3g}")
        steps.append((r, traces, title))
    all_grad = [v for g in grad.values() for v in g]
    fig = stepped_figure(
        steps, "r", active=list(ranks).index(active_r),
        xaxis=dict(title="optimizer step", domain=[0, 0.55]),
        yaxis=dict(title="loss ½‖sBA − W*‖²_F", range=[0, 1.05 * max(all_loss)]),
        xaxis2=dict(log_axis("rank r (log scale)", list(ranks)), domain=[0.68, 1], anchor="y2", dtick=math.log10(2) * 2),
        yaxis2=dict(log_axis("‖(∂L/∂A, ∂L/∂B)‖_F at step 0 (log)", all_grad), anchor="x2"),
    )
    fig.update_layout(margin=dict(t=110))
    return fig
