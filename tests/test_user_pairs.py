"""Pairs and datasets made from the browser (core/user_pairs.py): every bad input is one message
naming what is wrong (and the line), a saved pair is listed and resolved like a declared one, and a
run on it works and shares the declared pair's answers and scores (a run is keyed by content).

The models and data are test_pipeline.py's `world`: tiny random Llamas with a local tokenizer, and a
JSONL set whose references are the base model's own answers."""

from __future__ import annotations

import json
import shutil

import pytest

from core import pipeline
from core.config import RunRequest, configured, get_dataset, get_pair, load_config
from core.query import ResultCache
from core.store import ENV_CACHE, Store, WriterBusyError
from core.user_pairs import (MAX_DATASET_BYTES, ProblemsError, Upload, check_pair,
                             dataset_problems, model_declaration, pair_declaration, save_user_pair)
from test_pipeline import ALPHAS, SELECTION, quiet, world  # noqa: F401 - world is a fixture


def declaration(world, post="post", dataset="tiny", **changes):
    """The world's tiny pair as a new pair; `post` a folder (under the world) or a declaration."""
    base = model_declaration("folder", str(world / "base"), "tiny-base")
    if not isinstance(post, dict):
        post = model_declaration("folder", str(world / post), "tiny-post")
    return {**pair_declaration(base, post, "deepseek-math", 12, dataset), **changes}


def problems_of_upload(world, data: bytes, name="upload") -> list[str]:
    dataset, problems = dataset_problems(name, Upload("mine.jsonl", data),
                                         load_config(world / "pairs.toml", world / "none.duckdb"))
    assert (dataset is None) == bool(problems)
    return problems


def test_model_declarations_speak_the_pairs_toml_vocabulary(tmp_path):
    hub = model_declaration("hub", " org/model-7b ", revision="v1.0", algorithm="GRPO")
    assert hub == {"hub": "org/model-7b", "revision": "v1.0", "label": "model-7b",
                   "algorithm": "GRPO"}
    base = model_declaration("folder", str(tmp_path / "base"), "my-base")
    assert base == {"path": str(tmp_path / "base"), "label": "my-base"}
    # An adapter on the pair's base (its label dropped), or on a hub id or folder given as text.
    on_base = model_declaration("adapter", str(tmp_path / "lora") + "/", adapter_base=base)
    assert on_base == {"adapter": str(tmp_path / "lora"), "base": {"path": str(tmp_path / "base")},
                       "label": "lora"}
    assert model_declaration("adapter", "a", adapter_base="org/base")["base"] == {"hub": "org/base"}
    assert model_declaration("adapter", "a", adapter_base=str(tmp_path))["base"] == {
        "path": str(tmp_path)}


def test_each_bad_line_of_an_upload_is_one_message_with_its_line(world):
    lines = [{"id": "a", "question": "What is 1 plus 1", "answer": "2"},
             {"id": "b", "answer": "3"},                                   # no question
             {"id": "c", "question": "What is 2 plus 2"},                  # no answer
             {"id": "a", "question": "What is 3 plus 1", "answer": "4"},   # id of line 1
             {"id": "d", "question": "What is 1 plus 1", "answer": "2"}]   # question of line 1
    data = "\n".join(json.dumps(line) for line in lines).encode() + b"\nnot json\n\n\xff\n"
    problems = problems_of_upload(world, data)
    assert len(problems) == 6, problems
    assert "line 2: no question field" in problems[0]
    assert "line 3: no reference answer" in problems[1]
    assert "line 4: the id 'a' of line 1 again" in problems[2]
    assert "line 5: the question of line 1 again" in problems[3]
    assert "line 6: not a JSON object" in problems[4]
    assert "line 8: not UTF-8 text" in problems[5]
    assert all(p.startswith("mine.jsonl, line ") for p in problems)


def test_an_empty_too_large_or_misnamed_upload_is_refused(world):
    assert problems_of_upload(world, b"\n \n") == [
        "mine.jsonl holds no question: give one JSON object per line with a question and an answer "
        "field"]
    (too_large,) = problems_of_upload(world, b"x" * (MAX_DATASET_BYTES + 1))
    assert "at most 20 MiB" in too_large
    good = (world / "data.jsonl").read_bytes()
    assert problems_of_upload(world, good) == []
    (taken,) = problems_of_upload(world, good, name="tiny")
    assert "is declared in" in taken
    (path_like,) = problems_of_upload(world, good, name="my.jsonl")
    assert "may not end in .jsonl" in path_like
    # Too many bad lines: the first ones, then a count.
    problems = problems_of_upload(world, b"{}\n" * 30)
    assert len(problems) == 21 and problems[-1] == "... and 10 more problem(s)"


def test_every_problem_of_a_pair_at_once(world):
    problems = check_pair("tiny", declaration(world, template="nope", max_new_tokens=0,
                                              dataset="missing"),
                          config_path=str(world / "pairs.toml"), cache=str(world / "none.duckdb"))
    assert len(problems) == 4, problems
    assert "is declared in" in problems[0]
    assert "prompt template 'nope'" in problems[1]
    assert "max_new_tokens = 0" in problems[2]
    assert "dataset 'missing' is neither configured nor uploaded" in problems[3]
    # Labels the read model could not tell apart.
    same_labels = declaration(world)
    same_labels["post"]["label"] = "tiny-base"
    (labels,) = check_pair("new", same_labels, config_path=str(world / "pairs.toml"),
                           cache=str(world / "none.duckdb"))
    assert "must be distinct" in labels
    (blank,) = check_pair("new", declaration(world, post=model_declaration("folder", "", "p")),
                          config_path=str(world / "pairs.toml"), cache=str(world / "none.duckdb"))
    assert blank == "post model: give its folder"


