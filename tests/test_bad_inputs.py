"""Bad inputs and faults, as a new or hostile user meets them (issues 13 and 29): every expected
failure of the CLI is one `error:` line and exit code 2, said before any model work where it can
be; a damaged cache is refused and left byte for byte as it was; the parsers of user files give a
clear error or a valid result on arbitrary bytes.

With CIRCUITDIFF_BAD_INPUTS_TABLE=<file.md> the CLI cases also write the table of the issue's note:
input, exit code, first line of the message.

Faults tested where their machinery lives: resume after kill -9 (tests/test_store.py and
tests/test_pipeline.py), readers during a write (tests/test_store.py, tests/test_query.py), the
crafted and foreign exports (tests/test_exchange.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import jobs
from core.__main__ import main
from core.commands.score import read_samples
from core.datasets import DatasetError, read_jsonl
from core.config import RunRequest
from core.errors import CircuitdiffError, InputError
from core.exchange import MANIFEST, check_manifest, export_run
from core.models import (ModelNotLoadableError, ModelSpec, TokenizerMismatchError, check_loadable,
                         check_same_tokenizer)
from core.query import ResultCache
from core.runstore import RunStore
from core.store import SCHEMA_VERSION, CacheCorruptError, Store
from core.synthetic import build_fixture_cache, build_tiny_model, tiny_tokenizer
from core.templates import get_template
from job_stand_ins import wait_for, wait_for_release
from test_exchange import copy_export, entry_of, read_manifest, replace_file, write_manifest

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
            r"the 12 positions .* has embeddings for with max_new_tokens 4; leave those questions out "
            r"of the dataset \(their prompts alone fill it\)")
    # Prompts that fit, but not with the answers' room: the limit that would do.
    longest = max(len(p) for p in [get_template("deepseek-math").render(f"What is {i} plus 1", tiny_tokenizer())[1]
                                   for i in range(4)])
    roomy = gpt2_world(world, tmp_path / "gpt2-roomy", n_positions=longest + 2)
    config.write_text((world / "pairs.toml").read_text().replace(str(world / "base"), str(roomy)))
    refused("`run` on GPT-2 with prompts that leave too little room for max_new_tokens",
            ["run", "--pair", "tiny", "--dataset", "tiny", "--config", str(config), "--cache",
             str(tmp_path / "c.duckdb"), "--alpha", "0.5"],
            rf"\d question\(s\) .* would run past the {longest + 2} positions .* with max_new_tokens 4; "
            rf"lower max_new_tokens to at most 3, or leave those questions out of the dataset")
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


# --- issue 29: import, the manifest parser, and signals to and folders of jobs ----------------------
# An import refuses values that are not finite, rows that do not belong to the exported run and more
# rows than the manifest declares or the run could have, before reading the surplus; SIGTERM or
# SIGINT to a run job is a cancel; each cache file has its own jobs. The job tests run the real
# `python -m core run --request FILE --job-id ID` path in a detached process with the pipeline
# replaced by a stand-in (this file run as a module) that commits one row and then waits.

TESTS = Path(__file__).resolve().parent


# --- import: values, keys, row bounds (item 8) -----------------------------------------------------

@pytest.fixture(scope="module")
def pair_export(tmp_path_factory) -> Path:
    """The fixture cache's pair run (a dataset, two models, two alphas, position parts), exported."""
    root = tmp_path_factory.mktemp("exchange")
    pair, _ = build_fixture_cache(root / "source.duckdb")
    export_run(Store(root / "source.duckdb"), pair, root / "export")
    return root / "export"


@pytest.fixture
def target(tmp_path) -> Path:
    """A cache holding a run already: a refused import must leave its bytes as they were."""
    return cache_with_a_run(tmp_path / "target.duckdb", n_samples=2, n_edges=5)


def import_refused(what: str, folder: Path, cache: Path, first_line: str) -> str:
    """`python -m core import` exits 2 with one `error:` line; the cache's bytes are unchanged and
    nothing was written beside it."""
    before = sha256(cache)
    line = refused(what, ["import", str(folder), "--cache", str(cache)], first_line)
    assert sha256(cache) == before
    assert not Path(f"{cache}.wal").exists()
    return line


