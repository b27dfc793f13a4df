"""The dashboard's read path (core/query.py) on the synthetic fixture cache."""

import json

import numpy as np
import pandas as pd
import pytest

from core import metrics
from core.query import METRIC_TABLE_COLUMNS, ResultCache, RunNotFoundError
from core.settings import MetricSettings
from core.store import Store
from core.synthetic import build_fixture_cache

RUNS_COLUMNS = ["run_key", "pair", "dataset", "base_label", "post_label", "algorithm", "granularity",
                "n_layers", "alphas", "n_selected", "t_bar", "created_at", "settings"]
SAMPLES_COLUMNS = ["question_id", "question", "reference", "base_text", "post_text", "base_correct",
                   "post_correct", "base_answer_len", "post_answer_len", "t_cut",
                   "base_truncated_text", "post_truncated_text"]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "fixture.duckdb"
    pair_key, series_key = build_fixture_cache(path)
    return path, pair_key, series_key


def test_runs_has_one_row_per_post_model(fixture):
    path, pair_key, series_key = fixture
    runs = ResultCache.open(path).runs()
    assert set(RUNS_COLUMNS) <= set(runs.columns)
    assert sorted(runs["run_key"].tolist()) == sorted([pair_key, series_key, series_key])
    series = runs[runs["run_key"] == series_key]
    assert sorted(series["post_label"]) == ["synthetic-dpo", "synthetic-grpo"]
    row = runs.iloc[0]
    assert row["alphas"] == [0.1, 0.3]
    assert (runs["n_complete"].map(tuple) == (8, 8)).all()
    assert set(row["settings"]) >= {"selection", "score"}
    assert not ResultCache.open(path).is_empty()


