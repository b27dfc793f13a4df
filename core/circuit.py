"""The circuit of a paired run: the top-k edges of the residual graph, pruned to those on some path
from `input` to `logits`, as a networkx graph with a layered layout (docs/method.md section 2).

Nodes are the graph's modules (`input`, `a{l}`, `m{l}`, `logits`); an edge runs from its source to
the module its destination slot feeds (`a3<q>` feeds `a3`), so at granularity qkv one source can
reach one attention block through up to three slots: the graph is a MultiDiGraph keyed by edge name.
Every edge carries both models' mean |W| and mean W, the change of mean |W|, its relative change and
whether the per-edge test found it significant (docs/method.md section 7).

Exports: GraphML (networkx.write_graphml) and JSON (`JSON_FORMAT`: metadata, nodes, edges).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any, Literal, get_args

import networkx as nx
import numpy as np
import pandas as pd

from core.graph import ResidualGraph

# How the k edges are picked: the largest |post - base| of mean |W|, or the larger of the two mean |W|.
RankBy = Literal["change", "strength"]
RANK_BY: tuple[str, ...] = get_args(RankBy)

INPUT, LOGITS = "input", "logits"
JSON_FORMAT = "circuitdiff.circuit/1"

EDGE_COLUMNS = ("edge", "src", "dst", "base_mean_abs", "post_mean_abs", "base_mean_signed",
                "post_mean_signed", "abs_change", "rel_change", "significant")
# Edge attributes in the networkx graph, GraphML and JSON (the table's columns but the names).
_EDGE_VALUES = EDGE_COLUMNS[3:]


def top_edges(graph: ResidualGraph, means: dict[str, np.ndarray], k: int, by: str) -> pd.DataFrame:
    """The k real edges with the largest strength (`by="strength"`: max of the two models' mean |W|)
    or the largest change (`by="change"`: |post - base| of mean |W|), ranked, with both models' mean
    |W| and mean W (`means`: base_abs, post_abs, base_signed, post_signed, each [n_src, n_dst])."""
    if by not in RANK_BY:
        raise ValueError(f"top_edges: by={by!r} is not one of {list(RANK_BY)}")
    src, dst = np.nonzero(graph.real_edge_mask)
    base_abs = means["base_abs"][src, dst].astype(np.float64)
    post_abs = means["post_abs"][src, dst].astype(np.float64)
    score = np.maximum(base_abs, post_abs) if by == "strength" else np.abs(post_abs - base_abs)
    order = np.argsort(-score, kind="stable")[: max(int(k), 0)]
    src, dst, base_abs, post_abs = src[order], dst[order], base_abs[order], post_abs[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(base_abs > 0, (post_abs - base_abs) / base_abs, np.nan)
    return pd.DataFrame({
        "edge": [f"{graph.src_names[s]}->{graph.dst_names[d]}" for s, d in zip(src, dst)],
        "src": [graph.src_names[s] for s in src],
        "dst": [graph.dst_names[d] for d in dst],
        "base_mean_abs": base_abs, "post_mean_abs": post_abs,
        "base_mean_signed": means["base_signed"][src, dst].astype(np.float64),
        "post_mean_signed": means["post_signed"][src, dst].astype(np.float64),
        "abs_change": post_abs - base_abs, "rel_change": relative,
    })


def node_of_slot(slot: str) -> str:
    """Destination slot -> the module node it feeds: `a3<q>` -> `a3`, `m3` -> `m3`."""
    return slot.split("<", 1)[0]


def layered_layout(graph: ResidualGraph) -> dict[str, tuple[float, float]]:
    """One position per module node, fixed by the graph alone (so both models share it): layers go
    bottom to top, attention in the left lane, MLP in the right, input and logits centred."""
    positions = {INPUT: (0.5, -1.0), LOGITS: (0.5, float(graph.n_layers))}
    for layer in range(graph.n_layers):
        positions[f"a{layer}"] = (0.0, float(layer))
        positions[f"m{layer}"] = (1.0, layer + 0.5)
    return positions


def _node_kind(node: str, n_layers: int) -> tuple[str, int]:
    """(kind, layer) of a module node: input sits below layer 0, logits above the last layer."""
    if node == INPUT:
        return INPUT, -1
    if node == LOGITS:
        return LOGITS, n_layers
    return ("attention" if node[0] == "a" else "mlp"), int(node[1:])


def on_input_logits_paths(edges: pd.DataFrame) -> np.ndarray:
    """Mask of the edges (src, dst columns) that lie on some path from `input` to `logits` through
    these edges only. The graph is acyclic, so an edge u -> v is on such a path exactly when u is
    reachable from input and logits from v."""
    reach = nx.DiGraph()
    reach.add_nodes_from((INPUT, LOGITS))
    reach.add_edges_from(zip(edges["src"], map(node_of_slot, edges["dst"])))
    from_input = nx.descendants(reach, INPUT) | {INPUT}
    to_logits = nx.ancestors(reach, LOGITS) | {LOGITS}
    return np.array([s in from_input and node_of_slot(d) in to_logits
                     for s, d in zip(edges["src"], edges["dst"])], dtype=bool)


@dataclasses.dataclass(frozen=True)
class Circuit:
    """A pruned top-k circuit: `graph` (networkx MultiDiGraph over module nodes with x, y, kind and
    layer; edges keyed by edge name with slot and the `_EDGE_VALUES` attributes), `edges` (the same
    edges as a table, largest |abs_change| first: what the page lists) and `metadata` (run, alpha,
    granularity, k, by, base_label, post_label, n_layers, n_questions)."""

    graph: nx.MultiDiGraph
    edges: pd.DataFrame
    metadata: dict[str, Any]

    def to_graphml(self) -> bytes:
        buffer = io.BytesIO()
        nx.write_graphml(self.graph, buffer)
        return buffer.getvalue()

    def to_json(self) -> str:
        """`JSON_FORMAT`: {format, metadata, nodes: [{id, kind, layer, x, y}], edges: [{id, source,
        target, slot, base: {mean_abs, mean_signed}, post: {...}, abs_change, rel_change,
        significant}]}; a relative change undefined for a base strength of 0 is null."""
        nodes = [{"id": node, **attributes} for node, attributes in self.graph.nodes(data=True)]
        edges = []
        for row in self.edges.itertuples(index=False):
            edges.append({
                "id": row.edge, "source": row.src, "target": node_of_slot(row.dst), "slot": row.dst,
                "base": {"mean_abs": row.base_mean_abs, "mean_signed": row.base_mean_signed},
                "post": {"mean_abs": row.post_mean_abs, "mean_signed": row.post_mean_signed},
                "abs_change": row.abs_change,
                "rel_change": row.rel_change if math.isfinite(row.rel_change) else None,
                "significant": bool(row.significant)})
        return json.dumps({"format": JSON_FORMAT, "metadata": self.metadata, "nodes": nodes,
                           "edges": edges}, indent=1)


def build_circuit(graph: ResidualGraph, means: dict[str, np.ndarray], significant: set[str], *,
                  k: int, by: str, metadata: dict[str, Any]) -> Circuit:
    """The top-k edges of `top_edges`, pruned to input -> logits paths, with `significant` (edge
    names the per-edge test found) marked; `metadata` is recorded with k and by added."""
    ranked = top_edges(graph, means, k, by)
    kept = ranked[on_input_logits_paths(ranked)].copy()
    kept["significant"] = kept["edge"].isin(significant)
    kept = kept.iloc[np.argsort(-kept["abs_change"].abs().to_numpy(), kind="stable")]
    kept = kept.reset_index(drop=True)[list(EDGE_COLUMNS)]

    positions = layered_layout(graph)
    metadata = {**metadata, "k": int(k), "by": by}
    network = nx.MultiDiGraph(**metadata)
    for node in sorted(set(kept["src"]) | set(map(node_of_slot, kept["dst"])),
                       key=lambda name: positions[name][1]):
        kind, layer = _node_kind(node, graph.n_layers)
        x, y = positions[node]
        network.add_node(node, kind=kind, layer=layer, x=x, y=y)
    for row in kept.to_dict("records"):
        network.add_edge(row["src"], node_of_slot(row["dst"]), key=row["edge"], slot=row["dst"],
                         **{name: _graphml_value(row[name]) for name in _EDGE_VALUES})
    return Circuit(graph=network, edges=kept, metadata=metadata)


def _graphml_value(value: Any) -> float | bool:
    """numpy scalars as the Python types GraphML writes."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else float(value)
