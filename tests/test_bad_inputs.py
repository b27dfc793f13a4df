"""Bad inputs and faults, as a new user meets them (issue 13): every expected failure of the CLI is
one `error:` line and exit code 2, said before any model work where it can be; a damaged cache is
refused and left byte for byte as it was; the parsers of user files give a clear error or a valid
result on arbitrary bytes.

With CIRCUITDIFF_BAD_INPUTS_TABLE=<file.md> the CLI cases also write the table of the issue's note:
input, exit code, first line of the message.

Faults tested where their machinery lives: resume after kill -9 (tests/test_store.py and
tests/test_pipeline.py), readers during a write (tests/test_store.py, tests/test_query.py), the
crafted and foreign exports (tests/test_exchange.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.__main__ import main
from core.commands.score import read_samples
from core.datasets import DatasetError, read_jsonl
from core.errors import InputError
from core.models import (ModelNotLoadableError, ModelSpec, TokenizerMismatchError, check_loadable,
                         check_same_tokenizer)
from core.query import ResultCache
from core.runstore import RunStore
from core.store import SCHEMA_VERSION, CacheCorruptError, Store
from core.synthetic import build_tiny_model, tiny_tokenizer
from core.templates import get_template

TABLE_ENV = "CIRCUITDIFF_BAD_INPUTS_TABLE"
_TABLE: list[tuple[str, int, str]] = []


@pytest.fixture(scope="module", autouse=True)
def bad_input_table():
    """Writes the rows the CLI cases collected, when asked to."""
    yield
    target = os.environ.get(TABLE_ENV)
    if target:
        lines = ["| input | exit code | first line of the message |", "|---|---|---|"]
        lines += [f"| {what} | {code} | `{line.replace('|', '/')}` |" for what, code, line in _TABLE]
        Path(target).write_text("\n".join(lines) + "\n")


def cli(what: str, argv: list[str]) -> tuple[int, str]:
    """Run `python -m core argv` in this process: its exit code and its one `error:` line, which
    must be the last line of stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = err.getvalue().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err.getvalue()
    _TABLE.append((what, code, errors[0]))
    return code, errors[0]


def refused(what: str, argv: list[str], first_line: str) -> str:
    """The CLI case exits 2 and its message starts with `error: ` + first_line (a regex)."""
    import re

    code, line = cli(what, argv)
    assert code == 2
    assert re.match("error: " + first_line, line), line
    return line


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the world: two tiny models, a config, a dataset, a cache --------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "base", tokenizer, seed=0)
    build_tiny_model(root / "other", tiny_tokenizer(extra_words=("extra",)), seed=2)
    (root / "data.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} plus 1", "answer": str(i + 1)}) + "\n"
        for i in range(4)))
    (root / "pairs.toml").write_text(f"""
[pairs.tiny]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'base'}", label = "tiny-post", algorithm = "GRPO" }}
template = "deepseek-math"
max_new_tokens = 4

[pairs.mismatch]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'other'}", label = "other", algorithm = "PPO" }}
template = "deepseek-math"
max_new_tokens = 4

[datasets.tiny]
jsonl = "{root / 'data.jsonl'}"
""")
    return root


def run_argv(world: Path, cache: Path, *extra: str, pair: str = "tiny", dataset: str = "tiny") -> list[str]:
    return ["run", "--pair", pair, "--dataset", dataset, "--config", str(world / "pairs.toml"),
            "--cache", str(cache), "--alpha", "0.5", *extra]


def cache_with_a_run(path: Path, n_samples: int = 300, n_edges: int = 4000) -> Path:
    """A cache holding one run and enough score vectors to span many DuckDB blocks."""
    runs = RunStore(Store(path))
    runs.write_run({"run_key": "r1", "name": "tiny", "kind": "pair", "t_bar": 10.0,
                    "n_selected": n_samples, "score_key": "s"},
                   [{"label": "tiny-base", "role": "base", "model_key": "m", "position": 0}], [],
                   {0.5: 5})
    rows = [{"generation_key": f"g{i}", "t_cut": 5, "score_key": "s", "model_key": "m",
             "dataset_key": "d", "question_id": str(i), "loss": 1.0, "seconds": 0.1,
             "n_scored_tokens": 5, "scored_text": "x"} for i in range(n_samples)]
    vectors = np.random.default_rng(0).standard_normal((n_samples, n_edges)).astype(np.float32)
    runs.write_scores("r1", rows, vectors)
    return path


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    """A cache cut to half its size."""
    path = cache_with_a_run(tmp_path_factory.mktemp("truncated") / "cache.duckdb")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return path


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores file modes: then a kernel folder)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    kernel = Path("/sys/kernel")
    try:
        (kernel / "probe").touch()
    except OSError:
        return kernel
    pytest.skip("no folder here refuses writes to this process")


