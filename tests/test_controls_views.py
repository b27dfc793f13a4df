"""Controls, the view side (issue 10; docs/method.md section 8): the weights/tokens decomposition,
the position and confidence variants, the null comparison, and the scale question."""

import math

import numpy as np
import pytest
import torch

from core import metrics
from core.graph import ResidualGraph
from core.settings import MetricSettings

from tests.tiny_models import random_samples, tiny_model

GRAPH = ResidualGraph(2, "qkv")
QUICK = MetricSettings(bootstrap=200)


def _scores(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    edges = scale * rng.standard_t(3, size=(n, GRAPH.n_edges))
    return GRAPH.dense(edges)


# --- scale: W itself is invariant under a uniform rescaling of the residual stream ---------------

def _rescaled_residual(model, c: float):
    """The same model with its residual stream multiplied by c everywhere: embedding, every
    attention output projection and every MLP down projection scaled by c. Every norm reads c times
    its input, so (norms ignore scale) every block's output and the logits are unchanged but for the
    norms' epsilon."""
    scaled = type(model)(model.config).to(torch.float64)
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.model.embed_tokens.weight.mul_(c)
        for layer in scaled.model.layers:
            layer.self_attn.o_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.mul_(c)
    return scaled.requires_grad_(False).eval()


def test_a_uniformly_rescaled_residual_stream_leaves_w_and_its_metrics_unchanged():
    """O_s scales by c and each slot's branch gradient (through its norm) by 1/c, so W does not
    change: the 'scale variant' the issue asks for is W itself, and no residual-norm division is
    offered (it would break this invariance rather than restore it). Checked in float64 with the
    norms' epsilon set negligible."""
    from core.eap import score_samples

    model = tiny_model("llama", n_layers=2)
    model.config.rms_norm_eps = 1e-30
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-30
    samples = random_samples(4, seed=3)
    c = 37.0
    scaled = _rescaled_residual(model, c)  # built from the config, so with the same epsilon
    plain, rescaled = score_samples(model, samples), score_samples(scaled, samples)
    np.testing.assert_allclose(rescaled.loss, plain.loss, rtol=1e-12)
    np.testing.assert_allclose(rescaled.residual_norm, c * plain.residual_norm, rtol=1e-10)
    np.testing.assert_allclose(rescaled.scores, plain.scores, rtol=1e-8,
                               atol=1e-10 * np.abs(plain.scores).max())
    graph = plain.graph
    before, after = (metrics.model_metrics(s, graph) for s in (plain.scores, rescaled.scores))
    for name in metrics.METRICS:
        assert after[name] == pytest.approx(before[name], rel=1e-6), name


# --- decomposition ---------------------------------------------------------------------------------

def test_the_decomposition_sums_exactly_on_point_values_and_in_every_replicate():
    rng = np.random.default_rng(0)
    base, post, post_on_base, base_on_post = (_scores(rng, 12, s) for s in (1.0, 1.4, 1.2, 1.1))
    result = metrics.decompose(base, post, post_on_base, GRAPH, QUICK, base_on_post=base_on_post)
    for name in metrics.METRICS:
        total = result.values["total"][name]
        assert total == pytest.approx(result.values["weights"][name]
                                      + result.values["tokens"][name], rel=1e-12, abs=1e-15)
        assert total == pytest.approx(result.values["symmetric_weights"][name]
                                      + result.values["symmetric_tokens"][name], rel=1e-12,
                                      abs=1e-15)
        assert result.intervals["weights"][name] is not None
    # The per-sample metrics' total is the comparison's change (same questions and definitions).
    comparison = metrics.compare_models(base, post, GRAPH, QUICK)
    assert result.values["total"]["intensity"] == pytest.approx(
        comparison.metrics["intensity"].change, rel=1e-12)


def test_identical_base_and_post_give_zero_in_every_part_and_no_significant_edge():
    rng = np.random.default_rng(1)
    base = _scores(rng, 10)
    result = metrics.decompose(base, base.copy(), base.copy(), GRAPH, QUICK,
                               base_on_post=base.copy())
    for part, values in result.values.items():
        for name, value in values.items():
            assert value == 0.0, (part, name)
            assert result.intervals[part][name] == (0.0, 0.0), (part, name)
    assert metrics.significant_edges(base, base.copy(), GRAPH, QUICK).empty


def test_same_tokens_put_the_whole_change_in_the_weight_part():
    """Post scored on base's tokens that equal its own (both wrote the same answer): tokens part 0."""
    rng = np.random.default_rng(2)
    base, post = _scores(rng, 10), _scores(rng, 10, 2.0)
    result = metrics.decompose(base, post, post.copy(), GRAPH, QUICK)
    for name in metrics.METRICS:
        assert result.values["tokens"][name] == 0.0
        assert result.values["weights"][name] == result.values["total"][name]


def test_decomposition_refuses_matrices_of_different_questions():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="same questions"):
        metrics.decompose(_scores(rng, 5), _scores(rng, 5), _scores(rng, 4), GRAPH, QUICK)


