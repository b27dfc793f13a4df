"""Distribution metrics of per-sample edge-score matrices (docs/method.md sections 6-7), their paired bootstrap
confidence intervals and Wilcoxon tests, per-edge paired tests, the metrics' correlation with the
loss, and summaries over a grid of runs.

Pure functions of score arrays `scores[k, s, d]` (n samples, dense [n_src, n_dst] matrices whose
non-edges are structural zeros) and a `ResidualGraph`; no model, no UI. Every convention is a field of
`MetricSettings`, and every result object carries those settings and their key.

The metrics (natural logs throughout):
- intensity: mean |W| over samples and entries; entries = all n_src*n_dst (`intensity_normaliser`
  dense, the paper's formula) or real edges only (edges).
- complexity: Shannon entropy of the histogram of the pooled |W| of all samples, `histogram_bins`
  equal-width bins over [0, top] (numpy's binning: [e_i, e_i+1), the last bin closed), values above
  top counted in the last bin. top is the `complexity_range_quantile` of the pooled |W| of the full
  samples, of both models in a comparison: one grid for both models, the point value and every
  bootstrap resample. On one grid complexity is not scale-free: a model whose scores are all
  doubled spreads over more bins (edge_entropy is the scale-free, bin-free variant).
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
- complexity: the per-sample histograms on the fixed grid, summed with the draw counts (identical to
  histogramming the resampled pool on that grid). A grid per model (each its own quantile) would be
  scale-free, but its intervals miss the variation of that quantile, which they hold fixed: in
  simulation they covered 52% for a nominal 95%; on the shared grid that variation is common to
  both models and largely cancels in the change (tests/test_metrics.py checks the coverage);
- diversity averages the correlation over pairs of drawn positions whose original questions differ:
  a question drawn twice would otherwise contribute a self-pair with correlation 1.
Intervals are percentile intervals at `ci_level`. A change is reported on one of two scales
(`CHANGE_SCALES`): `log_ratio` where base and post are positive in the point estimate and in every
replicate (the interval of log(post/base), shown as % change), else `difference` (post - base in the
metric's units), since the base is then within bootstrap noise of 0 or the signs differ. A change is
called a change (a direction word) only where that interval excludes 0. The per-sample metrics also
get a paired Wilcoxon signed-rank test of post - base.

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

# The scale a change's interval is given on: the % change from a log-ratio interval, or the plain
# difference post - base where the base is near 0 or the signs differ (see `_change_scale`).
CHANGE_SCALES = ("log_ratio", "difference")
# The word for a change whose interval contains 0 (or that has none): neither direction is claimed.
NO_CLEAR_CHANGE = "no clear change"


# --- Input checks ---------------------------------------------------------------------------------


class AllZeroSampleError(ValueError):
    """A sample's matrix is all zero (e.g. a position part with no positions at this T_cut)."""

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
        raise AllZeroSampleError(f"{name}: sample(s) {empty[:10].tolist()} are all zero, so their kurtosis "
                         f"and correlations are undefined; drop them")
    return scores


# --- Metric values from per-sample pieces ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Pieces:
    """What the metrics of any multiset of one model's samples are computed from."""

    per_sample: dict[str, np.ndarray]   # intensity, edge_entropy, kurtosis, output_entropy: [n]
    histograms: np.ndarray              # [n, bins] counts of |W| on complexity's fixed grid
    correlation: np.ndarray             # [n, n] Pearson correlations, diagonal zeroed


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


def complexity_top(models: Iterable[np.ndarray], graph: ResidualGraph,
                   settings: MetricSettings = MetricSettings()) -> float:
    """The upper edge of complexity's bins: the `complexity_range_quantile` of the |W| of the
    `flatten` entries pooled over every sample of every model given (both models of a comparison).
    Fixed before resampling: a resample's own maximum would move the grid with whichever extreme
    question it happened to draw, and the entropy with it; a high quantile rather than the maximum
    keeps one question's outlier from setting the bin width for all."""
    return _complexity_top([check_scores(m, graph) for m in models], graph, settings)


