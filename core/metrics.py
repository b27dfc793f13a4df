"""Distribution metrics of per-sample edge-score matrices (docs/method.md sections 6-7), their paired bootstrap
confidence intervals, per-edge paired tests, and summaries over a grid of runs.

Pure functions of score arrays `scores[k, s, d]` (n samples, dense [n_src, n_dst] matrices whose
non-edges are structural zeros) and a `ResidualGraph`; no model, no UI. Every convention is a field of
`MetricSettings`, and every result object carries those settings and their key.

The metrics (natural logs throughout):
- intensity: mean |W| over samples and entries; entries = all n_src*n_dst (`intensity_normaliser`
  dense, the paper's formula) or real edges only (edges).
- complexity: Shannon entropy of the histogram of the pooled |W| of all samples, `histogram_bins`
  equal-width bins over [0, max of the pooled |W|] (numpy's binning: [e_i, e_i+1), the last bin closed).
- edge_entropy: the bin-free variant: entropy of p_e = |W_e| / sum |W| over real edges, per sample,
  averaged over samples.
- kurtosis: excess (Fisher) kurtosis, population moments (scipy's bias=True), of each sample's flattened
  matrix (signed W or |W|: `kurtosis_of`), averaged over samples.
- diversity: 1 - mean Pearson correlation of the flattened signed matrices over all pairs of samples.
- output_entropy: entropy of the normalised |W| of the edges into `logits`, per sample, averaged.
`flatten` decides which entries "flattened" and "pooled" mean for complexity, kurtosis and diversity:
all n_src*n_dst entries, structural zeros included (dense, the paper's flattened matrices), or real
edges only. The choice changes all three (zeros fill the first bin, add a spike at 0, and are shared by
every sample), so it is recorded, never implied.

Paired bootstrap: each replicate draws n question indices with replacement, once, and applies the same
indices to base and post, so the change's interval reflects the pairing. Every metric is recomputed
exactly by its definition on the resampled set:
- per-sample averages are weighted by how often each question was drawn;
- complexity's bins span [0, max of the resampled pool]; that max is the largest per-sample max among
  the drawn questions, so replicates are grouped by it and, per group, per-sample histograms on that
  group's grid are summed with the draw counts (identical to histogramming the resampled pool);
- diversity averages the correlation over pairs of drawn positions whose original questions differ:
  a question drawn twice would otherwise contribute a self-pair with correlation 1.
Intervals are percentile intervals at `ci_level`.

Per-edge tests: a paired t-test per real edge on d_k = |W_post,k,e| - |W_base,k,e| across questions
(it tests the mean change in strength, which is what `rel_change` reports; with the paper's n = 100
questions the t statistic of a mean is robust to the heavy tails of edge scores), then
Benjamini-Hochberg at `fdr` over all real edges.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import special, stats

from core.graph import ResidualGraph
from core.settings import MetricSettings

METRICS = ("intensity", "complexity", "edge_entropy", "kurtosis", "diversity", "output_entropy")
# The metrics with one value per sample, in the order per_sample_metrics returns them (complexity is
# a pooled histogram and diversity a mean over pairs: neither has a per-sample form).
PER_SAMPLE_METRICS = ("intensity", "edge_entropy", "kurtosis", "output_entropy")

# The way the paper reports online RL (PPO, GRPO) moving each metric; None where it makes no claim
# (edge_entropy and output_entropy are this project's reconstructions).
PAPER_DIRECTION = {"intensity": 1, "complexity": 1, "edge_entropy": None, "kurtosis": -1,
                   "diversity": 1, "output_entropy": None}

EDGE_MEASURES = ("ratio", "difference", "normalised")


# --- Input checks ---------------------------------------------------------------------------------

def check_scores(scores: np.ndarray, graph: ResidualGraph, name: str = "scores") -> np.ndarray:
    """The scores as float64 [n, n_src, n_dst], or a clear error saying what is wrong."""
    scores = np.asarray(scores)
    expected = (graph.n_src, graph.n_dst)
    if scores.ndim != 3 or scores.shape[1:] != expected:
        raise ValueError(f"{name} has shape {scores.shape}; expected [n_samples, {expected[0]}, "
                         f"{expected[1]}] for a {graph.n_layers}-layer {graph.granularity} graph")
    if scores.shape[0] < 2:
        raise ValueError(f"{name} holds {scores.shape[0]} sample(s); the metrics need at least 2 "
                         f"(diversity compares pairs of samples)")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        bad = np.unique(np.nonzero(~np.isfinite(scores))[0])
        raise ValueError(f"{name} has non-finite values in sample(s) {bad[:10].tolist()}; "
                         f"rescore them or drop them")
    if np.any(scores[:, ~graph.real_edge_mask]):
        raise ValueError(f"{name} has nonzero values at non-edges (a source read after its slot); "
                         f"the matrices do not match the graph's real-edge mask")
    empty = np.nonzero(~np.any(scores, axis=(1, 2)))[0]
    if empty.size:
        raise ValueError(f"{name}: sample(s) {empty[:10].tolist()} are all zero, so their kurtosis "
                         f"and correlations are undefined; drop them")
    return scores


# --- Metric values from per-sample pieces ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Pieces:
    """What the metrics of any multiset of one model's samples are computed from."""

    per_sample: dict[str, np.ndarray]   # intensity, edge_entropy, kurtosis, output_entropy: [n]
    sorted_abs: np.ndarray              # [n, m] |W| over the `flatten` entries, each row sorted
    sample_max: np.ndarray              # [n] max of each row
    correlation: np.ndarray             # [n, n] Pearson correlations, diagonal zeroed
    bins: int