# --- position and confidence variants -------------------------------------------------------------

def test_position_variants_are_the_hand_summed_parts():
    rng = np.random.default_rng(4)
    parts = np.stack([_scores(rng, 6) for _ in range(3)], axis=1)  # [n, 3, n_src, n_dst]
    total = parts[:, 0] + parts[:, 1] + parts[:, 2]
    norms = rng.uniform(0.5, 2.0, size=6)
    assert np.array_equal(metrics.score_variant(parts, total, norms, MetricSettings()), total)
    np.testing.assert_array_equal(
        metrics.score_variant(parts, total, norms, MetricSettings(positions="no-sink")),
        parts[:, 1] + parts[:, 2])
    np.testing.assert_array_equal(
        metrics.score_variant(parts, total, norms, MetricSettings(positions="answer-only")),
        parts[:, 2])
    np.testing.assert_allclose(
        metrics.score_variant(parts, total, norms,
                              MetricSettings(positions="no-sink", normalise="logit-grad")),
        (parts[:, 1] + parts[:, 2]) / norms[:, None, None], rtol=1e-15)


def test_variants_without_their_stored_inputs_say_what_is_missing():
    rng = np.random.default_rng(5)
    total = _scores(rng, 3)
    with pytest.raises(ValueError, match="position parts"):
        metrics.score_variant(None, total, None, MetricSettings(positions="answer-only"))
    with pytest.raises(ValueError, match="logit-gradient norm"):
        metrics.score_variant(None, total, None, MetricSettings(normalise="logit-grad"))


def test_the_variants_stay_out_of_the_metric_key_at_their_defaults():
    assert "positions" not in MetricSettings().key_dict()
    assert "normalise" not in MetricSettings().key_dict()
    assert MetricSettings(positions="no-sink").key() != MetricSettings().key()
    assert MetricSettings(normalise="logit-grad").key() != MetricSettings().key()


# --- null comparison --------------------------------------------------------------------------------

def _change(change: float, low: float, high: float) -> metrics.MetricChange:
    return metrics.MetricChange(base=1.0, post=1.0 + change, change=change, change_pct=100 * change,
                                base_ci=None, post_ci=None, change_ci=(low, high),
                                change_pct_ci=(100 * low, 100 * high), scale="log_ratio",
                                p=math.nan, wilcoxon_p=math.nan)


@pytest.mark.parametrize("real, null, expected", [
    ((0.5, 0.3, 0.7), (0.1, -0.1, 0.3), True),     # interval beyond the null's point change
    ((0.5, 0.3, 0.7), (0.4, 0.2, 0.6), False),     # the null's change lies inside the interval
    ((0.5, -0.1, 1.1), (0.0, -0.1, 0.1), False),   # no clear change at all
    ((-0.5, -0.7, -0.3), (-0.1, -0.3, 0.1), True),  # a clear decrease beyond the null's
    ((-0.5, -0.7, -0.3), (0.6, 0.4, 0.8), True),   # the null went the other way
])
def test_a_change_exceeds_its_null_only_with_its_interval_beyond_the_nulls_point_change(
        real, null, expected):
    assert metrics.exceeds_null(_change(*real), _change(*null)) is expected


