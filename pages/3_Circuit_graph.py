"""Circuit graph: the top-k edges drawn as a layered DAG for both models on one shared layout, linked
to a table of the same edges (select a row to highlight its edge in both panels)."""

import streamlit as st

from core import figures
from pages import _shared

sel = _shared.page_header("Circuit graph", links=("circuit.k", "circuit.by"))
if sel is not None:
    graph, base, post, ids = _shared.compared_matrices(sel)
    left, right = st.columns(2)
    most = min(300, graph.n_edges)
    _shared.linked("circuit.k", range(5, most + 1), int)
    _shared.linked("circuit.by", ("change", "strength"))
    st.session_state.setdefault("circuit.k", min(40, most))
    k = left.slider("Edges shown (top k)", 5, most, key="circuit.k")
    by = right.radio("Rank edges by", ("change", "strength"), horizontal=True, key="circuit.by",
                     help="change: |mean|W_post| - mean|W_base||; strength: the larger of the two "
                          "models' mean |W|")
    _shared.link("circuit.k", k)
    _shared.link("circuit.by", by)
    edges = figures.top_edges(graph, _shared.means(base, post), k, by)
    tests = _shared.significant_edges(sel)
    edges["significant"] = edges["edge"].isin(set(tests["edge"]))

    st.caption("Select a row of the table to highlight its edge in both panels.")
    figure_slot = st.empty()
    ranked = edges.reindex(edges["abs_change"].abs().sort_values(ascending=False).index)
    shown = ranked[["edge", "base_mean_abs", "post_mean_abs", "abs_change", "rel_change",
                    "significant"]].reset_index(drop=True)
    picked = _shared.table(shown, "circuit_edges", hide_index=True, on_select="rerun",
                           selection_mode="single-row", key="circuit.table")
    rows = picked.selection.rows if picked is not None else []
    highlight = shown["edge"].iloc[rows[0]] if rows else None
    with figure_slot.container():
        _shared.plot(figures.circuit_figure(graph, edges, sel.base_label, sel.post_label,
                                            highlight=highlight), "circuit_graph", sel)
        st.caption(f"Layers bottom to top; attention a{{l}} left, MLP m{{l}} right. Width: the model's "
                   f"mean |W| (one scale for both panels); coloured: mean W > 0, grey: < 0. "
                   f"{int(edges['significant'].sum())} of these {len(edges)} edges changed "
                   f"significantly (FDR {sel.metrics.fdr:g})."
                   + (f" Highlighted: {highlight}." if highlight else ""))
