"""The statistics of the faithfulness control (docs/method.md section 8): which questions rank the edges
that another question evaluates (cross-fitting), the recovery fraction f(k), its area and the kept
fraction where it reaches RECOVERY_TARGET, base vs post with a paired bootstrap over questions, and
the agreement of W with Delta per stratum of edges.

Pure numpy and scipy, no model library: core/faithfulness.py computes the losses with forward passes,
and the read model (core/query.py) recomputes every statistic from the stored edges and losses under
its own bootstrap settings without loading torch. Intervals are BCa (core/resampling.py).
"""

from __future__ import annotations

import numpy as np

from core.graph import ResidualGraph
from core.resampling import bca_interval, draw_counts
from core.settings import MetricSettings

# Kept fractions of real edges for the recovery curve: 0 (every edge removed), then four points per
# decade from 0.1% to 100% (nothing removed).
RECOVERY_FRACTIONS = np.concatenate([[0.0], np.logspace(-3, 0, 13)])
# The recovery whose kept fraction k is reported (`recovery_k`).
RECOVERY_TARGET = 0.8
# The ablated edges of a question: the largest by the other half's mean |W|, and a uniform draw.
STRATA = ("top", "random")
# Per stratum: per-question correlations of W with Delta and sign agreement (averaged over the
# questions), and the least-squares slope of Delta on W over the stratum's edges.
AGREEMENT_STATISTICS = ("spearman", "pearson", "sign_agreement", "calibration_slope")


def halves(n_questions: int) -> np.ndarray:
    """The half (0 or 1) of each question, by position: even positions, odd positions. The run's
    questions are in its selection's seeded random order, so the halves are a random split."""
    return np.arange(n_questions) % 2


def held_out_strength(abs_scores: np.ndarray) -> np.ndarray:
    """Per question, the mean of |W| [n_questions, ...] over the OTHER half's questions: what ranks
    the edges that question is evaluated on, so no question ranks the edges it evaluates."""
    abs_scores = np.asarray(abs_scores)
    if len(abs_scores) < 2:
        raise ValueError(f"cross-fitting needs at least 2 questions (one per half); got "
                         f"{len(abs_scores)}")
    half = halves(len(abs_scores))
    means = [abs_scores[half == h].mean(axis=0) for h in (0, 1)]
    return np.stack([means[1 - h] for h in half])