# --- the read model over a cache with controls -----------------------------------------------------

@pytest.fixture(scope="module")
def controls_cache(tmp_path_factory):
    from core.query import ResultCache
    from core.synthetic import build_controls_fixture

    path = tmp_path_factory.mktemp("controls") / "cache.duckdb"
    return ResultCache.open(path), build_controls_fixture(path, QUICK)


def test_the_decomposition_view_sums_exactly_and_matches_the_comparison(controls_cache):
    cache, runs = controls_cache
    table = cache.decomposition(runs["pair"], 0.1, settings=QUICK).set_index("metric")
    np.testing.assert_allclose(table["total"], table["weights"] + table["tokens"], rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(table["total"], table["symmetric_weights"]
                               + table["symmetric_tokens"], rtol=1e-12, atol=1e-15)
    comparison = cache.comparison(runs["pair"], 0.1, settings=QUICK)
    for name in ("intensity", "edge_entropy", "kurtosis", "diversity", "output_entropy"):
        assert table.loc[name, "total"] == pytest.approx(comparison.metrics[name].change, rel=1e-9)


def test_position_variant_views_equal_the_hand_summed_stored_parts(controls_cache):
    from core.runstore import RunStore
    from core.store import fetch_vectors

    cache, runs = controls_cache
    run_key = runs["pair"]
    graph = cache.graph(run_key)
    t_cut = int(cache.runs().set_index("run_key").loc[run_key, "t_cuts"][0])
    ids, part_ids = RunStore(cache.store).part_vector_ids(run_key, t_cut, "synthetic-rl")
    with cache.store.read() as con:
        parts = fetch_vectors(con, graph.n_edges, [i for row in part_ids for i in row])
    parts = parts.reshape(len(ids), 3, graph.n_edges).astype(np.float64)
    view = cache.view(run_key, 0.1, settings=MetricSettings(positions="no-sink"))
    assert list(view.question_ids) == ids
    np.testing.assert_allclose(view.post, graph.dense(parts[:, 1] + parts[:, 2]), rtol=1e-6,
                               atol=1e-12)
    answer = cache.view(run_key, 0.1, settings=MetricSettings(positions="answer-only"))
    np.testing.assert_array_equal(answer.post, graph.dense(parts[:, 2]))
    variant = cache.comparison(run_key, 0.1, settings=QUICK.replace(positions="answer-only"))
    direct = metrics.compare_models(answer.base, answer.post, graph, QUICK.replace(
        positions="answer-only"))
    assert variant.metrics["kurtosis"].change == pytest.approx(direct.metrics["kurtosis"].change)


def test_the_null_comparison_lists_each_metric_beside_its_null(controls_cache):
    cache, runs = controls_cache
    table = cache.null_comparison(runs["pair"], 0.3, settings=QUICK)
    assert list(table["metric"]) == list(metrics.METRICS)
    assert set(table["control"]) == {"perturb"}
    assert set(table["control_run_key"]) == {runs["null"]}
    real = cache.comparison(runs["pair"], 0.3, settings=QUICK)
    null = cache.comparison(runs["null"], 0.3, settings=QUICK)
    for row in table.itertuples():
        assert row.change == real.metrics[row.metric].change
        assert row.null_change == null.metrics[row.metric].change
        assert row.exceeds_null == metrics.exceeds_null(real.metrics[row.metric],
                                                        null.metrics[row.metric])


def test_runs_without_controls_say_which_command_computes_them(controls_cache):
    from core.query import ControlNotComputedError

    cache, runs = controls_cache
    with pytest.raises(ControlNotComputedError, match="--controls cross"):
        cache.decomposition(runs["series"], 0.1, settings=QUICK)
    with pytest.raises(ControlNotComputedError, match="--controls perturb"):
        cache.null_comparison(runs["series"], 0.1, settings=QUICK)
    with pytest.raises(ControlNotComputedError, match="position parts"):
        cache.comparison(runs["series"], 0.1, settings=QUICK.replace(positions="no-sink"))
    with pytest.raises(ControlNotComputedError, match="logit-gradient"):
        cache.comparison(runs["series"], 0.1, settings=QUICK.replace(normalise="logit-grad"))


def test_linking_a_control_changes_the_runs_content_key(tmp_path):
    from core.query import ResultCache
    from core.runstore import RunStore
    from core.synthetic import build_fixture_cache

    path = tmp_path / "cache.duckdb"
    pair, series = build_fixture_cache(path, QUICK)
    cache = ResultCache.open(path)
    before = {key: cache.content_key(key) for key in (pair, series)}
    RunStore(cache.store).write_control(pair, "synthetic-rl", "perturb", series)
    assert cache.content_key(pair) != before[pair]
    assert cache.content_key(series) == before[series]
    assert list(cache.controls(pair)["control_run_key"]) == [series]


def test_the_report_has_a_controls_section_only_where_a_control_is_computed(controls_cache):
    cache, runs = controls_cache
    settings = QUICK.replace(bootstrap=20)
    assert "Controls: weights vs tokens" in cache.report_html(runs["pair"], settings=settings)
    assert "Controls: weights vs tokens" not in cache.report_html(runs["series"],
                                                                  settings=settings)


def test_the_controls_figure_draws_every_computed_bar_of_the_summary(controls_cache):
    from core import figures

    cache, runs = controls_cache
    table = cache.controls_summary(runs["pair"], 0.3, settings=QUICK).table
    fig = figures.controls_bars(table)
    drawn = {(trace.xaxis, trace.name): trace.y[0] for trace in fig.data}
    for panel, row in enumerate(table.itertuples(), start=1):
        axis = "x" if panel == 1 else f"x{panel}"
        for column, label, _ in figures.CONTROL_BARS:
            assert drawn[(axis, label)] == pytest.approx(getattr(row, column), nan_ok=True)
    assert {label for _, label in drawn} == {label for _, label, _ in figures.CONTROL_BARS}


def test_a_null_models_run_is_never_pooled_in_the_overview(controls_cache):
    cache, runs = controls_cache
    pooling = cache.pooling()
    null_cells = pooling[pooling["run_key"] == runs["null"]]
    assert len(null_cells) and not null_cells["pooled"].any()
    assert null_cells["left_out"].str.contains(f"control of run {runs['pair']}").all()
    assert pooling[pooling["run_key"] == runs["pair"]]["pooled"].any()


def test_a_position_part_that_is_all_zero_is_listed_as_missing_not_raised(tmp_path, monkeypatch):
    # At T_cut 1 the one scored token is predicted from the prompt, so the answer-only part is zero.
    from core.query import ResultCache
    from core.synthetic import build_controls_fixture

    path = tmp_path / "cache.duckdb"
    runs = build_controls_fixture(path, QUICK)
    cache = ResultCache.open(path)
    real = ResultCache.comparison

    def comparison(self, run_key, alpha, *, settings=QUICK, **scope):
        if settings.positions == "answer-only":  # the variant of samples scored at T_cut 1
            parts = np.zeros((2, 3, 4))
            parts[:, :2] = 1.0
            metrics.score_variant(parts, parts.sum(1), None, settings)
        return real(self, run_key, alpha, settings=settings, **scope)
    monkeypatch.setattr(ResultCache, "comparison", comparison)
    summary = cache.controls_summary(runs["pair"], 0.1, settings=QUICK)
    assert "answer-only is defined from T_cut 2" in summary.missing["positions"]
    assert summary.table["answer_only"].isna().all() and summary.table["no_sink"].notna().all()


def test_a_variant_that_leaves_a_sample_all_zero_says_why():
    parts = np.ones((3, 3, 4))
    parts[1, 2] = 0.0  # sample 1 has no answer position (scored at T_cut 1)
    with pytest.raises(metrics.AllZeroSampleError, match=r"sample\(s\) \[1\].*defined from T_cut 2"):
        metrics.score_variant(parts, parts.sum(1), None, MetricSettings(positions="answer-only"))
    np.testing.assert_array_equal(
        metrics.score_variant(parts, parts.sum(1), None, MetricSettings(positions="no-sink")),
        parts[:, 1:].sum(1))
