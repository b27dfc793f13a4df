"""The trajectory of a series (docs/method.md section 7, "Trajectory"): a base and its checkpoints
along post-training, each compared with the base. Pure functions over the read model's views
(core/query.py gathers them per checkpoint and memoises the result).

- `checkpoints`: each post model's training step; a series that declares none gets 1..n in order.
- `metric_rows`: each metric's change post - base per step, with its paired interval.
- `edge_trends`: per real edge, the slope of its change against the step with a bootstrap interval
  over the shared questions, a permutation null over the step labels, Benjamini-Hochberg across
  edges, and the smallest p the series' steps allow at all.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from core.errors import InputError
from core.graph import ResidualGraph
from core.metrics import EDGE_MEASURES, Comparison
from core.resampling import bca_interval, draw_counts
from core.settings import MetricSettings
from core.vocab import KINDS

_, SERIES_KIND = KINDS  # pair, series
SERIES_COLUMNS = ("run_key", "name", "dataset", "n_steps", "post_labels", "steps", "declared")
TRAJECTORY_COLUMNS = ("step", "post_label", "metric", "value", "low", "high", "significant")
# edge_trends' table: after src, dst, edge come the change at each checkpoint (`step_column`), then
# these.
TREND_COLUMNS = ("slope", "slope_low", "slope_high", "p", "q", "beats_null")
# The permutation null enumerates every ordering of the step labels up to 8 points (the base and 7
# checkpoints: 40,320 orderings); beyond, it draws this many at random.
MAX_EXACT_PERMUTATIONS = math.factorial(8)
MONTE_CARLO_PERMUTATIONS = 9999


def step_column(step: int) -> str:
    """The column of `edge_trends`' table holding the change at `step`."""
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


# --- Edge trends: a slope per edge, its bootstrap interval, a permutation null ------------------

@dataclasses.dataclass(frozen=True)
class EdgeTrends:
    """`edge_trends`: every real edge's trend over the steps (`table`, TREND_COLUMNS after src, dst,
    edge and the change at each step), ranked by p, then by |slope|; and what the permutation null
    can resolve at all with this many steps."""

    table: pd.DataFrame
    fdr: float
    permutations: int  # orderings of the step labels the null was computed on
    exact: bool  # every ordering (else a seeded random draw of them)
    smallest_p: float  # the smallest p any edge can get with these steps

    @property
    def n_edges(self) -> int:
        return len(self.table)

    @property
    def n_beating(self) -> int:
        """Edges that beat the null: Benjamini-Hochberg q <= fdr."""
        return int(self.table["beats_null"].sum())

    @property
    def needed(self) -> int:
        """The fewest edges that must all reach `smallest_p` for Benjamini-Hochberg to declare any:
        an edge with p is declared only where at least p n / fdr of the n edges have p or less."""
        return max(1, math.ceil(self.smallest_p * self.n_edges / self.fdr - 1e-9))

    @property
    def can_beat(self) -> bool:
        """Whether any edge can beat the null with these steps, whatever the data (smallest_p <=
        fdr)."""
        return self.needed <= self.n_edges