# --- a damaged cache is refused by every entry, and never written --------------------------------

DAMAGED = r"the cache file .*cache\.duckdb is damaged \(block \d+ is in use .* it was cut short\)"


def test_ls_refuses_a_half_truncated_cache_and_leaves_its_bytes(truncated):
    before = sha256(truncated)
    refused("`ls` on a cache cut to half its size", ["ls", "--cache", str(truncated)], DAMAGED)
    assert sha256(truncated) == before


def test_run_refuses_a_half_truncated_cache_before_any_model_work(world, truncated, monkeypatch):
    before = sha256(truncated)
    monkeypatch.setattr(ModelSpec, "load_tokenizer", lambda self: pytest.fail("model work began"))
    refused("`run` into a cache cut to half its size", run_argv(world, truncated), DAMAGED)
    assert sha256(truncated) == before


def test_the_read_model_refuses_a_half_truncated_cache(truncated):
    before = sha256(truncated)
    with pytest.raises(CacheCorruptError, match=DAMAGED):
        ResultCache.open(truncated).runs()
    assert sha256(truncated) == before


def test_import_into_a_half_truncated_cache_is_refused_unwritten(tmp_path, truncated):
    good = cache_with_a_run(tmp_path / "good.duckdb", n_samples=3, n_edges=10)
    assert main(["export", "--cache", str(good), "--run", "r1", "--out", str(tmp_path / "export")]) == 0
    before = sha256(truncated)
    refused("`import` into a cache cut to half its size",
            ["import", str(tmp_path / "export"), "--cache", str(truncated)], DAMAGED)
    assert sha256(truncated) == before


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.duckdb"
    path.write_bytes(b"not a database" * 1000)
    refused("`ls` on a file that is not a database", ["ls", "--cache", str(path)],
            r"the cache file .* is damaged")
    assert path.read_bytes() == b"not a database" * 1000


def test_a_foreign_duckdb_file_is_not_taken_over(tmp_path):
    import duckdb

    path = tmp_path / "cache.duckdb"
    duckdb.connect(str(path)).execute("CREATE TABLE mine (x INTEGER)").close()
    refused("`ls` on another program's DuckDB file", ["ls", "--cache", str(path)],
            r"the file .* is a DuckDB database but not a circuitdiff cache \(no meta table\)")
    with pytest.raises(CacheCorruptError, match="not a circuitdiff cache"):
        with Store(path).write():
            pass


def test_a_cache_missing_a_table_is_refused(tmp_path):
    path = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    with Store(path).write() as con:
        con.execute("DROP TABLE grades")
    refused("`ls` on a cache missing a table", ["ls", "--cache", str(path)],
            r"the cache file .* is damaged \(the table grades is missing\)")


def test_an_older_schema_version_asks_for_migrate(tmp_path):
    path = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    with Store(path).write() as con:
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    refused("`ls` on a schema version 1 cache", ["ls", "--cache", str(path)],
            rf"the cache .* has schema version 1, this code reads version {SCHEMA_VERSION}: run `python -m core "
            r"migrate --cache")


def test_a_directory_given_as_cache_is_refused(tmp_path):
    refused("`ls --cache` naming a folder", ["ls", "--cache", str(tmp_path)],
            r"the cache .* is a folder; give the path of the cache file")


def test_run_into_a_read_only_folder_is_refused_before_work(world, tmp_path, monkeypatch):
    folder = read_only_folder(tmp_path)
    monkeypatch.setattr(ModelSpec, "load_tokenizer", lambda self: pytest.fail("model work began"))
    refused("`run` with the cache in a read-only folder", run_argv(world, folder / "cache.duckdb"),
            r"the cache .* cannot be written \(.*\); make its folder writable")


def test_two_runs_at_once_the_second_is_refused(world, tmp_path):
    cache = tmp_path / "cache.duckdb"
    # flock: a second lock object conflicts even within this process.
    with Store(cache).writer_lock():
        refused("a second `run` while another writes the cache", run_argv(world, cache),
                r"another process is writing to the cache .*: wait for its run to finish")


# --- export and import (the rest in tests/test_exchange.py) --------------------------------------

def test_export_of_an_unknown_run_leaves_no_folder(tmp_path):
    cache = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    refused("`export --run` of an unknown run",
            ["export", "--cache", str(cache), "--run", "nope", "--out", str(tmp_path / "out")],
            r"no run 'nope' in the cache")
    assert not (tmp_path / "out").exists()


def test_export_onto_an_existing_file_is_refused(tmp_path):
    cache = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    (tmp_path / "out").write_text("mine")
    refused("`export --out` onto an existing file",
            ["export", "--cache", str(cache), "--run", "r1", "--out", str(tmp_path / "out")],
            r".*out already exists and is not an empty folder")
    assert (tmp_path / "out").read_text() == "mine"


