"""The faithfulness control's statistics without a model (issue 26, item 6; docs/method.md section 8):
cross-fitting (no question ranks the edges it evaluates, and in-sample selection's inflation is gone),
per-stratum agreement averaged over questions, the calibration slope, the kept fraction k where
recovery reaches 0.8, and the BCa intervals they use."""

import numpy as np
import pytest
from scipy import stats

from core.faithfulness_stats import (RECOVERY_TARGET, STRATA, agreement, compare_recovery, halves,
                                     held_out_strength, recovery_k, stratified_edges)
from core.graph import ResidualGraph
from core.resampling import bca_interval, draw_counts
from core.settings import MetricSettings

QUICK = MetricSettings(bootstrap=300)


def test_no_question_ranks_the_edges_it_is_evaluated_on():
    abs_scores = np.random.default_rng(0).random((7, 5, 6))
    half = halves(7)
    assert half.tolist() == [0, 1, 0, 1, 0, 1, 0]
    strength = held_out_strength(abs_scores)
    for h in (0, 1):
        np.testing.assert_array_equal(strength[half == h],
                                      np.broadcast_to(abs_scores[half != h].mean(0),
                                                      strength[half == h].shape))
        # Whatever a half's own scores are, its questions' ranking does not move.
        changed = abs_scores.copy()
        changed[half == h] = np.random.default_rng(1).random(changed[half == h].shape)
        np.testing.assert_array_equal(held_out_strength(changed)[half == h], strength[half == h])
    with pytest.raises(ValueError, match="at least 2 questions"):
        held_out_strength(abs_scores[:1])


def ablated_rows(w, delta, graph, strength, rng):
    """The rows the control stores: per question, 8 edges stratified by `strength` [n, n_src,
    n_dst], with that question's W and Delta [n, n_edges]."""
    index = {(s, d): e for e, (s, d) in enumerate(zip(*np.nonzero(graph.real_edge_mask)))}
    rows = []
    for q, rank_by in enumerate(strength):
        for s, d, stratum in stratified_edges(rank_by, graph, 8, rng):
            e = index[(s, d)]
            rows.append((f"q{q}", stratum, w[q, e], delta[q, e]))
    return [f"q{q}" for q in range(len(w))], *zip(*rows)


def test_cross_fitted_agreement_is_not_inflated_by_selecting_on_the_same_questions():
    """No edge matters more than another on average; on each question, W equals Delta on that
    question's spikes (its 5% largest |W|) and is unrelated to it elsewhere. Picking each question's
    top edges by its own |W| picks exactly the spikes: near-perfect agreement that says nothing
    about the edges a circuit would keep. Ranked on the other half, the top edges are no better
    than random ones, and their interval covers the sign agreement of an edge drawn at random
    (5% spikes agree, the rest half the time)."""
    rng = np.random.default_rng(7)
    graph = ResidualGraph(8, "qkv")  # 281 real edges
    n = 20
    w = rng.normal(size=(n, graph.n_edges)) * rng.lognormal(0, 1, size=(n, graph.n_edges))
    spikes = np.abs(w) >= np.quantile(np.abs(w), 0.95, axis=1, keepdims=True)
    delta = np.where(spikes, w, rng.normal(size=w.shape) * np.abs(w).mean())
    dense = graph.dense(np.abs(w))
    in_sample = agreement(*ablated_rows(w, delta, graph, dense, np.random.default_rng(1)), QUICK)
    cross = agreement(*ablated_rows(w, delta, graph, held_out_strength(dense),
                                    np.random.default_rng(1)), QUICK)
    assert in_sample["top"]["sign_agreement"]["value"] > 0.95
    assert in_sample["top"]["spearman"]["value"] > 0.9
    random_edge = 0.05 + 0.95 * 0.5
    low, high = cross["top"]["sign_agreement"]["interval"]
    assert low <= random_edge <= high and high < 0.7
    assert cross["top"]["spearman"]["interval"][0] <= 0  # no rank agreement it can show
    assert abs(cross["top"]["sign_agreement"]["value"]
               - cross["random"]["sign_agreement"]["value"]) < 0.15


