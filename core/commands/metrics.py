"""`python -m core metrics`: the distribution metrics of score files, and with --against their change;
with --table, the Overview's table of a cache as Markdown (the README's demo table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from core.commands.score import load_score_file
from core.errors import InputError
from core.metrics import (METRICS, PRIMARY_MARK, compare_models, overview_cell, significant_edges,
                          summarise_model)
from core.settings import MetricSettings

# The Overview's default columns (app.py's TABLE1_METRICS).
TABLE_METRICS = ("intensity", "complexity", "edge_entropy", "kurtosis", "diversity")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "metrics", help="metrics of score files (.npz of `python -m core score`) as JSON",
        description="Prints every metric of each file with bootstrap intervals; with --against, the "
                    "change from --scores (base) to --against (post-trained), its paired intervals "
                    "and the significant edges. Samples are paired by their ids.")
    parser.add_argument("--scores", type=Path, help="score file of the base model")
    parser.add_argument("--against", type=Path,
                        help="score file of the post-trained model on the same questions")
    parser.add_argument("--table", action="store_true",
                        help="instead of score files: print the Overview's table of the cache's "
                             "pooled runs as Markdown (each cell as the dashboard prints it)")
    parser.add_argument("--cache", help="with --table: cache file (default: $CIRCUITDIFF_CACHE, "
                                        "else cache/circuitdiff.duckdb)")
    MetricSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def _aligned(base_ids: list[str], post_ids: list[str], post: np.ndarray, path: Path) -> np.ndarray:
    """post's samples in the order of base's question ids (the bootstrap pairs them by position)."""
    if len(set(post_ids)) != len(post_ids) or set(base_ids) != set(post_ids):
        only_base, only_post = set(base_ids) - set(post_ids), set(post_ids) - set(base_ids)
        raise InputError(f"{path} is not scored on the same questions: {len(only_base)} id(s) only in "
                         f"the base file, {len(only_post)} only in this one, or repeated ids; score "
                         f"both models on the same selected questions")
    position = {sample_id: k for k, sample_id in enumerate(post_ids)}
    return post[[position[sample_id] for sample_id in base_ids]]


def overview_markdown(table, settings: MetricSettings) -> str:
    """core.query's `overview` rows as a Markdown table: one row per pooled (pair, post model,
    alphas), one column per metric shown, each cell `overview_cell`."""
    shown = [m for m in METRICS if m in set(table["metric"])]
    level = 1 - settings.ci_level
    lines = ["| pair | post | alpha | " + " | ".join(shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for (pair, post, alphas), rows in table.groupby(["pair", "post_label", "alphas"], sort=False):
        cells = {row["metric"]: overview_cell(row, level) for _, row in rows.iterrows()}
        lines.append(f"| {pair} | {post} | {alphas} | "
                     + " | ".join(cells.get(m, "") for m in shown) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = MetricSettings.from_namespace(args)
    if args.table:
        from core.query import ResultCache

        table = ResultCache.open(args.cache).overview(settings, TABLE_METRICS)
        if table.empty:
            raise InputError("the cache holds no pooled cell (every selected question scored for "
                             "every model at an alpha); run the pipeline first")
        table = table.sort_values(["pair", "post_label", "alpha"], kind="stable")
        print(overview_markdown(table, settings))
        print(f"\n{PRIMARY_MARK}: primary ({settings.primary}); * Holm-adjusted p <= "
              f"{1 - settings.ci_level:g} across the {int(table['p'].notna().sum())} cells; "
              f"metric settings key {settings.key()}")
        return 0
    if args.scores is None:
        raise InputError("give --scores FILE (and --against FILE to compare), or --table")
    base, graph, base_ids = load_score_file(args.scores)
    report: dict = {"settings": settings.as_dict(), "settings_key": settings.key(),
                    "files": {str(args.scores): summarise_model(base, graph, settings).to_dict()}}
    if args.against is not None:
        post, post_graph, post_ids = load_score_file(args.against)
        if post_graph != graph:
            raise InputError(f"{args.against} has a {post_graph.n_layers}-layer {post_graph.granularity} "
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
