"""Metrics of per-sample score matrices: hand-computed values for every measure and convention,
tail ordering, the paper's own-max complexity against numpy, the paired bootstrap's and jackknife's
resampled sets, the pure-gain invariance, change scales (% for intensity, differences otherwise),
permutation p-values enumerated by hand and intervals that invert them, per-edge tests with BH, the
loss correlation, grid summaries, Holm and the CLI. Calibration in simulation:
tests/test_calibration.py."""

import json
import math

import numpy as np
import pytest

from core import metrics

from core.__main__ import main
from core.graph import ResidualGraph
from core.metrics import (METRICS, NO_CLEAR_CHANGE, PER_SAMPLE_METRICS, Comparison, MetricChange,
                          ModelMetrics, _draw_counts, _Rows, check_scores, compare_models,
                          complexity_top, diversity_summary, edge_change, format_change,
                          grid_table, holm, loss_correlation, model_metrics, per_sample_metrics,
                          significant_edges, summarise_model)
from core.settings import MetricSettings, SettingsError, stable_hash

# One layer, qkv: sources input, a0, m0; slots a0<q>, a0<k>, a0<v>, m0, logits; 8 real edges of 15
# entries, in row-major order: input->a0<q>, input->a0<k>, input->a0<v>, input->m0, input->logits,
# a0->m0, a0->logits, m0->logits. So the edges into logits are positions 4, 6 and 7.
SMALL = ResidualGraph(1)
X = np.arange(1.0, 9.0)                       # |W| 1..8, sum 36
ALTERNATING = np.array([1.0, -1, 1, -1, 1, -1, 1, -1])


def dense(*edge_rows):
    return SMALL.dense(np.array(edge_rows, dtype=np.float64))


def entropy(p):
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def settings(**changes):
    return MetricSettings(bootstrap=0).replace(**changes)


def test_small_graph_layout_as_the_hand_computations_assume():
    assert SMALL.n_edges == 8 and SMALL.real_edge_mask.size == 15
    assert SMALL.edge_names[4] == "input->logits" and SMALL.edge_names[6:] == ("a0->logits", "m0->logits")


# --- Hand-computed values ---------------------------------------------------------------------------

def test_intensity_dense_and_edges():
    scores = dense(X, ALTERNATING)
    # sum |W|: 36 and 8; dense divides by 15 entries, edges by 8.
    per_dense = per_sample_metrics(scores, SMALL, settings())["intensity"]
    per_edges = per_sample_metrics(scores, SMALL, settings(intensity_normaliser="edges"))["intensity"]
    np.testing.assert_allclose(per_dense, [36 / 15, 8 / 15])
    np.testing.assert_allclose(per_edges, [36 / 8, 1.0])
    assert model_metrics(scores, SMALL, settings())["intensity"] == pytest.approx(44 / 30)
    assert model_metrics(scores, SMALL, settings(intensity_normaliser="edges"))["intensity"] == \
        pytest.approx(5.5 / 2)


def test_complexity_pooled_histogram_dense_and_edges():
    scores = dense(X, ALTERNATING)
    full_range = settings()  # own-max: bins up to the pool's own maximum
    # Pool of |W| over edges: 1..8 and eight 1s; max 8. Two bins [0,4), [4,8]: 3+8 = 11 and 5.
    assert model_metrics(scores, SMALL, full_range.replace(histogram_bins=2, flatten="edges"))[
        "complexity"] == pytest.approx(entropy([11, 5]))
    # Dense adds the 2 x 7 structural zeros to the first bin: 25 and 5.
    assert model_metrics(scores, SMALL, full_range.replace(histogram_bins=2))["complexity"] == \
        pytest.approx(entropy([25, 5]))
    # Four bins of width 2 (the last closed): X gives 1 | 2,3 | 4,5 | 6,7,8; the 1s all go to bin 0.
    assert model_metrics(scores, SMALL, full_range.replace(histogram_bins=4, flatten="edges"))[
        "complexity"] == pytest.approx(entropy([9, 2, 2, 3]))
    # One value, all mass in one bin: entropy 0.
    assert model_metrics(dense(ALTERNATING, -ALTERNATING), SMALL,
                         settings(flatten="edges"))["complexity"] == pytest.approx(0.0)


def test_complexity_bins_match_numpy_histogram_with_values_on_bin_edges():
    graph = ResidualGraph(3)
    rng = np.random.default_rng(1)
    bins = 7
    top = 0.37
    # Values exactly on bin edges (k * top / bins) and random ones: rounding must not move any.
    on_edges = np.linspace(0.0, top, bins + 1)[rng.integers(1, bins + 1, size=(5, graph.n_edges))]
    values = np.where(rng.random((5, graph.n_edges)) < 0.5, on_edges,
                      rng.uniform(0, top, size=(5, graph.n_edges)))
    values[0, 0] = top
    scores = graph.dense(values * rng.choice([-1.0, 1.0], size=values.shape))
    counts, _ = np.histogram(np.abs(scores).ravel(), bins=bins, range=(0.0, top))
    assert model_metrics(scores, graph, settings(histogram_bins=bins))[
        "complexity"] == pytest.approx(entropy(counts), rel=1e-12)


