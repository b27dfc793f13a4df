"""`python -m core metrics`: the distribution metrics of score files, and with --against their change."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from core.graph import ResidualGraph
from core.metrics import compare_models, significant_edges, summarise_model
from core.settings import MetricSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "metrics", help="metrics of score files (.npz of `python -m core score`) as JSON",
        description="Prints every metric of each file with bootstrap intervals; with --against, the "
                    "change from --scores (base) to --against (post-trained), its paired intervals "
                    "and the significant edges. Samples are paired by their ids.")
    parser.add_argument("--scores", required=True, type=Path, help="score file of the base model")
    parser.add_argument("--against", type=Path,
                        help="score file of the post-trained model on the same questions")
    MetricSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def load_score_file(path: Path) -> tuple[np.ndarray, ResidualGraph, list[str]]:
    """Scores [n, n_src, n_dst], their graph and sample ids from an .npz of `python -m core score`."""
    if not path.exists():
        raise FileNotFoundError(f"score file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = {"scores", "src_names", "dst_names", "real_edge_mask", "sample_ids"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; write it with `python -m core score`")
        scores, sample_ids = data["scores"], [str(i) for i in data["sample_ids"]]
        src_names, dst_names = tuple(map(str, data["src_names"])), tuple(map(str, data["dst_names"]))
        mask = data["real_edge_mask"]
    n_layers = (len(src_names) - 1) // 2
    granularity = {4 * n_layers + 1: "qkv", 2 * n_layers + 1: "module"}.get(len(dst_names))
    graph = ResidualGraph(max(n_layers, 1), granularity or "qkv")
    if (granularity is None or (src_names, dst_names) != (graph.src_names, graph.dst_names)
            or not np.array_equal(mask, graph.real_edge_mask)):
        raise ValueError(f"{path}: its node names and edge mask are not those of a residual graph "
                         f"({len(src_names)} sources, {len(dst_names)} slots)")
    if len(sample_ids) != scores.shape[0]:
        raise ValueError(f"{path} has {scores.shape[0]} score matrices but {len(sample_ids)} sample ids")
    return scores, graph, sample_ids


def _aligned(base_ids: list[str], post_ids: list[str], post: np.ndarray, path: Path) -> np.ndarray:
    """post's samples in the order of base's question ids (the bootstrap pairs them by position)."""
    if len(set(post_ids)) != len(post_ids) or set(base_ids) != set(post_ids):
        only_base, only_post = set(base_ids) - set(post_ids), set(post_ids) - set(base_ids)
        raise ValueError(f"{path} is not scored on the same questions: {len(only_base)} id(s) only in "
                         f"the base file, {len(only_post)} only in this one, or repeated ids; score "
                         f"both models on the same selected questions")
    position = {sample_id: k for k, sample_id in enumerate(post_ids)}
    return post[[position[sample_id] for sample_id in base_ids]]


def run(args: argparse.Namespace) -> int:
    settings = MetricSettings.from_namespace(args)
    base, graph, base_ids = load_score_file(args.scores)
    report: dict = {"settings": settings.as_dict(), "settings_key": settings.key(),
                    "files": {str(args.scores): summarise_model(base, graph, settings).to_dict()}}
    if args.against is not None:
        post, post_graph, post_ids = load_score_file(args.against)
        if post_graph != graph:
            raise ValueError(f"{args.against} has a {post_graph.n_layers}-layer {post_graph.granularity} "
                             f"graph and {args.scores} a {graph.n_layers}-layer {graph.granularity} one; "
                             f"compare models of one architecture, scored at one granularity")
        post = _aligned(base_ids, post_ids, post, args.against)
        report["files"][str(args.against)] = summarise_model(post, graph, settings).to_dict()
        report["comparison"] = compare_models(base, post, graph, settings).to_dict()
        edges = significant_edges(base, post, graph, settings)
        # Full precision (to_json would round tiny p-values to 0), NaN as null.
        report["significant_edges"] = edges.astype(object).where(edges.notna(), None).to_dict("records")
    print(json.dumps(report, indent=1, allow_nan=False))
    return 0