def _complexity_top(models: list[np.ndarray], graph: ResidualGraph,
                    settings: MetricSettings) -> float:
    pooled = np.concatenate([np.abs(_flatten(m, graph, settings)).ravel() for m in models])
    top = float(np.quantile(pooled, settings.complexity_range_quantile))
    if top <= 0:
        raise ValueError(f"the {settings.complexity_range_quantile} quantile of the pooled |W| is 0 "
                         f"(more than {1 - settings.complexity_range_quantile:.1%} of the entries "
                         f"are zero); raise complexity_range_quantile or use flatten=edges")
    return top


def _pieces(scores: np.ndarray, graph: ResidualGraph, settings: MetricSettings,
            top: float) -> _Pieces:
    flat = _flatten(scores, graph, settings)
    constant = np.nonzero(flat.std(axis=1) == 0)[0]
    if constant.size:
        raise ValueError(f"sample(s) {constant[:10].tolist()} are constant over the "
                         f"{settings.flatten} entries, so their correlations are undefined; drop them")
    correlation = np.corrcoef(flat)
    np.fill_diagonal(correlation, 0.0)
    # Clipping at top puts every larger value in the closed last bin.
    clipped = np.minimum(np.sort(np.abs(flat), axis=1), top)
    return _Pieces(per_sample=_per_sample(scores, graph, settings),
                   histograms=_histograms(clipped, top, settings.histogram_bins),
                   correlation=correlation)


def _histograms(sorted_rows: np.ndarray, top: float, bins: int) -> np.ndarray:
    """Counts [rows, bins] of each sorted row (all values in [0, top]) in `bins` equal-width bins
    over [0, top], binned as np.histogram does: [e_i, e_i+1), the last bin closed. Counting by the
    edges themselves (values below each edge) puts a value lying on an edge in the bin starting
    there, whatever the rounding of value * bins / top."""
    edges = np.linspace(0.0, top, bins + 1)
    below = np.stack([np.searchsorted(row, edges, side="left") for row in sorted_rows])
    below[:, -1] = sorted_rows.shape[1]  # the closed last bin holds the values equal to top
    return np.diff(below, axis=1).astype(np.float64)


