"""A run's results as one self-contained HTML file, for collaborators without the dashboard
(`python -m core report`, and the dashboard's "Download report"): Table 1 with its intervals at every
alpha, the Figure-2 edge-change heatmap, the |W| distributions and per-sample metrics, the circuit
graphs, and every setting and provenance record the cache holds for the run.

The file needs no server and no network: plotly.js is embedded once, in the head, every figure is a
div it draws (hover, zoom and the camera button work), and nothing refers to a script, stylesheet or
font elsewhere.

Sections: SECTIONS lists the builders in document order. A builder takes the ReportContext and
returns a Section, or None when the run has nothing of its kind computed; results that exist for
some runs only (the controls and faithfulness of docs/method.md section 8) join the report by adding
a builder to SECTIONS, and no empty heading is ever written.

The read model (core/query.py) calls this module (ResultCache.report_html), so this module does not
import it: views are read through the `cache` it is handed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from core import figures, metrics
from core.errors import NotFoundError
from core.faithfulness_stats import RECOVERY_TARGET
from core.settings import MetricSettings
from core.store import code_version, now

if TYPE_CHECKING:
    from core.query import ResultCache

# The change measure of the Figure-2 heatmap (docs/method.md section 6) and the circuit's size and
# ranking: the dashboard's defaults.
HEATMAP_MEASURE = "ratio"
CIRCUIT_K = 40
CIRCUIT_BY = "change"


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the report: `anchor` (its id in the table of contents), title and HTML body."""

    anchor: str
    title: str
    body: str


