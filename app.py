"""circuitdiff dashboard, and its Overview page: `make dashboard`, or
`streamlit run app.py [-- --read-only]`.

Overview: Table 1 (activation intensity, information complexity, edge entropy, kurtosis, diversity;
base -> post) over the cached runs it can pool, and the Figure-3a summary of inter-sample diversity.
It pools only cells with every selected question scored, one cell per run and T_cut, from runs with
the same score and selection settings (core.query's `pooling`), and says which cells it left out and
why. The other pages are pages/*.py; every page draws the same sidebar (pages/_shared), whose
selection is kept in the URL's query string. Read-only mode (`-- --read-only` or
CIRCUITDIFF_READ_ONLY=1) hides Compute, for presenting. The pages read the result cache
(CIRCUITDIFF_CACHE, else cache/circuitdiff.duckdb) only through core.query, which hands them every
view already shaped; none imports a model library.
"""

import numpy as np
import pandas as pd
import streamlit as st

from core import figures
from core.query import METRICS, PAPER_DIRECTION, PRIMARY_MARK, overview_cell
from pages._shared import layout, selection

# Green where a clear change goes the way the paper reports for online RL, red where it goes against
# it; both mid-tones so they read on light and dark backgrounds.
DIRECTION_COLORS = {"as paper": "#2E9E44", "against paper": "#D64545"}
# The paper's Table-1 metrics and diversity, with the bin-free edge entropy beside complexity: it
# measures the same spread of attribution without a bin count to choose and has a per-sample form;
# a complexity change it does not share may come from the binning.
TABLE1_METRICS = ["intensity", "complexity", "edge_entropy", "kurtosis", "diversity"]
CELL_INDEX = ["pair", "dataset", "post_label", "alphas"]
# Marks a change that does not exceed its null model's (core.query's null_marks).
WITHIN_NULL = "◇"


def cell(row: pd.Series, level: float) -> str:
    """The cell as every output prints it (core.query's overview_cell), and ◇ where the change does
    not exceed its null model's."""
    within_null = f" {WITHIN_NULL}" if row.get("exceeds_null") is False else ""
    return overview_cell(row, level) + within_null


def left_out_lines(left_out: pd.DataFrame) -> str:
    return "; ".join(f"{r.pair} · {r.post_label} · {r.dataset} · α={r.alpha:g}: {r.left_out}"
                     for r in left_out.itertuples())