def _values(pieces: _Pieces, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of each replicate: counts [R, n] says how often each sample was drawn.
    - per-sample metrics: the count-weighted mean;
    - complexity: the histogram entropy of the counts-weighted sum of the per-sample histograms;
    - diversity: 1 - the mean correlation over pairs of drawn positions from different questions.
    One matrix product serves all three (each product is a BLAS call, which on a busy machine costs
    far more than its arithmetic)."""
    counts = counts.astype(np.float64)
    names = list(pieces.per_sample)
    bins = pieces.histograms.shape[1]
    product = counts @ np.hstack([np.column_stack([pieces.per_sample[k] for k in names]),
                                  pieces.histograms, pieces.correlation])
    sums, pooled, correlated = np.split(product, [len(names), len(names) + bins], axis=1)
    values = dict(zip(names, (sums / counts.sum(axis=1, keepdims=True)).T))
    values["complexity"] = _normalised_entropy(pooled)
    pair_sum = (correlated * counts).sum(axis=1)
    n_pairs = counts.sum(axis=1) ** 2 - (counts ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A replicate that drew one question only has no pair: NaN, left out of the interval.
        values["diversity"] = 1.0 - pair_sum / n_pairs
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


def _change_scale(base: float, post: float, base_replicates: np.ndarray | None,
                  post_replicates: np.ndarray | None) -> str:
    """log_ratio where base and post are positive in the point estimate and in every replicate
    that has both (a diversity replicate that drew one question has neither), else difference.
    The bootstrap itself judges "near 0": a base whose replicates reach 0 or below cannot be told
    from 0 at this sample size, and a % of it says nothing."""
    positive = base > 0 and post > 0
    if positive and base_replicates is not None:
        both = np.isfinite(base_replicates) & np.isfinite(post_replicates)
        positive = bool((base_replicates[both] > 0).all() and (post_replicates[both] > 0).all())
    return "log_ratio" if positive else "difference"


def _log_ratio_interval(base_replicates: np.ndarray, post_replicates: np.ndarray,
                        level: float) -> tuple[float, float] | None:
    """Percentile interval of log(post / base) over the replicates, as % change."""
    with np.errstate(invalid="ignore"):  # NaN replicates (see _change_scale) are left out
        interval = _interval(np.log(post_replicates / base_replicates), level)
    return None if interval is None else (100.0 * math.expm1(interval[0]),
                                          100.0 * math.expm1(interval[1]))


def _wilcoxon_p(base: np.ndarray, post: np.ndarray) -> float:
    """Two-sided p of the paired Wilcoxon signed-rank test of post - base over the questions (zero
    differences dropped, scipy's default); 1 where every difference is 0: no evidence of change."""
    differences = post - base
    if not np.any(differences):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # very few nonzero differences: a coarse p
        return float(stats.wilcoxon(differences).pvalue)


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
    """One model's metrics and their bootstrap intervals (None when `settings.bootstrap` is 0);
    complexity binned over [0, complexity_top]."""

    settings: MetricSettings
    n_samples: int
    values: dict[str, float]
    intervals: dict[str, tuple[float, float] | None]
    complexity_top: float

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "settings_key": self.settings.key(),
                "n_samples": self.n_samples, "complexity_top": self.complexity_top,
                "metrics": {name: {"value": _json_float(self.values[name]),
                                   "ci": _json_interval(self.intervals[name])}
                            for name in self.values}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetrics":
        metrics = data["metrics"]
        return cls(settings=MetricSettings.from_dict(data["settings"]), n_samples=data["n_samples"],
                   values={name: _read_float(m["value"]) for name, m in metrics.items()},
                   intervals={name: _read_interval(m["ci"]) for name, m in metrics.items()},
                   complexity_top=data["complexity_top"])


@dataclasses.dataclass(frozen=True)
class MetricChange:
    """One metric before and after post-training, with paired bootstrap intervals.

    The change is reported on `scale` (CHANGE_SCALES): log_ratio, the % change and its interval
    (from the interval of log(post / base)); or difference, the change post - base and its interval
    (change_pct is then NaN: a % of a base near 0, or across a sign change, says nothing).
    change_ci is given on both scales. `wilcoxon_p`: the paired signed-rank test's p for the
    per-sample metrics, NaN for complexity and diversity (they have no per-sample form)."""

    base: float
    post: float
    change: float                # post - base
    change_pct: float            # 100 (post - base) / base on the log_ratio scale, else NaN
    base_ci: tuple[float, float] | None
    post_ci: tuple[float, float] | None
    change_ci: tuple[float, float] | None
    change_pct_ci: tuple[float, float] | None
    scale: str
    wilcoxon_p: float

    _FLOATS = ("base", "post", "change", "change_pct", "wilcoxon_p")
    _INTERVALS = ("base_ci", "post_ci", "change_ci", "change_pct_ci")

    @property
    def interval(self) -> tuple[float, float] | None:
        """The reported change's interval: in % (log_ratio) or in the metric's units (difference)."""
        return self.change_pct_ci if self.scale == "log_ratio" else self.change_ci

    @property
    def clear_sign(self) -> int:
        """+1 or -1 where the reported interval lies above or below 0, the only cases where a
        direction is claimed; 0 where it contains 0 or there is none."""
        if self.interval is None:
            return 0
        return 1 if self.interval[0] > 0 else -1 if self.interval[1] < 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, **{k: _json_float(getattr(self, k)) for k in self._FLOATS},
                **{k: _json_interval(getattr(self, k)) for k in self._INTERVALS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricChange":
        return cls(scale=data["scale"], **{k: _read_float(data[k]) for k in cls._FLOATS},
                   **{k: _read_interval(data[k]) for k in cls._INTERVALS})


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every metric of a base and a post-trained model on the same questions, and its change;
    complexity binned for both over [0, complexity_top]."""

    settings: MetricSettings
    n_samples: int
    metrics: dict[str, MetricChange]
    complexity_top: float

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "settings_key": self.settings.key(),
                "n_samples": self.n_samples, "complexity_top": self.complexity_top,
                "metrics": {name: change.to_dict() for name, change in self.metrics.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Comparison":
        return cls(settings=MetricSettings.from_dict(data["settings"]), n_samples=data["n_samples"],
                   metrics={name: MetricChange.from_dict(m) for name, m in data["metrics"].items()},
                   complexity_top=data["complexity_top"])


def model_metrics(scores: np.ndarray, graph: ResidualGraph,
                  settings: MetricSettings = MetricSettings()) -> dict[str, float]:
    """Every metric of one model's samples (point values, no bootstrap)."""
    return summarise_model(scores, graph, settings.replace(bootstrap=0)).values


def summarise_model(scores: np.ndarray, graph: ResidualGraph,
                    settings: MetricSettings = MetricSettings()) -> ModelMetrics:
    """Every metric of one model with bootstrap intervals over its questions."""
    scores = check_scores(scores, graph)
    n = scores.shape[0]
    top = _complexity_top([scores], graph, settings)
    values = _values(_pieces(scores, graph, settings, top), _draw_counts(n, settings))
    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(METRICS)
    if settings.bootstrap:
        intervals = {name: _interval(v[1:], settings.ci_level) for name, v in values.items()}
    return ModelMetrics(settings=settings, n_samples=n, values={k: float(v[0]) for k, v in values.items()},
                        intervals=intervals, complexity_top=top)


def _check_pair(base: np.ndarray, post: np.ndarray, graph: ResidualGraph) -> tuple[np.ndarray, np.ndarray]:
    base, post = check_scores(base, graph, "base scores"), check_scores(post, graph, "post scores")
    if base.shape[0] != post.shape[0]:
        raise ValueError(f"base has {base.shape[0]} samples and post {post.shape[0]}; the paired "
                         f"comparison needs the same questions, in the same order, for both models")
    return base, post


def compare_models(base: np.ndarray, post: np.ndarray, graph: ResidualGraph,
                   settings: MetricSettings = MetricSettings()) -> Comparison:
    """Every metric of base and post (sample k of both = the same question), the change post - base
    on its scale, paired bootstrap intervals of each and of the change, and for the per-sample
    metrics the paired Wilcoxon test."""
    base, post = _check_pair(base, post, graph)
    n = base.shape[0]
    counts = _draw_counts(n, settings)  # the same draws for both models
    top = _complexity_top([base, post], graph, settings)  # one grid for both models
    base_pieces, post_pieces = _pieces(base, graph, settings, top), _pieces(post, graph, settings, top)
    base_values, post_values = _values(base_pieces, counts), _values(post_pieces, counts)
    metrics = {}
    for name in METRICS:
        b, p = float(base_values[name][0]), float(post_values[name][0])
        br, pr = (base_values[name][1:], post_values[name][1:]) if settings.bootstrap else (None, None)
        scale = _change_scale(b, p, br, pr)
        intervals = dict.fromkeys(MetricChange._INTERVALS)
        if settings.bootstrap:
            level = settings.ci_level
            intervals = {"base_ci": _interval(br, level), "post_ci": _interval(pr, level),
                         "change_ci": _interval(pr - br, level),
                         "change_pct_ci": (_log_ratio_interval(br, pr, level)
                                           if scale == "log_ratio" else None)}
        wilcoxon_p = (_wilcoxon_p(base_pieces.per_sample[name], post_pieces.per_sample[name])
                      if name in base_pieces.per_sample else math.nan)
        metrics[name] = MetricChange(
            base=b, post=p, change=p - b,
            change_pct=100.0 * (p - b) / b if scale == "log_ratio" else math.nan,
            scale=scale, wilcoxon_p=wilcoxon_p, **intervals)
    return Comparison(settings=settings, n_samples=n, metrics=metrics, complexity_top=top)


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
    `direction` is 'strengthened' or 'weakened' (the sign of the mean difference) where q <= fdr,
    else 'no clear change'. With `only_significant=False` every real edge is listed (q > fdr
    included)."""
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
        "direction": np.where(q <= settings.fdr, np.where(difference > 0, "strengthened", "weakened"),
                              NO_CLEAR_CHANGE)})
    if only_significant:
        table = table[table["q"] <= settings.fdr]
    order = np.argsort(-np.abs(table["rel_change"].to_numpy()), kind="stable")  # NaN last
    return table.iloc[order].reset_index(drop=True)


# --- Confidence ----------------------------------------------------------------------------------

LOSS_CORRELATION_COLUMNS = ("metric", "rho", "p", "n")


def loss_correlation(per_sample: dict[str, np.ndarray], loss: np.ndarray) -> pd.DataFrame:
    """Spearman correlation of each per-sample metric with the per-sample loss, and its two-sided p
    (NaN where either is constant). The loss's gradient at the logits is (softmax - onehot) / T, so
    |W| grows with the model's uncertainty on its own tokens (docs/method.md section 8): a metric
    that follows the loss may be measuring confidence rather than circuitry."""
    loss = np.asarray(loss, dtype=np.float64)
    rows = []
    for name, values in per_sample.items():
        if len(values) != len(loss):
            raise ValueError(f"{name} has {len(values)} values and the loss {len(loss)}; they must be "
                             f"the same questions")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)  # rho is NaN then
            result = stats.spearmanr(values, loss)
        rows.append({"metric": name, "rho": float(result.statistic), "p": float(result.pvalue),
                     "n": len(loss)})
    return pd.DataFrame(rows, columns=list(LOSS_CORRELATION_COLUMNS))


# --- Grids of runs --------------------------------------------------------------------------------

GridEntry = tuple[str, str, float, Comparison]  # (pair, dataset, alpha, comparison)

GRID_COLUMNS = ("pair", "dataset", "alpha", "metric", "base", "post", "scale", "change",
                "change_low", "change_high", "change_pct", "change_pct_low", "change_pct_high",
                "clear_sign", "wilcoxon_p", "direction", "settings_key")


def _direction(metric: str, change: MetricChange) -> str:
    """'as paper' or 'against paper' for a clear change of a metric the paper makes a claim about."""
    expected = PAPER_DIRECTION[metric]
    if expected is None:
        return "no paper claim"
    if change.clear_sign == 0:
        return NO_CLEAR_CHANGE
    return "as paper" if change.clear_sign == expected else "against paper"


def grid_table(comparisons: Iterable[GridEntry]) -> pd.DataFrame:
    """A Table-1-style long table: one row per (pair, dataset, alpha, metric) with base -> post, the
    change on its `scale` (change_pct and its interval on the log_ratio scale, NaN on the
    difference scale; change and its interval on both), whether the reported interval excludes 0,
    `clear_sign` (+1 or -1 where the reported interval lies above or below 0, else 0), the
    Wilcoxon p of the per-sample metrics, and `direction`: whether a clear change goes the way
    the paper reports for online RL (intensity, complexity, diversity up; kurtosis down). Every
    comparison must share one settings key, which the table's `settings_key` column records."""
    rows = []
    keys = set()
    for pair, dataset, alpha, comparison in comparisons:
        keys.add(comparison.settings.key())
        for metric, m in comparison.metrics.items():
            change_low, change_high = m.change_ci or (math.nan, math.nan)
            pct_low, pct_high = m.change_pct_ci or (math.nan, math.nan)
            rows.append({"pair": pair, "dataset": dataset, "alpha": alpha, "metric": metric,
                         "base": m.base, "post": m.post, "scale": m.scale, "change": m.change,
                         "change_low": change_low, "change_high": change_high,
                         "change_pct": m.change_pct, "change_pct_low": pct_low,
                         "change_pct_high": pct_high,
                         "clear_sign": m.clear_sign,
                         "wilcoxon_p": m.wilcoxon_p, "direction": _direction(metric, m),
                         "settings_key": comparison.settings.key()})
    if len(keys) > 1:
        raise ValueError(f"the comparisons were computed under {len(keys)} different metric settings "
                         f"({sorted(keys)}); recompute them under one convention to tabulate them")
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


def diversity_summary(comparisons: Iterable[GridEntry]) -> pd.DataFrame:
    """Figure-3a-style counts per model pair and over all ('all'): cells, cells where diversity rose
    (the point change), rose with the reported interval above 0, fell, fell with it below 0, and
    the mean % change of diversity (over the cells on the log_ratio scale)."""
    table = grid_table(comparisons)
    table = table[table["metric"] == "diversity"]
    groups = [(pair, rows) for pair, rows in table.groupby("pair", sort=True)] + [("all", table)]
    summary = []
    for pair, rows in groups:
        summary.append({"pair": pair, "cells": len(rows),
                        "rose": int((rows["change"] > 0).sum()),
                        "rose_ci_above_zero": int((rows["clear_sign"] > 0).sum()),
                        "fell": int((rows["change"] < 0).sum()),
                        "fell_ci_below_zero": int((rows["clear_sign"] < 0).sum()),
                        "mean_change_pct": float(rows["change_pct"].mean()) if len(rows) else math.nan})
    return pd.DataFrame(summary)


# --- Controls (docs/method.md section 8) -----------------------------------------------------------

# Which stored position parts (core.eap.POSITION_GROUPS: first token, rest of the prompt, answer)
# each MetricSettings.positions sums.
POSITION_PARTS = {"all": (0, 1, 2), "no-sink": (1, 2), "answer-only": (2,)}


def score_variant(parts: np.ndarray | None, scores: np.ndarray, logit_grad_norm: np.ndarray | None,
                  settings: MetricSettings) -> np.ndarray:
    """The per-sample matrices the metrics read under `settings.positions` and `settings.normalise`:
    the sum of the chosen position parts ([n, 3, ...]; `scores` itself for all positions), each
    sample then divided by its logit-gradient norm for normalise=logit-grad. Any trailing shape
    (dense matrices or real-edge vectors). A variant whose inputs were not stored is a ValueError
    saying so; one that leaves a sample all zero is an AllZeroSampleError saying why."""
    if settings.positions != "all":
        if parts is None:
            raise ValueError(f"positions={settings.positions} needs the scores' position parts, "
                             f"which were not stored for these samples")
        scores = np.asarray(parts)[:, list(POSITION_PARTS[settings.positions])].sum(axis=1)
        empty = np.flatnonzero(~np.asarray(scores).reshape(len(scores), -1).any(axis=1))
        if empty.size:
            raise AllZeroSampleError(
                f"positions={settings.positions}: the chosen part is zero for sample(s) "
                f"{empty[:10].tolist()}; a sample scored at T_cut 1 has no answer position (its one "
                f"scored token is predicted from the prompt), so answer-only is defined from T_cut 2")
    if settings.normalise == "logit-grad":
        if logit_grad_norm is None:
            raise ValueError("normalise=logit-grad needs each sample's logit-gradient norm, which "
                             "was not stored for these samples")
        norms = np.asarray(logit_grad_norm, dtype=np.float64)
        if not np.all(norms > 0):
            raise ValueError("a sample's logit-gradient norm is 0 or missing, so it cannot be "
                             "divided by it")
        scores = np.asarray(scores, dtype=np.float64) / norms.reshape(-1, *[1] * (np.ndim(scores) - 1))
    return scores


DECOMPOSITION_PARTS = ("total", "weights", "tokens")


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """Every metric's change split into weights and tokens (docs/method.md section 8), from the
    scores S(scorer, tokens) of one set of questions:
    total = S(post, post) - S(base, base) = weights + tokens, with
    weights = S(post, base's tokens) - S(base, base) (same tokens, other weights) and
    tokens = S(post, post) - S(post, base's tokens) (same weights, other tokens).
    `symmetric_*`: the other path, through S(base, post's tokens): weights = S(post, post) -
    S(base, post's tokens), tokens = S(base, post's tokens) - S(base, base); None where those scores
    were not given. Point values per part (`values[part][metric]`) and paired-bootstrap percentile
    intervals (`intervals[part][metric]`, None without bootstrap): the same question draws for every
    matrix, complexity on one grid over all of them, so each replicate also sums exactly."""

    settings: MetricSettings
    n_samples: int
    values: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float] | None]]
    complexity_top: float


