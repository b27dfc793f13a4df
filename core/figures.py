"""Plotly figures of a paired run: pure functions of the read model's views (numpy arrays,
DataFrames, a ResidualGraph, a core.circuit.Circuit); they draw, they compute no data.

No Streamlit here, so notebooks can call the same builders as the dashboard. Every figure uses one
colour for the base model and one for the post-trained model, and a diverging scale centred at 0 for
changes; both read on light and dark backgrounds (the dashboard applies its theme on top).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.circuit import Circuit, node_of_slot
from core.graph import ResidualGraph
from core.metrics import CHANGE_UNITS
from core.trajectory import step_column

BASE_COLOR = "#4C78A8"
POST_COLOR = "#F58518"
# Diverging, centred at 0 (white), readable on both themes: blue = weaker after post-training.
DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
# Above the plot, so it never covers the x-axis title.
TOP_LEGEND = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0.0}

def symmetric_range(values: np.ndarray, quantile: float = 0.99) -> float:
    """Half-width of a colour range centred at 0 that covers `quantile` of the finite |values|, so a
    few extreme ratios (a tiny base mean) do not wash out the rest."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    bound = float(np.quantile(finite, quantile))
    return bound if bound > 0 else float(finite.max()) or 1.0


def _edge_hover(graph: ResidualGraph, means: dict[str, np.ndarray], base_label: str,
                post_label: str) -> tuple[np.ndarray, str]:
    custom = np.stack([means["base_abs"], means["post_abs"], means["base_signed"],
                       means["post_signed"]], axis=-1).astype(np.float64)
    template = ("%{y} → %{x}<br>change %{z:.4g}<br>"
                f"{base_label}: mean |W| %{{customdata[0]:.6g}}, mean W %{{customdata[2]:.6g}}<br>"
                f"{post_label}: mean |W| %{{customdata[1]:.6g}}, mean W %{{customdata[3]:.6g}}"
                "<extra></extra>")
    return custom, template


def change_heatmap(graph: ResidualGraph, change: np.ndarray, means: dict[str, np.ndarray],
                   base_label: str, post_label: str, measure: str, *,
                   title: str | None = None) -> go.Figure:
    """Figure 2 style: sources (rows, computation order top to bottom) by destination slots
    (columns, layer order), diverging scale centred at 0, NaN cells (non-edges, hidden edges) blank.
    Hover shows both models' exact mean |W| and mean W."""
    bound = symmetric_range(change)
    custom, hover = _edge_hover(graph, means, base_label, post_label)
    fig = go.Figure(go.Heatmap(
        z=change, x=list(graph.dst_names), y=list(graph.src_names), customdata=custom,
        hovertemplate=hover, colorscale=DIVERGING, zmid=0.0, zmin=-bound, zmax=bound,
        colorbar={"title": {"text": measure, "side": "right"}}, hoverongaps=False))
    fig.update_layout(
        title=title or f"edge-strength change ({measure}): {base_label} → {post_label}",
        xaxis={"title": "destination slot", "tickangle": -90, "type": "category"},
        yaxis={"title": "source", "autorange": "reversed", "type": "category"},
        margin={"l": 60, "r": 20, "t": 60, "b": 80}, height=max(420, 9 * graph.n_src + 160))
    return fig


def mean_heatmaps(graph: ResidualGraph, base_abs: np.ndarray, post_abs: np.ndarray,
                  base_label: str, post_label: str) -> go.Figure:
    """The two mean |W| matrices on one shared log10 colour range, side by side."""
    mask = graph.real_edge_mask
    logs = []
    for matrix in (base_abs, post_abs):
        with np.errstate(divide="ignore"):
            logs.append(np.where(mask & (matrix > 0), np.log10(np.maximum(matrix, 1e-300)), np.nan))
    finite = np.concatenate([m[np.isfinite(m)] for m in logs])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=(f"{base_label}: mean |W|", f"{post_label}: mean |W|"))
    for col, (matrix, log) in enumerate(zip((base_abs, post_abs), logs), start=1):
        fig.add_trace(go.Heatmap(
            z=log, x=list(graph.dst_names), y=list(graph.src_names), customdata=matrix,
            zmin=low, zmax=high, colorscale=SEQUENTIAL, showscale=col == 2, hoverongaps=False,
            colorbar={"title": {"text": "log10 mean |W|", "side": "right"}},
            hovertemplate="%{y} → %{x}<br>mean |W| %{customdata:.6g}<extra></extra>"),
            row=1, col=col)
    fig.update_xaxes(type="category", tickangle=-90)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(height=max(380, 7 * graph.n_src + 160), margin={"t": 60, "b": 80})
    return fig


