"""Controls, the data side (docs/method.md section 8): cross scores keyed by their scorer, position
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
from core.store import Store, fetch_one, fetch_vectors
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
    # ...and without what version 3 added.
    con.execute("ALTER TABLE run_models DROP COLUMN step")
    for table in ("faithfulness", "token_views", "user_pairs", "user_datasets"):
        con.execute(f"DROP TABLE {table}")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
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


# --- The pipeline's controls on tiny real models ------------------------------------------------

import json  # noqa: E402

import torch  # noqa: E402

from core import pipeline  # noqa: E402
from core.config import RunRequest  # noqa: E402
from core.eap import Sample, score_samples  # noqa: E402
from core.generation import generate_greedy  # noqa: E402
from core.grading import extract_answer  # noqa: E402
from core.models import ModelSpec, load_causal_lm, matched_perturbation  # noqa: E402
from core.selection import t_cut as cut_at  # noqa: E402
from core.settings import ScoreSettings, SelectionSettings  # noqa: E402
from core.synthetic import build_tiny_model, tiny_tokenizer  # noqa: E402
from core.templates import get_template  # noqa: E402
from tests.tiny_models import ARCHITECTURES, tiny_model  # noqa: E402

MAX_NEW = 10
ALPHAS = (0.5,)
SCALED = "model.layers.1.mlp.down_proj.weight"
F64 = ScoreSettings(dtype="float64")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Llama base and a post = base with one MLP's down-projection scaled by 1.5 (a planted
    weight change), a dataset the base answers, and a config naming the pair."""
    root = tmp_path_factory.mktemp("planted")
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "base", tokenizer, seed=0)
    post = load_causal_lm(str(root / "base"))
    with torch.no_grad():
        post.get_parameter(SCALED).mul_(1.5)
    post.save_pretrained(root / "post", safe_serialization=True)
    tokenizer.save_pretrained(root / "post")
    questions = [f"What is {a} plus {b}" for a in range(3) for b in range(3)]
    template = get_template("deepseek-math")
    base = load_causal_lm(str(root / "base"))
    answers = generate_greedy(base, tokenizer, [template.render(q, tokenizer)[1] for q in questions],
                              MAX_NEW, template.stop_strings)
    with open(root / "data.jsonl", "w") as f:
        for i, (q, a) in enumerate(zip(questions, answers)):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": extract_answer(
                tokenizer.decode(a, skip_special_tokens=True))}) + "\n")
    (root / "pairs.toml").write_text(f"""
[pairs.planted]
base = {{ path = "{root / 'base'}", label = "base-model" }}
post = {{ path = "{root / 'post'}", label = "post-model", algorithm = "planted" }}
seed_null = {{ path = "{root / 'post'}", label = "seed-twin" }}
template = "deepseek-math"
max_new_tokens = {MAX_NEW}

[datasets.tiny]
jsonl = "{root / 'data.jsonl'}"
""")
    return root


def planted_request(root, cache, **changes) -> RunRequest:
    fields = dict(pair="planted", dataset="tiny", alphas=ALPHAS, score=F64, cache=str(cache),
                  config=str(root / "pairs.toml"),
                  selection=SelectionSettings(n=4, beta=0.0, gamma=10.0, delta=2.0))
    return RunRequest(**{**fields, **changes})


def stored(store: Store, run_key: str, t_cut: int, scorer: str, tokens: str):
    questions, ids = RunStore(store).cross_vectors(run_key, t_cut, scorer, tokens)
    with store.read() as con:
        n_edges = fetch_one(con, "SELECT any_value(n_edges) FROM scores")[0]
        return questions, fetch_vectors(con, n_edges, ids).astype(np.float64)


def test_cross_scoring_puts_a_planted_weight_change_in_the_weight_part(planted, tmp_path):
    cache = tmp_path / "cache.duckdb"
    summary = pipeline.run(planted_request(planted, cache, controls=("cross",)), log=lambda t: None)
    store, run_key = Store(cache), summary.run_key
    t_cut = summary.t_cuts[ALPHAS[0]]
    assert summary.done["cross"] == 2 * summary.selection["n_selected"]
    questions, base_base = stored(store, run_key, t_cut, "base-model", "base-model")
    _, post_base = stored(store, run_key, t_cut, "post-model", "base-model")
    _, post_post = stored(store, run_key, t_cut, "post-model", "post-model")
    _, base_post = stored(store, run_key, t_cut, "base-model", "post-model")
    # The weight part equals the engine's own difference on the base's tokens.
    with store.read() as con:
        tokens = {q: (p, a) for q, p, a in con.execute(
            "SELECT rs.question_id, g.prompt_ids, g.answer_ids FROM run_samples rs JOIN generations g "
            "USING (generation_key) WHERE rs.run_key = ? AND rs.label = 'base-model'",
            [run_key]).fetchall()}
    samples = [Sample(q, tuple(tokens[q][0]), tuple(tokens[q][1]), min(t_cut, len(tokens[q][1])))
               for q in questions]
    direct = {}
    for folder in ("base", "post"):
        result = score_samples(load_causal_lm(str(planted / folder), dtype="float64"), samples, F64)
        direct[folder] = result.graph.edges(result.scores)
    np.testing.assert_allclose(post_base - base_base, direct["post"] - direct["base"],
                               rtol=1e-5, atol=1e-6 * np.abs(direct["base"]).max())
    assert np.abs(post_base - base_base).max() > 1e-3 * np.abs(base_base).max()
    # The token part is exactly 0 wherever both models wrote the same answer.
    with store.read() as con:
        same = [q for q, in con.execute(
            "SELECT a.question_id FROM run_samples a JOIN run_samples b USING (run_key, question_id) "
            "JOIN generations ga ON ga.generation_key = a.generation_key "
            "JOIN generations gb ON gb.generation_key = b.generation_key WHERE a.run_key = ? "
            "AND a.label = 'base-model' AND b.label = 'post-model' AND ga.answer_ids = gb.answer_ids",
            [run_key]).fetchall()]
    assert same, "the planted change should leave some answers as they were"
    rows = [questions.index(q) for q in same]
    np.testing.assert_array_equal(post_post[rows], post_base[rows])
    np.testing.assert_array_equal(base_post[rows], base_base[rows])
    # Parts are stored with every score and sum to its total.
    _, part_ids = RunStore(store).part_vector_ids(run_key, t_cut, "post-model", "base-model")
    with store.read() as con:
        parts = np.stack([fetch_vectors(con, post_base.shape[1], ids) for ids in part_ids])
    np.testing.assert_allclose(parts.astype(np.float64).sum(axis=1), post_base, rtol=1e-5,
                               atol=1e-6 * np.abs(post_base).max())