@dataclasses.dataclass
class ReportContext:
    """What every section builder reads: the cache, the run's row of `cache.runs()` for the post
    model, the view (granularity, metric conventions), the alphas that can be compared, and the
    alphas left out with the read model's reason."""

    cache: "ResultCache"
    run: pd.Series
    granularity: str
    settings: MetricSettings
    alphas: tuple[float, ...]
    left_out: dict[float, str]
    circuit_k: int
    created_at: dt.datetime
    _figures: int = 0

    @property
    def run_key(self) -> str:
        return str(self.run["run_key"])

    @property
    def scope(self) -> dict[str, str]:
        """The read model's keyword arguments that pick this report's view of the run."""
        return {"post_label": str(self.run["post_label"]), "granularity": self.granularity}

    @property
    def labels(self) -> tuple[str, str]:
        return str(self.run["base_label"]), str(self.run["post_label"])

    def figure(self, fig: go.Figure, name: str) -> str:
        """A figure as a div drawn by the document's one plotly.js; the camera button saves `name`."""
        self._figures += 1
        config = {"displaylogo": False, "responsive": True,
                  "toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}}
        div = fig.to_html(full_html=False, include_plotlyjs=False, config=config,
                          div_id=f"figure-{self._figures}")
        return f'<div class="figure">{div}</div>'


SectionBuilder = Callable[[ReportContext], Section | None]


def _alpha_heading(alpha: float, ctx: ReportContext) -> str:
    t_cut = dict(zip(ctx.run["alphas"], ctx.run["t_cuts"]))[alpha]
    return f"<h3>alpha {alpha:g} (T_cut = {t_cut} tokens)</h3>"


def _table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table, text escaped, floats to 4 significant digits."""
    return frame.to_html(index=False, escape=True, na_rep="", border=0, classes="data",
                         float_format=lambda v: f"{v:.4g}")


def _interval(value: tuple[float, float] | None) -> str:
    if value is None or not all(math.isfinite(v) for v in value):
        return ""
    return f"[{value[0]:.4g}, {value[1]:.4g}]"


# --- sections -------------------------------------------------------------------------------------

def table_1(ctx: ReportContext) -> Section:
    """core.metrics.grid_table at every comparable alpha (the dashboard's Overview rows): base and
    post with their intervals, the change as the Overview prints it (`reported change`,
    core.metrics.format_change) and in numbers, the permutation p and its Holm adjustment across
    this table's cells, the primary cells (MetricSettings.primary), and the direction the paper
    reports for online RL."""
    frames = []
    for alpha in ctx.alphas:
        comparison = ctx.cache.comparison(ctx.run_key, alpha, **ctx.scope, settings=ctx.settings)
        grid = metrics.grid_table([(str(ctx.run["pair"]), str(ctx.run["dataset"]), alpha,
                                    comparison)])
        changes = [comparison.metrics[metric] for metric in grid["metric"]]
        grid.insert(list(grid.columns).index("alpha") + 1, "n", comparison.n_samples)
        grid.insert(list(grid.columns).index("base") + 1, "base interval",
                    [_interval(c.base_ci) for c in changes])
        grid.insert(list(grid.columns).index("post") + 1, "post interval",
                    [_interval(c.post_ci) for c in changes])
        grid.insert(list(grid.columns).index("scale"), "reported change",
                    [metrics.format_change(metric, c.scale, c.change_pct,
                                           c.change_pct_ci or (math.nan, math.nan), c.change,
                                           c.change_ci or (math.nan, math.nan))
                     for metric, c in zip(grid["metric"], changes)])
        frames.append(grid)
    table = pd.concat(frames, ignore_index=True)
    table.insert(list(table.columns).index("p") + 1, "p_holm", metrics.holm(table["p"]))
    declared = ctx.settings.primary_cells
    table.insert(list(table.columns).index("metric") + 1, "primary",
                 ["†" if any(metric == m and math.isclose(alpha, a) for m, a in declared) else ""
                  for metric, alpha in zip(table["metric"], table["alpha"])])
    table = _merge_intervals(table.drop(columns=["pair", "dataset", "settings_key", "wilcoxon_p"]))
    table["alpha"] = [f"{a:g}" for a in table["alpha"]]
    base, post = ctx.labels
    level = f"{ctx.settings.ci_level:.0%}"
    intro = (f"<p>{html.escape(base)} → {html.escape(post)}: each metric (docs/method.md section 6) "
             f"over the n questions scored for both models, with {level} paired bootstrap-t "
             f"intervals ({ctx.settings.bootstrap} resamples; none when 0; docs/method.md section "
             f"7). <em>reported change</em>: intensity in % (from the interval of log(post/base)); "
             f"complexity, edge and output entropy as differences Δ in nats; kurtosis and "
             f"diversity as differences. <em>p</em>: the paired permutation test of the change "
             f"({ctx.settings.permutations} swaps of base and post within questions, or all of "
             f"them); <em>p_holm</em>: Holm-adjusted across this table's cells. "
             f"<em>primary</em> (†): the cells declared before looking "
             f"(<code>{html.escape(ctx.settings.primary)}</code>), each a claim tested on its own "
             f"p at {1 - ctx.settings.ci_level:g}. <em>direction</em>: for a clear change (its "
             f"interval excludes 0), whether it goes the way the paper reports for online RL "
             f"(intensity, complexity and diversity up, kurtosis down); 'no clear change' "
             f"otherwise; edge_entropy and output_entropy are this project's reconstructions, with "
             f"no paper claim.</p>")
    return Section("table-1", "Table 1: metrics before and after post-training",
                   intro + _table(table))


def _merge_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """Each pair of columns <name>_low, <name>_high as one column `<name> interval`: [low, high]."""
    for low in [c for c in table.columns if c.endswith("_low")]:
        stem = low.removesuffix("_low")
        if f"{stem}_high" in table.columns:
            table.insert(list(table.columns).index(low), f"{stem} interval",
                         [_interval((a, b)) for a, b in zip(table[low], table[f"{stem}_high"])])
            table = table.drop(columns=[low, f"{stem}_high"])
    return table


def edge_heatmaps(ctx: ReportContext) -> Section:
    base, post = ctx.labels
    parts = [f"<p>Relative change of each edge's mean |W| ({HEATMAP_MEASURE}: (post - base) / base, "
             f"docs/method.md section 6); rows are sources in computation order, columns the "
             f"destination slots in layer order; blank cells are non-edges. The colour range covers "
             f"99% of the edges; hover for both models' exact means.</p>"]
    graph = ctx.cache.graph(ctx.run_key, ctx.granularity)
    for alpha in ctx.alphas:
        means = ctx.cache.mean_matrices(ctx.run_key, alpha, **ctx.scope, settings=ctx.settings)
        change = ctx.cache.edge_change(ctx.run_key, alpha, HEATMAP_MEASURE, **ctx.scope,
                                       settings=ctx.settings)
        fig = figures.change_heatmap(graph, change, means, base, post, HEATMAP_MEASURE)
        parts += [_alpha_heading(alpha, ctx),
                  ctx.figure(fig, f"edge_change_{HEATMAP_MEASURE}_alpha{alpha:g}")]
    return Section("edge-heatmap", "Figure 2: edge-strength change", "\n".join(parts))


def distributions(ctx: ReportContext) -> Section:
    base, post = ctx.labels
    colors = {base: figures.BASE_COLOR, post: figures.POST_COLOR}
    parts = ["<p>|W| pooled over real edges and questions, per model, on a log scale (structural "
             "zeros of non-edges left out); then each per-sample metric across alphas, a violin per "
             "model with the mean and its bootstrap interval.</p>"]
    for alpha in ctx.alphas:
        values = ctx.cache.abs_values(ctx.run_key, alpha, **ctx.scope, settings=ctx.settings)
        pooled = {base: values["base"], post: values["post"]}
        parts += [_alpha_heading(alpha, ctx), '<div class="pair">',
                  ctx.figure(figures.abs_histogram(pooled, colors=colors),
                             f"abs_w_histogram_alpha{alpha:g}"),
                  ctx.figure(figures.ecdf(pooled, colors=colors), f"abs_w_ecdf_alpha{alpha:g}"),
                  "</div>"]
    by_alpha = ctx.cache.per_sample_by_alpha(ctx.run_key, ctx.alphas, **ctx.scope,
                                             settings=ctx.settings)
    for metric in metrics.PER_SAMPLE_METRICS:
        values, intervals = [], []
        for alpha, per_sample in by_alpha.items():
            change = ctx.cache.comparison(ctx.run_key, alpha, **ctx.scope,
                                          settings=ctx.settings).metrics[metric]
            for side, label, mean, interval in (("base", base, change.base, change.base_ci),
                                                ("post", post, change.post, change.post_ci)):
                values.append(pd.DataFrame({"alpha": alpha, "model": label,
                                            "value": per_sample[f"{side}_{metric}"]}))
                low, high = interval if interval is not None else (math.nan, math.nan)
                intervals.append({"alpha": alpha, "model": label, "mean": mean, "ci_low": low,
                                  "ci_high": high})
        fig = figures.per_sample_violins(pd.concat(values, ignore_index=True), metric,
                                         intervals=pd.DataFrame(intervals), colors=colors)
        parts += [f"<h3>{html.escape(metric)} per sample</h3>",
                  ctx.figure(fig, f"per_sample_{metric}")]
    return Section("distributions", "Distributions", "\n".join(parts))


def circuits(ctx: ReportContext) -> Section:
    n_edges = ctx.cache.graph(ctx.run_key, ctx.granularity).n_edges
    k = min(ctx.circuit_k, n_edges)
    parts = [f"<p>The top {k} edges by {CIRCUIT_BY} (|mean|W_post| - mean|W_base||), pruned to "
             f"those on some path from input to logits, on one layout for both models: width by "
             f"mean |W|, colour by the sign of mean W (grey: negative). <em>significant</em>: the "
             f"per-edge paired t-test at FDR {ctx.settings.fdr:g} (docs/method.md section 7).</p>"]
    for alpha in ctx.alphas:
        circuit = ctx.cache.circuit(ctx.run_key, alpha, k=k, by=CIRCUIT_BY, **ctx.scope,
                                    settings=ctx.settings)
        edges = circuit.edges[["edge", "base_mean_abs", "post_mean_abs", "abs_change",
                               "rel_change", "significant"]]
        parts += [_alpha_heading(alpha, ctx),
                  ctx.figure(figures.circuit_figure(circuit), f"circuit_alpha{alpha:g}"),
                  f"<details><summary>the {len(edges)} edges, largest |change| first</summary>"
                  f"{_table(edges)}</details>"]
    return Section("circuit", "Circuit graphs", "\n".join(parts))


def settings_and_provenance(ctx: ReportContext) -> Section:
    run = ctx.run
    record = ctx.cache.provenance(ctx.run_key)
    selection_report = run["selection_report"] or {}
    alphas = pd.DataFrame({"alpha": [f"{a:g}" for a in run["alphas"]], "T_cut": run["t_cuts"],
                           "questions scored for every model": run["n_complete"],
                           "in this report": ["yes" if a in ctx.alphas
                                              else f"no: {ctx.left_out.get(a, 'not asked for')}"
                                              for a in run["alphas"]]})
    facts = {
        "run key": ctx.run_key, "pair or series": f"{run['pair']} ({run['kind']})",
        "dataset": run["dataset"], "dataset key": record["dataset"].get("dataset_key"),
        "dataset source": record["dataset"].get("source"),
        "dataset content hash": record["dataset"].get("content_hash"),
        "dataset questions": record["dataset"].get("n_questions"),
        "questions selected": f"{run['n_selected']} of {run['n_candidates']} candidates",
        "T_bar (tokens)": f"{run['t_bar']:.4g}" if pd.notna(run["t_bar"]) else "",
        "graph": f"{run['n_layers']} layers, scored at granularity {run['granularity']}, shown at "
                 f"{ctx.granularity}",
        "run created": str(run["created_at"]), "run updated": str(run["updated_at"]),
        "code version of the run": run["code_version"],
        "git commit of the run": record["run"].get("git_commit"),
        "report written": ctx.created_at.isoformat(timespec="seconds") + " UTC",
        "code version of the report": code_version(),
        "cache": str(ctx.cache.path),
    }
    settings = {"metric conventions (this report)": {**ctx.settings.as_dict(),
                                                      "key": ctx.settings.key()},
                **{f"{group} settings (the run)": values
                   for group, values in run["settings"].items()},
                "keys": {name: record["run"].get(name)
                         for name in ("gen_key", "selection_key", "score_key")}}
    removed = selection_report.get("removed", {})
    parts = ["<h3>Run</h3>", _facts(facts), "<h3>Models</h3>", _table(record["models"]),
             "<h3>Alphas</h3>", _table(alphas), "<h3>Selection</h3>",
             "<p>The selection report stored with the run (docs/method.md section 5)"
             + (", and the questions each rule removed:</p>" if removed else ":</p>"),
             _table(pd.DataFrame({"rule": list(removed), "removed": list(removed.values())}))
             if removed else "",
             f"<pre>{html.escape(json.dumps(selection_report, indent=1, default=str))}</pre>",
             "<h3>Settings</h3>",
             *(f"<h4>{html.escape(name)}</h4><pre>{html.escape(json.dumps(values, indent=1))}</pre>"
               for name, values in settings.items())]
    return Section("provenance", "Settings and provenance", "\n".join(parts))


# Document order. A builder returning None (nothing of its kind computed for the run) is left out.
def controls(ctx: ReportContext) -> Section | None:
    """The Controls page's table and figure at every alpha where a control (cross scores, a null
    run or position parts) is computed; None where none is."""
    parts = ["<p>Each metric's change post - base (metric units) split into weights (post on the "
             "base's answers - base) and tokens (post - post on the base's answers), which add up "
             "to it; the null model's change at the nearest T_cut and whether the change exceeds "
             "it (its interval excludes 0 and lies beyond the null's change); the change without "
             "the first token's part and from the answer tokens alone; each per-sample metric's "
             "Spearman correlation with the loss (docs/method.md section 8).</p>"]
    shown = False
    for alpha in ctx.alphas:
        summary = ctx.cache.controls_summary(ctx.run_key, alpha, **ctx.scope, settings=ctx.settings)
        if len(summary.missing) == 3:
            continue
        shown = True
        parts += [_alpha_heading(alpha, ctx), _table(summary.table),
                  ctx.figure(figures.controls_bars(summary.table), f"controls_alpha{alpha:g}")]
        parts += [f"<p>Not computed: {html.escape(message)}</p>"
                  for message in summary.missing.values()]
    return Section("controls", "Controls: weights vs tokens, null model, positions",
                   "\n".join(parts)) if shown else None


def faithfulness(ctx: ReportContext) -> Section | None:
    """At every alpha of the report with a stored faithfulness control, the agreement of W with the
    real ablation effect Delta per model, and the recovery areas with their intervals; where the
    pair was also scored with another method, how the two methods agree. None where neither is
    computed."""
    base, post = ctx.labels
    wanted = sorted({*ctx.alphas, *ctx.left_out})
    computed = set(ctx.cache.faithfulness_alphas(ctx.run_key))
    parts = [f"<p>Do the scores predict real edge removal (docs/method.md section 8)? Cross-fitted: "
             f"each question's edges are ranked on the other half of the questions. Per model, "
             f"edges of each question were removed one at a time (half the largest by the other "
             f"half's mean |W|, half at random); per stratum, never pooled: the Spearman and "
             f"Pearson correlation of W with the loss change Delta and the fraction of edges with "
             f"the same sign, within each question and averaged over questions, and the "
             f"calibration slope of Delta on W. Circuit recovery keeps the top fraction k of real "
             f"edges by the other half's mean |W| and removes the rest; the area of f(k) over "
             f"log k is 1 for a perfect circuit at every k (negative where partial circuits are "
             f"worse than none); k at {RECOVERY_TARGET:g} is where f first reaches it. "
             f"{ctx.settings.ci_level:.0%} BCa intervals from a bootstrap over questions, paired "
             f"for {post} - {base} and {post} / {base}.</p>"]
    shown = False
    for alpha in wanted:
        scope = {"post_label": post}
        agreement = areas = needed = methods = None
        if alpha in computed:
            try:
                agreement = ctx.cache.faithfulness_agreement(ctx.run_key, alpha, **scope,
                                                             settings=ctx.settings)
                areas = ctx.cache.recovery_areas(ctx.run_key, alpha, **scope, settings=ctx.settings)
                needed = ctx.cache.recovery_k(ctx.run_key, alpha, **scope, settings=ctx.settings)
            except NotFoundError:  # computed for another post model of the series only
                pass
        try:
            methods = ctx.cache.method_agreement(ctx.run_key, alpha, **scope, settings=ctx.settings)
        except ValueError:  # the other method's run has too few questions scored yet
            pass
        if agreement is None and methods is None:
            continue
        shown = True
        parts.append(_alpha_heading(alpha, ctx))
        if agreement is not None:
            for table in (agreement, areas, needed):
                table.insert(table.columns.get_loc("low"), "interval", [
                    _interval((low, high)) for low, high in zip(table["low"], table["high"])])
            parts += ["<h4>W vs Delta</h4>", _table(agreement.drop(columns=["role", "low", "high"])),
                      "<h4>Recovery areas</h4>", _table(areas.drop(columns=["low", "high"])),
                      f"<h4>Edges kept for {RECOVERY_TARGET:g} recovery</h4>",
                      _table(needed.drop(columns=["low", "high"]))]
        if methods is not None:
            parts += ["<h4>Another scoring method on the same answers</h4>",
                      "<p>Spearman correlation of the two methods' mean |W| over real edges per "
                      "model, and each metric's change post - base under both (agrees: the same "
                      "sign).</p>", _table(methods)]
    return Section("faithfulness", "Faithfulness: scores vs real ablation",
                   "\n".join(parts)) if shown else None


SECTIONS: tuple[SectionBuilder, ...] = (table_1, controls, faithfulness, edge_heatmaps,
                                        distributions, circuits, settings_and_provenance)


def _facts(facts: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"
                   for name, value in facts.items() if value is not None)
    return f'<table class="facts">{rows}</table>'


# --- the document ---------------------------------------------------------------------------------

_STYLE = """
:root { color-scheme: light dark; --fg: #1F2328; --bg: #FFFFFF; --muted: #F4F5F7; --line: #D0D7DE; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #E6E6E6; --bg: #0E1117; --muted: #1B1F27; --line: #3A3F4B; } }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1400px; padding: 1rem 2rem; }
h1 { font-size: 1.7rem; } h2 { border-bottom: 1px solid var(--line); padding-bottom: .3rem; }
table.data, table.facts { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
table.data th, table.data td, table.facts th, table.facts td {
  border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
table.data th, table.facts th { background: var(--muted); }
pre { background: var(--muted); padding: .5rem; overflow-x: auto; font-size: .8rem; }
/* Plotly draws on a white paper: the figures read the same in either theme. */
.figure { background: #FFFFFF; border-radius: 4px; margin: .5rem 0 1rem; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
nav ul { columns: 2; } .note { font-size: .85rem; opacity: .8; }
"""


def build_report(cache: "ResultCache", run_key: str, *, post_label: str | None = None,
                 granularity: str | None = None, settings: MetricSettings = MetricSettings(),
                 alphas: Sequence[float] | None = None, circuit_k: int = CIRCUIT_K) -> str:
    """The report of one run and post model (None: the first) at `granularity` (None: the run's
    own) under the metric conventions `settings`, at `alphas` (None: every alpha of the run; those
    with too few questions scored are listed, not drawn). Raises NotFoundError (a KeyError) for an
    unknown run, post model or alpha and ValueError for a granularity the run cannot show."""
    runs = cache.runs()
    rows = runs[runs["run_key"] == run_key]
    if rows.empty:
        raise NotFoundError(f"no run {run_key!r} in the cache {cache.path}; `python -m core ls` "
                            f"lists the cached runs")
    if post_label is not None and post_label not in set(rows["post_label"]):
        raise NotFoundError(f"run {run_key} has no post-trained model {post_label!r}; its post "
                            f"models are {list(rows['post_label'])}")
    graph = cache.graph(run_key, granularity)  # checks the granularity
    run = rows.iloc[0] if post_label is None else rows[rows["post_label"] == post_label].iloc[0]
    wanted = list(run["alphas"]) if alphas is None else [_run_alpha(run, a) for a in alphas]
    kept, left_out = [], {}
    for alpha in wanted:
        try:
            cache.comparison(run_key, alpha, post_label=run["post_label"], granularity=granularity,
                             settings=settings)
        except ValueError as error:  # too few questions scored at this alpha yet: say so
            left_out[alpha] = str(error)
        else:
            kept.append(alpha)
    ctx = ReportContext(cache=cache, run=run, granularity=graph.granularity, settings=settings,
                        alphas=tuple(kept), left_out=left_out, circuit_k=circuit_k,
                        created_at=now())
    # With no alpha to compare, only the provenance says what the run holds.
    built = [section for builder in (SECTIONS if kept else (settings_and_provenance,))
             if (section := builder(ctx)) is not None]
    return _document(ctx, built)


def _run_alpha(run: pd.Series, alpha: float) -> float:
    """The run's own alpha equal to `alpha` up to rounding."""
    for known in run["alphas"]:
        if math.isclose(known, float(alpha), rel_tol=1e-9):
            return known
    raise NotFoundError(f"run {run['run_key']} has no alpha {alpha:g}; its alphas are "
                     f"{', '.join(f'{a:g}' for a in run['alphas'])}")


def _document(ctx: ReportContext, sections: list[Section]) -> str:
    run = ctx.run
    base, post = ctx.labels
    title = f"circuitdiff report: {run['pair']} · {run['dataset']} · {base} → {post}"
    shown = ", ".join(f"{a:g}" for a in ctx.alphas) or "none"
    notes = "".join(f"<li>alpha {alpha:g} left out: {html.escape(reason)}</li>"
                    for alpha, reason in ctx.left_out.items())
    contents = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>\n{s.body}</section>'
                     for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="circuitdiff {html.escape(code_version())}">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Run <code>{html.escape(ctx.run_key)}</code> · alphas {shown} · granularity {ctx.granularity}
· metric conventions <code>{ctx.settings.key()}</code> · written
{ctx.created_at:%Y-%m-%d %H:%M} UTC from {html.escape(str(ctx.cache.path))}.</p>
{f'<ul class="note">{notes}</ul>' if notes else ''}
<p class="note">Edge Attribution Patching scores of every edge of the residual graph, on each model's
own answers, before and after post-training (docs/method.md in the circuitdiff repository). The
figures are interactive (hover, zoom, camera button) and need no network.</p>
<nav><ul>{contents}</ul></nav>
{body}
</body></html>
"""


def write_report(path: str | os.PathLike, document: str) -> Path:
    """Write the report atomically: a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(document, encoding="utf-8")
    os.replace(temporary, path)
    return path