def abs_histogram(abs_values: dict[str, np.ndarray], *, n_bins: int = 80,
                  colors: dict[str, str] | None = None) -> go.Figure:
    """Histograms of pooled |W| (one array per model) on log-spaced bins, as fractions of each
    model's values; zeros cannot sit on a log axis and are counted in the legend instead."""
    colors = colors or {}
    # Equal-width bins of log10 |W| (numpy's fast path for uniform bins) = log-spaced bins of |W|.
    logs = {label: np.log10(values[values > 0]) for label, values in abs_values.items()}
    pooled = np.concatenate(list(logs.values()))
    low, high = (float(pooled.min()), float(pooled.max())) if pooled.size else (-12.0, 0.0)
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, n_bins + 1)
    centres = 10 ** ((edges[:-1] + edges[1:]) / 2)
    fig = go.Figure()
    for i, (label, values) in enumerate(abs_values.items()):
        counts, _ = np.histogram(logs[label], bins=n_bins, range=(low, high))
        zeros = int(values.size - logs[label].size)
        name = label if zeros == 0 else f"{label} ({zeros} zeros not shown)"
        fig.add_trace(go.Scatter(
            x=centres, y=counts / max(values.size, 1), mode="lines", line_shape="hvh", name=name,
            line={"color": colors.get(label, _default_color(i)), "width": 2},
            hovertemplate="|W| ≈ %{x:.3g}<br>fraction %{y:.4f}<extra>" + label + "</extra>"))
    fig.update_layout(xaxis={"type": "log", "title": "|W| (log scale)"},
                      yaxis={"title": "fraction of values"}, legend=TOP_LEGEND,
                      margin={"t": 70})
    return fig


def ecdf(abs_values: dict[str, np.ndarray], *, n_points: int = 400,
         colors: dict[str, str] | None = None) -> go.Figure:
    """Empirical CDFs of |W| per model, drawn through `n_points` quantiles (enough to be exact to the
    eye, light enough for the browser)."""
    colors = colors or {}
    levels = np.linspace(0.0, 1.0, n_points)
    fig = go.Figure()
    for i, (label, values) in enumerate(abs_values.items()):
        if values.size == 0:
            continue
        fig.add_trace(go.Scatter(
            x=np.quantile(values, levels), y=levels, mode="lines", name=label,
            line={"color": colors.get(label, _default_color(i)), "width": 2},
            hovertemplate="|W| ≤ %{x:.3g}: %{y:.3f}<extra>" + label + "</extra>"))
    fig.update_layout(xaxis={"type": "log", "title": "|W| (log scale)"},
                      yaxis={"title": "fraction ≤ |W|", "range": [0, 1]},
                      legend=TOP_LEGEND, margin={"t": 70})
    return fig


