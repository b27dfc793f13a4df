"""The run pipeline end to end on a tiny random Llama pair with a local tokenizer and a tiny JSONL set.

Random models do not solve arithmetic, so the dataset's references are written after asking the base
model (greedy, through the same generation code) what it answers: the test checks the plumbing
(generation -> grading -> selection -> scoring -> cache), not the models. The post model is the base
plus small weight noise, so it agrees with the base on some questions and not on others.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core import jobs, pipeline
from core.config import ConfigError, RunRequest
from core.__main__ import main
from core.datasets import DatasetError, reference_from_record
from core.generation import finish_answer, generate_greedy
from core.grading import extract_answer
from core.models import ModelSpec, TokenizerMismatchError, load_causal_lm
from core.query import ResultCache
from core.selection import EmptySelectionError, NoJointlyCorrectError
from core.settings import GenerationSettings, SelectionSettings
from core.store import TABLES, Store, fetch_one
from core.synthetic import build_tiny_model, tiny_tokenizer
from core.templates import get_template

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 12
SELECTION = SelectionSettings(n=6, beta=0.0, gamma=10.0, delta=2.0)
ALPHAS = (0.1, 0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "base", tokenizer, seed=0)
    build_tiny_model(root / "post", tokenizer, seed=1, perturb_from=root / "base", perturbation=0.003)
    build_tiny_model(root / "post2", tokenizer, seed=3, perturb_from=root / "base", perturbation=0.001)
    build_tiny_model(root / "other", tiny_tokenizer(extra_words=("extra",)), seed=2)
    questions = [f"What is {a} plus {b}" for a in range(4) for b in range(3)]
    template = get_template("deepseek-math")
    prompts = [template.render(q, tokenizer)[1] for q in questions]
    base = load_causal_lm(str(root / "base"))
    answers = generate_greedy(base, tokenizer, prompts, MAX_NEW, template.stop_strings)
    references = [extract_answer(tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
    assert all(references), "the tiny base model should end its answers with a digit"
    with open(root / "data.jsonl", "w") as f:
        for i, (q, r) in enumerate(zip(questions, references)):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": r}) + "\n")
    # The same questions under other ids, in another order, in another file.
    with open(root / "renamed.jsonl", "w") as f:
        for i, (q, r) in reversed(list(enumerate(zip(questions, references)))):
            f.write(json.dumps({"id": f"r{i}", "question": q, "answer": r}) + "\n")
    with open(root / "unsolvable.jsonl", "w") as f:
        for i, q in enumerate(questions[:4]):
            f.write(json.dumps({"id": f"u{i}", "question": q, "answer": "no such answer"}) + "\n")
    config = root / "pairs.toml"
    config.write_text(f"""
[pairs.tiny]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'post'}", label = "tiny-post", algorithm = "GRPO" }}
template = "deepseek-math"
max_new_tokens = {MAX_NEW}

[series.tiny-series]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
posts = [
    {{ path = "{root / 'post'}", label = "tiny-post", algorithm = "GRPO" }},
    {{ path = "{root / 'post2'}", label = "tiny-post2", algorithm = "DPO" }},
]
template = "deepseek-math"
max_new_tokens = {MAX_NEW}

[pairs.wrong-layers]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'post'}", label = "tiny-post", algorithm = "GRPO" }}
template = "deepseek-math"
max_new_tokens = {MAX_NEW}
layers = 30

[pairs.mismatch]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'other'}", label = "other", algorithm = "PPO" }}
template = "deepseek-math"
max_new_tokens = {MAX_NEW}

[datasets.tiny]
jsonl = "{root / 'data.jsonl'}"

[datasets.renamed]
jsonl = "{root / 'renamed.jsonl'}"