def test_complexity_is_the_papers_formula_computed_independently():
    # The paper: the Shannon entropy (natural log) of the histogram of ONE model's pooled |W| over
    # every sample, 100 equal-width bins over [0, that pool's max]. Computed here with numpy alone.
    graph = ResidualGraph(4)
    rng = np.random.default_rng(11)
    base = graph.dense(rng.standard_t(3, size=(12, graph.n_edges)))
    post = graph.dense(2.5 * rng.standard_t(5, size=(12, graph.n_edges)))

    def paper(scores):
        pool = np.abs(scores).ravel()  # dense: the flattened matrices, structural zeros included
        counts, _ = np.histogram(pool, bins=100, range=(0.0, pool.max()))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    assert model_metrics(base, graph)["complexity"] == pytest.approx(paper(base), rel=1e-12)
    comparison = compare_models(base, post, graph, MetricSettings(bootstrap=0, permutations=0))
    assert comparison.metrics["complexity"].base == pytest.approx(paper(base), rel=1e-12)
    assert comparison.metrics["complexity"].post == pytest.approx(paper(post), rel=1e-12)
    assert comparison.complexity_tops == (np.abs(base).max(), np.abs(post).max())


def test_complexity_range_is_a_quantile_of_the_pool_and_larger_values_go_to_the_last_bin():
    scores = dense(X, ALTERNATING)
    # Pool over edges, sorted: nine 1s, then 2..8 (16 values). numpy's linear quantile at 11/15 sits
    # on position 11 of 0..15, the value 4: bins [0, 2), [2, 4]; 5..8 are clipped into the last bin.
    conventions = settings(histogram_bins=2, flatten="edges", complexity_grid="shared-quantile",
                           complexity_range_quantile=11 / 15)
    assert complexity_top([scores], SMALL, conventions) == pytest.approx(4.0)
    assert model_metrics(scores, SMALL, conventions)["complexity"] == pytest.approx(entropy([9, 7]))
    # A comparison bins both models on the quantile of their joint pool: post's larger values set it.
    comparison = compare_models(scores, 3 * scores, SMALL, conventions)
    top = comparison.complexity_tops[0]
    assert comparison.complexity_tops == (top, top)
    assert top == pytest.approx(complexity_top([scores, 3 * scores], SMALL, conventions))
    for model, side in ((scores, "base"), (3 * scores, "post")):
        counts, _ = np.histogram(np.minimum(np.abs(SMALL.edges(model)).ravel(), top), bins=2,
                                 range=(0.0, top))
        assert getattr(comparison.metrics["complexity"], side) == pytest.approx(entropy(counts))
    with pytest.raises(ValueError, match="raise complexity_range_quantile"):
        # 21 of the 30 dense entries are zero: the median |W| is 0.
        complexity_top([dense(X, np.eye(8)[0])], SMALL,
                       settings(complexity_grid="shared-quantile", complexity_range_quantile=0.5))


def test_edge_entropy_and_output_entropy():
    scores = dense(X, ALTERNATING)
    per = per_sample_metrics(scores, SMALL, settings())
    # Bin-free: p_e = |W_e| / sum |W| over the 8 edges; uniform |W| gives log 8.
    np.testing.assert_allclose(per["edge_entropy"], [entropy(X), math.log(8)])
    # Edges into logits are positions 4, 6, 7: |W| 5, 7, 8 and 1, 1, 1.
    np.testing.assert_allclose(per["output_entropy"], [entropy([5, 7, 8]), math.log(3)])
    # The structural zeros carry no probability, so the flatten convention cannot change these.
    dense_values = model_metrics(scores, SMALL, settings())
    edges_values = model_metrics(scores, SMALL, settings(flatten="edges", intensity_normaliser="edges"))
    assert dense_values["edge_entropy"] == pytest.approx(edges_values["edge_entropy"])
    assert dense_values["output_entropy"] == pytest.approx((entropy([5, 7, 8]) + math.log(3)) / 2)


def test_kurtosis_signed_abs_dense_edges():
    def kurtosis(edge_values, **conventions):
        return per_sample_metrics(dense(edge_values, X), SMALL, settings(**conventions))["kurtosis"][0]

    # Signed, edges: +-1 with equal weight: m2 = m4 = 1, excess kurtosis 1 - 3 = -2.
    assert kurtosis(ALTERNATING, flatten="edges") == pytest.approx(-2.0)
    # Signed, dense: 8 values +-1 and 7 zeros: m2 = m4 = 8/15, m4/m2^2 - 3 = 15/8 - 3.
    assert kurtosis(ALTERNATING) == pytest.approx(15 / 8 - 3)
    # |W|, dense: eight 1s and seven 0s, a Bernoulli(p = 8/15): (1 - 6p(1-p)) / (p(1-p)) = -111/56.
    assert kurtosis(ALTERNATING, kurtosis_of="abs") == pytest.approx(-111 / 56)
    # |W|, edges: 1s and 3s in equal number, a symmetric two-point law again: -2.
    assert kurtosis(np.array([1.0, -3, 1, -3, 1, -3, 1, -3]), kurtosis_of="abs", flatten="edges") == \
        pytest.approx(-2.0)
    # The model's kurtosis is the mean over samples.
    scores = dense(ALTERNATING, 2 * ALTERNATING)
    assert model_metrics(scores, SMALL, settings(flatten="edges"))["kurtosis"] == pytest.approx(-2.0)