def test_import_of_a_folder_that_is_no_export(tmp_path):
    (tmp_path / "folder").mkdir()
    refused("`import` of a folder without a manifest",
            ["import", str(tmp_path / "folder"), "--cache", str(tmp_path / "cache.duckdb")], r".*manifest")
    assert not (tmp_path / "cache.duckdb").exists()


def test_import_of_an_export_of_another_schema_version(tmp_path):
    cache = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    assert main(["export", "--cache", str(cache), "--run", "r1", "--out", str(tmp_path / "export")]) == 0
    manifest = tmp_path / "export" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": "1"}))
    refused("`import` of an export of schema version 1",
            ["import", str(tmp_path / "export"), "--cache", str(tmp_path / "new.duckdb")],
            rf".*manifest\.json: the export has cache schema version '1', this code imports version '{SCHEMA_VERSION}'")


# --- score: samples, output path, model files ------------------------------------------------------

def sample_line(**changes) -> str:
    return json.dumps({"id": "s1", "prompt_ids": [1, 5, 6], "answer_ids": [7, 8, 9], "t_cut": 2,
                       **changes})


def score_argv(world: Path, samples: Path, out: Path, model: Path | None = None) -> list[str]:
    return ["score", "--model", str(model or world / "base"), "--samples", str(samples),
            "--out", str(out), "--dtype", "float64"]