def test_cross_scoring_is_planned_and_resumes_after_a_kill(planted, tmp_path, monkeypatch):
    cache = tmp_path / "cache.duckdb"
    request = planted_request(planted, cache, controls=("cross",))
    pipeline.run(planted_request(planted, cache), log=lambda t: None)
    estimate = pipeline.plan(request)
    n = estimate["missing"]["cross"]
    assert n > 1 and estimate["missing"]["score"] == 0
    original, calls = pipeline._Runner._store_scores, []

    def killed_after_one_commit(self, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        original(self, *args)
    monkeypatch.setattr(pipeline._Runner, "_store_scores", killed_after_one_commit)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(dataclasses_replace(request, score=ScoreSettings(dtype="float64", batch_size=1)),
                     log=lambda t: None)
    monkeypatch.setattr(pipeline._Runner, "_store_scores", original)
    assert pipeline.plan(request)["missing"]["cross"] == n - 1
    summary = pipeline.run(request, log=lambda t: None)
    assert summary.done["cross"] == n - 1 and summary.done["score"] == 0
    assert pipeline.plan(request)["missing"]["cross"] == 0


def dataclasses_replace(request, **changes):
    import dataclasses

    return dataclasses.replace(request, **changes)


def test_null_models_run_as_linked_pair_runs(planted, tmp_path):
    cache = tmp_path / "cache.duckdb"
    request = planted_request(planted, cache, controls=("perturb", "seed"))
    plans = pipeline.plan(request)["controls"]
    assert sorted(plans) == ["perturb:post-model", "seed:post-model"]
    summary = pipeline.run(request, log=lambda t: None)
    links = RunStore(Store(cache)).controls_of(summary.run_key)
    assert {(r["control"], r["control_run_key"]) for r in links} == {
        (name.split(":")[0], key) for name, key in summary.control_runs.items()}
    for name, key in summary.control_runs.items():
        assert plans[name]["run_key"] == key
        with Store(cache).read() as con:
            kind, n_models = con.execute("SELECT kind, (SELECT count(*) FROM run_models WHERE "
                                         "run_key = ?) FROM runs WHERE run_key = ?", [key, key]).fetchone()
        assert (kind, n_models) == ("pair", 2)
    rerun = pipeline.run(request, log=lambda t: None)
    assert sum(rerun.done.values()) == 0 and rerun.control_runs == summary.control_runs


def test_seed_control_needs_a_seed_null(planted, tmp_path):
    config = (planted / "pairs.toml").read_text()
    other = tmp_path / "pairs.toml"
    other.write_text("\n".join(line for line in config.splitlines() if not line.startswith("seed_null")))
    request = planted_request(planted, tmp_path / "c.duckdb", controls=("seed",), config=str(other))
    with pytest.raises(Exception, match="seed_null"):
        pipeline.plan(request)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_perturbation_null_has_the_update_norms_and_is_reproducible(architecture):
    base = tiny_model(architecture, seed=0)
    post = tiny_model(architecture, seed=0)
    with torch.no_grad():
        for i, parameter in enumerate(post.parameters()):
            if i % 3:  # some matrices unchanged: their null is unchanged too
                parameter.add_(0.01 * torch.randn_like(parameter))
    nulls = []
    for seed in (5, 5, 6):
        null = tiny_model(architecture, seed=0)
        matched_perturbation(null, post, seed)
        nulls.append(dict(null.named_parameters()))
    base_parameters, post_parameters = dict(base.named_parameters()), dict(post.named_parameters())
    for name, parameter in base_parameters.items():
        update = nulls[0][name] - parameter
        if parameter.ndim != 2:
            assert torch.equal(update, torch.zeros_like(update)), name
            continue
        target = torch.linalg.matrix_norm(post_parameters[name] - parameter)
        assert abs(torch.linalg.matrix_norm(update) - target) <= 1e-6 * max(float(target), 1e-30), name
        assert torch.equal(nulls[0][name], nulls[1][name]), name  # same seed, same null
        if target > 0:
            assert not torch.equal(nulls[0][name], nulls[2][name]), name
            cosine = (update * (post_parameters[name] - parameter)).sum() / target ** 2
            assert abs(float(cosine)) < 0.5, name  # a random direction, not the update's


def test_a_perturbed_spec_is_keyed_by_both_models_and_its_seed(planted):
    base = ModelSpec.from_config({"path": str(planted / "base")})
    post = ModelSpec.from_config({"path": str(planted / "post")})
    fingerprints = {seed: ModelSpec.perturbed(base, post, seed).fingerprint() for seed in (0, 1)}
    assert fingerprints[0] != fingerprints[1]
    assert ModelSpec.perturbed(post, post, 0).fingerprint() != fingerprints[0]
    assert ModelSpec.perturbed(base, post, 0).fingerprint() == fingerprints[0]