def test_diversity_dense_and_edges():
    scores = dense(X, 2 * X, X[::-1])
    # Over edges: corr(X, 2X) = 1, corr(X, reversed) = -1 twice: mean -1/3, diversity 4/3.
    assert model_metrics(scores, SMALL, settings(flatten="edges"))["diversity"] == pytest.approx(4 / 3)
    # Dense (7 shared zeros): means 36/15 = 2.4, sum x*x' = sum i(9-i) = 120, sum x^2 = 204:
    # cov = 120/15 - 5.76 = 2.24, var = 204/15 - 5.76 = 7.84, corr = 2/7; mean (1 + 2/7 + 2/7)/3.
    assert model_metrics(scores, SMALL, settings())["diversity"] == pytest.approx(1 - 11 / 21)


# --- Tails ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flatten", ["dense", "edges"])
def test_heavy_tails_have_higher_kurtosis_and_lower_entropy(flatten):
    graph = ResidualGraph(4)
    rng = np.random.default_rng(0)
    heavy = graph.dense(rng.standard_t(2.5, size=(30, graph.n_edges)))
    light = graph.dense(rng.uniform(-1, 1, size=(30, graph.n_edges)))
    conventions = settings(flatten=flatten)
    heavy_m, light_m = model_metrics(heavy, graph, conventions), model_metrics(light, graph, conventions)
    assert heavy_m["kurtosis"] > light_m["kurtosis"] + 1
    assert heavy_m["complexity"] < light_m["complexity"]
    assert heavy_m["edge_entropy"] < light_m["edge_entropy"]


# --- Bootstrap ----------------------------------------------------------------------------------------

def test_replicates_and_leave_one_out_equal_the_metrics_of_the_resampled_set():
    graph = ResidualGraph(2)
    rng = np.random.default_rng(3)
    scores = graph.dense(rng.standard_t(3, size=(6, graph.n_edges)))
    strongest = int(np.abs(scores).reshape(6, -1).max(axis=1).argmax())
    others = [k for k in range(6) if k != strongest]
    # Draws with repeats, and draws that miss the sample holding the pooled max.
    draws = np.array([[0, 0, 1, 2, 3, 5], others + [others[0]], [strongest] * 3 + others[:3],
                      [others[1]] * 5 + [others[2]], [strongest] + others])
    counts = np.stack([np.bincount(d, minlength=6) for d in draws]).astype(float)
    for grid in ("own-max", "shared-quantile"):
        conventions = settings(histogram_bins=13, complexity_grid=grid)
        rows = _Rows([check_scores(scores, graph)], graph, conventions)
        replicates = rows.evaluate(counts)
        replicate, row = np.nonzero(counts)
        left_out = rows.leave_one_out(counts, replicate, row)
        sets = [(r, draw) for r, draw in enumerate(draws)]
        # Leaving a question out removes every copy of it.
        sets += [(len(draws) + i, draws[r][draws[r] != k]) for i, (r, k) in
                 enumerate(zip(replicate, row))]
        for index, draw in sets:
            found = ({name: v[index] for name, v in replicates.items()} if index < len(draws) else
                     {name: v[index - len(draws)] for name, v in left_out.items()})
            direct = model_metrics(scores[draw], graph, conventions) if len(draw) > 1 else None
            for name in ("intensity", "edge_entropy", "kurtosis", "output_entropy"):
                expected = (direct[name] if direct else
                            per_sample_metrics(scores, graph, conventions)[name][draw[0]])
                assert found[name] == pytest.approx(expected, rel=1e-10), (grid, name)
            # Complexity: the resampled pool on its own max (own-max), or on the full sample's
            # fixed grid with larger values in the last bin (shared-quantile).
            pool = np.abs(scores[draw]).ravel()
            top = pool.max() if grid == "own-max" else complexity_top([scores], graph, conventions)
            hist, _ = np.histogram(np.minimum(pool, top), bins=13, range=(0.0, top))
            assert found["complexity"] == pytest.approx(entropy(hist), rel=1e-10), grid
            # Diversity: pairs of drawn positions, leaving out those of one question drawn twice.
            flat = scores.reshape(6, -1)
            pairs = [np.corrcoef(flat[a], flat[b])[0, 1] for i, a in enumerate(draw)
                     for b in draw[i + 1:] if a != b]
            if pairs:
                assert found["diversity"] == pytest.approx(1 - np.mean(pairs), rel=1e-10)


def test_draws_are_seeded_and_row_zero_is_the_original_sample():
    counts = _draw_counts(10, MetricSettings(bootstrap=50, seed=4))
    assert counts.shape == (51, 10) and (counts[0] == 1).all() and (counts.sum(axis=1) == 10).all()
    np.testing.assert_array_equal(counts, _draw_counts(10, MetricSettings(bootstrap=50, seed=4)))
    assert not np.array_equal(counts, _draw_counts(10, MetricSettings(bootstrap=50, seed=5)))