def test_sample_matrices_are_aligned_dense_and_zero_off_edges(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    graph = cache.graph(series_key)
    base, base_ids = cache.sample_matrices(series_key, 0.1, "base")
    post, post_ids = cache.sample_matrices(series_key, 0.1, "synthetic-dpo")
    assert base.shape == (8, graph.n_src, graph.n_dst) and base.dtype == np.float32
    assert base_ids == post_ids and len(set(base_ids)) == 8
    assert np.all(base[:, ~graph.real_edge_mask] == 0)
    assert np.all(base[:, graph.real_edge_mask] != 0)
    assert not np.array_equal(base, post)


def test_mean_matrices_are_the_means_of_the_sample_matrices(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    means = cache.mean_matrices(pair_key, 0.3)
    base, _ = cache.sample_matrices(pair_key, 0.3, "base")
    post, _ = cache.sample_matrices(pair_key, 0.3, "synthetic-rl")
    np.testing.assert_allclose(means["base_abs"], np.abs(base).mean(0), rtol=1e-6)
    np.testing.assert_allclose(means["post_signed"], post.mean(0), rtol=1e-5, atol=1e-12)


def test_edge_across_alphas_matches_the_matrices(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    graph = cache.graph(pair_key)
    table = cache.edge_across_alphas(pair_key, "a0", "m1")
    assert list(table.columns) == ["alpha", "model", "mean_abs", "mean_signed", "n"]
    assert len(table) == 4
    s, d = graph.src_index("a0"), graph.dst_index("m1")
    for row in table.itertuples():
        matrices, _ = cache.sample_matrices(pair_key, row.alpha, row.model)
        assert row.mean_abs == pytest.approx(np.abs(matrices[:, s, d]).mean(), rel=1e-5)
        assert row.mean_signed == pytest.approx(matrices[:, s, d].mean(), rel=1e-4, abs=1e-12)
        assert row.n == 8
    with pytest.raises(ValueError, match="not an edge"):
        cache.edge_across_alphas(pair_key, "m1", "a0<q>")


def test_stored_comparison_equals_a_fresh_computation(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    graph = cache.graph(pair_key)
    base, _ = cache.sample_matrices(pair_key, 0.1, "base")
    post, _ = cache.sample_matrices(pair_key, 0.1, "synthetic-rl")
    fresh = metrics.compare_models(base, post, graph, MetricSettings())
    stored = cache.comparison(pair_key, 0.1)
    assert stored.to_dict() == json.loads(json.dumps(fresh.to_dict()))


def test_metric_table_for_default_and_other_settings(fixture):
    path, pair_key, series_key = fixture
    cache = ResultCache.open(path)
    table = cache.metric_table()
    assert list(METRIC_TABLE_COLUMNS) == list(table.columns[:len(METRIC_TABLE_COLUMNS)])
    # 3 (run, post) rows x 2 alphas x every metric.
    assert len(table) == 3 * 2 * len(metrics.METRICS)
    other = MetricSettings(intensity_normaliser="edges", bootstrap=20)
    recomputed = cache.metric_table(other)
    assert set(recomputed["settings_key"]) == {other.key()}
    intensity = recomputed[(recomputed["metric"] == "intensity") & (recomputed["run_key"] == pair_key)]
    dense = table[(table["metric"] == "intensity") & (table["run_key"] == pair_key)]
    assert (intensity["base"].to_numpy() > dense["base"].to_numpy()).all()  # fewer entries, same sum


def test_significant_edges_and_samples(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    edges = cache.significant_edges(series_key, 0.3, MetricSettings(), "synthetic-grpo")
    assert list(edges.columns) == list(metrics.EDGE_COLUMNS)
    samples = cache.samples(series_key, 0.3, "synthetic-grpo")
    assert set(SAMPLES_COLUMNS) <= set(samples.columns)
    assert {"base_intensity", "post_kurtosis"} <= set(samples.columns)
    assert len(samples) == 8
    _, ids = cache.sample_matrices(series_key, 0.3, "base")
    assert samples["question_id"].tolist() == ids
    assert samples["question"].str.startswith("What is").all()


def test_unknown_run_model_and_alpha_are_clear_errors(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    with pytest.raises(RunNotFoundError, match="python -m core ls"):
        cache.graph("nope")
    with pytest.raises(KeyError, match="has no model 'gpt'"):
        cache.sample_matrices(pair_key, 0.1, "gpt")
    with pytest.raises(KeyError, match="has no alpha 0.5"):
        cache.sample_matrices(pair_key, 0.5, "base")


def test_content_key_changes_with_the_runs_data_only(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, series_key = build_fixture_cache(path)
    cache = ResultCache.open(path)
    before = {k: cache.content_key(k) for k in (pair_key, series_key)}
    assert before == {k: ResultCache.open(path).content_key(k) for k in before}
    with Store(path).write() as con:
        con.execute("UPDATE runs SET updated_at = now() WHERE run_key = ?", [pair_key])
    assert cache.content_key(pair_key) != before[pair_key]
    assert cache.content_key(series_key) == before[series_key]


def test_memoised_answers_are_refreshed_after_a_write(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    assert len(cache.runs()) == 3
    with Store(path).write() as con:
        con.execute("DELETE FROM run_models WHERE run_key = ? AND role = 'post'", [pair_key])
    assert len(cache.runs()) == 2
    assert isinstance(cache.runs(), pd.DataFrame)


SYNTHETIC_WRITER = """
import sys
from core.synthetic import build_synthetic_cache
build_synthetic_cache(sys.argv[1], n_pairs=3, n_datasets=2, alphas=(0.1, 0.3), n_samples=12,
                      layer_counts=(3, 4, 2))
"""


def test_queries_work_while_another_process_writes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "busy.duckdb"
    writer = subprocess.Popen([sys.executable, "-c", SYNTHETIC_WRITER, str(path)],
                              cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE,
                              text=True)
    cache = ResultCache.open(path)
    states = set()
    try:
        while writer.poll() is None:
            runs = cache.runs()
            states.add(len(runs))
            for row in runs.itertuples():
                for alpha in row.alphas:
                    # One call reads one snapshot: the models always cover the same questions.
                    base, post, ids = cache.paired_sample_matrices(row.run_key, alpha, row.post_label)
                    assert base.shape == post.shape == (len(ids),) + base.shape[1:]
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read()
    assert len(states) > 1, "the reader never ran while the writer was writing"
    assert len(cache.runs()) == 6


def test_one_instance_serves_several_threads(fixture):
    from concurrent.futures import ThreadPoolExecutor

    path, pair_key, series_key = fixture
    cache = ResultCache.open(path)

    def work(i):
        key = (pair_key, series_key)[i % 2]
        fresh = ResultCache.open(path)  # memo-free reference answer
        matrices, ids = cache.sample_matrices(key, (0.1, 0.3)[i % 3 % 2], "base")
        expected, expected_ids = fresh.sample_matrices(key, (0.1, 0.3)[i % 3 % 2], "base")
        return ids == expected_ids and np.array_equal(matrices, expected) and len(cache.runs()) == 3

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(24)))


def test_a_call_never_mixes_memoised_answers_with_a_newer_version(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    base, ids = cache.sample_matrices(pair_key, 0.1, "base")  # memoised now
    assert len(ids) == 8
    label = cache._label
    commits = []

    def label_then_commit(run_key, model):
        # Between the call's memo hit (base) and its first read (post), a job commits: one question
        # loses its post score, so it is no longer complete for the run.
        if model == "synthetic-rl" and not commits:
            with Store(path).write() as con:
                con.execute("""DELETE FROM scores WHERE model_key =
                    (SELECT model_key FROM run_models WHERE run_key = ? AND label = 'synthetic-rl')
                    AND question_id = ?""", [pair_key, ids[0]])
            commits.append(ids[0])
        return label(run_key, model)

    cache._label = label_then_commit
    base, post, paired_ids = cache.paired_sample_matrices(pair_key, 0.1, "synthetic-rl")
    assert commits and paired_ids == ids[1:]
    assert base.shape[0] == post.shape[0] == 7