def test_agreement_is_per_question_per_stratum_and_does_not_depend_on_the_mix():
    rng = np.random.default_rng(3)
    questions = ["a", "b", "c", "d"]
    rows = []
    for q in questions:
        for stratum, size in (("top", 5), ("random", 4)):
            w = rng.normal(size=size)
            rows += [(q, stratum, x, 0.5 * x + 0.3 * rng.normal()) for x in w]
    ids, strata, w, delta = (np.array(column) for column in zip(*rows))
    w, delta = w.astype(float), delta.astype(float)
    found = agreement(questions, ids, strata, w, delta, QUICK)
    assert set(found) == set(STRATA)  # never pooled
    for stratum in STRATA:
        part = strata == stratum
        per_question = {name: [function(w[part & (ids == q)], delta[part & (ids == q)])
                               for q in questions]
                        for name, function in (
                            ("spearman", lambda x, y: stats.spearmanr(x, y).statistic),
                            ("pearson", lambda x, y: stats.pearsonr(x, y).statistic),
                            ("sign_agreement", lambda x, y: np.mean(np.sign(x) == np.sign(y))))}
        for name, values in per_question.items():
            assert found[stratum][name]["value"] == pytest.approx(np.mean(values), rel=1e-12)
            assert found[stratum][name]["n_questions"] == 4
            low, high = found[stratum][name]["interval"]
            assert low <= found[stratum][name]["value"] <= high
        slope = stats.linregress(w[part], delta[part]).slope
        assert found[stratum]["calibration_slope"]["value"] == pytest.approx(slope, rel=1e-10)
        assert found[stratum]["calibration_slope"]["n_edges"] == part.sum()
    # Twice as many random edges per question: a pooled number would move; the top stratum's not.
    more = [(q, "random", x, -x) for q in questions for x in rng.normal(size=8)]
    ids2, strata2, w2, delta2 = (np.array(column) for column in zip(*rows, *more))
    again = agreement(questions, ids2, strata2, w2.astype(float), delta2.astype(float), QUICK)
    assert again["top"] == found["top"] and again["random"] != found["random"]


def test_an_exact_linear_effect_has_calibration_slope_two_and_undefined_correlations_are_none():
    questions = ["a", "b", "c"]
    w = np.array([1.0, 2.0, 4.0, -1.0, 3.0, 0.5, 2.0, 2.0, 2.0])
    ids = np.repeat(questions, 3)
    found = agreement(questions, ids, ["top"] * 9, w, 2 * w + 0.1, QUICK)["top"]
    assert found["calibration_slope"]["value"] == pytest.approx(2.0, rel=1e-12)
    assert found["calibration_slope"]["interval"] == pytest.approx([2.0, 2.0], rel=1e-9)
    # Question c's W is constant: no correlation there, so the mean is over a and b.
    assert found["spearman"]["n_questions"] == 2 and found["spearman"]["value"] == 1.0
    assert found["sign_agreement"]["n_questions"] == 3
    empty = agreement(questions, ids, ["top"] * 9, w, 2 * w, MetricSettings(bootstrap=0))["random"]
    assert empty["spearman"] == {"value": None, "interval": None, "n_questions": 0, "n_edges": 0}