def _vectors_file(folder: Path) -> str:
    return next(p.name for p in sorted(folder.glob("vectors_*.parquet")))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_edge_vector_that_is_not_finite_is_refused(pair_export, target, tmp_path, value):
    folder = copy_export(pair_export, tmp_path / "export")
    name = _vectors_file(folder)
    vectors = pq.read_table(folder / name)
    column = vectors.column("edge_scores").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).copy()
    values[column.type.list_size + 3] = value  # the second vector
    replace_file(folder, name, vectors.set_column(1, "edge_scores", pa.FixedSizeListArray.from_arrays(
        pa.array(values, pa.float32()), column.type.list_size)))
    import_refused(f"`import` of an export with an edge score of {value}", folder, target,
                   rf".*{name} \(table edge_vectors\): 1 rows? with values that are not finite "
                   rf"\(NaN or infinity\) in edge_scores; .*export the run again")


@pytest.mark.parametrize("file, column", [("scores.parquet", "loss"),
                                          ("scores.parquet", "residual_norm"),
                                          ("runs.parquet", "t_bar"),
                                          ("run_alphas.parquet", "alpha")])
def test_a_score_or_run_value_that_is_not_finite_is_refused(pair_export, target, tmp_path, file,
                                                            column):
    folder = copy_export(pair_export, tmp_path / "export")
    rows = pq.read_table(folder / file)
    values = rows.column(column).to_pylist()
    values[0] = float("nan")
    index = rows.schema.get_field_index(column)
    replace_file(folder, file,
                 rows.set_column(index, column, pa.array(values, rows.schema.field(index).type)))
    table = file.removesuffix(".parquet")
    import_refused(f"`import` of an export with {column} NaN in {file}", folder, target,
                   rf".*{file} \(table {table}\): 1 rows? with values that are not finite \(NaN or "
                   rf"infinity\) in {column}; .*export the run again")


def _foreign(rows: pa.Table, column: str, value) -> pa.Table:
    """The rows with the first one's `column` set to `value` (as many rows as before, so no row
    bound tells it)."""
    index = rows.schema.get_field_index(column)
    values = rows.column(column).to_pylist()
    values[0] = value
    return rows.set_column(index, column, pa.array(values, rows.schema.field(index).type))


@pytest.mark.parametrize("file, column, value", [
    ("questions.parquet", "dataset_key", "another-dataset"),
    ("run_models.parquet", "run_key", "another-run"),
    ("models.parquet", "model_key", "a-model-of-no-run"),
    ("grades.parquet", "generation_key", "an-answer-not-exported"),
    ("metrics.parquet", "run_key", "another-run"),
])
def test_rows_that_do_not_belong_to_the_exported_run_are_refused(pair_export, target, tmp_path, file,
                                                                 column, value):
    folder = copy_export(pair_export, tmp_path / "export")
    replace_file(folder, file, _foreign(pq.read_table(folder / file), column, value))
    table = file.removesuffix(".parquet")
    import_refused(f"`import` of an export with a row of {table} from elsewhere", folder, target,
                   rf".*{file} \(table {table}\): 1 of its \d+ rows do not belong to the exported "
                   rf"run '[0-9a-f]+'.*export the run again")


def _padded_stage_timings(folder: Path, rows: int) -> pa.Table:
    """The export's stage timings and `rows` more of its run, each at its own time (as a rerun
    would add them)."""
    timings = pq.read_table(folder / "stage_timings.parquet")
    run_key = read_manifest(folder)["run_key"]
    times = np.datetime64("2020-01-01T00:00:00", "us") + np.arange(rows).astype("timedelta64[us]")
    junk = pa.table({"run_key": pa.array(np.full(rows, run_key, dtype=object)),
                     "stage": pa.array(np.full(rows, "score", dtype=object)),
                     "items": pa.array(np.ones(rows, np.int32)),
                     "seconds": pa.array(np.ones(rows)),
                     "code_version": pa.array(np.full(rows, "junk", dtype=object)),
                     "git_commit": pa.array(np.full(rows, "junk", dtype=object)),
                     "created_at": pa.array(times)}).cast(timings.schema)
    return pa.concat_tables([timings, junk])


