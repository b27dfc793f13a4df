"""The Trajectory page under Streamlit's AppTest: on the trajectory fixture (a stepped series with
planted edges, a series without steps, a pair), on an empty cache and on one without a series, in
read-only mode, and its step slider driving the heatmap."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.synthetic import PLANTED_EDGES, TRAJECTORY_STEPS, build_synthetic_cache, build_trajectory_fixture
from test_app import assert_clean, charts, open_app

PAGE = "pages/8_Trajectory.py"
STEPS_LINK = {"pair": "fixture-steps", "dataset": "fixture", "alpha": "0.1", "bootstrap": "50"}


@pytest.fixture(scope="module")
def trajectory_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trajectory-app") / "fixture.duckdb"
    build_trajectory_fixture(path)
    return path


def titles(at) -> list[str]:
    return [chart.get("layout", {}).get("title", {}).get("text", "") for chart in charts(at)]


def captions(at) -> str:
    return "\n".join(c.value for c in at.caption)


def test_the_page_shows_metrics_heatmap_and_edge_trends(monkeypatch, trajectory_cache):
    at = open_app(monkeypatch, trajectory_cache, PAGE, query=STEPS_LINK)
    assert_clean(at, "Trajectory")
    assert [s.value for s in at.subheader] == [
        "Metrics over training steps", "Edge change at a step",
        "Edges whose change trends with the step"]
    assert len(charts(at)) == 3
    metrics, edges = at.dataframe[0].value, at.dataframe[1].value
    assert sorted(set(metrics["step"])) == [0, *TRAJECTORY_STEPS]
    growing = {edge for edge, factors in PLANTED_EDGES.items() if factors[-1] > 1}
    assert set(edges["edge"][:2]) == growing
    assert {"slope", "slope_low", "slope_high", "p", "q", "beats_null"} <= set(edges.columns)
    # Steps 100, 200, 400: p can reach 1/24, but BH needs most edges there to declare any.
    (info,) = at.info
    assert "**0 of " in info.value and "beat the permutation null" in info.value
    assert "smallest p these steps allow is 0.0417" in info.value and "at least" in info.value
    # The heatmap opens on the last step; the lines start at the base.
    assert at.select_slider(key="trajectory.step").value == TRAJECTORY_STEPS[-1]
    assert "at step 400: synthetic-fixture-steps-base → synthetic-step-400" in titles(at)[1]
    lines = charts(at)[2]["data"]
    assert [line["name"] for line in lines] == edges["edge"].tolist()
    assert "declares no training steps" not in captions(at)
    assert dict(at.query_params)["trajectory.step"] == "400"


def test_the_slider_changes_the_heatmaps_step(monkeypatch, trajectory_cache):
    at = open_app(monkeypatch, trajectory_cache, PAGE, query=STEPS_LINK)
    before = charts(at)[1]["data"][0]["z"]
    at.select_slider(key="trajectory.step").set_value(100).run()
    assert_clean(at, "Trajectory")
    assert "at step 100: synthetic-fixture-steps-base → synthetic-step-100" in titles(at)[1]
    assert charts(at)[1]["data"][0]["z"] != before
    assert dict(at.query_params)["trajectory.step"] == "100"
    # A link to a step reopens it.
    again = open_app(monkeypatch, trajectory_cache, PAGE, query=dict(at.query_params))
    assert again.select_slider(key="trajectory.step").value == 100


def test_the_page_opens_on_a_series_and_says_when_steps_are_not_declared(monkeypatch,
                                                                          trajectory_cache):
    at = open_app(monkeypatch, trajectory_cache, PAGE)  # no link: the first series, not the pair
    assert_clean(at, "Trajectory")
    assert at.sidebar.selectbox(key="sel.pair").value == "fixture-series"
    assert "declares no training steps" in captions(at)
    assert at.select_slider(key="trajectory.step").options == ["1 · synthetic-grpo",
                                                                 "2 · synthetic-dpo"]
    # The base and two checkpoints: six orderings, the reverse ties, p >= 1/3.
    (warning,) = at.warning
    assert "With the base and 2 checkpoints no edge can beat it, whatever its change" in \
        warning.value and "0.333" in warning.value


def test_a_pair_selected_offers_the_series(monkeypatch, trajectory_cache):
    at = open_app(monkeypatch, trajectory_cache, PAGE, query={"pair": "fixture-pair"})
    assert_clean(at, "Trajectory")
    assert "compares one post model with its base" in at.info[0].value
    assert len(charts(at)) == 0
    (button,) = [b for b in at.button if b.label.startswith("fixture-steps")]
    button.click().run()
    assert_clean(at, "Trajectory")
    assert at.sidebar.selectbox(key="sel.pair").value == "fixture-steps"
    assert len(charts(at)) == 3


def test_read_only_mode(monkeypatch, trajectory_cache):
    at = open_app(monkeypatch, trajectory_cache, PAGE, query=STEPS_LINK, read_only=True)
    assert_clean(at, "Trajectory")
    labels = [link.proto.label for link in at.sidebar.get("page_link")]
    assert "Trajectory" in labels and "Compute" not in labels
    assert len(charts(at)) == 3


def test_an_empty_cache_says_how_to_compute_a_series(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "missing.duckdb", PAGE)
    assert_clean(at, "Trajectory")
    (info,) = at.info  # the empty cache's, as on every page; then how to compute a series
    assert "holds no runs" in info.value
    assert "python -m core run --pair NAME" in captions(at) and "`step = 200`" in captions(at)


def test_a_cache_without_a_series_says_how_to_compute_one(monkeypatch, tmp_path):
    cache = tmp_path / "pairs.duckdb"
    build_synthetic_cache(cache, n_pairs=1, n_datasets=1, alphas=(0.1,), n_samples=4,
                          layer_counts=(2,))
    at = open_app(monkeypatch, cache, PAGE)
    assert_clean(at, "Trajectory")
    (info,) = at.info
    assert "No series in this cache" in info.value and "[series.NAME]" in info.value
    assert [b.proto.label for b in at.sidebar.get("download_button")] == ["Download report"]
