"""The dashboard's read path (core/query.py) on the synthetic fixture cache."""

import json

import numpy as np
import pandas as pd
import pytest

from core import circuit, metrics
from core.query import (METRIC_TABLE_COLUMNS, POOLING_COLUMNS, ResultCache, RunNotFoundError,
                        TooFewQuestionsError)
from core.settings import MetricSettings
from core.store import Store, fetch_one, fetch_vectors
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


def matrices(cache: ResultCache, run_key: str, alpha: float, model: str):
    """One model's dense matrices [n, n_src, n_dst] at the run's granularity, and question ids."""
    edges, ids = cache.sample_edges(run_key, alpha, model)
    return cache.graph(run_key).dense(edges), ids


def test_view_is_aligned_dense_and_zero_off_edges(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    view = cache.view(series_key, 0.1, post_label="synthetic-dpo")
    graph = view.graph
    assert graph == cache.graph(series_key) and graph.granularity == "qkv"
    assert view.base.shape == (8, graph.n_src, graph.n_dst) and view.base.dtype == np.float32
    assert len(set(view.question_ids)) == 8
    assert np.all(view.base[:, ~graph.real_edge_mask] == 0)
    assert np.all(view.base[:, graph.real_edge_mask] != 0)
    assert not np.array_equal(view.base, view.post)
    post, post_ids = matrices(cache, series_key, 0.1, "synthetic-dpo")
    assert tuple(post_ids) == view.question_ids and np.array_equal(post, view.post)
    # None = the run's first post model
    assert np.array_equal(cache.view(series_key, 0.1).post,
                          matrices(cache, series_key, 0.1, "synthetic-grpo")[0])


def test_a_module_view_is_the_qkv_view_summed(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    qkv = cache.view(series_key, 0.3, post_label="synthetic-grpo")
    module = cache.view(series_key, 0.3, post_label="synthetic-grpo", granularity="module")
    assert module.graph == cache.graph(series_key, "module") and module.graph.granularity == "module"
    assert module.question_ids == qkv.question_ids
    np.testing.assert_array_equal(module.base, qkv.graph.to_module(qkv.base))
    np.testing.assert_array_equal(module.post, qkv.graph.to_module(qkv.post))
    means = cache.mean_matrices(series_key, 0.3, post_label="synthetic-grpo", granularity="module")
    np.testing.assert_array_equal(means["post_abs"], np.abs(module.post).mean(0))
    settings = MetricSettings(bootstrap=20)
    comparison = cache.comparison(series_key, 0.3, post_label="synthetic-grpo",
                                  granularity="module", settings=settings)
    assert comparison == metrics.compare_models(module.base, module.post, module.graph, settings)
    assert comparison != cache.comparison(series_key, 0.3, post_label="synthetic-grpo",
                                          settings=settings)
    per_sample = cache.per_sample(series_key, 0.3, post_label="synthetic-grpo", granularity="module")
    expected = metrics.per_sample_metrics(module.base, module.graph)["kurtosis"]
    np.testing.assert_array_equal(per_sample["base_kurtosis"], expected)
    with pytest.raises(ValueError, match="granularity='heads'"):
        cache.view(series_key, 0.3, granularity="heads")


def test_mean_matrices_edge_change_and_abs_values_come_from_the_view(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    view = cache.view(pair_key, 0.3)
    means = cache.mean_matrices(pair_key, 0.3)
    np.testing.assert_array_equal(means["base_abs"], np.abs(view.base).mean(0))
    np.testing.assert_array_equal(means["post_signed"], view.post.mean(0))
    base, _ = matrices(cache, pair_key, 0.3, "base")
    np.testing.assert_allclose(means["base_abs"], np.abs(base).mean(0), rtol=1e-6)
    for measure in metrics.EDGE_MEASURES:
        np.testing.assert_array_equal(
            cache.edge_change(pair_key, 0.3, measure),
            metrics.edge_change(view.base, view.post, view.graph, measure))
    pooled = cache.abs_values(pair_key, 0.3)
    assert pooled["base"].shape == (8 * view.graph.n_edges,)
    np.testing.assert_array_equal(np.sort(pooled["post"]),
                                  np.sort(np.abs(view.post[:, view.graph.real_edge_mask]).ravel()))


def test_edge_across_alphas_matches_the_matrices(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    graph = cache.graph(pair_key)
    table = cache.edge_across_alphas(pair_key, "a0", "m1")
    assert list(table.columns) == ["alpha", "model", "mean_abs", "mean_signed", "n"]
    assert len(table) == 4
    s, d = graph.src_index("a0"), graph.dst_index("m1")
    for row in table.itertuples():
        scores, _ = matrices(cache, pair_key, row.alpha, row.model)
        assert row.mean_abs == pytest.approx(np.abs(scores[:, s, d]).mean(), rel=1e-5)
        assert row.mean_signed == pytest.approx(scores[:, s, d].mean(), rel=1e-4, abs=1e-12)
        assert row.n == 8
    with pytest.raises(ValueError, match="not an edge"):
        cache.edge_across_alphas(pair_key, "m1", "a0<q>")


def test_stored_comparison_equals_a_fresh_computation(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    view = cache.view(pair_key, 0.1, post_label="synthetic-rl")
    fresh = metrics.compare_models(view.base, view.post, view.graph, MetricSettings())
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


def test_pooling_leaves_out_incomplete_cells_repeated_t_cuts_and_other_settings(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, series_key = build_fixture_cache(path)
    ids = ResultCache.open(path).view(series_key, 0.3).question_ids
    with Store(path).write() as con:
        # The pair's alpha 0.3 now cuts where its 0.1 does: one cell, counted once.
        con.execute("""UPDATE run_alphas SET t_cut = (SELECT t_cut FROM run_alphas
                           WHERE run_key = $run AND alpha = 0.1)
                       WHERE run_key = $run AND alpha = 0.3""", {"run": pair_key})
        # The pair was selected under other settings.
        selection = json.loads(fetch_one(con, "SELECT selection FROM runs WHERE run_key = ?",
                                         [pair_key])[0])
        con.execute("UPDATE runs SET selection = ?, selection_key = 'other' WHERE run_key = ?",
                    [json.dumps({**selection, "beta": 0.0}), pair_key])
        # One of the series' questions lost its dpo score at alpha 0.3: incomplete for the run.
        con.execute("""DELETE FROM scores WHERE t_cut = (SELECT t_cut FROM run_alphas
                           WHERE run_key = $run AND alpha = 0.3)
                       AND generation_key = (SELECT generation_key FROM run_samples
                           WHERE run_key = $run AND label = 'synthetic-dpo' AND question_id = $q)""",
                    {"run": series_key, "q": ids[0]})
    cache = ResultCache.open(path)
    pooling = cache.pooling().set_index(["run_key", "post_label", "alpha"])
    assert list(cache.pooling().columns) == list(POOLING_COLUMNS)
    pair = pooling.loc[pair_key]
    assert list(pair["alphas"]) == ["0.1, 0.3", "0.1, 0.3"]
    assert pair.loc[("synthetic-rl", 0.3), "left_out"].startswith("same T_cut")
    # The series has 2 complete cells, the pair 1: the series' settings are the pooled group's.
    assert pair.loc[("synthetic-rl", 0.1), "left_out"] == \
        "settings differ from the pooled runs': selection beta 0.0 (pooled: 0.5)"
    series = pooling.loc[series_key]
    assert series["pooled"].tolist() == [True, False, True, False]  # (dpo, grpo) x (0.1, 0.3)
    assert series.loc[("synthetic-dpo", 0.3), "left_out"] == \
        "7 of 8 selected questions scored for every model at this alpha"
    table = cache.metric_table(MetricSettings(bootstrap=10))
    assert set(table[table["pooled"]]["run_key"]) == {series_key}
    assert (table["left_out"] == "").equals(table["pooled"])
    summary = cache.diversity_summary(MetricSettings(bootstrap=10)).set_index("pair")
    assert summary.loc["all", "cells"] == 2


def test_loss_correlation_finds_a_planted_rank_order(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    per_sample = cache.per_sample(pair_key, 0.1)
    with Store(path).write() as con:
        # Base's loss rises with its intensity; post's falls with its kurtosis.
        for row in per_sample.itertuples():
            for label, loss in (("synthetic-fixture-pair-base", 1 + row.base_intensity),
                                ("synthetic-rl", -row.post_kurtosis)):
                con.execute("""UPDATE scores SET loss = $loss
                               WHERE t_cut = (SELECT t_cut FROM run_alphas
                                              WHERE run_key = $run AND alpha = 0.1)
                               AND generation_key = (SELECT generation_key FROM run_samples
                                   WHERE run_key = $run AND label = $label AND question_id = $q)""",
                            {"loss": float(loss), "run": pair_key, "label": label,
                             "q": row.question_id})
    table = ResultCache.open(path).loss_correlation(pair_key, 0.1).set_index(["model", "metric"])
    assert table.loc[("base", "intensity"), "rho"] == pytest.approx(1.0)
    assert table.loc[("post", "kurtosis"), "rho"] == pytest.approx(-1.0)
    assert table.loc[("base", "intensity"), "p"] < 0.01
    assert table.loc[("post", "kurtosis"), "label"] == "synthetic-rl"
    assert set(table["n"]) == {8} and len(table) == 2 * len(metrics.PER_SAMPLE_METRICS)


def test_significant_edges_and_samples(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    edges = cache.significant_edges(series_key, 0.3, post_label="synthetic-grpo")
    assert list(edges.columns) == list(metrics.EDGE_COLUMNS)
    samples = cache.samples(series_key, 0.3, post_label="synthetic-grpo")
    assert set(SAMPLES_COLUMNS) <= set(samples.columns)
    assert {"base_intensity", "post_kurtosis", "base_loss"} <= set(samples.columns)
    assert len(samples) == 8
    _, ids = cache.sample_edges(series_key, 0.3, "base")
    assert samples["question_id"].tolist() == ids
    assert samples["question"].str.startswith("What is").all()
    # The per-sample metrics at the asked granularity, merged in.
    module = cache.samples(series_key, 0.3, post_label="synthetic-grpo", granularity="module")
    per_sample = cache.per_sample(series_key, 0.3, post_label="synthetic-grpo", granularity="module")
    pd.testing.assert_frame_equal(module[per_sample.columns], per_sample)
    assert not np.array_equal(module["post_kurtosis"], samples["post_kurtosis"])


def test_per_sample_by_alpha_and_diversity_summary(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    by_alpha = cache.per_sample_by_alpha(pair_key, (0.1, 0.3), granularity="module")
    assert list(by_alpha) == [0.1, 0.3]
    for alpha, frame in by_alpha.items():
        fresh = ResultCache.open(path).per_sample(pair_key, alpha, granularity="module")
        pd.testing.assert_frame_equal(frame, fresh)
    summary = cache.diversity_summary()
    entries = [(f"{run.pair}: {run.post_label}", run.dataset, alpha,
                cache.comparison(run.run_key, alpha, post_label=run.post_label))
               for run in cache.runs().itertuples() for alpha in run.alphas]
    pd.testing.assert_frame_equal(summary, metrics.diversity_summary(entries))
    assert summary.iloc[-1]["pair"] == "all" and summary.iloc[-1]["cells"] == 6


def test_circuit_is_the_pruned_top_k_with_the_edge_tests(fixture):
    path, _, series_key = fixture
    cache = ResultCache.open(path)
    settings = MetricSettings(fdr=0.5)
    found = cache.circuit(series_key, 0.3, k=30, by="strength", post_label="synthetic-dpo",
                          granularity="module", settings=settings)
    means = cache.mean_matrices(series_key, 0.3, post_label="synthetic-dpo", granularity="module")
    graph = cache.graph(series_key, "module")
    top = circuit.top_edges(graph, means, 30, "strength")
    assert 0 < len(found.edges) <= 30
    assert set(found.edges["edge"]) == set(top["edge"][circuit.on_input_logits_paths(top)])
    tests = cache.significant_edges(series_key, 0.3, post_label="synthetic-dpo",
                                    granularity="module", settings=settings)
    assert set(found.edges["edge"][found.edges["significant"]]) == \
        set(found.edges["edge"]) & set(tests["edge"])
    assert found.metadata["run"] == series_key and found.metadata["granularity"] == "module"
    assert (found.metadata["k"], found.metadata["by"], found.metadata["alpha"]) == (30, "strength", 0.3)
    assert found.metadata["post_label"] == "synthetic-dpo"


def test_unknown_run_model_and_alpha_are_clear_errors(fixture):
    path, pair_key, _ = fixture
    cache = ResultCache.open(path)
    with pytest.raises(RunNotFoundError, match="python -m core ls"):
        cache.graph("nope")
    with pytest.raises(KeyError, match="has no model 'gpt'"):
        cache.view(pair_key, 0.1, post_label="gpt")
    with pytest.raises(KeyError, match="has no alpha 0.5"):
        cache.sample_edges(pair_key, 0.5, "base")


def test_views_that_compare_need_two_complete_questions(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    ids = cache.view(pair_key, 0.1).question_ids
    with Store(path).write() as con:  # every question but one loses its post score at alpha 0.1
        con.execute("""DELETE FROM scores WHERE t_cut = (SELECT t_cut FROM run_alphas
                           WHERE run_key = $run AND alpha = 0.1)
                       AND generation_key IN (SELECT generation_key FROM run_samples
                           WHERE run_key = $run AND label = 'synthetic-rl' AND question_id <> $kept)""",
                    {"run": pair_key, "kept": ids[0]})
    assert cache.view(pair_key, 0.1).question_ids == ids[:1]
    views = (lambda: cache.comparison(pair_key, 0.1, settings=MetricSettings(bootstrap=10)),
             lambda: cache.mean_matrices(pair_key, 0.1),
             lambda: cache.edge_change(pair_key, 0.1, "ratio"),
             lambda: cache.significant_edges(pair_key, 0.1),
             lambda: cache.per_sample(pair_key, 0.1),
             lambda: cache.samples(pair_key, 0.1),
             lambda: cache.abs_values(pair_key, 0.1),
             lambda: cache.circuit(pair_key, 0.1, k=10))
    for view in views:
        with pytest.raises(TooFewQuestionsError, match="only 1 question"):
            view()
    assert list(cache.per_sample_by_alpha(pair_key, (0.1, 0.3))) == [0.3]
    # The stored comparison of the default settings is still there.
    assert cache.comparison(pair_key, 0.1).n_samples == 8


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


def test_a_write_to_one_run_leaves_the_other_runs_views_warm(tmp_path, monkeypatch):
    from core import query

    path = tmp_path / "fixture.duckdb"
    pair_key, series_key = build_fixture_cache(path)
    cache = ResultCache.open(path)
    warm = {key: (cache.view(key, 0.1), cache.comparison(key, 0.1, settings=MetricSettings(
        bootstrap=10)), cache.samples(key, 0.1)) for key in (pair_key, series_key)}
    table = cache.metric_table(MetricSettings(bootstrap=10))
    vector_reads = []
    monkeypatch.setattr(query, "fetch_vectors",
                        lambda *args: vector_reads.append(args) or fetch_vectors(*args))
    opened = []
    read = cache.store.read
    monkeypatch.setattr(cache.store, "read", lambda *a: opened.append(1) or read(*a))
    ids = warm[pair_key][0].question_ids
    with Store(path).write() as con:  # the pair's job rescored one question: it is gone for now
        con.execute("""DELETE FROM scores WHERE generation_key = (SELECT generation_key
                           FROM run_samples WHERE run_key = ? AND label = 'synthetic-rl'
                           AND question_id = ?)""", [pair_key, ids[0]])
    series = (cache.view(series_key, 0.1), cache.comparison(series_key, 0.1, settings=MetricSettings(
        bootstrap=10)), cache.samples(series_key, 0.1))
    assert all(new is old for new, old in zip(series, warm[series_key]))
    assert vector_reads == [] and len(opened) == 1  # one query: every run's content key
    pair = cache.view(pair_key, 0.1)
    assert pair is not warm[pair_key][0] and pair.question_ids == ids[1:]
    assert len(vector_reads) == 2  # base and post of the pair only
    # Views over all runs follow any run's change.
    changed = cache.metric_table(MetricSettings(bootstrap=10))
    assert changed is not table
    assert set(changed[changed["run_key"] == pair_key]["n"]) == {7}
    assert set(changed[changed["run_key"] == series_key]["n"]) == {8}


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
                    view = cache.view(row.run_key, alpha, post_label=row.post_label)
                    n = len(view.question_ids)
                    assert view.base.shape == view.post.shape == (n,) + view.base.shape[1:]
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
        view = cache.view(key, (0.1, 0.3)[i % 3 % 2], granularity=("qkv", "module")[i % 2])
        expected = fresh.view(key, (0.1, 0.3)[i % 3 % 2], granularity=("qkv", "module")[i % 2])
        return (view.question_ids == expected.question_ids and np.array_equal(view.base, expected.base)
                and np.array_equal(view.post, expected.post) and len(cache.runs()) == 3)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(24)))


def test_a_call_never_mixes_memoised_answers_with_a_newer_version(tmp_path):
    path = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    _, ids = cache.sample_edges(pair_key, 0.1, "base")  # memoised now
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
    view = cache.view(pair_key, 0.1, post_label="synthetic-rl")
    assert commits and list(view.question_ids) == ids[1:]
    assert view.base.shape[0] == view.post.shape[0] == 7