def random_scores(graph, n, seed, df=3.0):
    return graph.dense(np.random.default_rng(seed).standard_t(df, size=(n, graph.n_edges)))


def test_identical_models_give_zero_change_and_no_significant_edge():
    graph = ResidualGraph(3)
    base = random_scores(graph, 40, 0)
    comparison = compare_models(base, base.copy(), graph, MetricSettings(bootstrap=200))
    for name, m in comparison.metrics.items():
        assert m.change == 0, name
        assert m.scale == ("log_ratio" if name == "intensity" else "difference"), name
        assert m.change_ci == (0, 0) and m.interval == (0, 0), name
        assert m.clear_sign == 0 and m.p == 1, name
        assert m.base_ci == m.post_ci and m.base_ci[0] <= m.base <= m.base_ci[1], name
        assert m.wilcoxon_p == 1 if name in PER_SAMPLE_METRICS else math.isnan(m.wilcoxon_p), name
    table = grid_table([("pair", "data", 0.1, comparison)])
    assert set(table["direction"]) == {NO_CLEAR_CHANGE, "no paper claim"}
    assert significant_edges(base, base.copy(), graph).empty
    every_edge = significant_edges(base, base.copy(), graph, only_significant=False)
    assert set(every_edge["direction"]) == {NO_CLEAR_CHANGE} and (every_edge["p"] == 1).all()
    change = edge_change(base, base.copy(), graph)
    assert (change[graph.real_edge_mask] == 0).all() and np.isnan(change[~graph.real_edge_mask]).all()


SCALE_FREE = ("complexity", "edge_entropy", "kurtosis", "diversity", "output_entropy")


@pytest.mark.parametrize("gain", [1e-3, 0.37, 1.0, 1.5, 3.0, 1e4])
@pytest.mark.parametrize("flatten", ["dense", "edges"])
def test_a_pure_gain_changes_intensity_only_and_by_exactly_the_gain(gain, flatten):
    # post = c x base on every question: every scale-free metric is unchanged (up to rounding:
    # 1e-12 of its value: c x W rounds differently), with p = 1 and an interval within rounding of
    # 0; intensity moves by exactly c - 1,
    # and its % interval is c - 1 exactly (every swap of a question scales it alike).
    graph = ResidualGraph(3)
    base = random_scores(graph, 30, 1)
    comparison = compare_models(base, gain * base, graph,
                                MetricSettings(bootstrap=50, permutations=500, flatten=flatten))
    for name in SCALE_FREE:
        m = comparison.metrics[name]
        assert abs(m.change) <= 1e-12 * max(1.0, abs(m.base)), (name, m.change)
        assert m.scale == "difference" and m.p == 1, name
        assert max(map(abs, m.interval)) <= 1e-12 * max(1.0, abs(m.base)), name
    intensity = comparison.metrics["intensity"]
    assert intensity.post / intensity.base == pytest.approx(gain, rel=1e-12)
    assert intensity.change == pytest.approx((gain - 1) * intensity.base, rel=1e-12)
    assert intensity.change_pct == pytest.approx(100 * (gain - 1), rel=1e-9, abs=1e-9)
    assert intensity.change_pct_ci == pytest.approx((100 * (gain - 1),) * 2, rel=1e-6, abs=1e-6)


def test_on_a_shared_grid_complexity_is_not_scale_free():
    graph = ResidualGraph(3)
    base = random_scores(graph, 30, 1)
    shared = MetricSettings(bootstrap=0, permutations=0, complexity_grid="shared-quantile")
    assert compare_models(base, 1.5 * base, graph, shared).metrics["complexity"].change > 0.1


def test_kurtosis_is_a_difference_even_when_signs_differ_and_intensity_a_percent():
    # Signed kurtosis over edges: uniform scores near -1.2, Laplace ones near +3.
    graph = ResidualGraph(3)
    rng = np.random.default_rng(0)
    base = graph.dense(rng.uniform(-1, 1, size=(40, graph.n_edges)))
    post = graph.dense(rng.laplace(size=(40, graph.n_edges)))
    comparison = compare_models(base, post, graph, MetricSettings(bootstrap=200, flatten="edges"))
    kurtosis = comparison.metrics["kurtosis"]
    assert kurtosis.base < 0 < kurtosis.post
    assert kurtosis.scale == "difference" and kurtosis.interval == kurtosis.change_ci
    assert math.isnan(kurtosis.change_pct) and kurtosis.change_pct_ci is None
    assert kurtosis.clear_sign == 1
    row = grid_table([("pair", "data", 0.1, comparison)]).set_index("metric").loc["kurtosis"]
    assert row["scale"] == "difference" and row["direction"] == "against paper"
    assert (row["change_low"], row["change_high"]) == pytest.approx(kurtosis.change_ci)
    intensity = comparison.metrics["intensity"]
    assert intensity.scale == "log_ratio" and intensity.interval == intensity.change_pct_ci
    assert intensity.change_pct == pytest.approx(100 * (intensity.post / intensity.base - 1))
    # Without permutations there is no test and no interval of the change, so no claim.
    plain = compare_models(base, post, graph, MetricSettings(bootstrap=0, permutations=0))
    assert all(m.interval is None and m.clear_sign == 0 and math.isnan(m.p)
               for m in plain.metrics.values())


