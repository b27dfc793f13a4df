"""The circuit graph (core/circuit.py): ranking, pruning to input -> logits paths, exports."""

import io
import json
import math

import networkx as nx
import numpy as np
import pytest

from core.circuit import (EDGE_COLUMNS, JSON_FORMAT, build_circuit, layered_layout,
                          on_input_logits_paths, top_edges)
from core.graph import ResidualGraph
from random_scores import random_means


def _only(graph: ResidualGraph, strengths: dict[str, float]) -> dict[str, np.ndarray]:
    """Means where only the named edges changed (post |W| = base + strength), all else equal."""
    means = {name: np.where(graph.real_edge_mask, 1.0, 0.0) for name in
             ("base_abs", "post_abs", "base_signed", "post_signed")}
    for edge, strength in strengths.items():
        src, dst = edge.split("->")
        means["post_abs"][graph.src_index(src), graph.dst_index(dst)] += strength
    return means


def test_top_edges_ranks_by_change_or_strength():
    graph = ResidualGraph(3, "qkv")
    means = random_means(graph)
    src, dst = np.nonzero(graph.real_edge_mask)
    change = np.abs(means["post_abs"] - means["base_abs"])[src, dst]
    strength = np.maximum(means["post_abs"], means["base_abs"])[src, dst]
    for by, score in (("change", change), ("strength", strength)):
        top = top_edges(graph, means, 7, by)
        expected = np.argsort(-score, kind="stable")[:7]
        assert list(top["edge"]) == [graph.edge_names[i] for i in expected]
    row = top_edges(graph, means, 3, "change").iloc[0]
    s, d = graph.src_index(row["src"]), graph.dst_index(row["dst"])
    assert row["rel_change"] == pytest.approx((means["post_abs"][s, d] - means["base_abs"][s, d])
                                              / means["base_abs"][s, d])
    with pytest.raises(ValueError, match="by="):
        top_edges(graph, means, 3, "size")


def test_pruning_keeps_exactly_the_edges_on_an_input_to_logits_path():
    graph = ResidualGraph(3, "qkv")
    on_path = ["input->a0<q>", "a0->m1", "m1->a2<v>", "m1->a2<k>", "a2->logits", "input->m2",
               "m2->logits"]
    # input reaches a1, but nothing leaves a1; m0 reaches logits, but input never reaches m0.
    dead_ends = ["input->a1<k>", "m0->logits", "m0->a2<q>"]
    strengths = {edge: 10.0 + i for i, edge in enumerate(on_path + dead_ends)}
    circuit = build_circuit(graph, _only(graph, strengths), set(), k=len(strengths), by="change",
                            metadata={"run": "hand-built"})
    assert sorted(circuit.edges["edge"]) == sorted(on_path)
    assert sorted(key for _, _, key in circuit.graph.edges(keys=True)) == sorted(on_path)
    assert set(circuit.graph.nodes) == {"input", "a0", "m1", "a2", "m2", "logits"}
    # Two slots of a2 fed by m1 are two edges between the same pair of nodes.
    assert circuit.graph.number_of_edges("m1", "a2") == 2
    mask = on_input_logits_paths(top_edges(graph, _only(graph, strengths), len(strengths), "change"))
    assert mask.sum() == len(on_path)


def test_circuit_keeps_top_k_before_pruning_and_marks_significant_edges():
    graph = ResidualGraph(2, "module")
    strengths = {"input->a0": 5.0, "a0->logits": 4.0, "input->logits": 3.0, "input->m1": 2.0}
    circuit = build_circuit(graph, _only(graph, strengths), {"a0->logits"}, k=3, by="change",
                            metadata={"run": "r"})
    # input->m1 is outside the top 3, so nothing else is kept either.
    assert list(circuit.edges["edge"]) == ["input->a0", "a0->logits", "input->logits"]
    assert list(circuit.edges.columns) == list(EDGE_COLUMNS)
    assert circuit.edges.set_index("edge")["significant"].to_dict() == {
        "input->a0": False, "a0->logits": True, "input->logits": False}
    assert circuit.metadata == {"run": "r", "k": 3, "by": "change"}


def test_graphml_round_trips_through_networkx():
    graph = ResidualGraph(3, "qkv")
    circuit = build_circuit(graph, random_means(graph), {"input->logits"}, k=60, by="strength",
                            metadata={"run": "r", "alpha": 0.1, "granularity": "qkv"})
    assert len(circuit.edges) > 0
    read = nx.read_graphml(io.BytesIO(circuit.to_graphml()), force_multigraph=True)
    assert set(read.nodes) == set(circuit.graph.nodes)
    assert read.graph["k"] == 60 and read.graph["by"] == "strength" and read.graph["alpha"] == 0.1
    for src, dst, key, data in circuit.graph.edges(keys=True, data=True):
        assert read.edges[src, dst, key] == pytest.approx(data, nan_ok=True)
    for node, data in circuit.graph.nodes(data=True):
        assert read.nodes[node] == data


def test_json_has_every_edge_with_both_models_scores():
    graph = ResidualGraph(2, "qkv")
    means = random_means(graph)
    means["base_abs"][graph.src_index("input"), graph.dst_index("logits")] = 0.0  # ratio undefined
    circuit = build_circuit(graph, means, set(), k=graph.n_edges, by="change",
                            metadata={"run": "r", "alpha": 0.3, "granularity": "qkv"})
    data = json.loads(circuit.to_json())
    assert data["format"] == JSON_FORMAT
    assert data["metadata"] == {"run": "r", "alpha": 0.3, "granularity": "qkv",
                                "k": graph.n_edges, "by": "change"}
    assert [e["id"] for e in data["edges"]] == list(circuit.edges["edge"])
    table = circuit.edges.set_index("edge")
    for edge in data["edges"]:
        row = table.loc[edge["id"]]
        assert (edge["source"], edge["slot"]) == (row["src"], row["dst"])
        for side in ("base", "post"):
            assert edge[side] == {"mean_abs": row[f"{side}_mean_abs"],
                                  "mean_signed": row[f"{side}_mean_signed"]}
        assert edge["abs_change"] == row["abs_change"]
        assert edge["rel_change"] == (row["rel_change"] if math.isfinite(row["rel_change"]) else None)
    assert {n["id"] for n in data["nodes"]} == set(circuit.graph.nodes)


def test_layout_puts_layers_bottom_to_top():
    layout = layered_layout(ResidualGraph(4, "qkv"))
    assert layout["input"][1] < layout["a0"][1] < layout["m0"][1] < layout["a1"][1]
    assert layout["logits"][1] > layout["m3"][1]
    assert layout["a2"][0] != layout["m2"][0]