SAMPLE_CASES = {
    "a samples line that is not JSON": ("{not json", r".*samples\.jsonl, line 2: not a JSON line"),
    "a string token id": (sample_line(answer_ids=[7, "8", 9]),
                          r".*samples\.jsonl, line 2: sample 's1': answer_ids\[1\] = '8' is not a "
                          r"token id"),
    "a negative token id": (sample_line(prompt_ids=[1, -5]),
                            r".*samples\.jsonl, line 2: sample 's1': prompt_ids\[1\] = -5 is not a "
                            r"token id"),
    "t_cut 1.9": (sample_line(t_cut=1.9),
                  r".*samples\.jsonl, line 2: sample 's1': t_cut = 1\.9 is not an integer"),
    "t_cut beyond the answer": (sample_line(t_cut=4),
                                r".*samples\.jsonl, line 2: sample 's1': t_cut=4 must lie in \[1, "),
    "an empty prompt": (sample_line(prompt_ids=[]),
                        r".*samples\.jsonl, line 2: sample 's1': prompt_ids is empty"),
    "a line without t_cut": (json.dumps({"id": "s1", "prompt_ids": [1], "answer_ids": [2]}),
                             r".*samples\.jsonl, line 2: not a sample; expected an object with keys"),
    "prompt_ids given as a string": (sample_line(prompt_ids="1 5 6"),
                                     r".*samples\.jsonl, line 2: prompt_ids is str, not a list"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_a_bad_samples_line_is_named_by_file_and_line(world, tmp_path, case):
    line, message = SAMPLE_CASES[case]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n" + line + "\n")
    refused(f"`score`: {case}", score_argv(world, samples, tmp_path / "out.npz"), message)


def test_token_ids_outside_the_vocabulary_are_refused_before_scoring(world, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line(answer_ids=[7, 10_000, 9]) + "\n")
    refused("`score`: a token id outside the vocabulary",
            score_argv(world, samples, tmp_path / "out.npz"), r"sample 's1': .*10000.* vocabulary")


def test_missing_and_empty_samples_files(world, tmp_path):
    refused("`score`: a samples file that does not exist",
            score_argv(world, tmp_path / "absent.jsonl", tmp_path / "out.npz"),
            r"samples file .*absent\.jsonl does not exist")
    (tmp_path / "empty.jsonl").write_text("\n")
    refused("`score`: an empty samples file", score_argv(world, tmp_path / "empty.jsonl",
                                                         tmp_path / "out.npz"), r".*empty\.jsonl holds no samples")


def test_out_that_is_a_directory_is_refused_before_the_model_loads(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    # No model exists there: the refusal must come before loading it.
    refused("`score --out` naming a folder",
            ["score", "--model", str(tmp_path / "no-model"), "--samples", str(samples), "--out",
             str(tmp_path)], r"--out .* is a directory; give the path of a file")


def test_out_in_a_read_only_folder_is_refused_before_the_model_loads(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    folder = read_only_folder(tmp_path)
    refused("`score --out` in a read-only folder",
            ["score", "--model", str(tmp_path / "no-model"), "--samples", str(samples), "--out",
             str(folder / "out.npz")], r"--out .* cannot be written \(")


def test_model_files_that_cannot_load(world, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    out = tmp_path / "out.npz"
    refused("`score --model` naming a file", score_argv(world, samples, out, world / "data.jsonl"),
            r"cannot load model .*data\.jsonl.*is not a folder")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((world / "base" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    refused("`score --model`: a folder with only pickled weights", score_argv(world, samples, out, pickled),
            r"cannot load model .*only pickled weights \(\['pytorch_model\.bin'\]\), which can run code")
    refused("`score --model`: an unknown hub id, offline",
            ["score", "--model", "nobody/no-such-model", "--samples", str(samples), "--out", str(out)],
            r"cannot load model 'nobody/no-such-model': it is neither a local folder")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "modeling.Mystery"}}))
    (remote / "model.safetensors").write_bytes(b"")
    (remote / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    refused("`score --model`: a model that needs its own code", score_argv(world, samples, out, remote),
            r"cannot load model .*remote': its model type 'mystery' is known only to the code it "
            r"ships \(auto_map in config\.json\), which is not run without --trust-remote-code")


def test_nan_scores_advise_float64_when_scoring_in_float32(world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "base")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    line = refused("`score`: a model whose loss is not finite (float32)",
                   ["score", "--model", str(tmp_path / "inf"), "--samples", str(samples), "--out",
                    str(tmp_path / "out.npz"), "--dtype", "float32"], r"non-finite .*")
    assert "float64" in line and "score in float32" not in line


# --- metrics ----------------------------------------------------------------------------------------

def test_metrics_on_a_file_that_is_no_npz_never_advises_pickle(tmp_path):
    (tmp_path / "scores.npz").write_text("hello")
    line = refused("`metrics --scores` on a text file", ["metrics", "--scores", str(tmp_path / "scores.npz")],
                   r".*scores\.npz is not an \.npz written by `python -m core score`")
    assert "pickle" not in line.lower() and "unsafe" not in line.lower()
    refused("`metrics --scores` naming no file", ["metrics", "--scores", str(tmp_path / "absent.npz")],
            r"score file .*absent\.npz does not exist")


# --- run and plan: config, dataset, models -----------------------------------------------------------

def test_unknown_pair_names_the_config_file_given(world, tmp_path):
    refused("`run --pair` unknown (with --config)", run_argv(world, tmp_path / "c.duckdb", pair="nope"),
            rf"unknown pair or series 'nope'; .*\({world / 'pairs.toml'}\)")


def test_unknown_dataset_name_lists_the_known_ones(world, tmp_path):
    refused("`run --dataset` unknown name", run_argv(world, tmp_path / "c.duckdb", dataset="nope"),
            r"unknown dataset 'nope'; known: \['tiny'\]")


def test_missing_dataset_path_is_reported_as_missing(world, tmp_path):
    refused("`run --dataset` a .jsonl path that does not exist",
            run_argv(world, tmp_path / "c.duckdb", dataset=str(tmp_path / "absent.jsonl")),
            r"dataset file .*absent\.jsonl does not exist")


DATASET_CASES = {
    "a dataset line that is not JSON": ("{oops", r".*data\.jsonl, line 3: not a JSON object"),
    "a dataset record without a reference answer": (json.dumps({"question": "q"}),
                                                    r".*data\.jsonl, line 3: no reference answer"),
    "a dataset line that is a list": ("[1, 2]", r".*data\.jsonl, line 3: a record must be a JSON object"),
    "a dataset with an id twice": (json.dumps({"id": "a", "question": "q", "answer": "1"}),
                                   r"dataset 'data' \(jsonl:.*data\.jsonl\) has the question id 'a' twice"),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_a_bad_dataset_line_is_named_by_file_and_line(world, tmp_path, case):
    line, message = DATASET_CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n\n" + line + "\n")
    refused(f"`run --dataset`: {case}", run_argv(world, tmp_path / "c.duckdb", dataset=str(data)), message)


def test_request_flags_that_conflict_or_are_missing(world, tmp_path):
    request = tmp_path / "request.json"
    request.write_text("{}")
    refused("`run --request` together with --pair", ["run", "--request", str(request), "--pair", "tiny"],
            r"--request FILE names the pair")
    refused("`run` without --pair", ["run", "--dataset", "tiny"], r"give --pair and --dataset")


@pytest.mark.parametrize("alpha", ["0", "1.5", "-0.1"])
def test_alpha_out_of_range(world, tmp_path, alpha):
    argv = run_argv(world, tmp_path / "c.duckdb")
    argv[argv.index("--alpha") + 1] = alpha
    refused(f"`run --alpha {alpha}`", argv, r".*alpha")


def test_mismatched_vocabularies_are_refused_naming_the_difference(world, tmp_path):
    refused("`plan` for a pair whose vocabularies differ",
            ["plan", *run_argv(world, tmp_path / "c.duckdb", pair="mismatch")[1:]],
            r"models 'tiny-base' and 'other' have different tokenizers: their vocabularies differ "
            r"\(\d+ vs \d+ tokens")


def test_no_question_answered_correctly_by_both(world, tmp_path):
    data = tmp_path / "wrong.jsonl"
    data.write_text("".join(json.dumps({"id": f"w{i}", "question": f"What is {i} plus 1",
                                        "answer": "no such answer"}) + "\n" for i in range(2)))
    refused("`run` where no question is answered correctly by every model",
            run_argv(world, tmp_path / "c.duckdb", dataset=str(data)), r"no question of 2 was answered")


# --- checks the pipeline runs before its first generation ----------------------------------------

def test_every_model_of_a_pair_is_checked_loadable_without_loading(world, tmp_path):
    broken = tmp_path / "post"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((world / "base" / name).read_bytes())
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"")
    check_loadable([("tiny-base", ModelSpec("local", str(world / "base")))])
    with pytest.raises(ModelNotLoadableError, match=r"1 model\(s\) cannot be loaded: tiny-post: "
                                                    r"model\.safetensors\.index\.json names 2 weight "
                                                    r"files, 1 missing"):
        check_loadable([("tiny-base", ModelSpec("local", str(world / "base"))),
                        ("tiny-post", ModelSpec("local", str(broken)))])
    adapter = ModelSpec("adapter", str(tmp_path / "adapter"), base=ModelSpec("local", str(world / "base")))
    with pytest.raises(ModelNotLoadableError, match="lora: the adapter folder .* has no adapter_config"):
        check_loadable([("lora", adapter)])


def test_tokenizers_are_compared_on_what_the_run_feeds_the_models():
    from tokenizers import normalizers

    plain, chat = get_template("deepseek-math"), get_template("chat-boxed")
    questions = [type("Q", (), {"id": "q1", "question": "What is 2 plus 3"})()]
    base, post = tiny_tokenizer(), tiny_tokenizer()
    # An RL checkpoint's own pad token and chat template: the plain template's ids are the same.
    post.pad_token = "</s>"
    base.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    post.chat_template = "{% for m in messages %}User: {{ m['content'] }}{% endfor %}"
    check_same_tokenizer([("base", base), ("post", post)], plain, questions)
    with pytest.raises(TokenizerMismatchError, match="chat templates differ and the prompt template "
                                                     "'chat-boxed' uses it"):
        check_same_tokenizer([("base", base), ("post", post)], chat, questions)
    post.chat_template = base.chat_template
    # Same vocabulary, other ids for the same prompt.
    post.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(TokenizerMismatchError, match=r"the prompt of question 'q1' becomes \d+ vs \d+ "
                                                     r"ids, first differing at position 0"):
        check_same_tokenizer([("base", base), ("post", post)], plain, questions)


# --- the parsers of user files on arbitrary bytes -------------------------------------------------

JSONISH = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.just(b'{"question": "q", "answer": "1"}'), st.just(b'{"id": 1'),
                       st.just(b"\xff\xfe"), st.just(b"[]"), st.just(b"null"), st.just(b"\n"),
                       st.just(b'{"question": {"a": [1]}, "solution": "\\\\boxed{'),
                       st.just(b'{"problem": "p", "final_answer": NaN, "idx": 1e999}'),
                       st.binary(max_size=20)), max_size=12).map(b"\n".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=JSONISH)
def test_the_jsonl_dataset_parser_gives_a_dataset_or_a_dataset_error(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    try:
        dataset = read_jsonl(path)
    except DatasetError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:
        assert dataset.questions and all(isinstance(q.id, str) and isinstance(q.reference, str)
                                         for q in dataset.questions)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.lists(st.one_of(
    st.just(sample_line().encode()), st.just(sample_line(t_cut=True).encode()),
    st.just(b'{"id": 1, "prompt_ids": [1e3], "answer_ids": [2], "t_cut": 1}'), st.binary(max_size=20)),
    max_size=6).map(b"\n".join)))
def test_the_samples_parser_gives_samples_or_an_input_error(tmp_path, content):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(content)
    try:
        samples = read_samples(path)
    except InputError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:
        assert all(1 <= s.t_cut <= len(s.answer_ids) for s in samples)


# --- issue 29: bytes overwritten inside a cache file ----------------------------------------------

OVERWRITTEN = (r"the cache file .*cache\.duckdb is damaged \(1 of its \d+ blocks of \d+ bytes fails its "
               r"checksum, block \d+: bytes inside the file were overwritten\)")


@pytest.fixture(scope="module")
def overwritten(tmp_path_factory) -> Path:
    """A cache whose middle 4 KiB were overwritten with random bytes (its size unchanged)."""
    path = cache_with_a_run(tmp_path_factory.mktemp("overwritten") / "cache.duckdb")
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(np.random.default_rng(1).bytes(4096))
    return path


def _files_beside(path: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in path.parent.iterdir() if p.is_file()}


def test_a_fresh_cache_verifies_block_by_block(tmp_path):
    """The checksum check reads DuckDB's own format: a whole file must pass it (a DuckDB release
    that changed the format would fail here, not refuse a user's good cache)."""
    from core.store import bad_blocks

    path = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=50)
    n_blocks = (path.stat().st_size - 3 * 4096) // 262144
    assert n_blocks > 3 and bad_blocks(path, 262144, n_blocks) == []