def test_wilcoxon_p_of_per_sample_metrics_by_hand():
    # Intensity rises on each of 5 questions by a different amount: every signed rank is positive,
    # so the exact two-sided p is 2 / 2^5.
    graph = ResidualGraph(2)
    base = random_scores(graph, 5, 8)
    post = base * (1 + 0.1 * np.arange(1, 6))[:, None, None]
    comparison = compare_models(base, post, graph, MetricSettings(bootstrap=0))
    assert comparison.metrics["intensity"].wilcoxon_p == pytest.approx(2 / 32)
    assert math.isnan(comparison.metrics["complexity"].wilcoxon_p)
    assert math.isnan(comparison.metrics["diversity"].wilcoxon_p)


@pytest.mark.parametrize("n", [3, 4])
def test_permutation_p_is_exact_on_every_swap_enumerated_by_hand(n):
    # All 2^n ways of swapping base and post within questions, built as matrices and measured with
    # the plain metrics: p = the share of them whose change is at least the observed one in size.
    # The scale-free metrics swap each model's matrices divided by its median nonzero |W| on real
    # edges (docs/method.md section 7; it changes none of their values, only which scale a
    # swapped pool mixes); intensity swaps the matrices as they are, on the log-ratio scale.
    graph = ResidualGraph(2)
    rng = np.random.default_rng(n)
    base = random_scores(graph, n, 20 + n)
    post = graph.dense(1.7 * rng.standard_t(4, size=(n, graph.n_edges)))
    plain = MetricSettings(bootstrap=0, permutations=0)

    def typical(scores):
        magnitude = np.abs(graph.edges(scores))
        return np.median(magnitude[magnitude > 0])

    scaled_base, scaled_post = base / typical(base), post / typical(post)
    changes = {name: [] for name in METRICS}
    for pattern in range(2 ** n):
        swap = np.array([(pattern >> k) & 1 for k in range(n)], dtype=bool)[:, None, None]
        for name in METRICS:
            b, p = (base, post) if name == "intensity" else (scaled_base, scaled_post)
            left = model_metrics(np.where(swap, p, b), graph, plain)[name]
            right = model_metrics(np.where(swap, b, p), graph, plain)[name]
            changes[name].append(math.log(right / left) if name == "intensity" else right - left)
    comparison = compare_models(base, post, graph, MetricSettings(bootstrap=0, permutations=2 ** n))
    assert comparison.exact
    for name in METRICS:
        swapped = np.abs(changes[name])
        observed = swapped[0]  # pattern 0 swaps nothing
        expected = int((swapped >= observed * (1 - 1e-9)).sum()) / 2 ** n
        assert comparison.metrics[name].p == pytest.approx(expected), name
        assert comparison.metrics[name].p in {k / 2 ** n for k in range(1, 2 ** n + 1)}, name


def test_intervals_are_the_changes_the_permutation_test_does_not_reject():
    # The interval excludes 0 exactly where p <= 1 - ci_level (one test, read two ways), and its
    # ends are where the test starts to reject.
    graph = ResidualGraph(3)
    conventions = MetricSettings(bootstrap=0, permutations=999)
    agree = 0
    for seed in range(6):
        base = random_scores(graph, 25, 100 + seed)
        post = random_scores(graph, 25, 200 + seed, df=6.0) * (1.0 + 0.1 * seed)
        for name, m in compare_models(base, post, graph, conventions).metrics.items():
            excludes = not m.interval[0] <= 0 <= m.interval[1]
            agree += excludes == (m.p <= 0.05)
            assert m.interval[0] <= (m.change_pct if m.scale == "log_ratio" else m.change) \
                <= m.interval[1], name
    assert agree == 6 * len(METRICS)


def test_loss_correlation_is_spearman_of_each_metric_with_the_loss():
    loss = np.array([0.5, 1.0, 2.0, 3.0, 4.0])
    per_sample = {"intensity": loss ** 2, "kurtosis": -loss, "edge_entropy": np.ones(5),
                  "output_entropy": np.array([1.0, 3.0, 2.0, 5.0, 4.0])}
    table = loss_correlation(per_sample, loss).set_index("metric")
    assert table.loc["intensity", "rho"] == pytest.approx(1.0)
    assert table.loc["kurtosis", "rho"] == pytest.approx(-1.0)
    assert math.isnan(table.loc["edge_entropy", "rho"])  # a constant metric has no rank order
    # Ranks 1,3,2,5,4 against 1..5: 1 - 6 * 4 / (5 * 24) = 0.8.
    assert table.loc["output_entropy", "rho"] == pytest.approx(0.8)
    assert table.loc["output_entropy", "p"] > table.loc["intensity", "p"]
    assert (table["n"] == 5).all()
    with pytest.raises(ValueError, match="same questions"):
        loss_correlation({"intensity": loss[:4]}, loss)


