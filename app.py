"""circuitdiff dashboard, and its Overview page: `make dashboard`, or
`streamlit run app.py [-- --read-only]`.

Overview: Table 1 (activation intensity, information complexity, kurtosis; base -> post) over every
cached run, and the Figure-3a summary of inter-sample diversity. The other pages are pages/*.py; every
page draws the same sidebar (pages/_shared), whose selection is kept in the URL's query string.
Read-only mode (`-- --read-only` or CIRCUITDIFF_READ_ONLY=1) hides Compute, for presenting. The pages
read the result cache (CIRCUITDIFF_CACHE, else cache/circuitdiff.duckdb) only through core.query,
which hands them every view already shaped; none imports a model library.
"""

import math

import numpy as np
import pandas as pd
import streamlit as st

from core import figures
from core.query import METRICS, PAPER_DIRECTION
from pages._shared import layout, selection

# Green where the change goes the way the paper reports for online RL, red where it goes against it;
# both mid-tones so they read on light and dark backgrounds.
DIRECTION_COLORS = {"as paper": "#2E9E44", "against paper": "#D64545"}
TABLE1_METRICS = ["intensity", "complexity", "kurtosis", "diversity"]

sel = layout.page_header("Overview")
if sel is not None:
    cache = selection.cache()
    table = cache.metric_table(sel.metrics)
    if table.empty:
        st.info("No cached run has an alpha with 2 or more questions scored for every model yet "
                "(the metrics compare samples); come back when a job has scored more (Compute "
                "page).")
        st.stop()
    st.markdown(
        "Each cell: base → post-trained, the change in % and its paired-bootstrap interval "
        f"({sel.metrics.ci_level:.0%}); ▲/▼ is the direction of the change, "
        f"<span style='color:{DIRECTION_COLORS['as paper']}'>green</span> where it matches the "
        "paper's report for online RL (intensity, complexity and diversity up, kurtosis down), "
        f"<span style='color:{DIRECTION_COLORS['against paper']}'>red</span> where it goes against "
        "it; \\* marks an interval that excludes 0.", unsafe_allow_html=True)
    chosen = st.multiselect("Metrics", list(METRICS), default=TABLE1_METRICS,
                            help="edge_entropy and output_entropy are this project's "
                                 "reconstructions; the paper makes no claim about them")
    long = table[table["metric"].isin(chosen)]

    def cell(row: pd.Series) -> str:
        if not math.isfinite(row["change_pct"]):
            return f"{row['base']:.3g} → {row['post']:.3g}"
        arrow = "▲" if row["change_pct"] > 0 else "▼" if row["change_pct"] < 0 else "="
        interval = ("" if not math.isfinite(row["ci_low"])
                    else f" [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]")
        star = "*" if row["ci_excludes_zero"] else ""
        return (f"{row['base']:.3g} → {row['post']:.3g}  {arrow} {row['change_pct']:+.1f}%"
                f"{interval}{star}")

    index = ["pair", "dataset", "post_label", "alpha"]
    shown = long.assign(text=long.apply(cell, axis=1))
    grid = shown.pivot_table(index=index, columns="metric", values="text", aggfunc="first")
    direction = shown.pivot_table(index=index, columns="metric", values="direction", aggfunc="first")
    grid = grid[[m for m in chosen if m in grid.columns]]
    direction = direction[grid.columns]
    frame = grid.reset_index()
    colors = pd.DataFrame("", index=frame.index, columns=frame.columns)
    for metric in grid.columns:
        colors[metric] = [f"color: {DIRECTION_COLORS[d]}" if d in DIRECTION_COLORS else ""
                          for d in direction[metric].to_numpy()]
    styled = frame.style.apply(lambda _: colors, axis=None).format({"alpha": "{:g}"})
    layout.table(styled, "metric_table", data=long, hide_index=True)
    st.caption(f"{long['run_key'].nunique()} run(s), {len(grid)} (run, post model, alpha) cells; "
               f"metric conventions key {sel.metrics.key()} (sidebar → Metric conventions).")

    st.subheader("Inter-sample diversity (Figure 3a)")
    diversity = table[table["metric"] == "diversity"]
    # A cell is named by pair, dataset and alpha; the post model too where a run has several.
    series = diversity.groupby("run_key")["post_label"].transform("nunique") > 1
    diversity = diversity.assign(cell=diversity["pair"]
                                 + np.where(series, " · " + diversity["post_label"], "")
                                 + " · " + diversity["dataset"] + " · α="
                                 + diversity["alpha"].map(lambda a: f"{a:g}"))
    summary = cache.diversity_summary(sel.metrics)
    overall = summary[summary["pair"] == "all"].iloc[0]
    st.markdown(f"Diversity rose after post-training in **{overall['rose']} of {overall['cells']}** "
                f"cells ({overall['rose_ci_above_zero']} with the interval above 0), mean change "
                f"**{overall['mean_change_pct']:+.1f}%**. The paper: higher after RL in 39 of 41 "
                f"cells, +7.6% on average.")
    layout.plot(figures.change_summary(diversity, "diversity",
                                        expected_sign=PAPER_DIRECTION["diversity"]),
                 "diversity_change", sel)
    st.caption("One bar per cell, sorted: orange where diversity rose (as the paper reports for RL), "
               "blue where it fell; whiskers: the change's bootstrap interval.")
    layout.table(summary, "diversity_summary", hide_index=True)
