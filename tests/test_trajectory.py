"""The trajectory of a series (issue 15, item 3; issue 26, item 5; docs/method.md section 7): the read
model's views on the synthetic series with training steps, whose planted edges change more at every
step, and the edge trends' permutation null and bootstrap on hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core import figures, trajectory
from core.errors import InputError, NotFoundError
from core.graph import ResidualGraph
from core.query import EDGE_MEASURES, METRICS, ResultCache
from core.settings import MetricSettings
from core.synthetic import PLANTED_EDGES, TRAJECTORY_STEPS, build_trajectory_fixture

QUICK = MetricSettings(bootstrap=200)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("trajectory") / "fixture.duckdb"
    return ResultCache.open(path), build_trajectory_fixture(path)


def test_series_runs_lists_series_with_their_steps(world):
    cache, keys = world
    series = cache.series_runs().set_index("run_key")
    assert list(cache.series_runs().columns) == list(trajectory.SERIES_COLUMNS)
    assert set(series.index) == {keys["series"], keys["steps"]}  # the pair is not a series
    steps = series.loc[keys["steps"]]
    assert steps["steps"] == list(TRAJECTORY_STEPS) and steps["declared"]
    assert steps["n_steps"] == 3
    assert steps["post_labels"] == [f"synthetic-step-{s}" for s in TRAJECTORY_STEPS]
    # A series without declared steps: its posts in order are steps 1..n.
    undeclared = series.loc[keys["series"]]
    assert undeclared["steps"] == [1, 2] and not undeclared["declared"]
    assert undeclared["post_labels"] == ["synthetic-grpo", "synthetic-dpo"]


def test_series_runs_of_an_empty_cache(tmp_path):
    table = ResultCache.open(tmp_path / "missing.duckdb").series_runs()
    assert table.empty and list(table.columns) == list(trajectory.SERIES_COLUMNS)


def test_metrics_over_steps_are_the_comparisons_with_their_intervals(world):
    cache, keys = world
    table = cache.trajectory_metrics(keys["steps"], 0.1, settings=QUICK)
    assert list(table.columns) == list(trajectory.TRAJECTORY_COLUMNS)
    assert table["step"].tolist() == sorted(table["step"])
    assert list(dict.fromkeys(table["step"])) == [0, *TRAJECTORY_STEPS]
    assert len(table) == (1 + len(TRAJECTORY_STEPS)) * len(METRICS)
    base = table[table["step"] == 0]
    assert (base[["value", "low", "high"]] == 0).all().all() and not base["significant"].any()
    assert set(base["post_label"]) == {"synthetic-fixture-steps-base"}
    posts = table[table["step"] > 0]
    assert (posts["low"] <= posts["value"]).all() and (posts["value"] <= posts["high"]).all()
    assert posts["significant"].equals((posts["low"] > 0) | (posts["high"] < 0))
    for row in posts.itertuples():  # exactly what `comparison` reports per post model
        change = cache.comparison(keys["steps"], 0.1, post_label=row.post_label,
                                  settings=QUICK).metrics[row.metric]
        assert (row.value, row.low, row.high) == (change.change, *change.change_ci)
    # The planted edges are the strongest and grow: intensity rises at every step.
    intensity = posts[posts["metric"] == "intensity"]["value"].to_numpy()
    assert np.all(np.diff(intensity) > 0) and intensity[0] > 0


def test_metrics_without_resampling_have_no_interval(world):
    # A change's interval inverts the permutation test (issue 26), so neither bootstrap nor
    # permutations leaves none.
    cache, keys = world
    table = cache.trajectory_metrics(keys["steps"], 0.3,
                                     settings=MetricSettings(bootstrap=0, permutations=0))
    posts = table[table["step"] > 0]
    assert posts[["low", "high"]].isna().all().all() and not posts["significant"].any()


def test_the_change_at_a_step_is_that_checkpoints_edge_change(world):
    cache, keys = world
    for step in TRAJECTORY_STEPS:
        graph, change, means = cache.trajectory_change(keys["steps"], 0.3, step, measure="ratio")
        label = f"synthetic-step-{step}"
        assert graph == cache.graph(keys["steps"])
        np.testing.assert_array_equal(change, cache.edge_change(keys["steps"], 0.3, "ratio",
                                                                post_label=label))
        np.testing.assert_array_equal(means["post_abs"], cache.mean_matrices(
            keys["steps"], 0.3, post_label=label)["post_abs"])
    module, _, _ = cache.trajectory_change(keys["steps"], 0.3, 100, granularity="module")
    assert module.granularity == "module"
    with pytest.raises(NotFoundError, match=r"no checkpoint at step 300; its steps are \[100, 200"):
        cache.trajectory_change(keys["steps"], 0.3, 300)


@pytest.mark.parametrize("measure", EDGE_MEASURES)
def test_edge_trends_hold_each_steps_change_and_rank_the_planted_growth_first(world, measure):
    cache, keys = world
    for alpha in (0.1, 0.3):
        trends = cache.edge_trends(keys["steps"], alpha, measure=measure, settings=QUICK)
        table = trends.table
        graph = cache.graph(keys["steps"])
        assert len(table) == graph.n_edges
        assert list(table.columns) == ["src", "dst", "edge",
                                       *map(trajectory.step_column, TRAJECTORY_STEPS),
                                       *trajectory.TREND_COLUMNS]
        # The two growing planted edges move the same way at every step: the smallest p, the
        # steepest slopes, intervals away from 0.
        growing = [edge for edge, factors in PLANTED_EDGES.items() if factors[-1] > 1]
        assert set(table["edge"][:2]) == set(growing)
        assert (table["p"][:2] == trends.smallest_p).all() and (table["slope_low"][:2] > 0).all()
        assert table["p"].is_monotonic_increasing
        changes = [cache.edge_change(keys["steps"], alpha, measure,
                                     post_label=f"synthetic-step-{step}")
                   for step in TRAJECTORY_STEPS]
        for row in table.to_dict("records"):
            s, d = graph.src_index(row["src"]), graph.dst_index(row["dst"])
            np.testing.assert_allclose([row[trajectory.step_column(s_)] for s_ in TRAJECTORY_STEPS],
                                       [float(c[s, d]) for c in changes], rtol=1e-5, atol=1e-12)
            slope = stats.linregress([0, *TRAJECTORY_STEPS],
                                     [0.0, *(row[trajectory.step_column(s_)]
                                             for s_ in TRAJECTORY_STEPS)]).slope
            assert row["slope"] == pytest.approx(slope, rel=1e-9, abs=1e-15)
            assert row["slope_low"] <= row["slope"] <= row["slope_high"]
        # Base, 100, 200, 400: 24 orderings, none ties the observed one, so p can reach 1/24; BH
        # over the edges needs nearly all of them there, so no edge beats the null.
        assert trends.exact and trends.permutations == 24 and trends.smallest_p == 1 / 24
        assert trends.needed == math.ceil(graph.n_edges / 24 / QUICK.fdr)
        assert trends.n_beating == 0 and not table["beats_null"].any()


def test_the_permutation_p_is_the_same_in_every_measure(world):
    cache, keys = world
    p = {measure: cache.edge_trends(keys["steps"], 0.1, measure=measure, settings=QUICK)
         .table.set_index("edge")["p"].sort_index() for measure in EDGE_MEASURES}
    for measure in EDGE_MEASURES[1:]:
        pd.testing.assert_series_equal(p[measure], p[EDGE_MEASURES[0]])


def test_a_pair_is_not_a_series(world):
    cache, keys = world
    for view in (lambda: cache.trajectory_metrics(keys["pair"], 0.1, settings=QUICK),
                 lambda: cache.edge_trends(keys["pair"], 0.1, settings=QUICK),
                 lambda: cache.trajectory_change(keys["pair"], 0.1, 1)):
        with pytest.raises(InputError, match=r"\(fixture-pair\) is a pair, not a series"):
            view()


def test_a_series_without_steps_uses_its_order(world):
    cache, keys = world
    table = cache.trajectory_metrics(keys["series"], 0.1, settings=QUICK)
    assert table.drop_duplicates("step")[["step", "post_label"]].values.tolist() == [
        [0, "synthetic-fixture-series-base"], [1, "synthetic-grpo"], [2, "synthetic-dpo"]]
    trends = cache.edge_trends(keys["series"], 0.1, settings=QUICK)
    assert [trajectory.step_column(1), trajectory.step_column(2)] == \
        [c for c in trends.table.columns if c.startswith("step ")]
    # The base and two checkpoints at 1, 2: six orderings, the reverse ties the identity.
    assert trends.permutations == 6 and trends.smallest_p == pytest.approx(2 / 6)
    assert not trends.can_beat and trends.n_beating == 0


# --- The permutation null and the trend on hand-made data ---------------------------------------

def test_the_permutation_p_is_exact_on_a_case_enumerated_by_hand():
    """Base and two checkpoints at steps 0, 10, 30 (centred: -40/3, -10/3, 50/3): the 3! orderings
    of the step labels listed by hand, each one's least-squares slope of the values against the
    relabelled steps."""
    steps = np.array([0.0, 10.0, 30.0])
    values = np.array([[0.0, 7.0, 2.0, 1.0],
                       [1.0, 7.0, 1.0, 3.0],
                       [5.0, 7.0, 3.0, 2.0]])  # four edges; the second is flat
    orderings = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    p, count, exact = trajectory.permutation_p(steps, values)
    assert exact and count == 6
    for column in range(values.shape[1]):
        observed = abs(stats.linregress(steps, values[:, column]).slope)
        as_extreme = sum(abs(stats.linregress(steps[list(order)], values[:, column]).slope)
                         >= observed - 1e-12 for order in orderings)
        assert p[column] == as_extreme / 6
    # Slope numerators sum_j (s_pi(j) - mean s)(v_j - mean v) over the six orderings, in order:
    # (0, 1, 5): 80, 0, 70, -50, -30, -70, so only the observed ordering reaches 80: p = 1/6;
    # flat: 0 everywhere, p = 1; (2, 1, 3): 20, -20, 30, -30, 10, -10: p = 4/6;
    # (1, 3, 2): 10, 30, -10, 20, -30, -20: p = 6/6.
    assert p.tolist() == [1 / 6, 1.0, 4 / 6, 1.0]


def test_evenly_spaced_steps_double_the_smallest_p():
    """The reverse ordering of evenly spaced steps gives the same |slope|, so the smallest p is
    2/n!; unevenly spaced steps leave the observed ordering alone at the top: 1/n!."""
    for steps, smallest in (([0, 10, 20, 30], 2 / 24), ([0, 10, 20, 40], 1 / 24)):
        line = np.array(steps, dtype=np.float64)[:, None]  # the change proportional to the step
        assert trajectory.permutation_p(np.array(steps), line)[0][0] == smallest


def random_series(n_steps: int, n_questions: int, seed: int) -> tuple[ResidualGraph, np.ndarray]:
    """A graph and |W| [n_steps + 1, n_questions, n_edges] of a base and n_steps checkpoints: each
    edge its own lognormal strength times lognormal noise per question and model, no trend."""
    rng = np.random.default_rng(seed)
    graph = ResidualGraph(3, "qkv")
    scale = rng.lognormal(0, 1, size=graph.n_edges)
    return graph, scale * rng.lognormal(0, 0.5, size=(n_steps + 1, n_questions, graph.n_edges))


def test_a_series_with_too_few_steps_reports_that_no_edge_can_beat_the_null():
    graph, models = random_series(3, 12, seed=1)
    models[1:, :, 0] *= np.array([2.0, 4.0, 8.0])[:, None]  # a perfect, large trend
    trends = trajectory.edge_trends(graph, [10, 20, 30], models[0], models[1:], "normalised",
                                    MetricSettings(bootstrap=100))
    assert trends.smallest_p == 2 / 24 > trends.fdr
    assert not trends.can_beat and trends.needed > trends.n_edges
    assert trends.n_beating == 0
    top = trends.table.iloc[0]
    assert top["edge"] == graph.edge_names[0] and top["p"] == trends.smallest_p
    assert top["slope_low"] > 0  # the interval sees the trend; the null cannot resolve it


def test_a_planted_monotone_edge_among_noise_edges_beats_the_null_with_enough_steps():
    steps = [1, 2, 3, 5, 8, 13, 21]  # the base and 7 checkpoints: 40,320 orderings, p down to 1/8!
    graph, models = random_series(len(steps), 20, seed=3)
    models[1:, :, graph.edge_names.index("a1->m1")] *= (1 + np.array(steps) / 7)[:, None]
    trends = trajectory.edge_trends(graph, steps, models[0], models[1:], "ratio",
                                    MetricSettings(bootstrap=100))
    assert trends.exact and trends.permutations == 40320 and trends.can_beat
    assert trends.smallest_p == 1 / 40320
    top = trends.table.iloc[0]
    assert top["edge"] == "a1->m1" and top["beats_null"] and top["slope_low"] > 0
    # Noise alone: BH declares nothing; without a bootstrap there is no interval.
    _, noise = random_series(len(steps), 20, seed=9)
    quiet = trajectory.edge_trends(graph, steps, noise[0], noise[1:], "ratio",
                                   MetricSettings(bootstrap=0))
    assert quiet.n_beating == 0 and quiet.table[["slope_low", "slope_high"]].isna().all().all()


def test_more_than_eight_points_draw_random_orderings():
    steps = list(range(1, 9))  # the base and 8 checkpoints: 9! orderings, too many to list
    graph, models = random_series(len(steps), 4, seed=4)
    trends = trajectory.edge_trends(graph, steps, models[0], models[1:], "difference",
                                    MetricSettings(bootstrap=0))
    assert not trends.exact and trends.permutations == trajectory.MONTE_CARLO_PERMUTATIONS
    assert trends.smallest_p == 1 / (trajectory.MONTE_CARLO_PERMUTATIONS + 1)
    assert (trends.table["p"] > 0).all() and (trends.table["p"] <= 1).all()


# --- Figures --------------------------------------------------------------------------------------

def test_figures_draw_one_panel_per_metric_and_one_line_per_edge(world):
    cache, keys = world
    table = cache.trajectory_metrics(keys["steps"], 0.1, settings=QUICK)
    fig = figures.trajectory_metrics_figure(table)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == list(METRICS)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == len(METRICS)
    intensity = table[table["metric"] == "intensity"]
    assert list(lines[0].x) == intensity["step"].tolist()
    np.testing.assert_allclose(lines[0].y, intensity["value"])
    symbols = list(lines[0].marker.symbol)
    assert symbols == ["circle" if s else "circle-open" for s in intensity["significant"]]

    edges = cache.edge_trends(keys["steps"], 0.1, settings=QUICK).table.head(4)
    fig = figures.consistent_edge_lines(edges, list(TRAJECTORY_STEPS), "normalised")
    assert [t.name for t in fig.data] == edges["edge"].tolist()
    assert list(fig.data[0].x) == [0, *TRAJECTORY_STEPS] and fig.data[0].y[0] == 0
    np.testing.assert_allclose(fig.data[0].y[1:], [edges[trajectory.step_column(s)][0]
                                                   for s in TRAJECTORY_STEPS])
    # An empty table draws an empty figure.
    assert len(figures.consistent_edge_lines(edges[:0], [1, 2], "ratio").data) == 0
    assert isinstance(figures.trajectory_metrics_figure(table[:0]).layout.height, (int, float))


def test_views_are_memoised(world):
    cache, keys = world
    first = cache.edge_trends(keys["steps"], 0.3, settings=QUICK)
    assert cache.edge_trends(keys["steps"], 0.3, settings=QUICK) is first
    assert isinstance(cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK), pd.DataFrame)
    assert cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK) is \
        cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK)