def per_sample_violins(frame: pd.DataFrame, metric: str, *, intervals: pd.DataFrame | None = None,
                       colors: dict[str, str] | None = None) -> go.Figure:
    """Per-sample values of one metric (`frame`: columns alpha, model, value), a violin with its box
    per (alpha, model). `intervals` (alpha, model, mean, ci_low, ci_high) adds the mean with its
    confidence interval as a marker with error bars."""
    colors = colors or {}
    fig = go.Figure()
    models = list(dict.fromkeys(frame["model"]))
    for i, model in enumerate(models):
        part = frame[frame["model"] == model]
        color = colors.get(model, _default_color(i))
        fig.add_trace(go.Violin(
            x=part["alpha"].astype(str), y=part["value"], name=model, legendgroup=model,
            box_visible=True, meanline_visible=True, points=False, line_color=color,
            offsetgroup=model, scalegroup=model))
        if intervals is not None:
            ci = intervals[intervals["model"] == model]
            fig.add_trace(go.Scatter(
                x=ci["alpha"].astype(str), y=ci["mean"], mode="markers", legendgroup=model,
                name=f"{model}: mean and CI", offsetgroup=model, marker={"color": color, "size": 9,
                                                                          "symbol": "diamond"},
                error_y={"type": "data", "symmetric": False,
                         "array": ci["ci_high"] - ci["mean"], "arrayminus": ci["mean"] - ci["ci_low"]}))
    fig.update_layout(violinmode="group", scattermode="group", xaxis={"title": "alpha", "type": "category"},
                      yaxis={"title": metric}, legend=TOP_LEGEND, margin={"t": 70})
    return fig


def change_summary(frame: pd.DataFrame, metric: str, *, expected_sign: int | None = None) -> go.Figure:
    """One metric's change per cell, sorted, with its interval, on the scale the tables report it
    (`frame`: cell, scale, change_pct, ci_low, ci_high, change, change_low, change_high; the %
    change where the scale is log_ratio, else the difference, in CHANGE_UNITS); bars agreeing with
    `expected_sign` (the paper's direction) are coloured as such (Figure 3a)."""
    percent = (frame["scale"] == "log_ratio").to_numpy()
    ordered = pd.DataFrame({
        "cell": frame["cell"].to_numpy(),
        "value": np.where(percent, frame["change_pct"], frame["change"]),
        "low": np.where(percent, frame["ci_low"], frame["change_low"]),
        "high": np.where(percent, frame["ci_high"], frame["change_high"])})
    ordered = ordered.sort_values("value").reset_index(drop=True)
    if expected_sign is None:
        colors = [POST_COLOR] * len(ordered)
    else:
        colors = [POST_COLOR if np.sign(v) == expected_sign else BASE_COLOR
                  for v in ordered["value"]]
    unit = "%" if percent.all() and len(frame) else f"Δ {CHANGE_UNITS[metric]}".strip()
    fig = go.Figure(go.Bar(
        x=ordered["cell"], y=ordered["value"], marker_color=colors,
        error_y={"type": "data", "symmetric": False, "array": ordered["high"] - ordered["value"],
                 "arrayminus": ordered["value"] - ordered["low"]},
        hovertemplate="%{x}<br>change %{y:.3g}<extra></extra>"))
    fig.add_hline(y=0, line_width=1, line_color="gray")
    fig.update_layout(yaxis={"title": f"{metric}: change after post-training ({unit})"},
                      xaxis={"title": "", "tickangle": -45, "type": "category"},
                      margin={"t": 40, "b": 120}, showlegend=False)
    return fig


# The controls figure's bars, in order: the change, its two parts (same tokens / same weights) and
# the null model's change, with their colours.
CONTROL_BARS = (("change", "change", POST_COLOR), ("weights", "weights part", "#72B7B2"),
                ("tokens", "tokens part", "#B279A2"), ("null", "null model's change", "#9D9D9D"))