[datasets.unsolvable]
jsonl = "{root / 'unsolvable.jsonl'}"
""")
    return root


def request(world, cache_name, **changes):
    fields = dict(pair="tiny", dataset="tiny", alphas=ALPHAS, selection=SELECTION,
                  cache=str(world / cache_name), config=str(world / "pairs.toml"))
    fields.update(changes)
    return RunRequest(**fields)


def quiet(text):
    pass


def sample_matrices(cache, run_key, alpha, model):
    """Dense per-sample score matrices of a model at alpha, and their question ids."""
    edges, ids = cache.sample_edges(run_key, alpha, model)
    return cache.graph(run_key).dense(edges), ids


def cache_contents(path):
    """Everything a run stored that does not depend on when or how fast it ran."""
    with Store(path).read() as con:
        generations = con.execute("SELECT generation_key, prompt_ids, answer_ids, answer_text, "
                                  "finish_reason FROM generations ORDER BY 1").fetchall()
        grades = con.execute("SELECT generation_key, extracted, correct FROM grades ORDER BY 1").fetchall()
        runs = con.execute("SELECT run_key, n_selected, t_bar, selection_report FROM runs").fetchall()
        samples = con.execute("SELECT * FROM run_samples ORDER BY ALL").fetchall()
        alphas = con.execute("SELECT * FROM run_alphas ORDER BY ALL").fetchall()
        scores = con.execute("SELECT generation_key, t_cut, loss, n_scored_tokens, scored_text, n_edges, "
                             "vector_id FROM scores ORDER BY 1, 2").fetchall()
        vectors = {(g, t): v for g, t, *_, n, v in scores}
        matrix = {key: vec for key, vec in zip(
            vectors, _fetch(con, scores[0][5], list(vectors.values())))}
        metric_rows = con.execute("SELECT post_label, alpha, comparison FROM metrics ORDER BY 1, 2").fetchall()
    return {"generations": generations, "grades": grades, "runs": runs, "samples": samples,
            "alphas": alphas, "scores": [s[:5] for s in scores], "vectors": matrix,
            "metrics": metric_rows}


def _fetch(con, n_edges, ids):
    from core.store import fetch_vectors

    return fetch_vectors(con, n_edges, ids)


def test_end_to_end_run_fills_every_table_and_the_query_layer_reads_it(world):
    summary = pipeline.run(request(world, "full.duckdb"), log=quiet)
    path = world / "full.duckdb"
    with Store(path).read() as con:
        counts = {t: fetch_one(con, f"SELECT count(*) FROM {t}")[0] for t in TABLES}
    # Every table but run_controls (this run asks for no control).
    # Controls, and what the browser adds, are written only when asked for.
    asked_only = {"run_controls", "faithfulness", "token_views", "user_pairs", "user_datasets"}
    assert all(n > 0 for t, n in counts.items() if t not in asked_only), counts
    assert all(counts[t] == 0 for t in asked_only), counts
    assert counts["generations"] == 24 and counts["grades"] == 24
    n = summary.selection["n_selected"]
    assert 1 <= n <= 6
    assert counts["scores"] == n * 2 * len(ALPHAS)
    assert summary.done == {"generate": 24, "grade": 24, "select": 1,
                            "score": n * 2 * len(ALPHAS),
                            "metrics": len(ALPHAS)}
    cache = ResultCache.open(path)
    run = cache.runs().iloc[0]
    assert (run.pair, run.dataset, run.post_label, run.alphas) == ("tiny", "tiny", "tiny-post", list(ALPHAS))
    assert run.n_layers == 2
    matrices, ids = sample_matrices(cache, run.run_key, 0.5, "tiny-post")
    assert matrices.shape == (n, 5, 9) and np.isfinite(matrices).all() and np.abs(matrices).sum() > 0
    samples = cache.samples(run.run_key, 0.5)
    assert samples["base_correct"].all() and samples["post_correct"].all()
    assert (samples["t_cut"] == summary.t_cuts[0.5]).all()
    assert len(cache.metric_table()) == len(ALPHAS) * 6
    # The stored ids are exactly what generation produced: they decode to the stored texts.
    tokenizer = tiny_tokenizer()
    with Store(path).read() as con:
        for ids_, text in con.execute("SELECT answer_ids, answer_text FROM generations").fetchall():
            assert tokenizer.decode(ids_, skip_special_tokens=True) == text


def test_second_run_does_no_model_work(world, monkeypatch):
    pipeline.run(request(world, "rerun.duckdb"), log=quiet)

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete rerun must not load a model")
    monkeypatch.setattr(ModelSpec, "load", no_loading)
    began = time.perf_counter()
    summary = pipeline.run(request(world, "rerun.duckdb"), log=quiet)
    assert summary.models_loaded == 0
    assert set(summary.done.values()) == {0}
    assert time.perf_counter() - began < 30


def test_extra_alpha_scores_only_the_new_cut(world):
    pipeline.run(request(world, "extend.duckdb", alphas=(0.5,)), log=quiet)
    summary = pipeline.run(request(world, "extend.duckdb", alphas=(0.1, 0.5)), log=quiet)
    assert summary.done["generate"] == 0
    assert summary.done["score"] == summary.selection["n_selected"] * 2
    run = ResultCache.open(world / "extend.duckdb").runs().iloc[0]
    assert run.alphas == [0.1, 0.5]


def test_scores_commit_batches_per_commit_batches_at_a_time(world, monkeypatch):
    from core.runstore import RunStore
    from core.settings import ScoreSettings

    commits = []
    write_scores = RunStore.write_scores
    monkeypatch.setattr(RunStore, "write_scores", lambda self, run_key, rows, *rest: (
        commits.append([(row["generation_key"], row["t_cut"]) for row in rows]),
        write_scores(self, run_key, rows, *rest))[1])
    summary = pipeline.run(request(world, "grouped.duckdb",
                                  score=ScoreSettings(batch_size=1, batches_per_commit=3)), log=quiet)
    # The world's prompts are far longer than its answers, so the cuts of an answer share a row: a
    # commit holds every cut of 3 answers (3 batches of 1 row), the last of a model what is left.
    answers = [list(dict.fromkeys(key for key, _ in commit)) for commit in commits]
    n_selected = summary.selection["n_selected"]
    assert n_selected > 3, "the test needs more than one commit per model"
    full, rest = divmod(n_selected, 3)
    assert [len(keys) for keys in answers] == 2 * ([3] * full + ([rest] if rest else []))
    for commit, keys in zip(commits, answers):
        assert sorted(commit) == sorted((key, cut) for key in keys for cut in set(summary.t_cuts.values()))
    # Grouping commits changes no score.
    pipeline.run(request(world, "ungrouped.duckdb"), log=quiet)
    grouped, ungrouped = (cache_contents(world / name) for name in ("grouped.duckdb", "ungrouped.duckdb"))
    assert [s[:2] + s[3:] for s in grouped["scores"]] == [s[:2] + s[3:] for s in ungrouped["scores"]]
    np.testing.assert_allclose([s[2] for s in grouped["scores"]], [s[2] for s in ungrouped["scores"]],
                               rtol=1e-6)
    assert grouped["vectors"].keys() == ungrouped["vectors"].keys()
    for key in grouped["vectors"]:
        np.testing.assert_allclose(grouped["vectors"][key], ungrouped["vectors"][key], rtol=1e-5,
                                   atol=1e-9)


KILL_DURING_SCORING = """
import json, os, signal, sys
from core import pipeline
from core.config import RunRequest
request = RunRequest.from_dict(json.loads(sys.argv[1]))
batches = []
def progress(stage, done, total):
    # Called after a scoring batch is computed and before it is committed: the third batch dies,
    # after saying how many samples the first two committed.
    if stage.startswith("score") and done:
        batches.append(done)
        if len(batches) == 3:
            print(batches[1], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
pipeline.run(request, progress=progress, log=lambda text: None)
"""


def test_run_killed_mid_scoring_resumes_to_the_same_cache(world):
    killed = request(world, "killed.duckdb")
    process = subprocess.run([sys.executable, "-c", KILL_DURING_SCORING, json.dumps(killed.as_dict())],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    committed = int(process.stdout)
    with Store(killed.cache).read() as con:
        assert fetch_one(con, "SELECT count(*) FROM scores")[0] == committed  # batches 1 and 2
    partial = ResultCache.open(killed.cache).runs().iloc[0]
    assert partial.n_complete == [0, 0]  # only the base model's first samples: nothing complete
    resumed = pipeline.run(killed, log=quiet)
    assert resumed.done["generate"] == 0 and resumed.done["grade"] == 0
    total = resumed.selection["n_selected"] * 2 * len(ALPHAS)
    assert resumed.done["score"] == total - committed

    pipeline.run(request(world, "uninterrupted.duckdb"), log=quiet)
    a, b = cache_contents(killed.cache), cache_contents(world / "uninterrupted.duckdb")
    for part in ("generations", "grades", "runs", "samples", "alphas"):
        assert a[part] == b[part], part
    assert [s[:2] + s[3:] for s in a["scores"]] == [s[:2] + s[3:] for s in b["scores"]]
    np.testing.assert_allclose([s[2] for s in a["scores"]], [s[2] for s in b["scores"]], rtol=1e-6)
    assert a["vectors"].keys() == b["vectors"].keys()
    for key in a["vectors"]:
        np.testing.assert_allclose(a["vectors"][key], b["vectors"][key], rtol=1e-5, atol=1e-9)
    assert [m[:2] for m in a["metrics"]] == [m[:2] for m in b["metrics"]]


def test_unknown_pair_and_dataset_are_clear_errors(world):
    with pytest.raises(ConfigError, match="unknown pair or series 'nope'.*known pairs.*"
                                          + str(world / "pairs.toml")):
        pipeline.run(request(world, "errors.duckdb", pair="nope"), log=quiet)
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*known"):
        pipeline.run(request(world, "errors.duckdb", dataset="nope"), log=quiet)
    with pytest.raises(ConfigError, match="declares layers = 30 but .* has 2"):
        pipeline.run(request(world, "errors.duckdb", pair="wrong-layers"), log=quiet)


def test_mismatched_tokenizers_are_refused(world):
    with pytest.raises(TokenizerMismatchError, match="'tiny-base' and 'other' have different tokenizers"):
        pipeline.run(request(world, "errors.duckdb", pair="mismatch"), log=quiet)


def test_no_jointly_correct_question_is_a_clear_error(world):
    with pytest.raises(NoJointlyCorrectError, match="no question of 4 was answered correctly"):
        pipeline.run(request(world, "errors.duckdb", dataset="unsolvable"), log=quiet)


def test_rules_that_leave_no_question_store_no_run(world):
    narrow = SelectionSettings(**{**SELECTION.as_dict(), "beta": 9.0, "gamma": 10.0})
    with pytest.raises(EmptySelectionError, match=r"no question survives the selection rules: of "
                                                  r"\d+ answered correctly by every model, removed: "
                                                  r"\d+ mean length outside"):
        pipeline.run(request(world, "empty.duckdb", selection=narrow), log=quiet)
    with Store(world / "empty.duckdb").read() as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM grades").fetchone()[0] > 0  # the answers are kept


def test_cli_run_ls_export_import(world, tmp_path, capsys):
    cache = str(world / "cli.duckdb")
    common = ["--config", str(world / "pairs.toml"), "--cache", cache]
    assert main(["run", "--pair", "tiny", "--dataset", "tiny", "--alpha", "0.1", "0.5", "--n", "6",
                 "--beta", "0", "--gamma", "10", "--delta", "2", *common]) == 0
    assert main(["ls", "--cache", cache]) == 0
    listing = capsys.readouterr().out
    run_key = ResultCache.open(cache).runs().iloc[0].run_key
    assert run_key in listing and "tiny-base -> tiny-post" in listing
    assert main(["export", "--cache", cache, "--run", run_key, "--out", str(tmp_path / "export")]) == 0
    imported = str(tmp_path / "laptop.duckdb")
    assert main(["import", str(tmp_path / "export"), "--cache", imported]) == 0
    source, copy = ResultCache.open(cache), ResultCache.open(imported)
    for alpha in ALPHAS:
        for model in ("base", "tiny-post"):
            a, ids_a = sample_matrices(source, run_key, alpha, model)
            b, ids_b = sample_matrices(copy, run_key, alpha, model)
            assert ids_a == ids_b
            np.testing.assert_array_equal(a, b)
    assert copy.metric_table().equals(source.metric_table())
    assert main(["import", str(tmp_path / "export"), "--cache", imported]) == 0  # idempotent
    with Store(imported).read() as con:
        assert fetch_one(con, "SELECT count(*) FROM scores")[0] == len(ALPHAS) * 2 * len(
            sample_matrices(ResultCache.open(imported), run_key, 0.5, "base")[1])
    assert main(["run", "--pair", "nope", "--dataset", "tiny", *common]) == 2
    assert "unknown pair or series 'nope'" in capsys.readouterr().err


def wait_for(job_id, cache, states, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = jobs.status(job_id, cache)
        if status.state in states:
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stayed {jobs.status(job_id, cache)}")


def test_jobs_run_detached_report_progress_and_refuse_a_second_writer(world):
    req = request(world, "jobs.duckdb")
    estimate = jobs.estimate(req)
    assert estimate["missing"]["generate"] == 24 and estimate["seconds"] > 0
    job_id = jobs.start(req)
    with pytest.raises(jobs.JobConflictError, match="still"):
        jobs.start(req)
    status = wait_for(job_id, req.cache, ("done", "failed"))
    assert status.state == "done", (status.message, Path(status.log_path).read_text())
    assert status.request == req and status.stage.startswith("score")
    assert ResultCache.open(req.cache).runs().iloc[0].pair == "tiny"
    assert jobs.estimate(req)["missing"] == {"generate": 0, "grade": 0, "select": 0, "score": 0,
                                             "metrics": 0}
    assert [j.job_id for j in jobs.list_jobs(req.cache)] == [job_id]
    # The job was handed its request as a file.
    assert RunRequest.from_file(jobs.jobs_dir(req.cache) / f"{job_id}.request.json") == req
    with Store(req.cache).writer_lock():
        with pytest.raises(jobs.JobConflictError, match="writer lock"):
            jobs.start(request(world, "jobs.duckdb", alphas=(0.3,)))


def test_failed_and_cancelled_jobs(world):
    bad = request(world, "jobs2.duckdb", pair="nope")
    failed = wait_for(jobs.start(bad), bad.cache, ("done", "failed", "cancelled"))
    assert failed.state == "failed" and "unknown pair or series 'nope'" in failed.message
    with pytest.raises(ValueError, match="^ConfigError: unknown pair or series 'nope'|^unknown pair"):
        jobs.estimate(bad)
    req = request(world, "jobs2.duckdb")
    job_id = jobs.start(req)
    cancelled = jobs.cancel(job_id, req.cache)
    assert cancelled.state == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.kill(cancelled.pid, 0)


def test_harness_reference_layouts():
    assert reference_from_record({"question": "q", "answer": "Natalia sold 48/2 = 24 clips.\n#### 72"}) == "72"
    assert reference_from_record({"problem": "p", "solution": "so $\\boxed{\\frac{1}{\\sqrt{2}}}$."}) \
        == "\\frac{1}{\\sqrt{2}}"


def test_answers_end_before_eos_and_stop_strings():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("5 plus 3 User: What is", add_special_tokens=False)["input_ids"]
    cut = finish_answer(ids, tokenizer, {tokenizer.eos_token_id}, ("User:",))
    assert tokenizer.decode(list(cut.answer_ids)) == "5 plus 3" and cut.finish_reason == "stop"
    eos = finish_answer(ids[:2] + [tokenizer.eos_token_id] + ids[2:], tokenizer,
                        {tokenizer.eos_token_id}, ("User:",))
    assert eos.answer_ids == tuple(ids[:2]) and eos.finish_reason == "eos"
    assert finish_answer(ids[:3], tokenizer, {tokenizer.eos_token_id}).finish_reason == "length"


def test_batched_left_padded_generation_equals_one_at_a_time(world):
    tokenizer = tiny_tokenizer()
    model = load_causal_lm(str(world / "post"))
    template = get_template("deepseek-math")
    prompts = [template.render(q, tokenizer)[1] for q in ("What is 1 plus 2", "What is so", "3")]
    batched = generate_greedy(model, tokenizer, prompts, MAX_NEW, template.stop_strings, batch_size=3)
    single = [generate_greedy(model, tokenizer, [p], MAX_NEW, template.stop_strings)[0] for p in prompts]
    assert batched == single


def test_lora_adapter_spec_merges_into_its_base_and_has_its_own_fingerprint(world, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_spec = ModelSpec("local", str(world / "base"))
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(world / "base"),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    spec = ModelSpec.from_config({"adapter": str(tmp_path / "adapter"),
                                  "base": {"path": str(world / "base")}})
    merged = spec.load()
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        plain = load_causal_lm(str(world / "base"))(ids).logits
    np.testing.assert_allclose(merged(ids).logits.detach().numpy(), expected.numpy(), atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter changes the model
    assert spec.fingerprint() != base_spec.fingerprint()
    assert spec.load_tokenizer().get_vocab() == tiny_tokenizer().get_vocab()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors adapters"):
        ModelSpec("adapter", str(tmp_path / "pickled"), base=base_spec).load()


def test_fingerprint_follows_the_weights_not_the_name(world, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(world / "base", copy)
    assert ModelSpec("local", str(copy)).fingerprint() == ModelSpec("local", str(world / "base")).fingerprint()
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert ModelSpec("local", str(copy)).fingerprint() != ModelSpec("local", str(world / "base")).fingerprint()


def test_hub_dataset_path_reads_a_local_dataset_folder(tmp_path):
    from core.datasets import read_hub

    folder = tmp_path / "hubish"
    folder.mkdir()
    (folder / "test.jsonl").write_text(
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "a"}) + "\n"
        + json.dumps({"problem": "2+2?", "answer": "4", "unique_id": "b"}) + "\n")
    dataset = read_hub(str(folder), "local", split="test", question_field="problem",
                       answer_field="answer", id_field="unique_id")
    assert [(q.id, q.question, q.reference) for q in dataset.questions] == [("a", "1+1?", "2"),
                                                                            ("b", "2+2?", "4")]
    assert dataset.head(1).key != dataset.key


def test_a_single_selected_question_is_scored_without_metrics(world):
    messages = []
    summary = pipeline.run(request(world, "single.duckdb",
                                   selection=SelectionSettings(n=1, beta=0.0, gamma=10.0, delta=2.0)),
                           log=messages.append)
    assert summary.selection["n_selected"] == 1
    assert summary.done["score"] == 2 * len(ALPHAS) and summary.done["metrics"] == 0
    assert any("metrics: skipped" in m for m in messages)


def test_series_selects_questions_correct_for_every_model_and_shares_work(world):
    pipeline.run(request(world, "series.duckdb"), log=quiet)  # the pair first, same cache
    summary = pipeline.run(request(world, "series.duckdb", pair="tiny-series"), log=quiet)
    # The base and tiny-post generations exist already: only tiny-post2 generates.
    assert summary.done["generate"] == 12
    cache = ResultCache.open(world / "series.duckdb")
    runs = cache.runs()
    series = runs[runs["pair"] == "tiny-series"]
    assert sorted(series["post_label"]) == ["tiny-post", "tiny-post2"]
    key = series.iloc[0].run_key
    _, base_ids = sample_matrices(cache, key, 0.5, "base")
    for post in ("tiny-post", "tiny-post2"):
        assert sample_matrices(cache, key, 0.5, post)[1] == base_ids
    with Store(world / "series.duckdb").read() as con:
        correct = dict(con.execute("""
            SELECT g.question_id, bool_and(gr.correct) FROM generations g JOIN grades gr USING (generation_key)
            JOIN run_models m ON m.model_key = g.model_key AND m.run_key = ?
            GROUP BY g.question_id""", [key]).fetchall())
    assert set(base_ids) <= {q for q, ok in correct.items() if ok}
    assert len(cache.metric_table().query("run_key == @key")) == 2 * len(ALPHAS) * 6


def count_generated_prompts(monkeypatch) -> list:
    """Every prompt the generate stage hands to the model, from now on."""
    from core import generation

    prompts = []
    original = generation.generate_greedy_detailed

    def counting(model, tokenizer, batch, *args, **kwargs):
        prompts.extend(batch)
        return original(model, tokenizer, batch, *args, **kwargs)
    monkeypatch.setattr(generation, "generate_greedy_detailed", counting)
    return prompts


def test_a_prefix_then_the_full_dataset_generates_each_answer_once(world, monkeypatch):
    prompts = count_generated_prompts(monkeypatch)
    first = pipeline.run(request(world, "prefix.duckdb", limit=6), log=quiet)
    assert len(prompts) == first.done["generate"] == 2 * 6
    prompts.clear()
    full = pipeline.run(request(world, "prefix.duckdb"), log=quiet)
    assert len(prompts) == full.done["generate"] == 2 * (12 - 6)
    assert full.done["grade"] == 2 * (12 - 6)
    assert full.run_key != first.run_key  # a run of its own over the shared answers
    with Store(world / "prefix.duckdb").read() as con:
        assert fetch_one(con, "SELECT count(*) FROM generations")[0] == 24


def test_the_same_question_in_another_dataset_file_reuses_its_answer(world, monkeypatch):
    first = pipeline.run(request(world, "content.duckdb"), log=quiet)
    prompts = count_generated_prompts(monkeypatch)
    renamed = pipeline.run(request(world, "content.duckdb", dataset="renamed"), log=quiet)
    assert prompts == [] and renamed.done["generate"] == 0 and renamed.done["grade"] == 0
    assert renamed.run_key != first.run_key
    cache = ResultCache.open(world / "content.duckdb")
    samples = cache.samples(renamed.run_key, 0.5)
    assert all(qid.startswith("r") for qid in samples["question_id"])
    with Store(world / "content.duckdb").read() as con:
        # Provenance: the answers keep the dataset and id they were first generated under.
        assert {row[0] for row in con.execute("SELECT DISTINCT question_id FROM generations").fetchall()} \
            == {f"q{i}" for i in range(12)}


def test_plan_counts_what_the_stages_then_do(world):
    fresh = request(world, "plan.duckdb", alphas=(0.5,), limit=8)
    before = pipeline.plan(fresh)
    assert not (world / "plan.duckdb").exists()  # plan writes nothing
    done = pipeline.run(fresh, log=quiet).done
    for stage in ("generate", "grade", "select", "metrics"):
        assert before["missing"][stage] == done[stage], stage
    # Until grading, which questions are selected is unknown: plan counts n of them.
    assert before["missing"]["score"] >= done["score"]
    # Once every answer is graded (a new alpha of the run; a new run with another selection over
    # the same answers), plan says exactly what the stages then do.
    fewer = SelectionSettings(n=4, beta=0.0, gamma=10.0, delta=2.0)
    for changed in (request(world, "plan.duckdb", alphas=(0.1, 0.5), limit=8),
                    request(world, "plan.duckdb", alphas=(0.1, 0.5), limit=8, selection=fewer)):
        planned = pipeline.plan(changed)["missing"]
        assert planned == pipeline.run(changed, log=quiet).done
        assert pipeline.plan(changed)["missing"] == dict.fromkeys(planned, 0)


def test_request_file_round_trip_and_the_cli_reads_it(world, tmp_path, capsys):
    req = request(world, "request.duckdb", alphas=(0.5, 0.1), limit=6,
                  generation=GenerationSettings(gen_batch_size=3))
    path = req.to_file(tmp_path / "job.request.json")
    assert RunRequest.from_file(path) == req
    assert main(["plan", "--request", str(path), "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert estimate["missing"]["generate"] == 2 * 6 and estimate["run_key"]
    assert main(["run", "--request", str(path)]) == 0
    assert ResultCache.open(req.cache).runs().iloc[0].run_key == estimate["run_key"]
    assert main(["run", "--request", str(path), "--pair", "tiny"]) == 2
    assert "--request FILE names the pair" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"pair": "tiny"}')
    with pytest.raises(ConfigError, match="bad.json is not a run request"):
        RunRequest.from_file(tmp_path / "bad.json")


def test_ray_stays_optional_the_local_executor_never_imports_it():
    # A fresh process: another test of the session may have imported Ray.
    check = ("import sys, core.pipeline, core.commands.run, core.jobs\n"
             "from core.executors import make_executor\n"
             "make_executor('local').close()\n"
             "assert 'ray' not in sys.modules, 'the local executor imported ray'\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = [line for line in (REPO / "requirements-ray.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert extra["ray"] == pinned, "pyproject's `ray` extra and requirements-ray.txt disagree"