def test_more_rows_than_the_manifest_declares_are_refused(pair_export, target, tmp_path):
    folder = copy_export(pair_export, tmp_path / "export")
    declared = entry_of(read_manifest(folder), "stage_timings.parquet")["rows"]
    pq.write_table(_padded_stage_timings(folder, 10), folder / "stage_timings.parquet")
    manifest = read_manifest(folder)
    entry_of(manifest, "stage_timings.parquet")["sha256"] = sha256(folder / "stage_timings.parquet")
    write_manifest(folder, manifest)  # the checksum fits, the declared count does not
    import_refused("`import` of a table holding more rows than its manifest declares", folder, target,
                   rf".*stage_timings\.parquet \(table stage_timings\) holds {declared + 10} rows, "
                   rf"the manifest says {declared}; copy the exported folder again")


def test_more_rows_than_the_run_could_have_are_refused_though_declared(pair_export, target, tmp_path):
    folder = copy_export(pair_export, tmp_path / "export")
    replace_file(folder, "stage_timings.parquet", _padded_stage_timings(folder, 6000))
    import_refused("`import` of an export padded with rows its run could not have", folder, target,
                   r".*manifest\.json: stage_timings\.parquet \(table stage_timings\) declares \d+ "
                   r"rows, more than its run can have \(at most \d+: .*\); .*export the run again")


TABLES_AND_VECTORS = ["runs", "datasets", "run_models", "run_alphas", "questions", "models",
                      "run_samples", "generations", "grades", "scores", "run_controls", "metrics",
                      "faithfulness", "token_views", "stage_timings", "vectors"]


@pytest.mark.parametrize("table", TABLES_AND_VECTORS)
def test_every_tables_declared_rows_are_bounded_before_its_file_is_read(pair_export, target, tmp_path,
                                                                        monkeypatch, table):
    folder = copy_export(pair_export, tmp_path / "export")
    manifest = read_manifest(folder)
    name = _vectors_file(folder) if table == "vectors" else f"{table}.parquet"
    entry_of(manifest, name)["rows"] = 10**9
    write_manifest(folder, manifest)
    opened = []
    real = pq.ParquetFile.__init__

    def watched(self, source, *args, **kwargs):
        opened.append(Path(source).name)
        return real(self, source, *args, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "__init__", watched)
    listed = "edge_vectors" if table == "vectors" else table
    import_refused(f"`import` of an export whose manifest declares 10^9 rows of {listed}", folder,
                   target, rf".*manifest\.json: {name} \(table {listed}\) declares 1000000000 rows, "
                   rf"more than its run can have \(at most \d+")
    assert name not in opened