def stratified_edges(strength: np.ndarray, graph: ResidualGraph, n: int,
                     rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """(src, dst, stratum) of n real edges: the ceil(n/2) largest by |strength| [n_src, n_dst]
    ("top"; cross-fitted: the other half's mean |W|), then the rest drawn uniformly from the other
    real edges ("random"); all edges when n exceeds them."""
    src, dst = np.nonzero(graph.real_edge_mask)
    order = np.argsort(-np.abs(strength[src, dst]), kind="stable")
    n = min(n, graph.n_edges)
    n_top = (n + 1) // 2
    drawn = rng.choice(order[n_top:], size=n - n_top, replace=False)
    return ([(int(src[e]), int(dst[e]), "top") for e in order[:n_top]]
            + [(int(src[e]), int(dst[e]), "random") for e in np.sort(drawn)])


def recovery_f(losses: np.ndarray) -> np.ndarray:
    """f(k) from the losses [K, ..., n_samples] (first row: every edge removed, last: none), on their
    means over the samples: [K, ...]. The ends are x - x = 0 and x / x = 1, exact in floating point."""
    mean = losses.mean(-1)
    if (mean[0] == mean[-1]).any():
        raise ValueError("removing every edge leaves the mean loss unchanged, so the recovery f(k) is "
                         "undefined; check the model and samples")
    return _f_of_means(mean)


def _f_of_means(mean: np.ndarray) -> np.ndarray:
    """f from mean losses [K, ...]; NaN where the span is 0 (a replicate, left out of intervals)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (mean[0] - mean) / (mean[0] - mean[-1])


def recovery_area(fractions: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Mean of f [K, ...] over log k on the fractions above 0 (trapezoids): 1 for f = 1 throughout."""
    log_k = np.log(fractions[1:])
    return np.trapezoid(f[1:], log_k, axis=0) / (log_k[-1] - log_k[0])


def recovery_k(fractions: np.ndarray, f: np.ndarray, target: float = RECOVERY_TARGET) -> np.ndarray:
    """The kept fraction k where f [K, ...] first reaches `target`, interpolated linearly in log k
    between the last fraction below it and the first at or above it; the smallest fraction above 0
    where f reaches it there already (so "at most"). f(1) = 1 makes it at most 1. NaN where f is."""
    positive, g = np.asarray(fractions[1:], dtype=np.float64), np.asarray(f[1:], dtype=np.float64)
    first = np.argmax(g >= target, axis=0)
    before = np.maximum(first - 1, 0)
    g_first = np.take_along_axis(g, first[None], axis=0)[0]
    g_before = np.take_along_axis(g, before[None], axis=0)[0]
    log_k = np.log(positive)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(first > 0, (target - g_before) / (g_first - g_before), 0.0)
    k = np.exp(log_k[before] + share * (log_k[first] - log_k[before]))
    return np.where(np.isnan(g).any(axis=0), np.nan, k)


def compare_recovery(fractions: np.ndarray, losses: dict[str, np.ndarray], base_label: str,
                     metric_settings: MetricSettings = MetricSettings()) -> dict:
    """Each model's recovery curve f, its area and the kept fraction k where f reaches
    RECOVERY_TARGET, with BCa intervals from a bootstrap over questions; each other model's area
    minus the base's and its k over the base's. losses: label -> [K, n_questions], the questions in
    the same order for every model; each replicate draws one set of questions for all models
    (paired). Replicate count, level and seed are the metrics' (MetricSettings.bootstrap, ci_level,
    seed); with no replicates the intervals are None."""
    shapes = {label: value.shape for label, value in losses.items()}
    if base_label not in losses or len(set(shapes.values())) != 1:
        raise ValueError(f"need the base {base_label!r} and losses of one shape [K, n_questions] for "
                         f"every model; got {shapes}")
    fractions = np.asarray(fractions, dtype=np.float64)
    n_questions = shapes[base_label][1]
    weights = draw_counts(n_questions, metric_settings.bootstrap, metric_settings.seed).T / n_questions

    def interval(estimate, replicates, jackknife) -> list | None:
        if metric_settings.bootstrap == 0:
            return None
        low, high = bca_interval(estimate, replicates, jackknife, metric_settings.ci_level)
        return [np.asarray(low).tolist(), np.asarray(high).tolist()]

    models, curves = {}, {}
    for label, value in losses.items():
        f = recovery_f(value)
        replicate_f = _f_of_means(value @ weights).T  # [B, K]
        jackknife_f = _f_of_means((value.sum(-1, keepdims=True) - value) / max(n_questions - 1, 1)).T
        curves[label] = {name: (f_of, recovery_area(fractions, f_of.T), recovery_k(fractions, f_of.T))
                         for name, f_of in (("point", f[None]), ("replicates", replicate_f),
                                            ("jackknife", jackknife_f))}
        _, area, k = curves[label]["point"]
        models[label] = {
            "f": f.tolist(), "f_interval": interval(f, replicate_f, jackknife_f),
            "area": float(area[0]),
            "area_interval": interval(area[0], curves[label]["replicates"][1],
                                      curves[label]["jackknife"][1]),
            "k": float(k[0]),
            "k_interval": interval(k[0], curves[label]["replicates"][2], curves[label]["jackknife"][2])}

    def between(label: str, index: int, combine) -> tuple:
        return tuple(combine(curves[label][part][index], curves[base_label][part][index])
                     for part in ("point", "replicates", "jackknife"))

    area_difference, k_ratio = {}, {}
    for label in losses:
        if label == base_label:
            continue
        point, replicates, jackknife = between(label, 1, np.subtract)
        area_difference[label] = {"difference": float(point[0]),
                                  "interval": interval(point[0], replicates, jackknife)}
        point, replicates, jackknife = between(label, 2, np.divide)
        k_ratio[label] = {"ratio": float(point[0]),
                          "interval": interval(point[0], replicates, jackknife)}
    return {"fractions": fractions.tolist(), "base": base_label, "target": RECOVERY_TARGET,
            "n_questions": n_questions, "bootstrap": metric_settings.bootstrap,
            "ci_level": metric_settings.ci_level, "models": models,
            "area_difference": area_difference, "k_ratio": k_ratio}


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho of x and y; None where undefined (fewer than 3 values, or a side constant)."""
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def agreement(question_ids: list[str], sample_ids, strata, w, delta,
              metric_settings: MetricSettings = MetricSettings()) -> dict:
    """Agreement of W with Delta per stratum (STRATA) of the ablated edges, never pooled across
    strata (a pooled number would depend on how many edges of each were drawn): per question the
    Spearman and Pearson correlation over that question's edges of the stratum and the fraction with
    the same sign, averaged over the questions where defined (a correlation needs 3 edges and
    neither side constant); and the calibration slope, the least-squares slope of Delta on W over
    all the stratum's edges (1: W predicts Delta's size; below 1: it overstates it). Each with a BCa
    interval from a bootstrap over questions (`question_ids`, in order; each edge belongs to the
    question `sample_ids` names). Returns stratum -> statistic (AGREEMENT_STATISTICS) -> {value,
    interval (None without a bootstrap), n_questions (those where defined), n_edges}; value None
    where undefined."""
    from scipy import stats

    sample_ids, strata = np.asarray(sample_ids), np.asarray(strata)
    w, delta = np.asarray(w, dtype=np.float64), np.asarray(delta, dtype=np.float64)
    n = len(question_ids)
    weights = draw_counts(n, metric_settings.bootstrap, metric_settings.seed).astype(np.float64)
    result = {}
    for stratum in STRATA:
        chosen = strata == stratum
        per_question = np.full((len(AGREEMENT_STATISTICS) - 1, n), np.nan)
        sums = np.zeros((5, n))  # edges, sum w, sum delta, sum w^2, sum w delta
        for i, question in enumerate(question_ids):
            edge = chosen & (sample_ids == question)
            x, y = w[edge], delta[edge]
            sums[:, i] = len(x), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()
            if len(x):
                per_question[2, i] = np.mean(np.sign(x) == np.sign(y))
            rho = rank_correlation(x, y)
            if rho is not None:
                per_question[0, i], per_question[1, i] = rho, stats.pearsonr(x, y).statistic
        defined = np.isfinite(per_question)
        values = np.where(defined, per_question, 0.0)

        def mean_over(counts: np.ndarray) -> np.ndarray:
            """Means of the per-question statistics with each question counted `counts` times."""
            with np.errstate(invalid="ignore", divide="ignore"):
                weight = counts[..., None, :]
                return (values * weight).sum(-1) / (defined * weight).sum(-1)

        def slope_over(counts: np.ndarray) -> np.ndarray:
            n_edges, sw, sd, sww, swd = (counts @ sums.T).T
            with np.errstate(invalid="ignore", divide="ignore"):
                return (n_edges * swd - sw * sd) / (n_edges * sww - sw * sw)

        leave_one_out = 1.0 - np.eye(n)
        statistics = {
            "means": (mean_over(np.ones(n)), mean_over(weights), mean_over(leave_one_out)),
            "slope": (slope_over(np.ones(n)), slope_over(weights), slope_over(leave_one_out))}
        result[stratum] = {}
        for index, name in enumerate(AGREEMENT_STATISTICS):
            point, replicates, jackknife = (statistics["slope"] if name == "calibration_slope" else
                                            tuple(part[..., index] for part in statistics["means"]))
            interval = None
            if metric_settings.bootstrap > 0 and np.isfinite(point):
                low, high = bca_interval(point, replicates, jackknife, metric_settings.ci_level)
                interval = [float(low), float(high)]
            result[stratum][name] = {
                "value": float(point) if np.isfinite(point) else None, "interval": interval,
                "n_questions": int(sums[0].astype(bool).sum() if name == "calibration_slope"
                                   else defined[index].sum()),
                "n_edges": int(sums[0].sum())}
    return result