@pytest.mark.parametrize("command", ["ls", "report", "export", "import", "run"])
def test_bytes_overwritten_inside_a_cache_are_refused_by_every_entry_and_nothing_is_written(
        world, overwritten, tmp_path, monkeypatch, command):
    good = tmp_path / "good" / "cache.duckdb"
    if command == "import":
        cache_with_a_run(good, n_samples=3, n_edges=10)
        assert main(["export", "--cache", str(good), "--run", "r1", "--out", str(tmp_path / "export")]) == 0
    monkeypatch.setattr(ModelSpec, "load_tokenizer", lambda self: pytest.fail("model work began"))
    argv = {"ls": ["ls", "--cache", str(overwritten)],
            "report": ["report", "--cache", str(overwritten), "--run", "r1", "--out",
                       str(tmp_path / "report.html")],
            "export": ["export", "--cache", str(overwritten), "--run", "r1", "--out",
                       str(tmp_path / "out")],
            "import": ["import", str(tmp_path / "export"), "--cache", str(overwritten)],
            "run": run_argv(world, overwritten)}[command]
    before = _files_beside(overwritten)
    refused(f"`{command}` on a cache with 4 KiB overwritten in its middle", argv, OVERWRITTEN)
    assert _files_beside(overwritten) == before  # no byte changed, no WAL or lock file added
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "out").exists()