def controls_bars(frame: pd.DataFrame) -> go.Figure:
    """Per metric (one panel each: their units differ), grouped bars of the change post - base, its
    weights and tokens parts and the null model's change, with their intervals. `frame` (the read
    model's controls table): metric, then for each of change, weights, tokens, null the value
    `<bar>` and `<bar>_low`, `<bar>_high` (NaN where not computed: no bar)."""
    metrics = list(frame["metric"])
    fig = make_subplots(rows=1, cols=max(len(metrics), 1), subplot_titles=metrics)
    for column, (_, row) in enumerate(frame.iterrows(), start=1):
        for bar, label, color in CONTROL_BARS:
            value = row.get(bar, np.nan)
            low, high = row.get(f"{bar}_low", np.nan), row.get(f"{bar}_high", np.nan)
            error = ({"type": "data", "symmetric": False, "array": [high - value],
                      "arrayminus": [value - low]} if np.isfinite(low) else None)
            fig.add_trace(go.Bar(x=[label], y=[value], name=label, marker_color=color,
                                 error_y=error, legendgroup=bar, showlegend=column == 1,
                                 hovertemplate=f"{row['metric']} · {label}: %{{y:.3g}}"
                                               f"<extra></extra>"),
                          row=1, col=column)
        fig.add_hline(y=0, line_width=1, line_color="gray", row=1, col=column)
    fig.update_xaxes(showticklabels=False)
    # The legend sits above the panels' titles.
    fig.update_layout(barmode="group", legend={**TOP_LEGEND, "y": 1.14}, margin={"t": 110},
                      yaxis={"title": "post − base (metric units)"})
    return fig


# --- Trajectory of a series -----------------------------------------------------------------------

# The interval band: the post model's colour, translucent, so the line reads on it in both themes.
BAND_COLOR = "rgba(245, 133, 24, 0.25)"
# Lines of the consistent edges: ten mid-tone colours (readable on light and dark), then dashed.
EDGE_LINE_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B",
                    "#9D755D", "#FF9DA6", "#9D9D9D")


def _step_axis(steps) -> dict:
    """An x axis ticked at the base (0) and each checkpoint's step, while they are few enough to
    label (no half steps between checkpoints 1..n)."""
    ticks = sorted({0, *(int(step) for step in steps)})
    return {"tickmode": "array", "tickvals": ticks} if len(ticks) <= 12 else {}


