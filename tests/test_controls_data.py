"""Controls, the data side (docs/method.md section 9): cross scores keyed by their scorer, position
parts and norms stored with every score, control runs linked in run_controls; their export and
import, the migration of a pre-controls cache, and (with tiny real models) the pipeline's
cross-scoring and null models."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from core.exchange import export_run, import_run
from core.migrations import migrate
from core.runstore import RunStore
from core.store import Store, fetch_vectors
from core.synthetic import build_fixture_cache

N_PARTS = 3


def run_models(store: Store, run_key: str) -> dict[str, tuple[str, str]]:
    with store.read() as con:
        return {label: (role, key) for label, role, key in con.execute(
            "SELECT label, role, model_key FROM run_models WHERE run_key = ?", [run_key]).fetchall()}


def add_cross_scores(store: Store, run_key: str, t_cut: int, rng) -> dict:
    """Cross scores with parts of the run's post model on the base's answers and back, for all but
    the last question; returns {(scorer, tokens label): {question id: (total, parts)}}."""
    runs = RunStore(store)
    labels = run_models(store, run_key)
    base = next(label for label, (role, _) in labels.items() if role == "base")
    post = next(label for label, (role, _) in labels.items() if role == "post")
    with store.read() as con:
        score_key, n_layers = con.execute("SELECT score_key, n_layers FROM runs WHERE run_key = ?",
                                          [run_key]).fetchone()
        samples = con.execute("SELECT label, question_id, generation_key, dataset_key "
                              "FROM run_samples JOIN runs USING (run_key) WHERE run_key = ? "
                              "ORDER BY position", [run_key]).fetchall()
        n_edges = con.execute("SELECT any_value(n_edges) FROM scores WHERE score_key = ?",
                              [score_key]).fetchone()[0]
    questions = sorted({q for _, q, _, _ in samples})[:-1]
    written = {}
    for scorer, tokens in ((post, base), (base, post)):
        chosen = [(q, g, d) for label, q, g, d in samples if label == tokens and q in questions]
        parts = rng.standard_normal((len(chosen), N_PARTS, n_edges)).astype(np.float32)
        totals = parts.sum(axis=1)
        runs.write_scores(run_key, [{
            "generation_key": g, "t_cut": t_cut, "score_key": score_key,
            "model_key": labels[scorer][1], "dataset_key": d, "question_id": q, "loss": 1.0,
            "seconds": 0.1, "n_scored_tokens": t_cut, "scored_text": "x", "logit_grad_norm": 2.0,
            "logits_slot_grad_norm": 3.0, "residual_norm": 4.0} for q, g, d in chosen], totals, parts)
        written[(scorer, tokens)] = {q: (totals[i], parts[i]) for i, (q, _, _) in enumerate(chosen)}
    return {"base": base, "post": post, "questions": questions, "n_edges": n_edges,
            "written": written}


@pytest.fixture
def fixture_cache(tmp_path):
    path = tmp_path / "cache.duckdb"
    run_keys = build_fixture_cache(path)
    return Store(path), run_keys


def t_cut_of(store: Store, run_key: str) -> int:
    with store.read() as con:
        return con.execute("SELECT min(t_cut) FROM run_alphas WHERE run_key = ?", [run_key]).fetchone()[0]


def test_cross_scores_are_rows_of_their_scorer_read_back_for_complete_questions(fixture_cache):
    store, (pair, _) = fixture_cache
    t_cut = t_cut_of(store, pair)
    cross = add_cross_scores(store, pair, t_cut, np.random.default_rng(0))
    runs = RunStore(store)
    base, post = cross["base"], cross["post"]
    with store.read() as con:
        # One answer, two scorers: two rows, told apart by model_key.
        per_answer = con.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM scores "
                                 "GROUP BY generation_key, t_cut, score_key)").fetchone()[0]
    assert per_answer == 2
    for scorer, tokens in ((post, base), (base, post)):
        questions, ids = runs.cross_vectors(pair, t_cut, scorer, tokens)
        # Both directions list the same questions: those with all four scores.
        assert questions == cross["questions"]
        with store.read() as con:
            vectors = fetch_vectors(con, cross["n_edges"], ids)
        expected = np.stack([cross["written"][(scorer, tokens)][q][0] for q in questions])
        np.testing.assert_array_equal(vectors, expected)
    assert runs.cross_vectors(pair, t_cut, "base", post) == runs.cross_vectors(pair, t_cut, base, post)
    # Equal labels: the model's own scores, every selected question (the last one has no cross).
    own_questions, _ = runs.cross_vectors(pair, t_cut, post, post)
    assert own_questions[:-1] == cross["questions"] and len(own_questions) == len(cross["questions"]) + 1
    with pytest.raises(KeyError, match="no model labelled 'nobody'"):
        runs.cross_vectors(pair, t_cut, "nobody", base)


def test_position_parts_and_norms_are_stored_with_the_score(fixture_cache):
    store, (pair, _) = fixture_cache
    t_cut = t_cut_of(store, pair)
    cross = add_cross_scores(store, pair, t_cut, np.random.default_rng(1))
    runs = RunStore(store)
    questions, part_ids = runs.part_vector_ids(pair, t_cut, cross["post"], cross["base"])
    assert questions == cross["questions"]
    with store.read() as con:
        for q, ids in zip(questions, part_ids):
            assert len(ids) == N_PARTS
            np.testing.assert_array_equal(fetch_vectors(con, cross["n_edges"], ids),
                                          cross["written"][(cross["post"], cross["base"])][q][1])
        norms = con.execute("SELECT DISTINCT logit_grad_norm, logits_slot_grad_norm, residual_norm "
                            "FROM scores WHERE part_vector_ids IS NOT NULL").fetchall()
    assert norms == [(2.0, 3.0, 4.0)]
    # The fixture's own scores were written without parts: None, not an empty list.
    _, own = runs.part_vector_ids(pair, t_cut, cross["base"])
    assert own == [None] * (len(cross["questions"]) + 1)


def test_control_runs_are_linked_and_listed(fixture_cache):
    store, (pair, series) = fixture_cache
    runs = RunStore(store)
    runs.write_control(pair, "synthetic-rl", "perturb", series)
    runs.write_control(pair, "synthetic-rl", "perturb", "another")  # an existing link is kept
    runs.write_control(pair, "synthetic-rl", "seed", "seed-run")
    found = runs.controls_of(pair)
    assert [(r["post_label"], r["control"], r["control_run_key"]) for r in found] == [
        ("synthetic-rl", "perturb", series), ("synthetic-rl", "seed", "seed-run")]
    assert runs.controls_of(series) == []


def test_export_and_import_carry_cross_scores_parts_and_controls(fixture_cache, tmp_path):
    store, (pair, _) = fixture_cache
    t_cut = t_cut_of(store, pair)
    cross = add_cross_scores(store, pair, t_cut, np.random.default_rng(2))
    RunStore(store).write_control(pair, cross["post"], "perturb", "null-run")
    export_run(store, pair, tmp_path / "export")
    target = Store(tmp_path / "target.duckdb")
    import_run(target, tmp_path / "export")
    source_runs, target_runs = RunStore(store), RunStore(target)
    assert [r["control_run_key"] for r in target_runs.controls_of(pair)] == ["null-run"]
    for scorer, tokens in ((cross["post"], cross["base"]), (cross["base"], cross["post"])):
        for read in ("cross_vectors", "part_vector_ids"):
            theirs = getattr(target_runs, read)(pair, t_cut, scorer, tokens)
            ours = getattr(source_runs, read)(pair, t_cut, scorer, tokens)
            assert theirs[0] == ours[0]
        _, ids = target_runs.part_vector_ids(pair, t_cut, scorer, tokens)
        _, totals = target_runs.cross_vectors(pair, t_cut, scorer, tokens)
        with target.read() as con:
            for q, part, total in zip(cross["questions"], ids, totals):
                written_total, written_parts = cross["written"][(scorer, tokens)][q]
                np.testing.assert_array_equal(fetch_vectors(con, cross["n_edges"], part), written_parts)
                np.testing.assert_array_equal(fetch_vectors(con, cross["n_edges"], [total])[0],
                                              written_total)


def test_a_cache_written_before_controls_is_migrated_in_place_of_refused(tmp_path):
    path = tmp_path / "cache.duckdb"
    pair, _ = build_fixture_cache(path)
    # Rewrite scores as the draft version 2 had them: no scorer in the key, no parts or norms.
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE old_scores AS SELECT * EXCLUDE (part_vector_ids, logit_grad_norm, "
                "logits_slot_grad_norm, residual_norm) FROM scores")
    con.execute("DROP TABLE scores")
    con.execute("DROP TABLE run_controls")
    con.execute("ALTER TABLE old_scores RENAME TO scores")
    rows = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    con.close()
    with pytest.raises(Exception, match="python -m core migrate"):
        RunStore(Store(path)).controls_of(pair)
    store = Store(path)
    backup = migrate(store, log=lambda text: None)
    assert backup.name.endswith(".v2-draft.bak")
    runs = RunStore(store)
    assert runs.controls_of(pair) == []
    with store.read() as con:
        assert con.execute("SELECT count(*), count(part_vector_ids) FROM scores").fetchone() == (rows, 0)