def test_the_read_model_refuses_a_cache_with_overwritten_bytes(overwritten):
    before = sha256(overwritten)
    with pytest.raises(CacheCorruptError, match=OVERWRITTEN):
        ResultCache.open(overwritten).runs()
    assert sha256(overwritten) == before


# --- issue 29: weights are safetensors only, and well-formed --------------------------------------

def model_copy(world: Path, folder: Path) -> Path:
    """A copy of the world's base model folder, to damage."""
    folder.mkdir()
    for file in (world / "base").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def pickled_behind_an_index(world: Path, folder: Path) -> Path:
    """A model whose safetensors index maps every weight to a pickled pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    model_copy(world, folder)
    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(weights, "pytorch_model.bin")}))
    return folder


PICKLE_BEHIND_INDEX = (r".*model\.safetensors\.index\.json maps weights to \['pytorch_model\.bin'\], "
                       r"which is not safetensors \(a pickled file can run code when loaded\)")


def test_an_index_that_maps_weights_to_a_pickle_is_refused_everywhere(world, tmp_path, monkeypatch):
    from core.user_pairs import check_pair, model_declaration, pair_declaration

    pickled = pickled_behind_an_index(world, tmp_path / "pickled")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    monkeypatch.setattr("torch.load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    refused("`score --model`: an index mapping weights to pytorch_model.bin",
            score_argv(world, samples, tmp_path / "out.npz", pickled), "cannot load model " + PICKLE_BEHIND_INDEX)
    config = tmp_path / "pairs.toml"
    config.write_text((world / "pairs.toml").read_text().replace(
        f'post = {{ path = "{world / "base"}", label = "tiny-post"', f'post = {{ path = "{pickled}", label = "tiny-post"', 1))
    monkeypatch.setattr(ModelSpec, "load_tokenizer", lambda self: pytest.fail("model work began"))
    refused("`run` with a post model whose index maps weights to a pickle",
            ["run", "--pair", "tiny", "--dataset", "tiny", "--config", str(config), "--cache",
             str(tmp_path / "c.duckdb"), "--alpha", "0.5"], r"1 model\(s\) cannot be loaded: tiny-post: " + PICKLE_BEHIND_INDEX)
    assert not (tmp_path / "c.duckdb").exists()
    declaration = pair_declaration(model_declaration("folder", str(world / "base")),
                                   model_declaration("folder", str(pickled)), "deepseek-math", 4, "tiny")
    problems = check_pair("new", declaration, config_path=str(world / "pairs.toml"),
                          cache=str(tmp_path / "c.duckdb"))
    assert any(re.match("pickled: " + PICKLE_BEHIND_INDEX, p) for p in problems), problems


def damaged_weights(world: Path, folder: Path, how: str) -> Path:
    model_copy(world, folder)
    weights = folder / "model.safetensors"
    if how == "random bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    elif how == "cut to half":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    else:  # a config of another model size
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 24}))
    return folder


WEIGHT_CASES = {
    "random bytes": r"model\.safetensors is not a safetensors file \(its first 8 bytes declare a \d+-byte "
                    r"header in a \d+-byte file\)",
    "cut to half": r"model\.safetensors is cut short: its header declares \d+ bytes of tensors, the file "
                   r"holds \d+; copy or download it again",
    "config of another size": r"model\.safetensors: .* has shape \[\d+(, \d+)*\] but config\.json describes "
                              r"\[\d+(, \d+)*\]; the config does not belong to these weights",
}


@pytest.mark.parametrize("how", list(WEIGHT_CASES))
def test_malformed_weights_are_one_line_before_any_work(world, tmp_path, how):
    folder = damaged_weights(world, tmp_path / "model", how)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line() + "\n")
    refused(f"`score --model`: model.safetensors with {how}",
            score_argv(world, samples, tmp_path / "out.npz", folder), r"cannot load model .*" + WEIGHT_CASES[how])
    with pytest.raises(ModelNotLoadableError, match=r"1 model\(s\) cannot be loaded: m: " + WEIGHT_CASES[how]):
        check_loadable([("m", ModelSpec("local", str(folder)))])


def test_an_adapter_whose_weights_are_random_bytes_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelNotLoadableError, match=r"adapter_model\.safetensors is not a safetensors file"):
        check_loadable([("lora", ModelSpec("adapter", str(folder), base=ModelSpec("local", str(tmp_path))))])


def test_a_pair_with_nan_weights_is_refused_naming_them_before_generating(world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "base")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "nan" / name).write_bytes((world / "base" / name).read_bytes())
    config = tmp_path / "pairs.toml"
    config.write_text((world / "pairs.toml").read_text().replace(
        f'post = {{ path = "{world / "base"}", label = "tiny-post"', f'post = {{ path = "{tmp_path / "nan"}", label = "tiny-post"', 1))
    refused("`run` with a post model whose weights hold a NaN",
            ["run", "--pair", "tiny", "--dataset", "tiny", "--config", str(config), "--cache",
             str(tmp_path / "c.duckdb"), "--alpha", "0.5"],
            r"the model .*nan has non-finite weights \(NaN or inf\) in 1 tensor\(s\), first "
            r"\['model\.layers\.0\.mlp\.up_proj\.weight'\]")
    with Store(tmp_path / "c.duckdb").read() as con:
        assert con.execute("SELECT count(*) FROM generations WHERE answer_text IS NOT NULL "
                           "AND model_key IN (SELECT model_key FROM models WHERE label = 'tiny-post')"
                           ).fetchone()[0] == 0


# --- issue 29: architectures and positions, checked before generating --------------------------------

def test_an_unsupported_architecture_is_refused_before_generating(world, tmp_path, monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = tiny_tokenizer()
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    config = tmp_path / "pairs.toml"
    config.write_text((world / "pairs.toml").read_text().replace(str(world / "base"), str(tmp_path / "opt")))
    monkeypatch.setattr("core.pipeline.GenerationJob", lambda *a, **k: pytest.fail("generation began"))
    refused("`run` on a pair of an unsupported architecture (OPT)",
            ["run", "--pair", "tiny", "--dataset", "tiny", "--config", str(config), "--cache",
             str(tmp_path / "c.duckdb"), "--alpha", "0.5"],
            r"2 model\(s\) cannot be loaded: tiny-base: architecture OPTForCausalLM is not supported "
            r"\(supported: LlamaForCausalLM")
    assert not (tmp_path / "c.duckdb").exists()


def gpt2_world(world: Path, folder: Path, n_positions: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2,
                               n_positions=n_positions, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_gpt2_prompt_longer_than_its_positions_is_refused_before_generating(world, tmp_path, monkeypatch):
    gpt2 = gpt2_world(world, tmp_path / "gpt2", n_positions=12)
    config = tmp_path / "pairs.toml"
    config.write_text((world / "pairs.toml").read_text().replace(str(world / "base"), str(gpt2)))
    monkeypatch.setattr("core.pipeline.GenerationJob", lambda *a, **k: pytest.fail("generation began"))
    refused("`run` on GPT-2 with prompts longer than n_positions",
            ["run", "--pair", "tiny", "--dataset", "tiny", "--config", str(config), "--cache",
             str(tmp_path / "c.duckdb"), "--alpha", "0.5"],
            r"4 question\(s\) of dataset 'tiny' \(first 'q0', up to \d+ prompt tokens\) would run past "
            r"the 12 positions .* has embeddings for with max_new_tokens 4; lower max_new_tokens")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(sample_line(prompt_ids=[1] * 12, answer_ids=[7, 8], t_cut=2) + "\n")
    refused("`score` of a GPT-2 sample longer than n_positions",
            score_argv(world, samples, tmp_path / "out.npz", gpt2),
            r"sample 's1': its prompt and answer up to T_cut span 13 positions, more than the 12 the "
            r"model has position embeddings for")


# --- issue 29: metrics, selection, datasets, declarations -----------------------------------------

def test_repeated_ids_in_the_base_score_file_are_refused(world, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(sample_line(id=i) for i in ("a", "a", "b")) + "\n")
    assert main(score_argv(world, samples, tmp_path / "base.npz")) == 0
    samples.write_text("\n".join(sample_line(id=i) for i in ("a", "b")) + "\n")
    assert main(score_argv(world, samples, tmp_path / "post.npz")) == 0
    refused("`metrics` with a sample id twice in the base file",
            ["metrics", "--scores", str(tmp_path / "base.npz"), "--against", str(tmp_path / "post.npz")],
            r".*base\.npz holds the sample id 'a' more than once \(1 id\(s\) repeated\): samples are "
            r"paired by id")


def test_settings_that_select_nothing_are_refused_and_store_no_run(world, tmp_path):
    refused("`run --beta 2 --gamma 1`", run_argv(world, tmp_path / "c.duckdb", "--beta", "2", "--gamma", "1"),
            r".*beta=2\.0 > gamma=1\.0 leaves the answer length window .* empty")
    assert not (tmp_path / "c.duckdb").exists()
    # A window no answer falls in: tests/test_pipeline.py (this world's models answer nothing right).


@pytest.mark.parametrize("record, field", [
    ({"question": ["list"], "answer": "1"}, r"the question field 'question' holds list \[\"list\"\]"),
    ({"question": "q", "answer": {"value": 1}}, r"the answer field 'answer' holds dict"),
    ({"question": "q", "answer": True}, r"the answer field 'answer' holds bool true"),
    ({"id": [1], "question": "q", "answer": "1"}, r"the id field 'id' holds list"),
])
def test_dataset_fields_that_are_not_text_are_refused_not_stringified(world, tmp_path, record, field):
    from core.user_pairs import Upload, dataset_problems
    from core.config import load_config

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q", "answer": 1}) + "\n" + json.dumps(record) + "\n")
    refused(f"`run --dataset`: {json.dumps(record)}", run_argv(world, tmp_path / "c.duckdb", dataset=str(data)),
            r".*data\.jsonl, line 2: " + field + r".*; write it as a JSON string")
    _, problems = dataset_problems("upload", Upload("mine.jsonl", data.read_bytes()),
                                   load_config(str(world / "pairs.toml"), str(tmp_path / "c.duckdb")))
    assert any(re.search(field, p) for p in problems), problems


@pytest.mark.parametrize("declaration", [
    {"base": "tiny-base", "post": {"path": "x"}, "template": "deepseek-math", "max_new_tokens": 4,
     "dataset": "tiny"},
    {"base": {"adapter": "a", "base": 7}, "post": ["x"], "template": "deepseek-math",
     "max_new_tokens": 4, "dataset": "tiny"},
    ["not", "an", "object"],
])
def test_model_entries_that_are_not_objects_are_problems_not_tracebacks(world, tmp_path, declaration):
    from core.user_pairs import check_pair

    problems = check_pair("new", declaration, config_path=str(world / "pairs.toml"),
                          cache=str(tmp_path / "c.duckdb"))
    assert problems and all("must be an object" in p or p.startswith(("post model", "base model"))
                            for p in problems if "object" in p), problems
    assert any("must be an object" in p for p in problems), problems


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["hub", "path", "adapter", "base", "label",
                                                                "revision", "algorithm", "x"]),
                                               children, max_size=4)),
    max_leaves=12)
DECLARATIONS = st.one_of(JSON_VALUES, st.fixed_dictionaries(
    {}, optional={"base": JSON_VALUES, "post": JSON_VALUES, "template": JSON_VALUES,
                  "max_new_tokens": JSON_VALUES, "dataset": JSON_VALUES}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declaration=DECLARATIONS)
def test_the_pair_declaration_check_gives_problems_never_a_traceback(world, tmp_path, declaration):
    """What the New-pair form (or a hand-written declaration file) can send: problems, one line each."""
    from core.user_pairs import check_pair

    problems = check_pair("new", declaration, config_path=str(world / "pairs.toml"),
                          cache=str(tmp_path / "c.duckdb"))
    assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)