def trajectory_metrics_figure(frame: pd.DataFrame, *, x_title: str = "training step",
                              columns: int = 3) -> go.Figure:
    """Each metric's change post - base over the steps of a series, one panel per metric (their
    units differ). `frame` (the read model's trajectory_metrics): step, post_label, metric, value,
    low, high, significant. The line runs from the base (step 0, change 0) through the
    checkpoints; the band is the interval; a filled marker where it excludes 0, hollow elsewhere."""
    names = list(dict.fromkeys(frame["metric"]))
    rows = max(-(-len(names) // columns), 1)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=names, horizontal_spacing=0.07,
                        vertical_spacing=0.16)
    for i, name in enumerate(names):
        row, col = i // columns + 1, i % columns + 1
        part = frame[frame["metric"] == name].sort_values("step")
        band = part.dropna(subset=["low", "high"])
        fig.add_trace(go.Scatter(
            x=[*band["step"], *band["step"][::-1]], y=[*band["high"], *band["low"][::-1]],
            mode="lines", fill="toself", fillcolor=BAND_COLOR, line={"width": 0}, hoverinfo="skip",
            name="interval", legendgroup="interval", showlegend=i == 0), row=row, col=col)
        fig.add_trace(go.Scatter(
            x=part["step"], y=part["value"], mode="lines+markers", name="change post − base",
            legendgroup="change", showlegend=i == 0, line={"color": POST_COLOR, "width": 2},
            marker={"color": POST_COLOR, "size": 8,
                    "symbol": ["circle" if s else "circle-open" for s in part["significant"]]},
            customdata=part[["low", "high", "post_label"]].to_numpy(),
            hovertemplate=(f"{name} · %{{customdata[2]}} (step %{{x}})<br>change %{{y:.4g}} "
                           "[%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>")),
            row=row, col=col)
        fig.add_hline(y=0, line_width=1, line_color="gray", row=row, col=col)
    fig.update_xaxes(**_step_axis(frame["step"]))
    fig.update_xaxes(title_text=x_title, row=rows)
    # The legend sits above the panels' titles.
    fig.update_layout(height=280 * rows + 120, legend={**TOP_LEGEND, "y": 1.0 + 0.3 / rows},
                      margin={"t": 100})
    return fig


def consistent_edge_lines(frame: pd.DataFrame, steps: list[int], measure: str, *,
                          x_title: str = "training step") -> go.Figure:
    """The change of each edge of `frame` (the read model's edge_trends(...).table: edge, and the
    change at each of `steps` in core.trajectory.step_column(step)) over the steps, from 0 at the
    base (step 0): one line per edge, in the table's order."""
    fig = go.Figure()
    for i, row in enumerate(frame.to_dict("records")):
        fig.add_trace(go.Scatter(
            x=[0, *steps], y=[0.0, *(row[step_column(step)] for step in steps)],
            mode="lines+markers", name=row["edge"],
            line={"color": EDGE_LINE_COLORS[i % len(EDGE_LINE_COLORS)],
                  "dash": "dash" if i // len(EDGE_LINE_COLORS) % 2 else "solid", "width": 2},
            hovertemplate=f"{row['edge']}<br>step %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.add_hline(y=0, line_width=1, line_color="gray")
    fig.update_layout(xaxis={"title": x_title, **_step_axis(steps)},
                      yaxis={"title": f"edge change ({measure})"},
                      legend={"title": {"text": "edge"}}, margin={"t": 30})
    return fig


# --- Faithfulness and the token view (docs/method.md section 8) ----------------------------------

# Ablated edges by stratum: the largest by |W| and the random draw; both read on light and dark.
STRATUM_COLORS = {"top": "#E45756", "random": "#9D9D9D"}
STRATUM_NAMES = {"top": "top by |W|", "random": "drawn at random"}
# Token axes name every token up to this many; longer answers show positions (tokens on hover).
MAX_TOKEN_TICKS = 60


def _signed_log(values, linear: float) -> np.ndarray:
    """asinh(x / linear): linear within about ±linear, sign-preserving log10-like beyond it."""
    return np.arcsinh(np.asarray(values, dtype=np.float64) / linear)


def _signed_log_axis(values: np.ndarray) -> tuple[float, dict]:
    """The linear width of `_signed_log` for these values (their 5% quantile of nonzero |x|, so
    most points sit on the log part) and an axis of ticks at 0 and ±powers of ten from ten times
    that width on (closer ones would crowd 0), labelled with the values themselves."""
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    if magnitudes.size == 0:
        return 1.0, {}
    linear = float(np.quantile(magnitudes, 0.05))
    low, high = int(np.ceil(np.log10(linear))) + 1, int(np.ceil(np.log10(magnitudes.max())))
    exponents = list(range(low, high + 1))[::max(1, -(-(high - low + 1) // 6))]
    ticks = [0.0] + [sign * 10.0 ** e for e in exponents for sign in (1, -1)]
    return linear, {"tickmode": "array", "tickvals": _signed_log(ticks, linear).tolist(),
                    "ticktext": ["0" if t == 0 else f"{'−' if t < 0 else ''}1e{int(round(np.log10(abs(t))))}"
                                 for t in ticks]}


def _agreement_title(label: str, rows: pd.DataFrame) -> str:
    """The model's label over one line per stratum: its per-question Spearman and sign agreement,
    averaged over questions (cross-fitted; docs/method.md section 8)."""
    lines = [label]
    for stratum in STRATUM_NAMES:
        chosen = rows[rows["stratum"] == stratum].set_index("statistic")["value"]
        if chosen.empty:
            continue
        shown = {name: "undefined" if pd.isna(chosen.get(name)) else f"{chosen.get(name):.2f}"
                 for name in ("spearman", "sign_agreement")}
        lines.append(f"{STRATUM_NAMES[stratum]}: Spearman {shown['spearman']} · same sign "
                     f"{shown['sign_agreement']}")
    return "<br>".join(lines)


def faithfulness_scatter(edges: pd.DataFrame, agreement: pd.DataFrame) -> go.Figure:
    """W against the real ablation effect Delta of every ablated edge, one panel per model (base
    first), coloured by stratum, both axes on one sign-preserving log scale (asinh) so that the
    diagonal Delta = W is the line of perfect agreement. `edges`: label, sample_id, src, dst,
    stratum, w, delta (the read model's faithfulness_edges); `agreement` (faithfulness_agreement)
    puts each model's per-stratum agreement in its panel title."""
    labels = list(dict.fromkeys(edges["label"]))
    values = edges[["w", "delta"]].to_numpy(dtype=np.float64).ravel()
    linear, axis = _signed_log_axis(values)
    fig = make_subplots(rows=1, cols=max(len(labels), 1), horizontal_spacing=0.08,
                        subplot_titles=[_agreement_title(label, agreement[agreement["label"] == label])
                                        for label in labels])
    span = float(np.abs(_signed_log(values[np.isfinite(values)], linear)).max()) if values.size else 1.0
    for col, label in enumerate(labels, start=1):
        part = edges[edges["label"] == label]
        for stratum, color in STRATUM_COLORS.items():
            chosen = part[part["stratum"] == stratum]
            if chosen.empty:
                continue
            fig.add_trace(go.Scatter(
                x=_signed_log(chosen["w"], linear), y=_signed_log(chosen["delta"], linear),
                mode="markers", name=STRATUM_NAMES[stratum], legendgroup=stratum,
                showlegend=col == 1, marker={"color": color, "size": 6, "opacity": 0.75},
                customdata=chosen[["sample_id", "src", "dst", "w", "delta"]].to_numpy(dtype=object),
                hovertemplate=("%{customdata[1]} → %{customdata[2]} · %{customdata[0]}<br>"
                               "W %{customdata[3]:.4g}<br>Δ %{customdata[4]:.4g}<extra>"
                               f"{label}</extra>")), row=1, col=col)
        fig.add_trace(go.Scatter(x=[-span, span], y=[-span, span], mode="lines", name="Δ = W",
                                 legendgroup="diagonal", showlegend=col == 1, hoverinfo="skip",
                                 line={"color": "gray", "dash": "dash", "width": 1}), row=1, col=col)
    fig.update_xaxes(title_text="W (edge score)", tickangle=0, **axis)
    fig.update_yaxes(title_text="Δ = L(edge removed) − L", **axis)
    fig.update_annotations(font_size=13)
    # The legend sits above the panels' three-line titles.
    fig.update_layout(height=520, legend={**TOP_LEGEND, "y": 1.27}, margin={"t": 160})
    return fig


def _translucent(color: str, alpha: float) -> str:
    red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, {alpha})"


def recovery_figure(curves: pd.DataFrame, areas: pd.DataFrame | None = None) -> go.Figure:
    """Circuit recovery f(k) of each model over the kept fraction k of real edges (log axis; k = 0,
    where f = 0 by definition, cannot sit on it), with its interval as a band. `curves`: label,
    role, fraction, n_kept, f, low, high (the read model's recovery_curves); `areas`
    (recovery_areas) adds each model's area to its legend entry."""
    area_of = {} if areas is None else dict(zip(areas["label"], areas["area"]))
    fig = go.Figure()
    for label in dict.fromkeys(curves["label"]):
        part = curves[(curves["label"] == label) & (curves["fraction"] > 0)]
        color = BASE_COLOR if part["role"].iloc[0] == "base" else POST_COLOR
        band = part.dropna(subset=["low", "high"])
        if not band.empty:
            fig.add_trace(go.Scatter(
                x=[*band["fraction"], *band["fraction"][::-1]], y=[*band["high"], *band["low"][::-1]],
                fill="toself", fillcolor=_translucent(color, 0.2), line={"width": 0},
                hoverinfo="skip", legendgroup=label, showlegend=False))
        name = label if label not in area_of else f"{label} (area {area_of[label]:.3f})"
        fig.add_trace(go.Scatter(
            x=part["fraction"], y=part["f"], mode="lines+markers", name=name, legendgroup=label,
            line={"color": color, "width": 2}, marker={"color": color, "size": 6},
            customdata=part[["n_kept", "low", "high"]].to_numpy(dtype=np.float64),
            hovertemplate=("k %{x:.3g} (%{customdata[0]:.0f} edges kept)<br>f %{y:.3f} "
                           "[%{customdata[1]:.3f}, %{customdata[2]:.3f}]<extra>" + label
                           + "</extra>")))
    for level in (0.0, 1.0):
        fig.add_hline(y=level, line_width=1, line_color="gray", line_dash="dot")
    fig.update_layout(xaxis={"type": "log", "title": "kept fraction k of real edges (log scale)"},
                      yaxis={"title": "recovery f(k)"}, legend=TOP_LEGEND, margin={"t": 70})
    return fig


def _token_text(token: str) -> str:
    """A token piece as an axis label: its whitespace made visible."""
    return token.replace("\n", "⏎").replace(" ", "␣") or "∅"


def token_view_figure(view: dict) -> go.Figure:
    """Which answer tokens carry the change: per model (one heatmap each, base first), the term of
    each answer token fed as input in each chosen edge's W (rows: the edges, most changed first;
    columns: the tokens), on one diverging scale centred at 0 for all models. `view`: a stored
    token view (core/tokens.py; the read model's token_view)."""
    edges = [f"{e['src']} → {e['dst']}" for e in view["edges"]]
    models = view["models"]
    values = np.concatenate([np.ravel(m["contributions"]) for m in models] or [np.zeros(0)])
    bound = symmetric_range(values)
    titles = [f"{m['label']} ({m['role']}): {len(m['tokens'])} answer tokens, T_cut {m['t_cut']}"
              for m in models]
    fig = make_subplots(rows=len(models), cols=1, subplot_titles=titles, vertical_spacing=0.18)
    for row, model in enumerate(models, start=1):
        tokens = [_token_text(t) for t in model["tokens"]]
        positions = list(range(len(tokens)))
        z = np.array(model["contributions"], dtype=np.float64).reshape(len(edges), len(tokens))
        prompt = np.array(model["first_token"]) + np.array(model["prompt_rest"])
        custom = np.empty(z.shape + (4,), dtype=object)
        custom[..., 0] = np.array(tokens, dtype=object)[None, :] if tokens else ""
        custom[..., 1] = np.array(model["w"])[:, None]
        custom[..., 2] = prompt[:, None]
        custom[..., 3] = np.array(edges, dtype=object)[:, None]
        fig.add_trace(go.Heatmap(
            z=z, x=positions, y=list(range(len(edges))), customdata=custom, colorscale=DIVERGING,
            zmid=0.0, zmin=-bound, zmax=bound, showscale=row == 1,
            colorbar={"title": {"text": "term of W", "side": "right"}},
            hovertemplate=("%{customdata[3]} · token %{x} %{customdata[0]}<br>term %{z:.4g}<br>"
                           "W %{customdata[1]:.4g} (prompt's part %{customdata[2]:.4g})"
                           f"<extra>{model['label']}</extra>")), row=row, col=1)
        ticks = ({"tickmode": "array", "tickvals": positions, "ticktext": tokens, "tickangle": -60}
                 if len(tokens) <= MAX_TOKEN_TICKS else {"title_text": "answer position"})
        fig.update_xaxes(row=row, col=1, **ticks)
        fig.update_yaxes(row=row, col=1, tickmode="array", tickvals=list(range(len(edges))),
                         ticktext=edges, autorange="reversed")
    fig.update_layout(height=len(models) * (24 * len(edges) + 190), margin={"t": 50, "b": 40})
    return fig


# --- Circuit graph --------------------------------------------------------------------------------

def _curve(p0: tuple[float, float], p1: tuple[float, float], n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic Bezier from p0 to p1 bowed sideways, more for edges that skip more layers (up to a
    cap that keeps them inside the panel), so edges in the same lane stay apart."""
    (x0, y0), (x1, y1) = p0, p1
    bow = 0.7 * (1.0 - np.exp(-abs(y1 - y0) / 6.0)) * (1.0 if x0 == x1 else 0.3)
    side = -1.0 if (x0 + x1) / 2 < 0.5 else 1.0
    cx, cy = (x0 + x1) / 2 + side * bow, (y0 + y1) / 2
    t = np.linspace(0.0, 1.0, n)
    return ((1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x1,
            (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y1)


def circuit_figure(circuit: Circuit, *, highlight: str | None = None,
                   width_classes: int = 5) -> go.Figure:
    """A core.circuit.Circuit drawn as a layered DAG for both models side by side on its one layout:
    width proportional to each model's mean |W| (one scale for both panels), colour by the sign of
    its mean W; `highlight` (an edge name) is drawn on top in both panels."""
    edges = circuit.edges
    meta = circuit.metadata
    positions = {node: (data["x"], data["y"]) for node, data in circuit.graph.nodes(data=True)}
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(meta["base_label"], meta["post_label"]))
    strongest = float(np.nanmax(edges[["base_mean_abs", "post_mean_abs"]].to_numpy())) if len(edges) else 1.0
    strongest = strongest if strongest > 0 else 1.0
    nodes = list(circuit.graph.nodes)
    ends = [(src, node_of_slot(dst)) for src, dst in zip(edges["src"], edges["dst"])]
    for col, side in ((1, "base"), (2, "post")):
        values = edges[f"{side}_mean_abs"].to_numpy()
        signs = np.sign(edges[f"{side}_mean_signed"].to_numpy())
        classes = np.minimum((values / strongest * width_classes).astype(int), width_classes - 1)
        # Edges grouped by (width class, sign): a handful of traces instead of one per edge.
        for width in range(width_classes):
            for sign, color in ((1.0, POST_COLOR if side == "post" else BASE_COLOR), (-1.0, "#9D9D9D")):
                chosen = edges[(classes == width) & ((signs >= 0) == (sign > 0))]
                if chosen.empty:
                    continue
                xs: list[float] = []
                ys: list[float] = []
                for src, dst in zip(chosen["src"], chosen["dst"]):
                    cx, cy = _curve(positions[src], positions[node_of_slot(dst)])
                    xs += [*cx, None]
                    ys += [*cy, None]
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line={"color": color, "width": 0.6 + 1.6 * width},
                                         opacity=0.75), row=1, col=col)
        # Hover points at the middle of each edge, with both models' values.
        mids = [_curve(positions[s], positions[d], n=3) for s, d in ends]
        fig.add_trace(go.Scatter(
            x=[m[0][1] for m in mids], y=[m[1][1] for m in mids], mode="markers", showlegend=False,
            marker={"size": 6, "color": "rgba(0,0,0,0)"}, text=edges["edge"],
            customdata=edges[["base_mean_abs", "post_mean_abs", "rel_change"]].to_numpy(),
            hovertemplate=("%{text}<br>" + f"{meta['base_label']}: %{{customdata[0]:.6g}}<br>"
                           f"{meta['post_label']}: %{{customdata[1]:.6g}}<br>"
                           "relative change %{customdata[2]:.3g}<extra></extra>")), row=1, col=col)
        if highlight is not None and highlight in set(edges["edge"]):
            row = edges[edges["edge"] == highlight].iloc[0]
            cx, cy = _curve(positions[row["src"]], positions[node_of_slot(row["dst"])])
            fig.add_trace(go.Scatter(x=cx, y=cy, mode="lines", showlegend=False, hoverinfo="skip",
                                     line={"color": "#D62728", "width": 5}), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=[positions[n][0] for n in nodes], y=[positions[n][1] for n in nodes],
            mode="markers+text", text=nodes, textposition="middle center", showlegend=False,
            marker={"size": 22, "color": "#DDDDDD", "line": {"color": "#555555", "width": 1}},
            textfont={"size": 9, "color": "#111111"}, hoverinfo="text"), row=1, col=col)
    fig.update_xaxes(visible=False, range=[-0.9, 1.9])
    fig.update_yaxes(visible=False)
    fig.update_layout(height=max(500, 26 * meta["n_layers"] + 120), margin={"t": 50, "b": 10},
                      showlegend=False)
    return fig


def _default_color(index: int) -> str:
    return (BASE_COLOR, POST_COLOR, "#54A24B", "#B279A2", "#9D755D")[index % 5]
