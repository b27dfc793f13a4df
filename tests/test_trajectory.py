"""The trajectory of a series (issue 15, item 3; docs/method.md section 7): the read model's views on
the synthetic series with training steps, whose planted edges change more at every step, and the
consistency score's pieces on hand-made changes."""

from __future__ import annotations

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


def test_metrics_without_a_bootstrap_have_no_interval(world):
    cache, keys = world
    table = cache.trajectory_metrics(keys["steps"], 0.3, settings=MetricSettings(bootstrap=0))
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
def test_the_planted_edges_rank_first(world, measure):
    cache, keys = world
    for alpha in (0.1, 0.3):
        table = cache.consistent_edges(keys["steps"], alpha, k=5, measure=measure)
        assert len(table) == 5
        assert set(table["edge"][:3]) == set(PLANTED_EDGES)
        planted = table[:3].set_index("edge")
        # Growing edges end above the base, the weakening one below; each moves at every step.
        assert (planted["monotony"].abs() == 1).all()
        assert np.sign(planted["final_change"]).to_dict() == {
            edge: np.sign(factors[-1] - 1) for edge, factors in PLANTED_EDGES.items()}
        assert table["score"].is_monotonic_decreasing
        changes = [cache.edge_change(keys["steps"], alpha, measure,
                                     post_label=f"synthetic-step-{step}")
                   for step in TRAJECTORY_STEPS]
        graph = cache.graph(keys["steps"])
        for row in table.to_dict("records"):
            s, d = graph.src_index(row["src"]), graph.dst_index(row["dst"])
            assert [row[trajectory.step_column(step)] for step in TRAJECTORY_STEPS] == \
                [float(c[s, d]) for c in changes]


def test_a_pair_is_not_a_series(world):
    cache, keys = world
    for view in (lambda: cache.trajectory_metrics(keys["pair"], 0.1, settings=QUICK),
                 lambda: cache.consistent_edges(keys["pair"], 0.1),
                 lambda: cache.trajectory_change(keys["pair"], 0.1, 1)):
        with pytest.raises(InputError, match=r"\(fixture-pair\) is a pair, not a series"):
            view()


def test_a_series_without_steps_uses_its_order(world):
    cache, keys = world
    table = cache.trajectory_metrics(keys["series"], 0.1, settings=QUICK)
    assert table.drop_duplicates("step")[["step", "post_label"]].values.tolist() == [
        [0, "synthetic-fixture-series-base"], [1, "synthetic-grpo"], [2, "synthetic-dpo"]]
    edges = cache.consistent_edges(keys["series"], 0.1, k=3)
    assert [trajectory.step_column(1), trajectory.step_column(2)] == \
        [c for c in edges.columns if c.startswith("step ")]


# --- The consistency score on hand-made changes --------------------------------------------------

def test_monotony_is_kendalls_tau_b_with_the_base_at_zero():
    rng = np.random.default_rng(0)
    steps = np.array([10, 20, 50, 90])
    changes = rng.normal(size=(4, 30)).round(1)  # rounding makes ties
    changes[:, 0] = 0.0  # all tied: undefined
    tau = trajectory.monotony(steps, changes)
    assert np.isnan(tau[0])
    for column in range(1, 30):
        expected = stats.kendalltau([0, *steps], [0.0, *changes[:, column]]).statistic
        assert tau[column] == pytest.approx(expected, abs=1e-12)
    assert trajectory.monotony(steps, np.array([[1.0], [2], [3], [4]]))[0] == 1.0
    assert trajectory.monotony(steps, np.array([[-1.0], [-2], [-3], [-4]]))[0] == -1.0
    with pytest.raises(ValueError, match="steps must increase"):
        trajectory.monotony(np.array([10, 10, 20, 30]), changes)


def test_consistency_prefers_steady_growth_over_a_larger_wandering_change():
    graph = ResidualGraph(1, "module")  # edges: input->a0, input->m0, a0->m0, input->logits, ...
    names = list(graph.edge_names)
    per_edge = np.zeros((3, graph.n_edges))
    per_edge[:, names.index("input->a0")] = [1.0, 2.0, 3.0]     # steady growth
    per_edge[:, names.index("a0->m0")] = [-0.5, -1.0, -2.0]     # steady weakening
    per_edge[:, names.index("input->m0")] = [8.0, -6.0, 4.0]    # large, wandering
    changes = np.where(graph.real_edge_mask, graph.dense(per_edge), np.nan)
    table = trajectory.consistent_edges(graph, [1, 2, 3], changes, k=graph.n_edges)
    assert table["edge"][:2].tolist() == ["input->a0", "a0->m0"]
    assert table.set_index("edge").loc["input->a0", "score"] == 3.0
    assert table.set_index("edge").loc["a0->m0", "score"] == 2.0
    wandering = table.set_index("edge").loc["input->m0"]
    assert wandering["monotony"] == 0 and wandering["score"] == 0
    assert table[trajectory.step_column(2)].tolist()[:2] == [2.0, -1.0]


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

    edges = cache.consistent_edges(keys["steps"], 0.1, k=4)
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
    first = cache.consistent_edges(keys["steps"], 0.3, k=5)
    assert cache.consistent_edges(keys["steps"], 0.3, k=5) is first
    assert isinstance(cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK), pd.DataFrame)
    assert cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK) is \
        cache.trajectory_metrics(keys["steps"], 0.3, settings=QUICK)