def test_real_change_gives_intervals_away_from_zero():
    graph = ResidualGraph(3)
    base = random_scores(graph, 60, 2, df=2.5)
    post = random_scores(graph, 60, 3, df=30.0) * 3.0  # lighter tails, stronger
    comparison = compare_models(base, post, graph, MetricSettings(bootstrap=300))
    assert comparison.metrics["intensity"].change_ci[0] > 0
    assert comparison.metrics["kurtosis"].change_ci[1] < 0
    assert comparison.metrics["complexity"].change_ci[0] > 0


# --- Per-edge tests ----------------------------------------------------------------------------------

def planted(seed, n=60, graph=ResidualGraph(6)):
    """Signed scores with lognormal magnitudes; post is an independent draw from the same law except
    8 edges x2 (strengthened) and 4 edges x0.4 (weakened)."""
    rng = np.random.default_rng(seed)

    def draw():
        shape = (n, graph.n_edges)
        return rng.lognormal(0.0, 0.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)

    base, post = draw(), draw()
    changed = rng.choice(graph.n_edges, size=12, replace=False)
    post[:, changed[:8]] *= 2.0
    post[:, changed[8:]] *= 0.4
    names = np.asarray(graph.edge_names)
    return graph.dense(base), graph.dense(post), set(names[changed[:8]]), set(names[changed[8:]])


def test_planted_edges_are_found_at_the_stated_false_discovery_rate():
    graph = ResidualGraph(6)
    conventions = MetricSettings(fdr=0.05)
    proportions = []
    for seed in range(20):
        base, post, stronger, weaker = planted(seed)
        found = significant_edges(base, post, graph, conventions)
        assert (found["q"] <= 0.05).all()
        by_direction = found.groupby("direction")["edge"].apply(set)
        assert stronger <= by_direction.get("strengthened", set())
        assert weaker <= by_direction.get("weakened", set())
        proportions.append(len(set(found["edge"]) - stronger - weaker) / len(found))
    # BH bounds the expected false discovery proportion by fdr * (true nulls / tests) <= 0.05; the mean
    # of 20 runs has a standard error near 0.01.
    assert np.mean(proportions) <= 0.08


def test_edge_table_columns_ranking_and_hand_values():
    graph = ResidualGraph(6)
    base, post, stronger, _ = planted(0)
    table = significant_edges(base, post, graph, only_significant=False)
    assert list(table.columns) == ["src", "dst", "edge", "base_mean_abs", "post_mean_abs", "difference",
                                   "rel_change", "statistic", "p", "q", "direction"]
    assert len(table) == graph.n_edges
    assert (np.diff(np.abs(table["rel_change"].to_numpy())) <= 0).all()
    row = table.iloc[0]
    column = np.abs(graph.edges(base)[:, graph.edge_names.index(row["edge"])])
    assert row["base_mean_abs"] == pytest.approx(column.mean())
    assert row["edge"] == f"{row['src']}->{row['dst']}"
    assert row["rel_change"] == pytest.approx(row["difference"] / row["base_mean_abs"])


def test_edge_change_measures_by_hand():
    # Edge strengths mean_k |W|: base X (both samples), post 2X on sample 0 and X on sample 1 -> 1.5X.
    base, post = dense(X, -X), dense(2 * X, X)
    ratio = edge_change(base, post, SMALL, "ratio")
    difference = edge_change(base, post, SMALL, "difference")
    normalised = edge_change(base, post, SMALL, "normalised")
    mask = SMALL.real_edge_mask
    np.testing.assert_allclose(ratio[mask], 0.5)
    np.testing.assert_allclose(difference[mask], 0.5 * X)
    np.testing.assert_allclose(normalised[mask], 0.5 * X / 4.5)  # base mean |W| over edges: 36/8
    for change in (ratio, difference, normalised):
        assert np.isnan(change[~mask]).all()
    with pytest.raises(ValueError, match="measure"):
        edge_change(base, post, SMALL, "log")


# --- Results, settings and grids --------------------------------------------------------------------

def test_results_carry_their_settings_and_round_trip_through_json():
    graph = ResidualGraph(2)
    base, post = random_scores(graph, 12, 5), random_scores(graph, 12, 6)
    conventions = MetricSettings(bootstrap=20, flatten="edges", histogram_bins=30)
    comparison = compare_models(base, post, graph, conventions)
    data = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert data["settings_key"] == conventions.key() != MetricSettings().key()
    assert Comparison.from_dict(data) == comparison
    model = summarise_model(base, graph, conventions)
    assert ModelMetrics.from_dict(json.loads(json.dumps(model.to_dict(), allow_nan=False))) == model
    # Under own-max each model is binned on its own pool, alone or in a comparison.
    assert model.values == pytest.approx({k: comparison.metrics[k].base for k in METRICS})
    for k in METRICS:
        assert model.intervals[k] == pytest.approx(comparison.metrics[k].base_ci, rel=1e-9), k
    assert model.complexity_top == np.abs(base).max() == comparison.complexity_tops[0]
    # Without bootstrap and permutations there are no intervals, and the JSON says so.
    plain = compare_models(base, post, graph,
                           conventions.replace(bootstrap=0, permutations=0)).to_dict()
    assert plain["metrics"]["intensity"]["change_ci"] is None
    assert plain["metrics"]["intensity"]["base_ci"] is None and plain["metrics"]["intensity"]["p"] is None