def _normalised_entropy(weights: np.ndarray) -> np.ndarray:
    """Entropy of each row of non-negative weights normalised to sum 1 (0 for an all-zero row)."""
    total = weights.sum(axis=-1, keepdims=True)
    p = np.divide(weights, total, out=np.zeros_like(weights, dtype=np.float64), where=total > 0)
    return special.entr(p).sum(axis=-1)


def per_sample_metrics(scores: np.ndarray, graph: ResidualGraph,
                       settings: MetricSettings = MetricSettings()) -> dict[str, np.ndarray]:
    """Per-sample intensity, edge_entropy, kurtosis and output_entropy, each [n]; the model's value is
    their mean. complexity (a pooled histogram) and diversity (pairs) have no per-sample form."""
    return _per_sample(check_scores(scores, graph), graph, settings)


def _per_sample(scores: np.ndarray, graph: ResidualGraph,
                settings: MetricSettings) -> dict[str, np.ndarray]:
    n = scores.shape[0]
    magnitude = np.abs(scores)
    edges_abs = graph.edges(magnitude)
    if settings.intensity_normaliser == "dense":
        intensity = magnitude.reshape(n, -1).mean(axis=1)
    else:
        intensity = edges_abs.mean(axis=1)
    flat = _flatten(scores if settings.kurtosis_of == "signed" else magnitude, graph, settings)
    return {
        "intensity": intensity,
        "edge_entropy": _normalised_entropy(edges_abs),
        "kurtosis": stats.kurtosis(flat, axis=1, fisher=True, bias=True),
        "output_entropy": _normalised_entropy(magnitude[:, :, graph.logits_dst]),
    }


def _flatten(scores: np.ndarray, graph: ResidualGraph, settings: MetricSettings) -> np.ndarray:
    if settings.flatten == "dense":
        return scores.reshape(scores.shape[0], -1)
    return graph.edges(scores)


