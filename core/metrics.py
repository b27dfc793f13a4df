"""Distribution metrics of per-sample edge-score matrices (docs/method.md sections 6-7), the paired
permutation test of every change and the interval that inverts it, bootstrap-t intervals of each
model's value, Holm's adjustment, per-edge paired tests, the metrics' correlation with the loss, and
summaries over a grid of runs.

Pure functions of score arrays `scores[k, s, d]` (n samples, dense [n_src, n_dst] matrices whose
non-edges are structural zeros) and a `ResidualGraph`; no model, no UI. Every convention is a field of
`MetricSettings`, and every result object carries those settings and their key.

The metrics (natural logs throughout):
- intensity: mean |W| over samples and entries; entries = all n_src*n_dst (`intensity_normaliser`
  dense, the paper's formula) or real edges only (edges).
- complexity: Shannon entropy of the histogram of the pooled |W| of all samples of one model,
  `histogram_bins` equal-width bins over [0, that pool's maximum] (`complexity_grid` own-max, the
  paper's definition: scale-free; numpy's binning, [e_i, e_i+1), the last bin closed), or over
  [0, a quantile of both models' joint pool] (shared-quantile; not scale-free).
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

Every metric of any weighted set of samples (a bootstrap replicate, a set with one question left
out, a pool with base and post swapped within some questions) is computed exactly by its definition
from per-sample pieces (`_Rows`): per-sample averages weighted, complexity's histogram the weighted
sum of the samples' histograms on the set's own grid, diversity over pairs of different members.

Changes (`compare_models`): intensity as a % from the log ratio, every other metric as the difference
post - base (CHANGE_SCALES). Each gets the two-sided paired permutation p (base and post swapped
within questions, every pattern or `permutations` random ones) and, as its interval, every change
that test does not reject; so the interval excludes 0 exactly where p <= 1 - ci_level. Each model's
value gets a symmetric bootstrap-t interval (paired bootstrap over questions, a jackknife standard
error in every replicate). `holm` adjusts a table's p-values; `MetricSettings.primary` names the
cells a claim rests on. The per-sample metrics also carry a Wilcoxon p, a secondary column.

Per-edge tests: a paired t-test per real edge on d_k = |W_post,k,e| - |W_base,k,e| across questions
(it tests the mean change in strength, which is what `rel_change` reports; with the paper's n = 100
questions the t statistic of a mean is robust to the heavy tails of edge scores), then
Benjamini-Hochberg at `fdr` over all real edges.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from scipy import special, stats

from core.graph import ResidualGraph
from core.settings import METRIC_NAMES, MetricSettings

METRICS = METRIC_NAMES
# The metrics with one value per sample, in the order per_sample_metrics returns them (complexity is
# a pooled histogram and diversity a mean over pairs: neither has a per-sample form).
PER_SAMPLE_METRICS = ("intensity", "edge_entropy", "kurtosis", "output_entropy")

# The way the paper reports online RL (PPO, GRPO) moving each metric; None where it makes no claim
# (edge_entropy and output_entropy are this project's reconstructions).
PAPER_DIRECTION = {"intensity": 1, "complexity": 1, "edge_entropy": None, "kurtosis": -1,
                   "diversity": 1, "output_entropy": None}

EDGE_MEASURES = ("ratio", "difference", "normalised")

# The scale a change is reported on: the % change from the log ratio (intensity, a ratio quantity),
# or the difference post - base (every other metric, whose zero is arbitrary; LOG_SCALE_METRICS).
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


# --- Metric values of weighted sets of samples ----------------------------------------------------

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
    """The upper edge of complexity's bins under complexity_grid shared-quantile: the
    `complexity_range_quantile` of the |W| of the `flatten` entries pooled over every sample of
    every model given (both models of a comparison), one grid for all of them and every resample.
    (Under own-max, the default, each model's grid ends at its own pool's maximum.)"""
    return _shared_top([check_scores(m, graph) for m in models], graph, settings)


def _shared_top(models: list[np.ndarray], graph: ResidualGraph, settings: MetricSettings) -> float:
    pooled = np.concatenate([np.abs(_flatten(m, graph, settings)).ravel() for m in models])
    top = float(np.quantile(pooled, settings.complexity_range_quantile))
    if top <= 0:
        raise ValueError(f"the {settings.complexity_range_quantile} quantile of the pooled |W| is 0 "
                         f"(more than {1 - settings.complexity_range_quantile:.1%} of the entries "
                         f"are zero); raise complexity_range_quantile or use flatten=edges")
    return top


class _Rows:
    """Samples ("rows": one model's, or several matrices' stacked) from which every metric of any
    weighted multiset of them is computed. A weight vector w [m] says how often each row is in the
    set: a bootstrap replicate puts its draw counts on one model's rows; a permutation puts each
    question's base row in one set and its post row in the other.

    Complexity's grid is part of the statistic: under own-max the bins of a set end at the largest
    |W| of the rows in it, which is one of the rows' own maxima, so the set's histogram is the
    weighted sum of its rows' histograms on that grid (computed once per grid that occurs); under
    shared-quantile one grid serves every set."""

    def __init__(self, matrices: list[np.ndarray], graph: ResidualGraph, settings: MetricSettings):
        per_sample = [_per_sample(m, graph, settings) for m in matrices]
        self.per_sample = np.vstack([np.column_stack([p[k] for k in PER_SAMPLE_METRICS])
                                     for p in per_sample])                      # [m, 4]
        flat = np.vstack([_flatten(m, graph, settings) for m in matrices])
        constant = np.nonzero(flat.std(axis=1) == 0)[0]
        if constant.size:
            raise ValueError(f"sample(s) {constant[:10].tolist()} are constant over the "
                             f"{settings.flatten} entries, so their correlations are undefined; "
                             f"drop them")
        self.correlation = np.corrcoef(flat)
        np.fill_diagonal(self.correlation, 0.0)
        self.sorted = np.sort(np.abs(flat), axis=1)
        self.bins = settings.histogram_bins
        if settings.complexity_grid == "own-max":
            self.tops, self.own_top = np.unique(self.sorted[:, -1], return_inverse=True)
        else:
            self.tops = np.array([_shared_top(matrices, graph, settings)])
            self.own_top = np.zeros(len(flat), dtype=np.intp)
        self._histograms: dict[int, np.ndarray] = {}

    def block(self, start: int, stop: int) -> "_Rows":
        """Rows start..stop alone (one matrix of several stacked), on the same grids: a set of one
        matrix's rows is computed from its own rows only, so two equal matrices give bit-equal
        values wherever they are stacked."""
        part = object.__new__(_Rows)
        part.per_sample = self.per_sample[start:stop]
        part.correlation = self.correlation[start:stop, start:stop]
        part.sorted = self.sorted[start:stop]
        part.bins, part.tops, part.own_top = self.bins, self.tops, self.own_top[start:stop]
        part._histograms = {}
        return part

    def histograms(self, grid: int) -> np.ndarray:
        """[m, bins] counts of every row's |W| in `bins` equal-width bins over [0, tops[grid]],
        binned as np.histogram with that range does ([e_i, e_i+1), the last bin closed; its edges
        from np.linspace, so a value on an edge lands where numpy puts it); larger values (rows
        outside a set with this grid, or above a shared quantile) are counted in the last bin."""
        if grid not in self._histograms:
            edges = np.linspace(0.0, self.tops[grid], self.bins + 1)
            below = np.stack([np.searchsorted(row, edges, side="left") for row in self.sorted])
            below[:, -1] = self.sorted.shape[1]
            self._histograms[grid] = np.diff(below, axis=1).astype(np.float64)
        return self._histograms[grid]

    def grid(self, weights: np.ndarray) -> np.ndarray:
        """[R]: the index in `tops` of each weighted set's grid (its largest member's maximum)."""
        return np.where(weights > 0, self.own_top[None, :], -1).max(axis=1)

    def pooled(self, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """[R, bins]: each set's histogram on its grid."""
        pooled = np.empty((len(weights), self.bins))
        for g in np.unique(grid):
            chosen = grid == g
            pooled[chosen] = weights[chosen] @ self.histograms(int(g))
        return pooled

    def evaluate(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric of each weighted set (weights [R, m]), [R] each. Per-sample metrics: the
        weighted mean. Complexity: the entropy of the weighted sum of the rows' histograms on the
        set's grid. Diversity: 1 - the mean correlation over pairs of set members that are
        different rows (a row drawn twice would add a self-pair of correlation 1); a set of one
        member has no pair: NaN."""
        weights = np.asarray(weights, dtype=np.float64)
        total = weights.sum(axis=1)
        means = weights @ self.per_sample / total[:, None]
        values = dict(zip(PER_SAMPLE_METRICS, means.T))
        values["complexity"] = _normalised_entropy(self.pooled(weights, self.grid(weights)))
        pairs = total ** 2 - (weights ** 2).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values["diversity"] = 1.0 - ((weights @ self.correlation) * weights).sum(axis=1) / pairs
        return {name: values[name] for name in METRICS}

    def leave_one_out(self, weights: np.ndarray, replicate: np.ndarray,
                      row: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric of the sets weights[replicate[i]] without row[i] (every copy of it), [L]
        each, for the jackknife: per-sample metrics and diversity by removing the row's terms from
        the set's sums; complexity by removing its histogram from the set's, on the set's grid,
        or on the next grid down where the row held the set's maximum alone."""
        weights = np.asarray(weights, dtype=np.float64)
        copies = weights[replicate, row]
        total = weights.sum(axis=1)
        left = total[replicate] - copies
        sums = weights @ self.per_sample
        with np.errstate(invalid="ignore", divide="ignore"):  # a replicate of one question: NaN
            means = (sums[replicate] - copies[:, None] * self.per_sample[row]) / left[:, None]
        values = dict(zip(PER_SAMPLE_METRICS, means.T))
        pair_sums = weights @ self.correlation
        pair_total = ((pair_sums * weights).sum(axis=1)[replicate]
                      - 2 * copies * pair_sums[replicate, row])
        pairs = left ** 2 - ((weights ** 2).sum(axis=1)[replicate] - copies ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            values["diversity"] = 1.0 - pair_total / pairs
        grid = self.grid(weights)
        pooled = self.pooled(weights, grid)
        at_top = (weights * (self.own_top[None, :] == grid[:, None])).sum(axis=1)
        moves = (self.own_top[row] == grid[replicate]) & (at_top[replicate] == copies)
        complexity = np.empty(len(row))
        stays = ~moves
        for g in np.unique(grid[replicate[stays]]):
            chosen = stays & (grid[replicate] == g)
            complexity[chosen] = _normalised_entropy(
                pooled[replicate[chosen]]
                - copies[chosen, None] * self.histograms(int(g))[row[chosen]])
        if moves.any():
            smaller = weights[replicate[moves]].copy()
            smaller[np.arange(moves.sum()), row[moves]] = 0
            complexity[moves] = _normalised_entropy(self.pooled(smaller, self.grid(smaller)))
        values["complexity"] = complexity
        return {name: values[name] for name in METRICS}


def _draw_counts(n: int, settings: MetricSettings) -> np.ndarray:
    """[1 + bootstrap, n]: how often each question is drawn; row 0 is the original sample (each
    question once), each further row a replicate of n draws with replacement. It depends only on n
    and the settings, so every model gets the same draws."""
    rng = np.random.default_rng(settings.seed)
    draws = rng.integers(0, n, size=(settings.bootstrap, n))
    offsets = n * np.arange(settings.bootstrap)[:, None]
    replicates = np.bincount((draws + offsets).ravel(), minlength=settings.bootstrap * n)
    return np.vstack([np.ones((1, n), dtype=np.int64), replicates.reshape(-1, n)])


def _swaps(n: int, settings: MetricSettings) -> tuple[np.ndarray, bool]:
    """([S, n] of 0/1, exact): which questions swap base and post in each permutation. Every one
    of the 2^n swap patterns (the first none) where 2^n <= `permutations`, exact = True; else
    `permutations` random patterns (each question swapped with probability 1/2), seeded apart
    from the bootstrap's draws."""
    if n <= 30 and 2 ** n <= settings.permutations:
        patterns = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
        return patterns, True
    rng = np.random.default_rng([settings.seed, 1])
    return rng.integers(0, 2, size=(settings.permutations, n)), False


# Each metric's change is tested and given its interval on this transform of the two models'
# values: log for intensity, a ratio quantity (the % change comes from the log ratio), the
# identity for the others, whose zero is arbitrary (docs/method.md section 7).
LOG_SCALE_METRICS = ("intensity",)


def _transform(name: str, values: np.ndarray) -> np.ndarray:
    if name in LOG_SCALE_METRICS:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(values)
    return values


@dataclasses.dataclass(frozen=True)
class _Bootstrap:
    """The paired bootstrap's draws and, for the jackknife inside each replicate, every (replicate,
    question drawn, copies) triple: leaving that question out of that replicate."""

    counts: np.ndarray      # [1 + R, n], row 0 the original sample
    replicate: np.ndarray   # [L]
    question: np.ndarray    # [L]
    copies: np.ndarray      # [L]

    @classmethod
    def draw(cls, n: int, settings: MetricSettings) -> "_Bootstrap":
        counts = _draw_counts(n, settings)
        replicate, question = np.nonzero(counts)
        return cls(counts, replicate, question, counts[replicate, question].astype(np.float64))

    def evaluate(self, rows: _Rows, position: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(values [1 + R], leave-one-out values [L]) of every metric of matrix `position` of
        those stacked in `rows`."""
        n = self.counts.shape[1]
        own = rows.block(position * n, (position + 1) * n)
        return (own.evaluate(self.counts),
                own.leave_one_out(self.counts, self.replicate, self.question))

    def standard_errors(self, statistic: np.ndarray, leave_one_out: np.ndarray) -> np.ndarray:
        """[1 + R]: the jackknife standard error of a statistic in every replicate, from its
        values without each question drawn (all its copies): sqrt((n - 1) / n sum over the n
        draws of (T_(i) - their mean)^2), a question drawn c times counting as c draws of
        T + (T_(-q) - T) / c. Leaving out every copy lets a replicate that drew the question
        holding the pool's maximum twice still see what that question does to the grid."""
        rows, n = self.counts.shape
        own = statistic[self.replicate]
        per_draw = own + (leave_one_out - own) / self.copies
        mean = np.bincount(self.replicate, self.copies * per_draw, rows) / n
        spread = np.bincount(self.replicate,
                             self.copies * (per_draw - mean[self.replicate]) ** 2, rows)
        return np.sqrt((n - 1) / n * spread)

    def interval(self, statistic: np.ndarray, leave_one_out: np.ndarray, level: float,
                 magnitude: float) -> tuple[float, float] | None:
        """The symmetric bootstrap-t interval T_0 -+ q se_0, q the `level` quantile of
        |T_r - T_0| / se_r over the replicates, se the jackknife's (docs/method.md section 7).
        Studentizing widens the interval where a few heavy questions dominate (their
        replicates' standard errors are larger), which a percentile interval cannot; the
        symmetric form does not lean on the skew of t that a dominant question creates.
        Deviations and standard errors below 1e-12 `magnitude` (the size of the values the
        statistic is made of) are rounding, and count as 0."""
        resolution = 1e-12 * magnitude
        with np.errstate(invalid="ignore"):
            se = self.standard_errors(statistic, leave_one_out)
        se = np.where(se <= resolution, 0.0, se)
        t0, se0 = statistic[0], se[0]
        if not (math.isfinite(t0) and math.isfinite(se0)):
            return None
        if se0 == 0:
            return float(t0), float(t0)
        deviation, spread = np.abs(statistic[1:] - t0), se[1:]
        deviation = np.where(deviation <= resolution, 0.0, deviation)
        keep = np.isfinite(deviation) & np.isfinite(spread)
        if not keep.any():
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            t = deviation[keep] / spread[keep]
        # No spread in a replicate: 0/0 is no deviation, d/0 an unbounded one (kept finite so
        # the quantile stays defined).
        t = np.minimum(np.nan_to_num(t, nan=0.0), 1e12)
        q = float(np.quantile(t, level))
        return float(t0 - q * se0), float(t0 + q * se0)


def _permutation_p(observed: float, swapped: np.ndarray, exact: bool, magnitude: float) -> float:
    """Two-sided p of the paired permutation test from the observed statistic and its values under
    the swaps (`_swaps`). Exact enumeration (the identity among the patterns): the share of all 2^n
    patterns with |T| >= |T_obs|; random swaps: (1 + that count) / (1 + S), a valid p. A relative
    tolerance of 1e-9 keeps a pattern equal to the observed value up to rounding counted, and an
    observed change below 1e-12 `magnitude` (the size of the values compared) is rounding: p 1."""
    if not math.isfinite(observed):
        return math.nan
    if abs(observed) <= 1e-12 * magnitude:
        return 1.0
    at_least = int((np.abs(swapped) >= abs(observed) * (1 - 1e-9)).sum())
    return at_least / len(swapped) if exact else (1 + at_least) / (1 + len(swapped))


def _wilcoxon_p(base: np.ndarray, post: np.ndarray) -> float:
    """Two-sided p of the paired Wilcoxon signed-rank test of post - base over the questions (zero
    differences dropped, scipy's default); 1 where every difference is 0. Kept as a secondary
    column only: it tests symmetry of the per-question differences about 0, not the change the
    table reports (docs/method.md section 7)."""
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
    """One model's metrics and their bootstrap-t intervals (None when `settings.bootstrap` is 0);
    complexity binned over [0, complexity_top] (the pool's maximum under own-max)."""

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
    """One metric before and after post-training, with paired bootstrap-t intervals and the paired
    permutation test.

    The change is reported on `scale` (CHANGE_SCALES): log_ratio for intensity, the % change and
    its interval (from the interval of log(post / base)); difference for every other metric, the
    change post - base and its interval in the metric's units (change_pct is then NaN: a % of an
    entropy or a kurtosis depends on where its zero happens to be). change_ci is given on both
    scales. `p`: the two-sided paired permutation p of the change on its test scale (log ratio for
    intensity, difference otherwise), NaN without permutations. `wilcoxon_p`: the paired
    signed-rank test of the per-sample metrics, a secondary column (it tests another hypothesis),
    NaN for complexity and diversity."""

    base: float
    post: float
    change: float                # post - base
    change_pct: float            # 100 (post - base) / base on the log_ratio scale, else NaN
    base_ci: tuple[float, float] | None
    post_ci: tuple[float, float] | None
    change_ci: tuple[float, float] | None
    change_pct_ci: tuple[float, float] | None
    scale: str
    p: float
    wilcoxon_p: float

    _FLOATS = ("base", "post", "change", "change_pct", "p", "wilcoxon_p")
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
    complexity binned over [0, complexity_tops[0]] for base and [0, complexity_tops[1]] for post
    (each model's own pool maximum under own-max, one shared quantile under shared-quantile);
    `exact`: whether the permutation p enumerated every swap pattern."""

    settings: MetricSettings
    n_samples: int
    metrics: dict[str, MetricChange]
    complexity_tops: tuple[float, float]
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "settings_key": self.settings.key(),
                "n_samples": self.n_samples, "complexity_tops": list(self.complexity_tops),
                "exact": self.exact,
                "metrics": {name: change.to_dict() for name, change in self.metrics.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Comparison":
        return cls(settings=MetricSettings.from_dict(data["settings"]), n_samples=data["n_samples"],
                   metrics={name: MetricChange.from_dict(m) for name, m in data["metrics"].items()},
                   complexity_tops=tuple(data["complexity_tops"]), exact=data["exact"])


def model_metrics(scores: np.ndarray, graph: ResidualGraph,
                  settings: MetricSettings = MetricSettings()) -> dict[str, float]:
    """Every metric of one model's samples (point values, no bootstrap)."""
    return summarise_model(scores, graph, settings.replace(bootstrap=0)).values


def _side(counts: np.ndarray, position: int, sides: int) -> np.ndarray:
    """Weights over `sides` stacked matrices of n rows each: `counts` [R, n] on matrix `position`,
    0 on the others."""
    weights = np.zeros((counts.shape[0], sides * counts.shape[1]))
    weights[:, position * counts.shape[1]:(position + 1) * counts.shape[1]] = counts
    return weights


def _model_interval(name: str, boot: _Bootstrap, values: np.ndarray, leave_one_out: np.ndarray,
                    level: float) -> tuple[float, float] | None:
    """One model's bootstrap-t interval of a metric, on its transform's scale, mapped back."""
    interval = boot.interval(_transform(name, values), _transform(name, leave_one_out), level,
                             abs(float(_transform(name, values[:1])[0])))
    if interval is None or name not in LOG_SCALE_METRICS:
        return interval
    return math.exp(interval[0]), math.exp(interval[1])


def summarise_model(scores: np.ndarray, graph: ResidualGraph,
                    settings: MetricSettings = MetricSettings()) -> ModelMetrics:
    """Every metric of one model with bootstrap-t intervals over its questions."""
    scores = check_scores(scores, graph)
    n = scores.shape[0]
    rows = _Rows([scores], graph, settings)
    boot = _Bootstrap.draw(n, settings)
    values, leave_one_out = boot.evaluate(rows, 0)
    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(METRICS)
    if settings.bootstrap:
        intervals = {name: _model_interval(name, boot, values[name], leave_one_out[name],
                                           settings.ci_level) for name in METRICS}
    return ModelMetrics(settings=settings, n_samples=n,
                        values={k: float(v[0]) for k, v in values.items()},
                        intervals=intervals, complexity_top=float(rows.tops[rows.own_top].max()))


def _check_pair(base: np.ndarray, post: np.ndarray, graph: ResidualGraph) -> tuple[np.ndarray, np.ndarray]:
    base, post = check_scores(base, graph, "base scores"), check_scores(post, graph, "post scores")
    if base.shape[0] != post.shape[0]:
        raise ValueError(f"base has {base.shape[0]} samples and post {post.shape[0]}; the paired "
                         f"comparison needs the same questions, in the same order, for both models")
    return base, post


def _change_statistic(name: str, base: np.ndarray, post: np.ndarray) -> np.ndarray:
    """The change on its test scale: log(post / base) for intensity, post - base otherwise."""
    return _transform(name, post) - _transform(name, base)


def _typical_magnitude(scores: np.ndarray, graph: ResidualGraph) -> float:
    """The median nonzero |W| over a model's real edges and samples: a scale that a pure gain
    multiplies and a few extreme questions barely move."""
    magnitude = np.abs(graph.edges(scores))
    return float(np.median(magnitude[magnitude > 0]))


def _swapped_changes(base: np.ndarray, post: np.ndarray, graph: ResidualGraph, rows: _Rows,
                     settings: MetricSettings) -> dict[str, Callable[[float], tuple[float, np.ndarray]]]:
    """Per metric, the paired permutation test of "the change is delta" as a function of delta:
    delta -> (the observed statistic, its values under each swap pattern of `_swaps`), on the
    metric's test scale; delta = 0 is the test of no change, and the interval is every delta it
    does not reject (docs/method.md section 7).
    - intensity (log scale): post's per-sample intensities divided by exp(delta), then swapped:
      exact where post is exp(delta) times an exchangeable copy of base (a pure gain);
    - the per-sample scale-free metrics: the per-question differences less delta, sign-flipped
      (the paired test of a mean, exact where the differences are symmetric about delta);
    - complexity and diversity, which have no per-question form: the swapped pools' changes,
      each model's matrices divided by its typical |W| first (that changes none of their values,
      both being scale-free, but a swapped pool then mixes rows of one scale, so a pure gain is
      not mistaken for a change; on a shared-quantile grid complexity is not scale-free and is
      swapped as it is), tested as a shift of the statistic: T_obs - delta against T_swapped."""
    n = base.shape[0]
    swaps, exact = _swaps(n, settings)
    sides = (np.hstack([1 - swaps, swaps]), np.hstack([swaps, 1 - swaps]))
    scaled = rows
    if settings.complexity_grid == "own-max":
        scaled = _Rows([base / _typical_magnitude(base, graph),
                        post / _typical_magnitude(post, graph)], graph, settings)
    swapped_base, swapped_post = (scaled.evaluate(side) for side in sides)
    observed_base, observed_post = (scaled.evaluate(_side(np.ones((1, n)), position, 2))
                                    for position in (0, 1))
    tests: dict[str, Callable[[float], tuple[float, np.ndarray]]] = {}
    for name in ("complexity", "diversity"):
        observed = float(observed_post[name][0] - observed_base[name][0])
        swapped = swapped_post[name] - swapped_base[name]
        tests[name] = lambda delta, observed=observed, swapped=swapped: (observed - delta, swapped)
    signs = 1.0 - 2.0 * swaps
    for j, name in enumerate(PER_SAMPLE_METRICS):
        base_values, post_values = rows.per_sample[:n, j], rows.per_sample[n:, j]
        if name in LOG_SCALE_METRICS:
            def test(delta: float, b=base_values, p=post_values) -> tuple[float, np.ndarray]:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    # A delta far out overflows to inf or 0: NaN statistics, never accepted.
                    scaled_post = p * np.exp(-delta)
                    return (float(np.log(scaled_post.mean() / b.mean())),
                            np.log((sides[1][:, :n] * b + sides[1][:, n:] * scaled_post).sum(axis=1)
                                   / (sides[0][:, :n] * b
                                      + sides[0][:, n:] * scaled_post).sum(axis=1)))
        else:
            def test(delta: float, d=post_values - base_values) -> tuple[float, np.ndarray]:
                return float((d - delta).mean()), signs @ (d - delta) / n
        tests[name] = test
    return tests, exact


def _inverted_interval(test: Callable[[float], tuple[float, np.ndarray]], exact: bool,
                       level: float) -> tuple[float, float]:
    """Every delta the permutation test `test` does not reject at 1 - level, as [low, high]
    (infinite where too few questions leave any p small enough):
    from the observed change (where the test statistic is 0, p = 1) outwards, doubling a step
    of the swapped statistics' spread until a delta is rejected, then bisecting to 1e-6 of
    that step (or to the floats' resolution, where the spread is rounding)."""
    center = test(0.0)[0]
    swaps = len(test(center)[1])
    # The smallest p the swaps can give (the identity and the full swap tie with the observed
    # value's size): where even that exceeds 1 - level, no change is ever rejected.
    if (2 / swaps if exact else 1 / (1 + swaps)) > 1 - level:
        return -math.inf, math.inf

    def accepted(delta: float) -> bool:
        observed, swapped = test(delta)
        return _permutation_p(observed, swapped, exact, 0.0) > 1 - level

    step = float(np.quantile(np.abs(test(center)[1]), level))
    if not math.isfinite(step) or step == 0:
        return center, center
    ends = []
    for direction in (-1.0, 1.0):
        inside, outside = center, center + direction * step
        for _ in range(60):
            if not accepted(outside):
                break
            inside, outside = outside, center + 2 * (outside - center)
        for _ in range(60):  # to 1e-6 of the step, or to the floats' resolution
            middle = (inside + outside) / 2
            if abs(outside - inside) <= 1e-6 * step or middle in (inside, outside):
                break
            inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
        ends.append(inside)
    return ends[0], ends[1]


def compare_models(base: np.ndarray, post: np.ndarray, graph: ResidualGraph,
                   settings: MetricSettings = MetricSettings()) -> Comparison:
    """Every metric of base and post (sample k of both = the same question), the change post - base
    on its scale with the paired permutation test's p and its interval (every change the test
    does not reject; `_swapped_changes`), each model's bootstrap-t interval, and for the
    per-sample metrics the Wilcoxon p."""
    base, post = _check_pair(base, post, graph)
    n = base.shape[0]
    rows = _Rows([base, post], graph, settings)
    boot = _Bootstrap.draw(n, settings)  # the same draws for both models
    (base_values, base_out), (post_values, post_out) = (boot.evaluate(rows, position)
                                                        for position in (0, 1))
    tests, exact = (_swapped_changes(base, post, graph, rows, settings) if settings.permutations
                    else ({}, False))
    level = settings.ci_level
    metrics = {}
    for name in METRICS:
        b, p = float(base_values[name][0]), float(post_values[name][0])
        scale = "log_ratio" if name in LOG_SCALE_METRICS and b > 0 and p > 0 else "difference"
        intervals = dict.fromkeys(MetricChange._INTERVALS)
        if settings.bootstrap:
            intervals["base_ci"] = _model_interval(name, boot, base_values[name], base_out[name],
                                                   level)
            intervals["post_ci"] = _model_interval(name, boot, post_values[name], post_out[name],
                                                   level)
        p_value = math.nan
        if name in tests:
            observed, swapped = tests[name](0.0)
            magnitude = (max(abs(math.log(b)), abs(math.log(p)), 1.0) if scale == "log_ratio"
                         else max(abs(b), abs(p)))
            p_value = _permutation_p(observed, swapped, exact, magnitude)
            low, high = _inverted_interval(tests[name], exact, level)
            if scale == "log_ratio":
                # The interval of log(post / base), as % and, at base's value, as a difference.
                intervals["change_pct_ci"] = 100.0 * math.expm1(low), 100.0 * math.expm1(high)
                intervals["change_ci"] = b * math.expm1(low), b * math.expm1(high)
            else:
                intervals["change_ci"] = low, high
        wilcoxon_p = (_wilcoxon_p(rows.per_sample[:n, PER_SAMPLE_METRICS.index(name)],
                                  rows.per_sample[n:, PER_SAMPLE_METRICS.index(name)])
                      if name in PER_SAMPLE_METRICS else math.nan)
        metrics[name] = MetricChange(
            base=b, post=p, change=p - b,
            change_pct=100.0 * (p - b) / b if scale == "log_ratio" else math.nan,
            scale=scale, p=p_value, wilcoxon_p=wilcoxon_p, **intervals)
    tops = tuple(float(rows.tops[rows.own_top[side * n:(side + 1) * n]].max()) for side in (0, 1))
    return Comparison(settings=settings, n_samples=n, metrics=metrics, complexity_tops=tops,
                      exact=bool(exact))


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
                "clear_sign", "p", "wilcoxon_p", "direction", "settings_key")


# The unit of each metric's reported change: intensity's is a % (of a ratio quantity); the
# entropies' a difference in nats; kurtosis and diversity differences in their own units.
CHANGE_UNITS = {"intensity": "%", "complexity": "nats", "edge_entropy": "nats", "kurtosis": "",
                "diversity": "", "output_entropy": "nats"}


def _signed(value: float) -> str:
    """A signed number with enough digits that a small change does not print as 0: one decimal
    from 1 up, three significant digits below."""
    return f"{value:+.1f}" if abs(value) >= 1 else f"{value:+.3g}"


def format_change(metric: str, scale: str, change_pct: float, pct_interval: tuple[float, float],
                  change: float, interval: tuple[float, float]) -> str:
    """A change as every table prints it (the Overview, the report, the CLI's table, the README):
    "+30.1% [+15.1, +58.6]" on the log_ratio scale, "Δ+0.0123 [-0.00412, +0.0287] nats" on the
    difference scale (the unit from CHANGE_UNITS); the interval left out where it is NaN."""
    if scale == "log_ratio":
        value, (low, high), unit = change_pct, pct_interval, "%"
        text = f"{_signed(value)}%"
    else:
        value, (low, high), unit = change, interval, CHANGE_UNITS[metric]
        text = f"Δ{_signed(value)}"
    if not math.isfinite(value):
        return ""
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{_signed(low)}, {_signed(high)}]"
    return text + (f" {unit}" if unit and unit != "%" else "")


# Marks the cell a claim rests on (MetricSettings.primary) wherever a table is printed.
PRIMARY_MARK = "†"


def overview_cell(row: Any, level: float) -> str:
    """One cell of the Overview's table as every output prints it (the dashboard, the CLI's
    `--table`, the README), from a row of core.query's `overview`: base → post, ▲/▼ where the
    interval excludes 0, the change (format_change), the permutation p with its Holm-adjusted
    value (* where that is at most `level`), and PRIMARY_MARK on a primary cell."""
    values = f"{row['base']:.4g} → {row['post']:.4g}"
    text = format_change(row["metric"], row["scale"], row["change_pct"],
                         (row["ci_low"], row["ci_high"]), row["change"],
                         (row["change_low"], row["change_high"]))
    if not text:
        return values
    arrow = {1: "▲ ", -1: "▼ "}.get(row["clear_sign"], "")
    test = ""
    if math.isfinite(row["p"]):
        star = "*" if row["p_holm"] <= level else ""
        test = f"  p={row['p']:.2g} (Holm {row['p_holm']:.2g}){star}"
    primary = f" {PRIMARY_MARK}" if row["primary"] else ""
    return f"{values}  {arrow}{text}{test}{primary}"


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
    permutation p, the Wilcoxon p of the per-sample metrics (secondary), and `direction`: whether
    a clear change goes the way the paper reports for online RL (intensity, complexity, diversity
    up; kurtosis down). Every
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
                         "clear_sign": m.clear_sign, "p": m.p,
                         "wilcoxon_p": m.wilcoxon_p, "direction": _direction(metric, m),
                         "settings_key": comparison.settings.key()})
    if len(keys) > 1:
        raise ValueError(f"the comparisons were computed under {len(keys)} different metric settings "
                         f"({sorted(keys)}); recompute them under one convention to tabulate them")
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