def cell(diversity_pct, intensity_pct, kurtosis_change, conventions=MetricSettings()):
    def change(pct, base=1.0):
        post = base * (1 + pct / 100)
        return MetricChange(base=base, post=post, change=post - base, change_pct=pct, base_ci=(0.9, 1.1),
                            post_ci=(0.9, 1.1), change_ci=(post - base - 0.01, post - base + 0.01),
                            change_pct_ci=(pct - 1, pct + 1), scale="log_ratio", p=0.5,
                            wilcoxon_p=0.5)

    metrics = {name: change(0.0) for name in METRICS}
    metrics.update(diversity=change(diversity_pct), intensity=change(intensity_pct),
                   kurtosis=change(kurtosis_change * 100 / 300, base=300.0))
    return Comparison(settings=conventions, n_samples=100, metrics=metrics,
                      complexity_tops=(1.0, 1.0), exact=False)


def test_grid_table_and_diversity_summary():
    grid = [("deepseek", "MATH", 0.1, cell(8.0, 19.0, -134.0)),
            ("deepseek", "MATH", 0.3, cell(-3.0, 5.0, 20.0)),
            ("qwen25-dpo", "college_math", 0.3, cell(0.5, -1.5, -100.0))]
    table = grid_table(grid)
    assert len(table) == 3 * len(METRICS)
    row = table[(table["alpha"] == 0.1) & (table["metric"] == "kurtosis")].iloc[0]
    assert row["direction"] == "as paper" and row["change_pct"] == pytest.approx(-134 / 3)
    row = table[(table["alpha"] == 0.3) & (table["pair"] == "deepseek") & (table["metric"] == "diversity")]
    assert row["direction"].item() == "against paper" and row["clear_sign"].item() == -1
    # +0.5% with the interval [-0.5, +1.5]: no direction is claimed.
    row = table[(table["pair"] == "qwen25-dpo") & (table["metric"] == "diversity")]
    assert row["direction"].item() == NO_CLEAR_CHANGE and row["clear_sign"].item() == 0
    assert set(table[table["metric"] == "edge_entropy"]["direction"]) == {"no paper claim"}
    assert set(table[table["metric"] == "complexity"]["direction"]) == {NO_CLEAR_CHANGE}
    summary = diversity_summary(grid).set_index("pair")
    assert summary.loc["all", ["cells", "rose", "rose_ci_above_zero", "fell", "fell_ci_below_zero"]
                       ].tolist() == [3, 2, 1, 1, 1]
    assert summary.loc["all", "mean_change_pct"] == pytest.approx(5.5 / 3)
    assert summary.loc["all", "mean_change"] == pytest.approx(0.055 / 3)
    assert (table["p"] == 0.5).all()
    assert summary.loc["deepseek", "cells"] == 2 and summary.loc["qwen25-dpo", "rose"] == 1
    with pytest.raises(ValueError, match="different metric settings"):
        grid_table(grid + [("mistral", "MATH", 0.3, cell(1, 1, 1, MetricSettings(histogram_bins=50)))])


# --- Input checks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, message", [
    (np.zeros((3, 3, 4)), "shape"),
    (dense(X), "at least 2"),
    (dense(X, X * np.nan), "non-finite"),
    (dense(X, 0 * X), "all zero"),
    (dense(X, X) + 1.0, "non-edges"),
])
def test_bad_scores_raise_clear_errors(scores, message):
    with pytest.raises(ValueError, match=message):
        model_metrics(scores, SMALL, settings())


def test_paired_inputs_must_have_the_same_questions():
    with pytest.raises(ValueError, match="same questions"):
        compare_models(dense(X, X), dense(X, X, X), SMALL)


# --- CLI -----------------------------------------------------------------------------------------------

def write_scores(path, scores, graph, ids):
    np.savez(path, scores=scores.astype(np.float32), src_names=np.array(graph.src_names),
             dst_names=np.array(graph.dst_names), real_edge_mask=graph.real_edge_mask,
             sample_ids=np.array(ids), loss=np.zeros(len(ids)))