def decompose(base: np.ndarray, post: np.ndarray, post_on_base: np.ndarray, graph: ResidualGraph,
              settings: MetricSettings = MetricSettings(),
              base_on_post: np.ndarray | None = None) -> Decomposition:
    """`Decomposition` of the change base -> post; sample k of every matrix is question k (base and
    post on their own answers, post_on_base = post scored on base's answer, base_on_post = base
    scored on post's answer)."""
    matrices = {"base": base, "post": post, "post_on_base": post_on_base}
    if base_on_post is not None:
        matrices["base_on_post"] = base_on_post
    checked = {name: check_scores(m, graph, f"{name} scores") for name, m in matrices.items()}
    sizes = {m.shape[0] for m in checked.values()}
    if len(sizes) != 1:
        raise ValueError(f"the matrices hold different numbers of samples "
                         f"({ {k: m.shape[0] for k, m in checked.items()} }); the decomposition "
                         f"needs every one on the same questions, in the same order")
    n = sizes.pop()
    counts = _draw_counts(n, settings)
    top = _complexity_top(list(checked.values()), graph, settings)
    values = {name: _values(_pieces(m, graph, settings, top), counts) for name, m in checked.items()}
    parts = {"total": ("post", "base"), "weights": ("post_on_base", "base"),
             "tokens": ("post", "post_on_base")}
    if base_on_post is not None:
        parts |= {"symmetric_weights": ("post", "base_on_post"),
                  "symmetric_tokens": ("base_on_post", "base")}
    points, intervals = {}, {}
    for part, (minuend, subtrahend) in parts.items():
        points[part], intervals[part] = {}, {}
        for name in METRICS:
            difference = values[minuend][name] - values[subtrahend][name]
            points[part][name] = float(difference[0])
            intervals[part][name] = (_interval(difference[1:], settings.ci_level)
                                     if settings.bootstrap else None)
    return Decomposition(settings=settings, n_samples=n, values=points, intervals=intervals,
                         complexity_top=top)


def exceeds_null(change: MetricChange, null: MetricChange) -> bool:
    """Whether a real change exceeds its null model's: the real change is clear (its reported
    interval excludes 0) and that interval lies wholly beyond the null's point change, on the real
    change's side. Compared on the % scale where both changes are on it (the null run selects its
    own questions, so its base value differs a little), else on the difference scale.
    Why the null's point change and not its interval: the null answers "what does an update of this
    size do", and its point change is that reference; asking two intervals not to overlap is a test
    at well below the nominal level (about 0.6% for two 95% intervals) and throws power away. The
    null's interval is shown beside it for a reader who wants the stricter reading."""
    sign = change.clear_sign
    if sign == 0:
        return False
    if change.scale == "log_ratio" and null.scale == "log_ratio":
        interval, reference = change.change_pct_ci, null.change_pct
    else:
        interval, reference = change.change_ci, null.change
    if interval is None or not math.isfinite(reference):
        return False
    return interval[0] > reference if sign > 0 else interval[1] < reference
