"""The trajectory of a series (docs/method.md section 7, "Trajectory"): a base and its checkpoints
along post-training, each compared with the base. Pure functions over the read model's views
(core/query.py gathers them per checkpoint and memoises the result).

- `checkpoints`: each post model's training step; a series that declares none gets 1..n in order.
- `metric_rows`: each metric's change post - base per step, with its paired interval.
- `monotony` and `consistent_edges`: the edges whose change grows most consistently over steps.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from core.errors import InputError
from core.graph import ResidualGraph
from core.metrics import Comparison
from core.vocab import KINDS

_, SERIES_KIND = KINDS  # pair, series
SERIES_COLUMNS = ("run_key", "name", "dataset", "n_steps", "post_labels", "steps", "declared")
TRAJECTORY_COLUMNS = ("step", "post_label", "metric", "value", "low", "high", "significant")
# consistent_edges: after src, dst, edge come the change at each checkpoint (`step_column`), then
# these.
CONSISTENCY_COLUMNS = ("monotony", "final_change", "score")


def step_column(step: int) -> str:
    """The column of `consistent_edges` holding the change at `step`."""
    return f"step {step}"


def checkpoints(run_key: str, name: str, kind: str, posts: list[tuple[str, int | None]]
                ) -> tuple[list[tuple[str, int]], bool]:
    """(label, step) of each post model in the series' order, and whether the steps are declared
    (pairs.toml `step`); undeclared steps are the positions 1..n. InputError for a pair."""
    if kind != SERIES_KIND:
        raise InputError(f"run {run_key} ({name}) is a {kind}, not a series: a trajectory needs a "
                         f"base and several checkpoints (a [series.*] entry in pairs.toml); pick a "
                         f"series run")
    declared = all(step is not None for _, step in posts)
    steps = [(label, step if declared else i) for i, (label, step) in enumerate(posts, start=1)]
    return steps, declared


def metric_rows(steps: list[tuple[str, int]], base_label: str,
                comparisons: list[Comparison]) -> pd.DataFrame:
    """TRAJECTORY_COLUMNS, one row per (step, metric): the change post - base in the metric's units
    (the difference scale: defined at every step, and 0 at the base) with its paired-bootstrap
    interval (NaN without a bootstrap); `significant` where that interval excludes 0. The base is
    step 0, change 0."""
    metric_names = list(comparisons[0].metrics) if comparisons else []
    rows = [{"step": 0, "post_label": base_label, "metric": name, "value": 0.0, "low": 0.0,
             "high": 0.0, "significant": False} for name in metric_names]
    for (label, step), comparison in zip(steps, comparisons):
        for name, change in comparison.metrics.items():
            low, high = change.change_ci or (math.nan, math.nan)
            rows.append({"step": step, "post_label": label, "metric": name, "value": change.change,
                         "low": low, "high": high, "significant": bool(low > 0 or high < 0)})
    return pd.DataFrame(rows, columns=list(TRAJECTORY_COLUMNS))


def monotony(steps: np.ndarray, changes: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of change against step, per column of `changes` [n_steps, n_edges], over the
    base (step 0, change 0) and the checkpoints at increasing `steps`: 1 where every checkpoint's
    change exceeds every earlier one's (and the base's 0), -1 where each falls below. NaN where a
    change is NaN or all are equal."""
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"steps must increase; got {list(steps)}")
    points = np.vstack([np.zeros((1, changes.shape[1])), changes])
    later, earlier = np.triu_indices(len(points), k=1)[::-1]
    signs = np.sign(points[later] - points[earlier])  # steps increase: the step's sign is +1
    pairs = len(later)
    untied = pairs - (signs == 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(untied > 0, signs.sum(axis=0) / np.sqrt(pairs * untied), np.nan)


def consistent_edges(graph: ResidualGraph, steps: list[int], changes: np.ndarray,
                     k: int) -> pd.DataFrame:
    """The k edges with the highest consistency score: monotony (Kendall tau-b of change with step,
    base included) times the change at the last step. It is high for an edge whose change moves
    away from the base at every step in the direction it ends up (strengthening or weakening) and
    ends far from it; a change that wanders scores near 0 or below. `changes` [n_steps, n_src,
    n_dst] (one edge-change matrix per checkpoint, in step order, NaN at non-edges). Columns: src,
    dst, edge, the change at each step (`step_column`), CONSISTENCY_COLUMNS; best first, NaN
    scores last."""
    per_edge = graph.edges(changes).astype(np.float64)  # [n_steps, n_edges]
    tau = monotony(np.asarray(steps), per_edge)
    final = per_edge[-1]
    score = tau * final
    src, dst = np.nonzero(graph.real_edge_mask)
    table = pd.DataFrame({"src": np.asarray(graph.src_names)[src],
                          "dst": np.asarray(graph.dst_names)[dst], "edge": graph.edge_names})
    for step, column in zip(steps, per_edge):
        table[step_column(step)] = column
    table["monotony"], table["final_change"], table["score"] = tau, final, score
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return table.iloc[order[:k]].reset_index(drop=True)