def test_cli_prints_metrics_changes_and_significant_edges(tmp_path, capsys):
    graph = ResidualGraph(6)
    base, post, stronger, weaker = planted(7)
    ids = [f"q{k}" for k in range(base.shape[0])]
    write_scores(tmp_path / "base.npz", base, graph, ids)
    shuffle = np.random.default_rng(0).permutation(len(ids))  # the post file lists questions in another order
    write_scores(tmp_path / "post.npz", post[shuffle], graph, [ids[k] for k in shuffle])
    assert main(["metrics", "--scores", str(tmp_path / "base.npz"), "--against", str(tmp_path / "post.npz"),
                 "--bootstrap", "50", "--flatten", "edges"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = MetricSettings(bootstrap=50, flatten="edges")
    assert report["settings_key"] == expected.key() == report["comparison"]["settings_key"]
    assert set(report["files"]) == {str(tmp_path / "base.npz"), str(tmp_path / "post.npz")}
    assert set(report["comparison"]["metrics"]) == set(METRICS)
    # Realigned by id: the same result as the API on the aligned arrays.
    direct = compare_models(base.astype(np.float32), post.astype(np.float32), graph, expected)
    assert report["comparison"]["metrics"]["intensity"]["change"] == \
        pytest.approx(direct.metrics["intensity"].change)
    found = {row["edge"]: row["direction"] for row in report["significant_edges"]}
    assert all(found.get(edge) == "strengthened" for edge in stronger)
    assert all(found.get(edge) == "weakened" for edge in weaker)


def test_cli_single_file_and_mismatched_questions(tmp_path, capsys):
    graph = ResidualGraph(2)
    scores = random_scores(graph, 5, 0)
    write_scores(tmp_path / "a.npz", scores, graph, ["a", "b", "c", "d", "e"])
    write_scores(tmp_path / "b.npz", scores, graph, ["a", "b", "c", "d", "x"])
    assert main(["metrics", "--scores", str(tmp_path / "a.npz"), "--bootstrap", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "comparison" not in report
    values = report["files"][str(tmp_path / "a.npz")]["metrics"]
    assert values["diversity"]["value"] == pytest.approx(
        model_metrics(scores.astype(np.float32), graph)["diversity"])
    assert main(["metrics", "--scores", str(tmp_path / "a.npz"), "--against", str(tmp_path / "b.npz")]) == 2
    assert "same questions" in capsys.readouterr().err
    assert main(["metrics", "--scores", str(tmp_path / "missing.npz")]) == 2


def test_sample_constant_over_real_edges_is_refused_when_flattening_over_edges():
    scores = dense(X, np.ones(8))
    assert math.isfinite(model_metrics(scores, SMALL, settings())["diversity"])  # zeros make it vary
    with pytest.raises(ValueError, match="constant over the edges entries"):
        model_metrics(scores, SMALL, settings(flatten="edges"))


def test_per_sample_metrics_come_in_the_declared_order():
    graph = ResidualGraph(2, "qkv")
    scores = np.random.default_rng(0).normal(size=(3, graph.n_src, graph.n_dst)) * graph.real_edge_mask
    assert tuple(metrics.per_sample_metrics(scores, graph)) == metrics.PER_SAMPLE_METRICS


def test_the_new_statistics_change_the_key_so_comparisons_of_the_old_method_are_not_served():
    # Stored comparisons are found by MetricSettings().key(). The keys of the statistics before
    # issue 26 (shared-quantile complexity, percentile intervals, no permutation p) had neither
    # complexity_grid nor permutations: no key of today's settings can equal one of them.
    current = MetricSettings().key_dict()
    assert current["complexity_grid"] == "own-max" and current["permutations"] == 10000
    old = {k: v for k, v in current.items() if k not in ("complexity_grid", "permutations")}
    assert MetricSettings().key() != stable_hash({"group": "metrics", **old})
    assert MetricSettings().key() != MetricSettings(complexity_grid="shared-quantile").key()
    # The primary cell is a declaration about reading, not a result: outside the key.
    assert "primary" not in current
    assert MetricSettings(primary="kurtosis@0.3").key() == MetricSettings().key()


@pytest.mark.parametrize("text", ["intensity", "intensity@", "entropy@0.1", "intensity@1.5",
                                  "intensity@0.1,kurtosis"])
def test_a_malformed_primary_is_refused_naming_the_form(text):
    with pytest.raises(SettingsError, match="metric@alpha"):
        MetricSettings(primary=text)


def test_primary_cells_parse():
    assert MetricSettings().primary_cells == (("intensity", 0.1),)
    assert MetricSettings(primary="kurtosis@0.3, diversity@0.03").primary_cells == (
        ("kurtosis", 0.3), ("diversity", 0.03))
    assert MetricSettings(primary="none").primary_cells == ()


def test_holm_by_hand():
    # m = 4 (NaN not counted): sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, then running max.
    adjusted = holm([0.01, 0.04, 0.03, math.nan, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, math.nan, 0.02])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_changes_print_with_their_unit_and_enough_digits():
    nan = (math.nan, math.nan)
    assert format_change("intensity", "log_ratio", 30.12, (15.1, 58.6), 0.1, nan) == \
        "+30.1% [+15.1, +58.6]"
    # A small entropy change keeps its digits (never "-0.0%"), in nats.
    assert format_change("edge_entropy", "difference", math.nan, nan, -0.00123,
                         (-0.002, -0.0004)) == "Δ-0.00123 [-0.002, -0.0004] nats"
    assert format_change("kurtosis", "difference", math.nan, nan, -12.34, (-20.1, -3.3)) == \
        "Δ-12.3 [-20.1, -3.3]"
    assert format_change("intensity", "log_ratio", -0.0412, (-0.1, 0.02), 0.0, nan) == \
        "-0.0412% [-0.1, +0.02]"