def _pieces(scores: np.ndarray, graph: ResidualGraph, settings: MetricSettings) -> _Pieces:
    flat = _flatten(scores, graph, settings)
    constant = np.nonzero(flat.std(axis=1) == 0)[0]
    if constant.size:
        raise ValueError(f"sample(s) {constant[:10].tolist()} are constant over the "
                         f"{settings.flatten} entries, so their correlations are undefined; drop them")
    correlation = np.corrcoef(flat)
    np.fill_diagonal(correlation, 0.0)
    sorted_abs = np.sort(np.abs(flat), axis=1)
    return _Pieces(per_sample=_per_sample(scores, graph, settings), sorted_abs=sorted_abs,
                   sample_max=sorted_abs[:, -1], correlation=correlation,
                   bins=settings.histogram_bins)


def _histograms(sorted_rows: np.ndarray, top: float, bins: int) -> np.ndarray:
    """Counts [rows, bins] of each sorted row (all values in [0, top]) in `bins` equal-width bins
    over [0, top], binned as np.histogram does: [e_i, e_i+1), the last bin closed. Counting by the
    edges themselves (values below each edge) puts a value lying on an edge in the bin starting
    there, whatever the rounding of value * bins / top."""
    edges = np.linspace(0.0, top, bins + 1)
    below = np.stack([np.searchsorted(row, edges, side="left") for row in sorted_rows])
    below[:, -1] = sorted_rows.shape[1]  # the closed last bin holds the values equal to top
    return np.diff(below, axis=1)


def _complexity(pieces: _Pieces, counts: np.ndarray) -> np.ndarray:
    """Histogram entropy of the pool of each replicate (counts [R, n]: draws of each sample)."""
    drawn_max = np.where(counts > 0, pieces.sample_max[None, :], -np.inf).max(axis=1)
    out = np.zeros(counts.shape[0])
    for top in np.unique(drawn_max):  # > 0: check_scores refuses all-zero samples
        replicates = drawn_max == top
        eligible = pieces.sample_max <= top  # the only samples these replicates can have drawn
        hist = _histograms(pieces.sorted_abs[eligible], float(top), pieces.bins)
        pooled = counts[np.ix_(replicates, eligible)].astype(np.float64) @ hist
        out[replicates] = _normalised_entropy(pooled)
    return out


