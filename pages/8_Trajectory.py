"""Trajectory: a series (a base and checkpoints along its post-training) over training steps. Each
metric's change post - base at every step with its interval, the edge-change heatmap at the step a
slider picks, and each edge's trend over the steps against a permutation null (docs/method.md
section 7, "Trajectory")."""

import streamlit as st

from core import figures
from core.query import EDGE_MEASURES
from pages._shared import layout, selection, widgets

HOW_TO_COMPUTE = (
    "A series is a base and several checkpoints of its post-training: a `[series.NAME]` entry in "
    "core/pairs.toml whose `posts` list each checkpoint with its training step (`step = 200`, "
    "increasing; the base is step 0). Compute it like a pair: `python -m core run --pair NAME "
    "--dataset DATASET ...` (or on the Compute page).")
MEASURE_HELP = ("normalised (the default here): mean|W_post| - mean|W_base| over the base's mean |W| "
                "of all edges, one scale for every edge and step, so weak edges do not dominate the "
                "ranking; ratio: relative to the edge's own base strength; difference: in |W| units")


def series_choice(row) -> dict[str, str]:
    """The sidebar's selection of the series run `row` (of series_runs)."""
    return selection.run_choice(row.name, row.dataset, row.run_key)


cache = selection.cache()
series = cache.series_runs()
if not series.empty and selection.sidebar_choice("pair") is None:
    # Nothing chosen yet in this session or link: open on the first series, not the first pair.
    st.session_state.update(series_choice(next(series.itertuples())))

sel = layout.page_header("Trajectory",
                         links=("trajectory.step", "trajectory.measure", "trajectory.k"))
if sel is None:
    if series.empty:
        st.caption(HOW_TO_COMPUTE)  # under the empty cache's message
else:
    layout.report_download(sel)  # the sidebar's run, as on every result page
    if series.empty:
        st.info(f"No series in this cache yet. {HOW_TO_COMPUTE}", icon=":material/info:")
        st.stop()
    if sel.run_key not in set(series["run_key"]):
        st.info(f"The sidebar's run, **{sel.pair}**, compares one post model with its base; this "
                f"page shows a series. Pick one:", icon=":material/info:")
        for row in series.itertuples():
            st.button(f"{row.name} · {row.dataset} · {row.n_steps} checkpoints",
                      key=f"trajectory.pick.{row.run_key}", on_click=st.session_state.update,
                      args=(series_choice(row),))
        st.stop()
    layout.require_pairs(sel)
    run = series.set_index("run_key").loc[sel.run_key]
    steps, labels = list(run["steps"]), dict(zip(run["steps"], run["post_labels"]))
    x_title = "training step" if run["declared"] else "checkpoint (series order)"
    if not run["declared"]:
        st.caption(f"{sel.pair} declares no training steps (pairs.toml `step`): its post models "
                   f"are shown in the series' order as checkpoints 1..{len(steps)}.")
    st.caption(f"Every checkpoint of {sel.pair} against the base {sel.base_label} at alpha "
               f"{sel.alpha:g}; the sidebar's post model does not apply here.")

    st.subheader("Metrics over training steps")
    metrics = cache.trajectory_metrics(sel.run_key, sel.alpha, granularity=sel.granularity,
                                       settings=sel.metrics)
    layout.plot(figures.trajectory_metrics_figure(metrics, x_title=x_title),
                "trajectory_metrics", sel)
    st.caption(f"Each panel: the metric's change post − base (metric units; the base is step 0), "
               f"its {sel.metrics.ci_level:.0%} paired-bootstrap interval as the band, a filled "
               f"marker where the interval excludes 0.")
    with st.expander("Table"):
        layout.table(metrics, "trajectory_metrics", hide_index=True)

    st.subheader("Edge change at a step")
    left, right = st.columns([3, 2])
    widgets.linked("trajectory.step", steps, int)
    widgets.linked("trajectory.measure", EDGE_MEASURES)
    if st.session_state.get("trajectory.step") not in steps:  # first visit, or another series'
        st.session_state["trajectory.step"] = steps[-1]
    st.session_state.setdefault("trajectory.measure", "normalised")
    step = left.select_slider("Step", steps, key="trajectory.step",
                              format_func=lambda s: f"{s} · {labels[s]}")
    measure = right.radio("Change measure", EDGE_MEASURES, horizontal=True,
                          key="trajectory.measure", help=MEASURE_HELP)
    widgets.link("trajectory.step", step)
    widgets.link("trajectory.measure", measure)
    graph, change, means = cache.trajectory_change(sel.run_key, sel.alpha, step, measure=measure,
                                                   granularity=sel.granularity,
                                                   settings=sel.metrics)
    layout.plot(figures.change_heatmap(
        graph, change, means, sel.base_label, labels[step], measure,
        title=f"edge-strength change ({measure}) at step {step}: {sel.base_label} → "
              f"{labels[step]}"), f"trajectory_edge_change_step{step}_{measure}", sel)

    st.subheader("Edges whose change trends with the step")
    trends = cache.edge_trends(sel.run_key, sel.alpha, measure=measure,
                               granularity=sel.granularity, settings=sel.metrics)
    fdr = f"{trends.fdr:g}"
    ordering = (f"all {trends.permutations:,} orderings" if trends.exact else
                f"{trends.permutations:,} random orderings")
    verdict = (f"**{trends.n_beating:,} of {trends.n_edges:,} edges beat the permutation null** "
               f"(Benjamini-Hochberg q ≤ {fdr} across the edges).")
    if not trends.can_beat:
        st.warning(f"{verdict} **With the base and {len(steps)} checkpoints no edge can beat "
                   f"it, whatever its change**: the smallest p a permutation of the step labels "
                   f"can give is {trends.smallest_p:.3g} ({ordering}), above the FDR level "
                   f"{fdr}. More checkpoints are needed (the base and n checkpoints allow p down "
                   f"to about 1/(n + 1)!).", icon=":material/warning:")
    elif trends.n_beating == 0:
        st.info(f"{verdict} The smallest p these steps allow is {trends.smallest_p:.3g} "
                f"({ordering}); Benjamini-Hochberg declares an edge at that p only where at least "
                f"{trends.needed:,} of the {trends.n_edges:,} edges reach it.",
                icon=":material/info:")
    else:
        st.success(verdict, icon=":material/check:")
    most = min(50, graph.n_edges)
    widgets.linked("trajectory.k", range(1, most + 1), int)
    if not 1 <= st.session_state.get("trajectory.k", 0) <= most:
        st.session_state["trajectory.k"] = min(10, most)
    k = st.slider("Edges shown", 1, most, key="trajectory.k")
    widgets.link("trajectory.k", k)
    edges = trends.table.head(k)
    layout.plot(figures.consistent_edge_lines(edges, steps, measure, x_title=x_title),
                "trajectory_edge_trends", sel)
    layout.table(edges, "trajectory_edge_trends", hide_index=True)
    st.caption(f"The edges with the smallest p, then the steepest. Slope: the least-squares slope "
               f"of the change ({measure}) against the step over the base (step 0, change 0) and "
               f"the checkpoints, per step, with its {sel.metrics.ci_level:.0%} BCa interval from "
               f"a paired bootstrap over the questions every model holds. p: the share of "
               f"orderings of the step labels ({ordering}) whose slope is at least as far from 0, "
               f"the same in every measure; q: Benjamini-Hochberg across all real edges. The "
               f"null is that the models' mean |W| of the edge do not depend on the step; the "
               f"bootstrap interval is per edge and not corrected for the many edges.")
