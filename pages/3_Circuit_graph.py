"""Circuit graph: the top-k edges on some path from input to logits, drawn as a layered DAG for both
models on one shared layout, linked to a table of the same edges (select a row to highlight its edge
in both panels), downloadable as GraphML and JSON."""

import streamlit as st

from core import figures
from core.query import RANK_BY
from pages._shared import layout, selection, widgets

sel = layout.page_header("Circuit graph", links=("circuit.k", "circuit.by"))
if sel is not None:
    layout.report_download(sel)
    layout.require_pairs(sel)
    cache = selection.cache()
    left, right = st.columns(2)
    most = min(300, cache.graph(sel.run_key, sel.granularity).n_edges)
    widgets.linked("circuit.k", range(5, most + 1), int)
    widgets.linked("circuit.by", RANK_BY)
    st.session_state.setdefault("circuit.k", min(40, most))
    k = left.slider("Edges ranked (top k)", 5, most, key="circuit.k")
    by = right.radio("Rank edges by", RANK_BY, horizontal=True, key="circuit.by",
                     help="change: |mean|W_post| - mean|W_base||; strength: the larger of the two "
                          "models' mean |W|")
    widgets.link("circuit.k", k)
    widgets.link("circuit.by", by)
    circuit = cache.circuit(sel.run_key, sel.alpha, k=k, by=by, **sel.scope, settings=sel.metrics)
    edges = circuit.edges  # largest |change| first

    st.caption("Select a row of the table to highlight its edge in both panels.")
    figure_slot = st.empty()
    shown = edges[["edge", "base_mean_abs", "post_mean_abs", "abs_change", "rel_change",
                   "significant"]]
    picked = layout.table(shown, "circuit_edges", hide_index=True, on_select="rerun",
                          selection_mode="single-row", key="circuit.table")
    rows = picked.selection.rows if picked is not None else []
    highlight = shown["edge"].iloc[rows[0]] if rows else None
    name = f"circuit_{sel.run_key[:8]}_alpha{sel.alpha:g}_{by}{k}"
    graphml, json_file, _ = st.columns([1, 1, 4])
    layout.download("GraphML", circuit.to_graphml, f"{name}.graphml", "application/graphml+xml",
                    container=graphml)
    layout.download("JSON", circuit.to_json, f"{name}.json", "application/json", container=json_file)
    with figure_slot.container():
        layout.plot(figures.circuit_figure(circuit, highlight=highlight), "circuit_graph", sel)
        st.caption(f"Layers bottom to top; attention a{{l}} left, MLP m{{l}} right. Width: the model's "
                   f"mean |W| (one scale for both panels); coloured: mean W > 0, grey: < 0. "
                   f"{len(edges)} of the top {k} edges lie on a path from input to logits; "
                   f"{int(edges['significant'].sum())} of them changed significantly "
                   f"(FDR {sel.metrics.fdr:g})."
                   + (f" Highlighted: {highlight}." if highlight else ""))