def diversity_summary(comparisons: Iterable[GridEntry]) -> pd.DataFrame:
    """Figure-3a-style counts per model pair and over all ('all'): cells, cells where diversity rose
    (the point change), rose with the interval above 0, fell, fell with it below 0, the mean
    change (a difference, as diversity is reported) and, to set beside the paper's "+7.6% on
    average", the mean of the point % changes 100 (post - base) / base (no interval)."""
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
                        "mean_change": float(rows["change"].mean()) if len(rows) else math.nan,
                        "mean_change_pct": (float((100 * rows["change"] / rows["base"]).mean())
                                            if len(rows) else math.nan)})
    return pd.DataFrame(summary)


def holm(p: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values (family-wise error): the i-th smallest of m gets
    max over j <= i of min(1, (m - j + 1) p_(j)). NaN stays NaN and is not counted in m."""
    p = np.asarray(list(p), dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted


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
    were not given. Point values per part (`values[part][metric]`, on the difference scale) and
    paired bootstrap-t intervals (`intervals[part][metric]`, None without bootstrap): the same
    question draws for every matrix, each matrix's metrics by their definition (complexity on
    each matrix's own grid under own-max, on one grid over all of them under shared-quantile),
    so the parts add up to the total exactly, and the total equals `compare_models`' change."""

    settings: MetricSettings
    n_samples: int
    values: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float] | None]]


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
    boot = _Bootstrap.draw(n, settings)
    rows = _Rows(list(checked.values()), graph, settings)
    evaluated = {name: boot.evaluate(rows, position)
                 for position, name in enumerate(checked)}
    parts = {"total": ("post", "base"), "weights": ("post_on_base", "base"),
             "tokens": ("post", "post_on_base")}
    if base_on_post is not None:
        parts |= {"symmetric_weights": ("post", "base_on_post"),
                  "symmetric_tokens": ("base_on_post", "base")}
    points, intervals = {}, {}
    for part, (minuend, subtrahend) in parts.items():
        (high, high_out), (low, low_out) = evaluated[minuend], evaluated[subtrahend]
        points[part], intervals[part] = {}, {}
        for name in METRICS:
            difference = high[name] - low[name]
            points[part][name] = float(difference[0])
            magnitude = max(abs(high[name][0]), abs(low[name][0]))
            intervals[part][name] = (boot.interval(difference, high_out[name] - low_out[name],
                                                   settings.ci_level, magnitude)
                                     if settings.bootstrap else None)
    return Decomposition(settings=settings, n_samples=n, values=points, intervals=intervals)


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
