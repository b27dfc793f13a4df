"""Edge heatmap in the style of the paper's Figure 2: the change of every edge's strength from the
base to the post-trained model, sources by destination slots in layer order, and both mean matrices."""

import numpy as np
import streamlit as st

from core import figures
from core.query import EDGE_MEASURES
from pages._shared import layout, selection, widgets

MEASURE_HELP = {
    "ratio": "(mean|W_post| - mean|W_base|) / mean|W_base|: the paper's relative edge-strength change",
    "difference": "mean|W_post| - mean|W_base|",
    "normalised": "the difference divided by the base model's mean |W| over all real edges, so weak "
                  "edges do not blow up as in the ratio",
}

sel = layout.page_header("Edge heatmap", links=("heatmap.measure", "heatmap.significant"))
if sel is not None:
    layout.report_download(sel)
    layout.require_pairs(sel)
    cache = selection.cache()
    left, middle, right = st.columns([2, 2, 3])
    widgets.linked("heatmap.measure", EDGE_MEASURES)
    widgets.linked("heatmap.significant", (True, False), widgets.parse_bool)
    measure = left.radio("Change measure", EDGE_MEASURES, horizontal=True, key="heatmap.measure",
                         format_func=str, help="\n\n".join(f"**{k}**: {v}" for k, v in MEASURE_HELP.items()))
    only_significant = middle.toggle(
        "Only significant edges", key="heatmap.significant",
        help=f"paired t-test per edge on |W_post| - |W_base| across the {sel.n_questions} questions, "
             f"Benjamini-Hochberg at FDR {sel.metrics.fdr:g} (sidebar → Metric conventions)")
    right.caption(MEASURE_HELP[measure])
    widgets.link("heatmap.measure", measure)
    widgets.link("heatmap.significant", only_significant)

    graph = cache.graph(sel.run_key, sel.granularity)
    mean = cache.mean_matrices(sel.run_key, sel.alpha, **sel.scope, settings=sel.metrics)
    change = cache.edge_change(sel.run_key, sel.alpha, measure, **sel.scope, settings=sel.metrics)
    if only_significant:
        tests = cache.significant_edges(sel.run_key, sel.alpha, **sel.scope, settings=sel.metrics)
        keep = np.zeros_like(graph.real_edge_mask)
        keep[[graph.src_index(s) for s in tests["src"]], [graph.dst_index(d) for d in tests["dst"]]] = True
        change = np.where(keep, change, np.nan)
        st.caption(f"{len(tests)} of {graph.n_edges} edges changed significantly "
                   f"(FDR {sel.metrics.fdr:g}); the others are blank.")
    layout.plot(figures.change_heatmap(graph, change, mean, sel.base_label, sel.post_label, measure),
                f"edge_change_{measure}", sel)
    st.caption("Rows: sources in computation order (input, then attention a{l} and MLP m{l} of each "
               "layer); columns: destination slots in layer order. Blank cells are non-edges (a "
               "source computed after the slot reads the residual stream). The colour range covers "
               "99% of the edges; hover for both models' exact means.")
    st.subheader("Mean |W| of each model")
    layout.plot(figures.mean_heatmaps(graph, mean["base_abs"], mean["post_abs"], sel.base_label,
                                      sel.post_label), "mean_abs_matrices", sel)