def permutation_p(steps: np.ndarray, values: np.ndarray, seed: int = 0
                  ) -> tuple[np.ndarray, int, bool]:
    """Two-sided permutation p of the association of each column of `values` [n_points, n] with
    `steps` [n_points]: the share of orderings of the step labels whose |sum_j (s_j - mean s) v_j|
    (the numerator of the least-squares slope, which orderings leave the rest of unchanged) is at
    least the observed one. Every ordering where there are at most MAX_EXACT_PERMUTATIONS (the
    observed one among them, so p >= 1/n_points!), else MONTE_CARLO_PERMUTATIONS seeded random ones
    and p = (1 + count) / (1 + their number). Returns (p, orderings, exact)."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    centred_steps = steps - steps.mean()
    centred = values - values.mean(axis=0)
    observed = np.abs(centred_steps @ centred)
    # Orderings that tie the observed one exactly (the reverse of evenly spaced steps) must count:
    # a relative tolerance far above rounding and far below any real difference.
    tolerance = 1e-9 * (np.abs(centred_steps) @ np.abs(centred))
    exact = math.factorial(len(steps)) <= MAX_EXACT_PERMUTATIONS
    if exact:
        orderings = np.array(list(itertools.permutations(range(len(steps)))))
    else:
        rng = np.random.default_rng(seed)
        orderings = rng.permuted(np.tile(np.arange(len(steps)), (MONTE_CARLO_PERMUTATIONS, 1)),
                                 axis=1)
    count = np.zeros(values.shape[1], dtype=np.int64)
    chunk = max(1, 2 ** 22 // max(values.shape[1], 1))
    for start in range(0, len(orderings), chunk):
        statistic = np.abs(centred_steps[orderings[start:start + chunk]] @ centred)
        count += (statistic >= observed - tolerance).sum(axis=0)
    if exact:
        return count / len(orderings), len(orderings), True
    return (1 + count) / (1 + len(orderings)), len(orderings), False


def edge_trends(graph: ResidualGraph, steps: list[int], base_abs: np.ndarray, post_abs: np.ndarray,
                measure: str, settings: MetricSettings) -> EdgeTrends:
    """Every real edge's trend over a series (docs/method.md section 7, "Trajectory"). base_abs [n,
    n_edges] and post_abs [n_checkpoints, n, n_edges]: |W| of the base and of each checkpoint (at
    increasing `steps`) on the series' shared questions, in one order.

    The change at each step is core.metrics.edge_change in `measure`; the slope is the least-squares
    slope of the change against the step over the base (step 0, change 0) and the checkpoints, with a
    BCa interval from the paired bootstrap over questions (every model takes the same draws; the
    change's denominator is recomputed in each replicate). The null: the base's and checkpoints'
    mean |W| of the edge are exchangeable across the step labels; its p (`permutation_p`) is the
    same in every measure, each being an affine map of those means; Benjamini-Hochberg across the
    real edges at settings.fdr gives q, and an edge beats the null where q <= fdr."""
    if measure not in EDGE_MEASURES:
        raise ValueError(f"measure={measure!r} is not one of {list(EDGE_MEASURES)}")
    points = np.array([0, *steps], dtype=np.float64)
    if np.any(np.diff(points) <= 0):
        raise ValueError(f"steps must be positive and increase; got {list(steps)}")
    models = np.concatenate([np.asarray(base_abs)[None], np.asarray(post_abs)]).astype(np.float64)
    if models.shape[0] != len(points) or models.shape[2] != graph.n_edges:
        raise ValueError(f"expected |W| of the base and {len(steps)} checkpoints over "
                         f"{graph.n_edges} real edges; got shape {models.shape}")
    n = models.shape[1]
    weights = (points - points.mean()) / ((points - points.mean()) ** 2).sum()
    means = models.mean(axis=1)  # [n_points, n_edges]
    # [n, n_edges]: the slope of each question's |W| over the models; its mean is the slope of means.
    per_question = np.tensordot(weights, models, axes=1)

    def divisor(base_means: np.ndarray) -> np.ndarray:
        """What the measure divides the difference post - base by (metrics.edge_change)."""
        if measure == "difference":
            return np.ones_like(base_means)
        if measure == "normalised":
            return np.broadcast_to(base_means.mean(axis=-1, keepdims=True), base_means.shape)
        return np.where(base_means > 0, base_means, np.nan)

    with np.errstate(invalid="ignore", divide="ignore"):
        changes = (means[1:] - means[0]) / divisor(means[0])
        slope = weights @ means / divisor(means[0])  # the weights sum to 0: c_0 = 0 drops out
        low = high = np.full(graph.n_edges, np.nan)
        if settings.bootstrap > 0 and n > 1:
            counts = draw_counts(n, settings.bootstrap, settings.seed) / n
            replicate = (counts @ per_question) / divisor(counts @ models[0])
            jackknife = ((n * weights @ means - per_question) / (n - 1)
                         / divisor((n * means[0] - models[0]) / (n - 1)))
            low, high = bca_interval(slope, replicate, jackknife, settings.ci_level)
    p, orderings, exact = permutation_p(points, means, settings.seed)
    # Exact: the p of a change proportional to the step, which no other ordering beats (the reverse
    # of evenly spaced steps ties it). Drawn: (1 + 0) / (1 + orderings).
    smallest_p = (float(permutation_p(points, points[:, None])[0][0]) if exact
                  else 1 / (1 + orderings))
    q = stats.false_discovery_control(p, method="bh")
    src, dst = np.nonzero(graph.real_edge_mask)
    table = pd.DataFrame({"src": np.asarray(graph.src_names)[src],
                          "dst": np.asarray(graph.dst_names)[dst], "edge": graph.edge_names})
    for step, column in zip(steps, changes):
        table[step_column(step)] = column
    table["slope"], table["slope_low"], table["slope_high"] = slope, low, high
    table["p"], table["q"], table["beats_null"] = p, q, q <= settings.fdr
    magnitude = np.where(np.isnan(slope), -np.inf, np.abs(slope))
    order = np.lexsort((-magnitude, p))
    return EdgeTrends(table.iloc[order].reset_index(drop=True), settings.fdr, orderings, exact,
                      smallest_p)
