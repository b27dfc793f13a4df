"""The token view: the engine's per-answer-position terms of W (they sum to W, and each is the
derivative of ablating the edge at its position only), and the job that stores a view for one question
of a run, which the read model returns."""

import time

import numpy as np
import pytest

from ablation import ablated_loss, source_outputs
from core import jobs
from core.__main__ import main
from core.adapters import adapter_for
from core.eap import Sample, score_samples
from core.query import ResultCache
from core.settings import ScoreSettings
from core.store import Store
from test_faithfulness import tiny_run  # noqa: F401  (a fixture: a cached run of a tiny pair)
from tiny_models import random_samples, tiny_model


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_answer_position_terms_sum_to_the_engines_w(architecture):
    model = tiny_model(architecture, seed=3)  # float64
    samples = random_samples(3, seed=31, min_answer=4)
    assert len({s.t_cut for s in samples}) > 1, "answers of several lengths: the groups are padded"
    settings = ScoreSettings(batch_size=3)
    terms = score_samples(model, samples, settings, answer_positions=True)
    default = score_samples(model, samples, settings)
    parts = terms.position_parts
    assert parts.dtype == np.float64
    assert parts.shape == (3, 2 + max(s.t_cut - 1 for s in samples)) + default.scores.shape[1:]
    np.testing.assert_array_equal(parts.sum(axis=1), terms.scores)
    scale = np.abs(default.scores).max()
    np.testing.assert_allclose(terms.scores, default.scores, rtol=0, atol=1e-12 * scale)
    # First token and rest of the prompt: the same products as the engine's position parts.
    np.testing.assert_array_equal(parts[:, :2], default.position_parts[:, :2])
    np.testing.assert_allclose(parts[:, 2:].sum(axis=1), default.position_parts[:, 2], rtol=0,
                               atol=1e-12 * scale)
    for i, sample in enumerate(samples):
        answer = parts[i, 2:2 + sample.t_cut - 1]
        assert all(np.abs(term).max() > 1e-6 * scale for term in answer)
        assert not parts[i, 2 + sample.t_cut - 1:].any(), "padding groups stay zero"


def test_each_answer_position_term_is_the_derivative_of_ablating_that_position_only():
    model = tiny_model("llama", seed=4)
    drawn = random_samples(1, seed=37, min_prompt=4, min_answer=6)[0]
    sample = Sample(drawn.id, drawn.prompt_ids, drawn.answer_ids, t_cut=5)
    result = score_samples(model, [sample], ScoreSettings(), answer_positions=True)
    graph = result.graph
    position = len(sample.prompt_ids) + 2  # the third answer token fed as input
    eps = 1e-5
    with adapter_for(model).exact_precision(model):
        sources = source_outputs(model, sample)
        for source in sources:
            source[:, :position] = 0
            source[:, position + 1:] = 0
        for s, d in zip(*np.nonzero(graph.real_edge_mask)):
            expected = (ablated_loss(model, sample, graph, s, d, eps, sources)
                        - ablated_loss(model, sample, graph, s, d, -eps, sources)) / (2 * eps)
            term = result.position_parts[0, 2 + 2, s, d]
            assert abs(term - expected) <= 1e-6 * abs(expected) + 1e-9, (
                graph.src_names[s], graph.dst_names[d], term, expected)


def wait_for(cache, run_key, alpha, question_id, post_label) -> jobs.TokenViewJob:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = jobs.token_view_job(cache, run_key, alpha, question_id, post_label)
        if job.state not in jobs.ACTIVE:
            return job
        time.sleep(0.2)
    raise AssertionError("the token-view job did not finish within 300 s")


def test_the_job_stores_a_view_the_read_model_returns(tiny_run):  # noqa: F811
    root, run_key = tiny_run
    cache_path = root / "c.duckdb"
    cache = ResultCache.open(cache_path)
    question_id = cache.samples(run_key, 0.5)["question_id"].iloc[1]
    assert cache.token_view(run_key, 0.5, question_id) is None
    job_id = jobs.start_token_view(str(cache_path), run_key, 0.5, question_id, "tiny-post", 3)
    with pytest.raises(jobs.JobConflictError, match=f"question {question_id} .* being computed"):
        jobs.start_token_view(str(cache_path), run_key, 0.5, question_id, "tiny-post", 3)
    job = wait_for(str(cache_path), run_key, 0.5, question_id, "tiny-post")
    log = (jobs.jobs_dir(cache_path) / "token_views" / f"{job_id}.log").read_text()
    assert job.state == "done", log
    assert job.done == job.total == 5

    view = ResultCache.open(cache_path).token_view(run_key, 0.5, question_id, post_label="tiny-post")
    assert view["question_id"] == question_id and view["k"] == 3 and view["post_label"] == "tiny-post"
    graph = cache.graph(run_key)
    change = cache.edge_change(run_key, 0.5, "difference")
    strongest = np.sort(np.abs(change[graph.real_edge_mask]))[::-1][:3]
    np.testing.assert_allclose([abs(e["change"]) for e in view["edges"]], strongest, rtol=1e-6)
    assert [m["label"] for m in view["models"]] == ["tiny-base", "tiny-post"]
    for model in view["models"]:
        stored, ids = cache.sample_edges(run_key, 0.5, model["label"])
        scores = graph.dense(stored)[ids.index(question_id)]
        assert len(model["tokens"]) == model["t_cut"] - 1
        for i, edge in enumerate(view["edges"]):
            contributions = model["contributions"][i]
            assert len(contributions) == len(model["tokens"])
            total = model["first_token"][i] + model["prompt_rest"][i] + sum(contributions)
            assert total == pytest.approx(model["w"][i], rel=1e-5, abs=1e-9)
            # The run's own score of this answer: the right tokens, cut where the run cut them.
            expected = scores[graph.src_index(edge["src"]), graph.dst_index(edge["dst"])]
            assert model["w"][i] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


def test_the_command_names_an_unknown_question_and_releases_the_cache(tiny_run, capsys):  # noqa: F811
    root, run_key = tiny_run
    status = main(["tokens", "--cache", str(root / "c.duckdb"), "--run", run_key, "--alpha", "0.5",
                   "--question", "nope"])
    assert status == 2
    assert f"run {run_key} has no selected question 'nope'" in capsys.readouterr().err
    assert not Store(root / "c.duckdb").writer_active()


def test_a_token_view_is_refused_while_another_process_writes(tmp_path):
    store = Store(tmp_path / "c.duckdb")
    with store.writer_lock():
        with pytest.raises(jobs.JobConflictError, match="writer lock is held"):
            jobs.start_token_view(str(store.path), "run", 0.1, "q1", "post", 3)
    assert jobs.token_view_job(str(store.path), "run", 0.1, "q1", "post") is None