def _peak_rss_mb_of_import(folder: Path, cache: Path) -> tuple[int, float]:
    """Exit status and peak resident memory (MB) of `python -m core import` in a child process:
    its VmHWM, which starts afresh at exec (ru_maxrss would count this process's memory at fork)."""
    code = ("import re\nfrom pathlib import Path\nfrom core.__main__ import main\n"
            f"status = main(['import', {str(folder)!r}, '--cache', {str(cache)!r}])\n"
            "peak_kb = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1]\n"
            "print(status, int(peak_kb) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    status, peak = done.stdout.split()[-2:]
    return int(status), float(peak)


@pytest.mark.parametrize("declared", [True, False])
def test_junk_rows_cost_no_memory(pair_export, tmp_path, declared):
    """Peak memory of a refused import does not grow with the junk rows (issue 29: 5 million of them
    took 2.8 GB; before this check, these 2 million took 160 MB more than the clean import when not
    declared, 550 MB when declared): the refusal comes from the manifest and the file's footer,
    before its rows."""
    clean = copy_export(pair_export, tmp_path / "clean")
    junk = copy_export(pair_export, tmp_path / "junk")
    padded = _padded_stage_timings(junk, 2_000_000)
    if declared:
        replace_file(junk, "stage_timings.parquet", padded)
    else:
        pq.write_table(padded, junk / "stage_timings.parquet")
        manifest = read_manifest(junk)
        entry_of(manifest, "stage_timings.parquet")["sha256"] = sha256(junk / "stage_timings.parquet")
        write_manifest(junk, manifest)
    cache = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    before = sha256(cache)
    junk_status, junk_peak = _peak_rss_mb_of_import(junk, cache)
    assert junk_status == 2 and sha256(cache) == before
    clean_status, clean_peak = _peak_rss_mb_of_import(clean, tmp_path / "clean.duckdb")
    assert clean_status == 0
    assert junk_peak < clean_peak + 32, (junk_peak, clean_peak)


def test_a_clean_export_still_imports_and_round_trips_its_row_counts(pair_export, tmp_path):
    cache = tmp_path / "cache.duckdb"
    assert main(["import", str(pair_export), "--cache", str(cache)]) == 0
    with Store(cache).read() as con:
        for entry in read_manifest(pair_export)["files"]:
            if entry["table"] != "edge_vectors":
                found = con.execute(f"SELECT count(*) FROM {entry['table']}").fetchone()[0]
                assert found == entry["rows"], entry["path"]


# --- the manifest parser on arbitrary input --------------------------------------------------------

def _manifest_outcome(folder: Path, content: bytes) -> None:
    """check_manifest gives a manifest of well-formed entries, or one CircuitdiffError line
    naming a file of the folder; never another exception."""
    (folder / MANIFEST).write_bytes(content)
    try:
        manifest = check_manifest(folder)
    except CircuitdiffError as error:
        message = str(error)
        assert "\n" not in message and str(folder) in message, message
        assert len(message) < 2000, message
    else:
        assert isinstance(manifest["run_key"], str) and manifest["run_key"]
        for entry in manifest["files"]:
            assert isinstance(entry["path"], str) and (folder / entry["path"]).is_file()
            assert isinstance(entry["rows"], int) and entry["rows"] >= 0


PARSER = settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def parser_folder(pair_export, tmp_path_factory) -> Path:
    return copy_export(pair_export, tmp_path_factory.mktemp("parser") / "export")


@PARSER
@given(content=st.binary(max_size=3000))
def test_arbitrary_bytes_as_the_manifest_give_one_line(parser_folder, content):
    _manifest_outcome(parser_folder, content)


@PARSER
@given(document=JSON)
def test_arbitrary_json_as_the_manifest_gives_one_line(parser_folder, document):
    _manifest_outcome(parser_folder, json.dumps(document).encode())


@PARSER
@given(change=st.sampled_from(["drop", "set", "set in an entry", "drop from an entry"]),
       top=st.sampled_from(["format", "schema_version", "run_key", "files", "code_version"]),
       field=st.sampled_from(["path", "table", "columns", "rows", "sha256", "n_edges"]),
       value=JSON, index=st.integers(min_value=0))
def test_one_field_of_a_valid_manifest_changed_gives_entries_or_one_line(pair_export, parser_folder,
                                                                        change, top, field, value,
                                                                        index):
    manifest = read_manifest(pair_export)
    entry = manifest["files"][index % len(manifest["files"])]
    if change == "drop":
        manifest.pop(top)
    elif change == "set":
        manifest[top] = value
    elif change == "set in an entry":
        entry[field] = value
    else:
        entry.pop(field, None)
    _manifest_outcome(parser_folder, json.dumps(manifest).encode())


@pytest.mark.parametrize("case, content", [
    ("a format nested 5,000 deep", b'{"format": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("a format nested 900 deep", b'{"format": ' + b"[" * 900 + b"]" * 900 + b"}"),
    ("a schema version of 10,000 digits", b'{"format": "circuitdiff-run-export", "schema_version": '
                                          + b"9" * 10_000 + b"}"),
    ("a format of a megabyte", json.dumps({"format": "x" * 1_000_000}).encode()),
    ("NaN rows", None),
    ("negative rows", None),
])
def test_hostile_manifests_through_the_cli(pair_export, target, tmp_path, case, content):
    folder = copy_export(pair_export, tmp_path / "export")
    if content is None:
        manifest = read_manifest(folder)
        entry_of(manifest, "runs.parquet")["rows"] = float("nan") if case == "NaN rows" else -1
        content = json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(content)
    before = sha256(target)
    code, line = cli(f"`import` of a manifest with {case}",
                     ["import", str(folder), "--cache", str(target)])
    assert code == 2 and str(folder) in line and len(line) < 1000, line
    assert sha256(target) == before


# --- jobs: SIGTERM and SIGINT are a cancel (item 11), one jobs folder per cache (item 12) ------------

# The stand-in pipeline waits for this file before it returns, so the job stays active meanwhile.
RELEASE_ENV = "CIRCUITDIFF_TEST_RUN_RELEASE"


def _stand_in_pipeline_run(request, progress=None, log=print):
    """Under the writer lock, as the pipeline: commit one row (a stage timing of run "committed"),
    report it, then wait for the release file (60 s at most)."""
    store = Store(request.cache)
    with store.writer_lock(wait=False):
        with store.write() as con:
            Store.insert_rows(con, "stage_timings", [{
                "run_key": "committed", "stage": "generate", "items": 1, "seconds": 1.0,
                "code_version": "test", "git_commit": "test", "created_at": dt.datetime.now()}])
        progress("generate", 1, 2)
        wait_for_release(RELEASE_ENV)
    return types.SimpleNamespace(run_key=f"key-{request.pair}", done={}, seconds=0.0, t_cuts={},
                                 selection={"n_selected": 0}, control_runs={})



@pytest.fixture
def stand_in_runs(monkeypatch, tmp_path) -> Path:
    """Run jobs start this file as their module; returns the release file."""
    monkeypatch.setattr(jobs, "RUN_MODULE", Path(__file__).stem)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(RELEASE_ENV, str(tmp_path / "release"))
    return tmp_path / "release"


def _start_and_wait(cache: Path) -> jobs.JobStatus:
    job_id = jobs.start(RunRequest(pair="tiny", dataset="tiny", cache=str(cache)))
    wait_for(lambda: jobs.status(job_id, cache).done == 1, "the job's committed progress")
    return jobs.status(job_id, cache)


def _committed(cache: Path) -> list[tuple]:
    with Store(cache).read() as con:
        return con.execute("SELECT run_key FROM stage_timings").fetchall()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_run_job_is_a_cancel(stand_in_runs, tmp_path, signum):
    cache = tmp_path / "cache.duckdb"
    job = _start_and_wait(cache)
    assert job.state == "running"
    os.kill(job.pid, signum)
    jobs._children[job.job_id].wait(timeout=60)
    job = jobs.status(job.job_id, cache)
    log = Path(job.log_path).read_text()
    assert job.state == "cancelled", (job.message, log)
    assert signal.Signals(signum).name in job.message and "rerun resumes" in job.message
    assert "Traceback" not in log, log
    raw = json.loads(jobs._status_path(job.job_id, cache).read_text())
    assert raw["state"] == "cancelled"  # recorded by the job, not inferred from its absence
    assert _committed(cache) == [("committed",)]
    assert not Store(cache).writer_active()
    assert jobs.active_jobs(cache) == []


def test_cancel_still_stops_a_run_job(stand_in_runs, tmp_path):
    cache = tmp_path / "cache.duckdb"
    job = _start_and_wait(cache)
    cancelled = jobs.cancel(job.job_id, cache)
    assert cancelled.state == "cancelled" and "rerun resumes" in cancelled.message
    assert _committed(cache) == [("committed",)]
    assert not Store(cache).writer_active()


def test_caches_in_one_folder_have_their_own_jobs(stand_in_runs, tmp_path):
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    try:
        job_a = _start_and_wait(a)
        assert [j.job_id for j in jobs.active_jobs(b)] == []  # b's banner
        job_b = _start_and_wait(b)  # not refused by a's job
        assert [j.job_id for j in jobs.active_jobs(a)] == [job_a.job_id]
        assert [j.job_id for j in jobs.active_jobs(b)] == [job_b.job_id]
        assert [j.job_id for j in jobs.list_jobs(b)] == [job_b.job_id]
        with pytest.raises(jobs.JobConflictError, match=f"job {job_a.job_id}"):
            jobs.start(RunRequest(pair="other", dataset="tiny", cache=str(a)))
    finally:
        stand_in_runs.touch()
    for cache in (a, b):
        wait_for(lambda: jobs.active_jobs(cache) == [], f"the job of {cache.name} to end")
        assert [j.state for j in jobs.list_jobs(cache)] == ["done"], Path(
            jobs.list_jobs(cache)[0].log_path).read_text()


def test_the_same_cache_by_another_path_shares_its_jobs(tmp_path):
    (tmp_path / "sub").mkdir()
    assert jobs.jobs_dir(tmp_path / "sub" / ".." / "a.duckdb") == jobs.jobs_dir(tmp_path / "a.duckdb")


if __name__ == "__main__":  # the stand-in for `python -m core` that jobs.start runs in the job tests
    from core import pipeline

    pipeline.run = _stand_in_pipeline_run
    sys.exit(main(sys.argv[1:]))