def _diversity(pieces: _Pieces, counts: np.ndarray) -> np.ndarray:
    """1 - mean correlation over pairs of drawn positions from different questions, per replicate."""
    counts = counts.astype(np.float64)
    pair_sum = ((counts @ pieces.correlation) * counts).sum(axis=1)
    n_pairs = counts.sum(axis=1) ** 2 - (counts ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A replicate that drew one question only has no pair: NaN, left out of the interval.
        return 1.0 - pair_sum / n_pairs


def _values(pieces: _Pieces, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of each replicate: counts [R, n] says how often each sample was drawn."""
    weights = counts / counts.sum(axis=1, keepdims=True)
    values = {name: weights @ per_sample for name, per_sample in pieces.per_sample.items()}
    values["complexity"] = _complexity(pieces, counts)
    values["diversity"] = _diversity(pieces, counts)
    return {name: values[name] for name in METRICS}


def _draw_counts(n: int, settings: MetricSettings) -> np.ndarray:
    """[1 + bootstrap, n]: how often each question is drawn; row 0 is the original sample (each
    question once), each further row a replicate of n draws with replacement. It depends only on n
    and the settings, so base and post get the same draws."""
    rng = np.random.default_rng(settings.seed)
    draws = rng.integers(0, n, size=(settings.bootstrap, n))
    offsets = n * np.arange(settings.bootstrap)[:, None]
    replicates = np.bincount((draws + offsets).ravel(), minlength=settings.bootstrap * n)
    return np.vstack([np.ones((1, n), dtype=np.int64), replicates.reshape(-1, n)])


def _interval(values: np.ndarray, level: float) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _percent(change: np.ndarray, base: np.ndarray) -> np.ndarray:
    """100 * change / |base|: the sign stays the sign of the change even for a negative base
    (kurtosis can be negative)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * change / np.abs(base)


# --- Public results -------------------------------------------------------------------------------

def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_interval(interval: tuple[float, float] | None) -> list | None:
    return None if interval is None else [_json_float(interval[0]), _json_float(interval[1])]


def _read_interval(value: list | None) -> tuple[float, float] | None:
    return None if value is None else (_read_float(value[0]), _read_float(value[1]))


def _read_float(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """One model's metrics and their bootstrap intervals (None when `settings.bootstrap` is 0)."""

    settings: MetricSettings
    n_samples: int
    values: dict[str, float]
    intervals: dict[str, tuple[float, float] | None]

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "settings_key": self.settings.key(),
                "n_samples": self.n_samples,
                "metrics": {name: {"value": _json_float(self.values[name]),
                                   "ci": _json_interval(self.intervals[name])}
                            for name in self.values}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetrics":
        metrics = data["metrics"]
        return cls(settings=MetricSettings.from_dict(data["settings"]), n_samples=data["n_samples"],
                   values={name: _read_float(m["value"]) for name, m in metrics.items()},
                   intervals={name: _read_interval(m["ci"]) for name, m in metrics.items()})


@dataclasses.dataclass(frozen=True)
class MetricChange:
    """One metric before and after post-training, with paired bootstrap intervals."""

    base: float
    post: float
    change: float                # post - base
    change_pct: float            # 100 * change / |base|
    base_ci: tuple[float, float] | None
    post_ci: tuple[float, float] | None
    change_ci: tuple[float, float] | None
    change_pct_ci: tuple[float, float] | None

    _FLOATS = ("base", "post", "change", "change_pct")
    _INTERVALS = ("base_ci", "post_ci", "change_ci", "change_pct_ci")

    def to_dict(self) -> dict[str, Any]:
        return {**{k: _json_float(getattr(self, k)) for k in self._FLOATS},
                **{k: _json_interval(getattr(self, k)) for k in self._INTERVALS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricChange":
        return cls(**{k: _read_float(data[k]) for k in cls._FLOATS},
                   **{k: _read_interval(data[k]) for k in cls._INTERVALS})


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every metric of a base and a post-trained model on the same questions, and its change."""

    settings: MetricSettings
    n_samples: int
    metrics: dict[str, MetricChange]

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "settings_key": self.settings.key(),
                "n_samples": self.n_samples,
                "metrics": {name: change.to_dict() for name, change in self.metrics.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Comparison":
        return cls(settings=MetricSettings.from_dict(data["settings"]), n_samples=data["n_samples"],
                   metrics={name: MetricChange.from_dict(m) for name, m in data["metrics"].items()})


def model_metrics(scores: np.ndarray, graph: ResidualGraph,
                  settings: MetricSettings = MetricSettings()) -> dict[str, float]:
    """Every metric of one model's samples (point values, no bootstrap)."""
    return summarise_model(scores, graph, settings.replace(bootstrap=0)).values


def summarise_model(scores: np.ndarray, graph: ResidualGraph,
                    settings: MetricSettings = MetricSettings()) -> ModelMetrics:
    """Every metric of one model with bootstrap intervals over its questions."""
    scores = check_scores(scores, graph)
    n = scores.shape[0]
    values = _values(_pieces(scores, graph, settings), _draw_counts(n, settings))
    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(METRICS)
    if settings.bootstrap:
        intervals = {name: _interval(v[1:], settings.ci_level) for name, v in values.items()}
    return ModelMetrics(settings=settings, n_samples=n, values={k: float(v[0]) for k, v in values.items()},
                        intervals=intervals)


def _check_pair(base: np.ndarray, post: np.ndarray, graph: ResidualGraph) -> tuple[np.ndarray, np.ndarray]:
    base, post = check_scores(base, graph, "base scores"), check_scores(post, graph, "post scores")
    if base.shape[0] != post.shape[0]:
        raise ValueError(f"base has {base.shape[0]} samples and post {post.shape[0]}; the paired "
                         f"comparison needs the same questions, in the same order, for both models")
    return base, post


def compare_models(base: np.ndarray, post: np.ndarray, graph: ResidualGraph,
                   settings: MetricSettings = MetricSettings()) -> Comparison:
    """Every metric of base and post (sample k of both = the same question), the change post - base,
    and paired bootstrap intervals of each and of the change."""
    base, post = _check_pair(base, post, graph)
    n = base.shape[0]
    counts = _draw_counts(n, settings)  # the same draws for both models
    base_values = _values(_pieces(base, graph, settings), counts)
    post_values = _values(_pieces(post, graph, settings), counts)
    metrics = {}
    for name in METRICS:
        b, p = float(base_values[name][0]), float(post_values[name][0])
        intervals = dict.fromkeys(MetricChange._INTERVALS)
        if settings.bootstrap:
            br, pr = base_values[name][1:], post_values[name][1:]
            level = settings.ci_level
            intervals = {"base_ci": _interval(br, level), "post_ci": _interval(pr, level),
                         "change_ci": _interval(pr - br, level),
                         "change_pct_ci": _interval(_percent(pr - br, br), level)}
        metrics[name] = MetricChange(base=b, post=p, change=p - b,
                                     change_pct=float(_percent(np.float64(p - b), np.float64(b))),
                                     **intervals)
    return Comparison(settings=settings, n_samples=n, metrics=metrics)


# --- Edges ----------------------------------------------------------------------------------------

def edge_change(base: np.ndarray, post: np.ndarray, graph: ResidualGraph,
                measure: str = "ratio") -> np.ndarray:
    """Change of each edge's strength mean_k |W| from base to post, dense [n_src, n_dst], NaN at
    non-edges (and, for `ratio`, where the base strength is 0).
    - ratio: (mean|W_post| - mean|W_base|) / mean|W_base|
    - difference: mean|W_post| - mean|W_base| (signed: > 0 strengthened)
    - normalised: the difference / the base model's mean |W| over all real edges and samples, so weak
      edges do not blow up as in the ratio."""
    if measure not in EDGE_MEASURES:
        raise ValueError(f"measure={measure!r} is not one of {list(EDGE_MEASURES)}")
    base, post = _check_pair(base, post, graph)
    base_strength, post_strength = np.abs(base).mean(axis=0), np.abs(post).mean(axis=0)
    difference = post_strength - base_strength
    with np.errstate(invalid="ignore", divide="ignore"):
        if measure == "ratio":
            change = difference / base_strength
            change[base_strength == 0] = np.nan
        elif measure == "difference":
            change = difference
        else:
            change = difference / base_strength[graph.real_edge_mask].mean()
    return np.where(graph.real_edge_mask, change, np.nan)


EDGE_COLUMNS = ("src", "dst", "edge", "base_mean_abs", "post_mean_abs", "difference", "rel_change",
                "statistic", "p", "q", "direction")


def significant_edges(base: np.ndarray, post: np.ndarray, graph: ResidualGraph,
                      settings: MetricSettings = MetricSettings(),
                      only_significant: bool = True) -> pd.DataFrame:
    """Edges whose strength |W| changed, by a paired t-test per real edge on |W_post| - |W_base|
    across questions and Benjamini-Hochberg at `settings.fdr`. Ranked by |rel_change|, largest first;
    `direction` is 'strengthened' or 'weakened' (the sign of the mean difference). With
    `only_significant=False` every real edge is listed (q > fdr included)."""
    base, post = _check_pair(base, post, graph)
    base_abs, post_abs = graph.edges(np.abs(base)), graph.edges(np.abs(post))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # An edge whose differences are all equal has zero variance; handled below.
        warnings.simplefilter("ignore", RuntimeWarning)
        statistic, p = stats.ttest_rel(post_abs, base_abs, axis=0)
    base_mean, post_mean = base_abs.mean(axis=0), post_abs.mean(axis=0)
    difference = post_mean - base_mean
    unchanged = np.all(post_abs == base_abs, axis=0)  # t is 0/0: no evidence of any change
    statistic, p = np.where(unchanged, 0.0, statistic), np.where(unchanged, 1.0, p)
    q = stats.false_discovery_control(p, method="bh")
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_change = np.where(base_mean > 0, difference / base_mean, np.nan)
    src, dst = np.nonzero(graph.real_edge_mask)
    table = pd.DataFrame({
        "src": np.asarray(graph.src_names)[src], "dst": np.asarray(graph.dst_names)[dst],
        "edge": graph.edge_names, "base_mean_abs": base_mean, "post_mean_abs": post_mean,
        "difference": difference, "rel_change": rel_change, "statistic": statistic, "p": p, "q": q,
        "direction": np.where(difference > 0, "strengthened", "weakened")})
    if only_significant:
        table = table[table["q"] <= settings.fdr]
    order = np.argsort(-np.abs(table["rel_change"].to_numpy()), kind="stable")  # NaN last
    return table.iloc[order].reset_index(drop=True)


# --- Grids of runs --------------------------------------------------------------------------------

GridEntry = tuple[str, str, float, Comparison]  # (pair, dataset, alpha, comparison)


def _direction(metric: str, change: float) -> str:
    expected = PAPER_DIRECTION[metric]
    if expected is None:
        return "no paper claim"
    if not math.isfinite(change) or change == 0:
        return "no change"
    return "as paper" if np.sign(change) == expected else "against paper"


def _excludes_zero(interval: tuple[float, float] | None) -> bool | None:
    return None if interval is None else bool(interval[0] > 0 or interval[1] < 0)


def grid_table(comparisons: Iterable[GridEntry]) -> pd.DataFrame:
    """A Table-1-style long table: one row per (pair, dataset, alpha, metric) with base -> post, the
    % change and its interval, whether the change's interval excludes 0, and `direction`: whether the
    change goes the way the paper reports for online RL (intensity, complexity, diversity up; kurtosis
    down). Every comparison must share one settings key, which the table's `settings_key` column
    records."""
    rows = []
    keys = set()
    for pair, dataset, alpha, comparison in comparisons:
        keys.add(comparison.settings.key())
        for metric, m in comparison.metrics.items():
            low, high = m.change_pct_ci if m.change_pct_ci is not None else (math.nan, math.nan)
            rows.append({"pair": pair, "dataset": dataset, "alpha": alpha, "metric": metric,
                         "base": m.base, "post": m.post, "change_pct": m.change_pct,
                         "change_pct_low": low, "change_pct_high": high,
                         "ci_excludes_zero": _excludes_zero(m.change_ci),
                         "direction": _direction(metric, m.change),
                         "settings_key": comparison.settings.key()})
    if len(keys) > 1:
        raise ValueError(f"the comparisons were computed under {len(keys)} different metric settings "
                         f"({sorted(keys)}); recompute them under one convention to tabulate them")
    return pd.DataFrame(rows, columns=["pair", "dataset", "alpha", "metric", "base", "post",
                                       "change_pct", "change_pct_low", "change_pct_high",
                                       "ci_excludes_zero", "direction", "settings_key"])


def diversity_summary(comparisons: Iterable[GridEntry]) -> pd.DataFrame:
    """Figure-3a-style counts per model pair and over all ('all'): cells, cells where diversity rose,
    rose with the change's interval above 0, fell, and the mean % change of diversity."""
    table = grid_table(comparisons)
    table = table[table["metric"] == "diversity"]
    groups = [(pair, rows) for pair, rows in table.groupby("pair", sort=True)] + [("all", table)]
    summary = []
    for pair, rows in groups:
        summary.append({"pair": pair, "cells": len(rows),
                        "rose": int((rows["change_pct"] > 0).sum()),
                        "rose_ci_above_zero": int((rows["change_pct_low"] > 0).sum()),
                        "fell": int((rows["change_pct"] < 0).sum()),
                        "mean_change_pct": float(rows["change_pct"].mean()) if len(rows) else math.nan})
    return pd.DataFrame(summary)