sel = layout.page_header("Overview")
if sel is not None:
    layout.report_download(sel)
    cache = selection.cache()
    pooling = cache.pooling()
    left_out = pooling[~pooling["pooled"].astype(bool)]
    chosen = st.multiselect("Metrics", list(METRICS), default=TABLE1_METRICS,
                            help="edge_entropy and output_entropy are this project's "
                                 "reconstructions; the paper makes no claim about them")
    if not chosen:
        st.info("Choose at least one metric.")
        st.stop()
    long = cache.overview(sel.metrics, chosen)
    if long.empty:
        st.info("No cached run has an alpha with every selected question scored for every model yet "
                "(the Overview pools complete cells only); come back when a job has scored them "
                "(Compute page)." + (f" Left out: {left_out_lines(left_out)}." if len(left_out) else ""))
        st.stop()
    level = f"{sel.metrics.ci_level:.0%}"
    alpha = 1 - sel.metrics.ci_level
    st.markdown(
        f"Each cell: base → post-trained and the change with its {level} interval (paired "
        "bootstrap-t over questions): intensity in % (from the interval of log(post/base)); "
        "complexity, edge and output entropy as differences Δ in nats; kurtosis and diversity as "
        "differences. ▲/▼ and a colour where that interval excludes 0: "
        f"<span style='color:{DIRECTION_COLORS['as paper']}'>green</span> where the change "
        "matches the paper's report for online RL (intensity, complexity and diversity up, "
        f"kurtosis down), <span style='color:{DIRECTION_COLORS['against paper']}'>red</span> "
        "where it goes against it. p: the paired permutation test of the change (base and post "
        "swapped within questions); Holm: that p adjusted across every cell shown, \\* where it "
        f"is at most {alpha:g}. {PRIMARY_MARK}: a primary cell, declared before looking (sidebar → "
        f"Metric conventions → primary: `{sel.metrics.primary}`); a claim rests on its own p.",
        unsafe_allow_html=True)
    marks = cache.null_marks(sel.metrics)
    long = long.merge(marks, on=["run_key", "post_label", "alpha", "metric"], how="left")
    long["exceeds_null"] = long["exceeds_null"].astype(object).where(long["exceeds_null"].notna(),
                                                                     None)
    shown = long.assign(text=long.apply(cell, axis=1, level=alpha))
    grid = shown.pivot_table(index=CELL_INDEX, columns="metric", values="text", aggfunc="first")
    direction = shown.pivot_table(index=CELL_INDEX, columns="metric", values="direction",
                                  aggfunc="first")
    grid = grid[[m for m in chosen if m in grid.columns]]
    direction = direction[grid.columns]
    frame = grid.reset_index()
    colors = pd.DataFrame("", index=frame.index, columns=frame.columns)
    for metric in grid.columns:
        colors[metric] = [f"color: {DIRECTION_COLORS[d]}" if d in DIRECTION_COLORS else ""
                          for d in direction[metric].to_numpy()]
    layout.table(frame.style.apply(lambda _: colors, axis=None), "metric_table", data=long,
                 hide_index=True)
    tested = int(np.isfinite(long["p"]).sum())
    significant = int((long["p_holm"] <= alpha).sum())
    primary = long[long["primary"].astype(bool)]
    primary_lines = "; ".join(
        f"{r.pair} · {r.post_label} · {r.metric} at α={r.alphas}: p={r.p:.2g}"
        f" ({'below' if r.p <= alpha else 'not below'} {alpha:g})"
        for r in primary.itertuples()) or "none among the cells shown"
    st.caption(
        f"Pooled: {long['run_key'].nunique()} run(s), {len(grid)} (run, post model, T_cut) cells; "
        f"alphas with one T_cut are one cell. Metric conventions key {sel.metrics.key()} (sidebar → "
        f"Metric conventions). \\* marks {significant} of the {tested} tests shown after Holm's "
        f"adjustment across all of them (family-wise error {alpha:g}); the raw p is beside each. "
        f"Primary cells ({PRIMARY_MARK}): {primary_lines}.")
    within = int((long["exceeds_null"] == False).sum())  # noqa: E712 (None: no null run)
    with_null = int(long["exceeds_null"].notna().sum())
    st.caption(
        f"{WITHIN_NULL} marks a change that does not exceed its null model's (a matched random "
        f"perturbation of the base, or a seed null, at the nearest T_cut): {within} of the "
        f"{with_null} cells with a null run; cells without a mark and without a null run were "
        f"not controlled (`--controls perturb`). Controls page: the null's change beside each.")
    if len(left_out):
        st.caption(f"Left out: {len(left_out)} cell(s), listed below.")
        with st.expander(f"Cells left out ({len(left_out)})"):
            layout.table(left_out, "cells_left_out", hide_index=True)

    st.subheader("Inter-sample diversity (Figure 3a)")
    diversity = cache.overview(sel.metrics, ["diversity"])
    # A cell is named by pair, dataset and its alphas; the post model too where a run has several.
    series = diversity.groupby("run_key")["post_label"].transform("nunique") > 1
    diversity = diversity.assign(cell=diversity["pair"]
                                 + np.where(series, " · " + diversity["post_label"], "")
                                 + " · " + diversity["dataset"] + " · α=" + diversity["alphas"])
    summary = cache.diversity_summary(sel.metrics)
    overall = summary[summary["pair"] == "all"].iloc[0]
    st.markdown(f"Diversity rose after post-training in **{overall['rose']} of {overall['cells']}** "
                f"pooled cells ({overall['rose_ci_above_zero']} with the interval above 0; it fell "
                f"in {overall['fell']}, {overall['fell_ci_below_zero']} with the interval below 0), "
                f"mean change **Δ{overall['mean_change']:+.3g}** (a mean point change of "
                f"{overall['mean_change_pct']:+.1f}% of the base's value). The paper: higher after "
                f"RL in 39 of 41 cells, +7.6% on average.")
    layout.plot(figures.change_summary(diversity, "diversity",
                                        expected_sign=PAPER_DIRECTION["diversity"]),
                "diversity_change", sel)
    st.caption("One bar per pooled cell, sorted: orange where diversity rose (as the paper reports "
               "for RL), blue where it fell; whiskers: the change's bootstrap-t interval "
               "(diversity is reported as the difference post − base).")
    layout.table(summary, "diversity_summary", hide_index=True)
