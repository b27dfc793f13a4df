"""Bootstrap over questions for the faithfulness and trajectory statistics (docs/method.md sections 7
and 8): how often each replicate draws each question, and bias-corrected and accelerated (BCa)
intervals, vectorised over many statistics at once (every real edge, every kept fraction).

BCa (Efron 1987) rather than the percentile interval: the statistics here are ratios (a calibration
slope, a recovery fraction, a slope over a normalising mean) or means of bounded per-question values
(correlations, sign agreement) whose bootstrap distributions are skewed at 10-40 questions, where the
percentile interval is off-centre; BCa corrects the centre (z0, from the replicates) and the skew
(the acceleration a, from the leave-one-question-out jackknife).
"""

from __future__ import annotations

import numpy as np
from scipy import special


def draw_counts(n: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, n]: how often each replicate's n draws with replacement pick each question. The
    draws depend only on n, the count and the seed, so every model of a comparison gets the same."""
    draws = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
    offsets = n * np.arange(replicates)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=replicates * n).reshape(replicates, n)


def bca_interval(estimate: np.ndarray, replicates: np.ndarray, jackknife: np.ndarray,
                 level: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) BCa bounds at `level` of each statistic: estimate [...], replicates [B, ...] (the
    statistic on each bootstrap replicate), jackknife [n, ...] (on the questions with question i
    left out). Non-finite replicates and jackknife values are left out of that statistic's interval;
    NaN where the estimate is not finite or no replicate is. A statistic equal in every replicate
    has the interval [estimate, estimate]."""
    estimate = np.asarray(estimate, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    jackknife = np.asarray(jackknife, dtype=np.float64)
    finite = np.isfinite(replicates)
    m = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = ((replicates < estimate) & finite).sum(axis=0)
        tied = ((replicates == estimate) & finite).sum(axis=0)
        share = np.clip((below + 0.5 * tied) / m, 0.5 / np.maximum(m, 1), 1 - 0.5 / np.maximum(m, 1))
        z0 = special.ndtri(share)
        known = np.isfinite(jackknife)
        centre = np.where(known, jackknife, 0).sum(axis=0) / known.sum(axis=0)
        spread = np.where(known, centre - jackknife, 0.0)
        denominator = 6 * (spread ** 2).sum(axis=0) ** 1.5
        acceleration = np.where(denominator > 0, (spread ** 3).sum(axis=0) / denominator, 0.0)
    ordered = np.sort(np.where(finite, replicates, np.inf), axis=0)  # non-finite last
    bounds = []
    for tail in ((1 - level) / 2, (1 + level) / 2):
        z = special.ndtri(tail)
        with np.errstate(invalid="ignore", divide="ignore"):
            adjusted = special.ndtr(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
        position = np.nan_to_num(adjusted, nan=tail) * np.maximum(m - 1, 0)
        lower = np.floor(position).astype(np.int64)
        upper = np.minimum(lower + 1, np.maximum(m - 1, 0))
        weight = position - lower
        at_lower = np.take_along_axis(ordered, lower[None], axis=0)[0]
        at_upper = np.take_along_axis(ordered, upper[None], axis=0)[0]
        with np.errstate(invalid="ignore"):
            value = np.where(weight > 0, at_lower + weight * (at_upper - at_lower), at_lower)
        bounds.append(np.where((m > 0) & np.isfinite(estimate), value, np.nan))
    return bounds[0], bounds[1]