def test_models_that_cannot_be_used_are_named(world, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(world / "base" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not safe")
    unsupported = tmp_path / "bert"
    shutil.copytree(world / "base", unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps(
        {**config, "model_type": "bert", "architectures": ["BertLMHeadModel"]}))
    where = dict(config_path=str(world / "pairs.toml"), cache=str(world / "none.duckdb"))

    (problem,) = check_pair("new", declaration(world, post=str(pickled)), **where)
    assert problem.startswith("tiny-post: ") and "only pickled weights" in problem
    (problem,) = check_pair("new", declaration(world, post=str(unsupported)), **where)
    assert "architecture BertLMHeadModel is not supported" in problem
    (problem,) = check_pair("new", declaration(world, post="other"), **where)
    assert "different tokenizers" in problem
    assert check_pair("new", declaration(world), **where) == []


def test_save_lists_and_resolves_the_pair_and_its_uploaded_dataset(world, tmp_path):
    cache, config_path = str(tmp_path / "cache.duckdb"), str(world / "pairs.toml")
    data = (world / "data.jsonl").read_bytes()
    declared = declaration(world, dataset="uploaded")
    with pytest.raises(ProblemsError, match="'uploaded' is neither configured nor uploaded"):
        save_user_pair("mine", declared, config_path=config_path, cache=cache)
    assert not Store(cache).exists()
    save_user_pair("mine", declared, upload=Upload("data.jsonl", data), config_path=config_path,
                   cache=cache)

    offered = configured(config_path, cache)
    assert offered["pairs"]["mine"] == "pair" and offered["user_pairs"] == ["mine"]
    assert offered["datasets"][-1] == "uploaded" and offered["user_datasets"] == ["uploaded"]
    config = load_config(config_path, cache)
    pair = get_pair("mine", config)
    assert pair.template == "deepseek-math" and pair.max_new_tokens == 12
    assert [m.label for m in pair.models] == ["tiny-base", "tiny-post"]
    assert [m.spec for m in pair.models] == [m.spec for m in get_pair("tiny", config).models]
    uploaded, original = get_dataset("uploaded", config), get_dataset("tiny", config)
    assert uploaded.questions == original.questions and uploaded.source == "upload:data.jsonl"
    assert len(get_dataset("uploaded", config, limit=3).questions) == 3
    # Names are not taken twice.
    with pytest.raises(ProblemsError) as refused:
        save_user_pair("mine", declared, upload=Upload("data.jsonl", data),
                       config_path=config_path, cache=cache)
    assert len(refused.value.problems) == 2
    assert all("made from the browser already" in p for p in refused.value.problems)
    # The declared config does not know the pair without the cache.
    with pytest.raises(ValueError, match="unknown pair or series 'mine'"):
        get_pair("mine", load_config(config_path, tmp_path / "other.duckdb"))


def test_a_cache_that_cannot_be_read_lists_only_the_declared_pairs(world, tmp_path):
    import duckdb

    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (a INTEGER)").close()
    offered = configured(world / "pairs.toml", other)
    assert list(offered["pairs"]) == ["tiny", "wrong-layers", "mismatch", "tiny-series"]
    assert offered["user_pairs"] == [] and "not a circuitdiff cache" in offered["cache_problem"]
    assert configured(world / "pairs.toml", tmp_path / "none.duckdb")["cache_problem"] is None


def test_save_waits_for_no_run(world, tmp_path):
    cache = str(tmp_path / "busy.duckdb")
    with Store(cache).writer_lock():
        with pytest.raises(WriterBusyError, match="another process is writing"):
            save_user_pair("mine", declaration(world), config_path=str(world / "pairs.toml"),
                           cache=cache)


def test_a_run_on_a_user_pair_reuses_the_declared_pairs_work(world, tmp_path, monkeypatch):
    cache = tmp_path / "run.duckdb"
    # The run reads user pairs from the cache its request names, not the default one.
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "elsewhere.duckdb"))
    common = dict(alphas=ALPHAS, selection=SELECTION, cache=str(cache),
                  config=str(world / "pairs.toml"))
    declared = pipeline.run(RunRequest(pair="tiny", dataset="tiny", **common), log=quiet)
    save_user_pair("mine", declaration(world, dataset="uploaded"),
                   upload=Upload("data.jsonl", (world / "data.jsonl").read_bytes()),
                   config_path=str(world / "pairs.toml"), cache=str(cache))
    mine = pipeline.run(RunRequest(pair="mine", dataset="uploaded", **common), log=quiet)
    assert mine.run_key != declared.run_key
    assert mine.selection == declared.selection
    # The same models on the same questions: every answer and score is found again.
    assert mine.done["generate"] == mine.done["score"] == 0 and mine.models_loaded == 0
    runs = ResultCache.open(cache).runs()
    assert sorted(runs["pair"]) == ["mine", "tiny"]
    assert runs.set_index("pair").loc["mine", "dataset"] == "uploaded"