def test_the_k_where_recovery_reaches_its_target_is_interpolated_in_log_k():
    fractions = np.array([0.0, 0.001, 0.01, 0.1, 1.0])
    assert RECOVERY_TARGET == 0.8
    # Between 0.01 (f 0.5) and 0.1 (f 0.9): log10 k = -2 + (0.8 - 0.5) / (0.9 - 0.5) = -1.25.
    curves = np.array([[0, 0.2, 0.5, 0.9, 1.0],
                       [0, 0.85, 0.9, 0.95, 1.0],     # already at 0.1%: "at most" 0.001
                       [0, 0.1, 0.85, -0.2, 1.0],     # the first crossing counts: 0.001 to 0.01
                       [0, 0.1, 0.2, 0.3, 1.0]]).T    # only at k = 1: log10 k = -1 + 0.5/0.7
    k = recovery_k(fractions, curves)
    np.testing.assert_allclose(k, [10 ** -1.25, 0.001, 10 ** (-3 + 0.7 / 0.75),
                                   10 ** (-1 + 0.5 / 0.7)], rtol=1e-12)
    # Through compare_recovery: losses 1 - f on every question (L_empty 1, L_full 0).
    base = np.repeat(1 - curves[:, :1], 6, axis=1)
    post = np.repeat(1 - curves[:, 3:], 6, axis=1)
    comparison = compare_recovery(fractions, {"base": base, "post": post}, "base", QUICK)
    assert comparison["models"]["base"]["k"] == pytest.approx(10 ** -1.25, rel=1e-12)
    assert comparison["models"]["base"]["k_interval"] == pytest.approx([10 ** -1.25] * 2)
    assert comparison["k_ratio"]["post"]["ratio"] == pytest.approx(
        10 ** (-1 + 0.5 / 0.7) / 10 ** -1.25, rel=1e-12)


def test_k_has_an_interval_from_the_questions_and_is_paired():
    fractions = np.array([0.0, 0.001, 0.01, 0.1, 1.0])
    rng = np.random.default_rng(2)
    n = 30
    reach = rng.uniform(0.3, 1.0, size=n)  # each question's recovery at the inner fractions
    f = np.vstack([np.zeros(n), 0.5 * reach, reach, np.minimum(1.0, 1.2 * reach), np.ones(n)])
    base = 3.0 - 2.0 * f
    post = 3.0 - 2.0 * np.vstack([f[:2], 0.8 * f[2:4], f[4:]])  # needs more edges, same questions
    comparison = compare_recovery(fractions, {"base": base, "post": post}, "base", QUICK)
    for label in ("base", "post"):
        low, high = comparison["models"][label]["k_interval"]
        assert low < comparison["models"][label]["k"] < high
    low, high = comparison["k_ratio"]["post"]["interval"]
    assert 1 < low and comparison["k_ratio"]["post"]["ratio"] > 1


def test_bca_is_the_percentile_interval_when_unbiased_and_unskewed():
    """z0 = 0 (half the replicates below the estimate) and a = 0 (a symmetric jackknife): BCa is
    the percentile interval; a statistic equal in every replicate has a zero-width interval;
    non-finite replicates are left out."""
    replicates = np.concatenate([np.linspace(-2, -0.01, 200), np.linspace(0.01, 2, 200)])
    jackknife = np.array([-1.0, 1.0, -0.5, 0.5])
    low, high = bca_interval(0.0, replicates, jackknife, 0.9)
    assert [float(low), float(high)] == pytest.approx(np.quantile(replicates, [0.05, 0.95]).tolist())
    low, high = bca_interval(np.array([3.0, np.nan]), np.full((50, 2), 3.0), np.full((5, 2), 3.0),
                             0.95)
    assert low.tolist()[0] == high.tolist()[0] == 3.0 and np.isnan(low[1]) and np.isnan(high[1])
    with_nan = np.append(replicates, [np.nan, np.inf])
    assert [float(bound) for bound in bca_interval(0.0, with_nan, jackknife, 0.9)] == \
        pytest.approx([float(bound) for bound in bca_interval(0.0, replicates, jackknife, 0.9)])


def test_draw_counts_draw_n_questions_per_replicate_reproducibly():
    counts = draw_counts(7, 50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()
    np.testing.assert_array_equal(counts, draw_counts(7, 50, seed=3))
