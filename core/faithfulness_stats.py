"""The statistics of the faithfulness control (docs/method.md section 8): the recovery fraction f(k),
its area, base vs post with a paired bootstrap over questions, and the agreement of W with Delta.

Pure numpy and scipy, no model library: core/faithfulness.py computes the losses with forward passes,
and the read model (core/query.py) recomputes intervals from the stored losses without loading torch.
"""

from __future__ import annotations

import numpy as np

from core.settings import MetricSettings

# Kept fractions of real edges for the recovery curve: 0 (every edge removed), then four points per
# decade from 0.1% to 100% (nothing removed).
RECOVERY_FRACTIONS = np.concatenate([[0.0], np.logspace(-3, 0, 13)])


def recovery_f(losses: np.ndarray) -> np.ndarray:
    """f(k) from the losses [K, ..., n_samples] (first row: every edge removed, last: none), on their
    means over the samples: [K, ...]. The ends are x - x = 0 and x / x = 1, exact in floating point."""
    mean = losses.mean(-1)
    span = mean[0] - mean[-1]
    if (span == 0).any():
        raise ValueError("removing every edge leaves the mean loss unchanged, so the recovery f(k) is "
                         "undefined; check the model and samples")
    return (mean[0] - mean) / span


def recovery_area(fractions: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Mean of f [K, ...] over log k on the fractions above 0 (trapezoids): 1 for f = 1 throughout."""
    log_k = np.log(fractions[1:])
    return np.trapezoid(f[1:], log_k, axis=0) / (log_k[-1] - log_k[0])


def compare_recovery(fractions: np.ndarray, losses: dict[str, np.ndarray], base_label: str,
                     metric_settings: MetricSettings = MetricSettings()) -> dict:
    """Each model's recovery curve and area with percentile intervals from a bootstrap over questions,
    and each other model's area minus the base's. losses: label -> [K, n_questions], the questions in
    the same order for every model; each replicate draws one set of questions for all models (paired).
    Replicate count, level and seed are the metrics' (MetricSettings.bootstrap, ci_level, seed); with
    no replicates the intervals are None."""
    shapes = {label: value.shape for label, value in losses.items()}
    if base_label not in losses or len(set(shapes.values())) != 1:
        raise ValueError(f"need the base {base_label!r} and losses of one shape [K, n_questions] for "
                         f"every model; got {shapes}")
    n_questions = shapes[base_label][1]
    draws = np.random.default_rng(metric_settings.seed).integers(
        0, n_questions, size=(metric_settings.bootstrap, n_questions))
    tails = [(1 - metric_settings.ci_level) / 2, (1 + metric_settings.ci_level) / 2]

    def interval(values: np.ndarray) -> list | None:
        if values.shape[-1] == 0:  # bootstrap 0: no replicates, no interval
            return None
        return np.quantile(values, tails, axis=-1).tolist()

    models, replicate_areas = {}, {}
    for label, value in losses.items():
        f = recovery_f(value)
        replicate_f = recovery_f(value[:, draws])  # [K, bootstrap]
        replicate_areas[label] = recovery_area(fractions, replicate_f)
        models[label] = {"f": f.tolist(), "f_interval": interval(replicate_f),
                         "area": float(recovery_area(fractions, f)),
                         "area_interval": interval(replicate_areas[label])}
    differences = {label: {"difference": models[label]["area"] - models[base_label]["area"],
                           "interval": interval(replicate_areas[label] - replicate_areas[base_label])}
                   for label in losses if label != base_label}
    return {"fractions": np.asarray(fractions).tolist(), "base": base_label,
            "n_questions": n_questions, "bootstrap": metric_settings.bootstrap,
            "ci_level": metric_settings.ci_level, "models": models, "area_difference": differences}


def agreement(w: np.ndarray, delta: np.ndarray) -> dict:
    """Spearman and Pearson correlation of W with Delta, and the fraction of edges where their signs
    agree. A correlation is None where it is undefined (fewer than two edges, or a constant side)."""
    from scipy import stats

    def defined(correlate) -> float | None:
        if len(w) < 2 or np.ptp(w) == 0 or np.ptp(delta) == 0:
            return None
        return float(correlate(w, delta).statistic)

    return {"n": len(w), "spearman": defined(stats.spearmanr), "pearson": defined(stats.pearsonr),
            "sign_agreement": float(np.mean(np.sign(w) == np.sign(delta))) if len(w) else None}
