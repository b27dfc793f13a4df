"""The Compute page's New pair under Streamlit's AppTest (no browser): Check lists every problem of
a pair and of its uploaded dataset at once, Save keeps a tiny local pair in the cache and the page
opens on it; a link's pair and dataset made from the browser are picked; an empty cache and
read-only mode."""

from __future__ import annotations

import json

import pytest

from core.config import configured
from core.synthetic import build_fixture_cache, build_tiny_model, tiny_tokenizer
from core.user_pairs import Upload, model_declaration, pair_declaration, save_user_pair
from test_app import assert_clean, open_app

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} plus 1", "answer": str(i + 1)}
             for i in range(4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny local models sharing a tokenizer, and a JSONL file of questions."""
    root = tmp_path_factory.mktemp("new-pair")
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "tiny-base", tokenizer, seed=0)
    build_tiny_model(root / "tiny-post", tokenizer, seed=1, perturb_from=root / "tiny-base", perturbation=0.003)
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root


def fill_pair(at, name: str, base: str, post: str):
    """Name and two local folders in the New pair form, the prompt template the tiny tokenizer
    reads, and an answer limit."""
    at.text_input(key="new.name").set_value(name)
    for role, folder in (("base", base), ("post", post)):
        at.radio(key=f"new.{role}.source").set_value("folder").run()
        at.text_input(key=f"new.{role}.location").set_value(folder)
    at.selectbox(key="new.template").set_value("deepseek-math")
    at.number_input(key="new.max_new_tokens").set_value(12)
    at.radio(key="new.dataset_source").set_value("upload").run()
    return at


def upload(at, data: bytes, name: str = "questions.jsonl"):
    at.file_uploader(key="new.upload").set_value((name, data, "application/jsonl"))
    return at.run()


def test_check_lists_every_problem_and_save_makes_the_pair_pickable(monkeypatch, models, tmp_path):
    cache = tmp_path / "cache.duckdb"
    build_fixture_cache(cache)
    at = open_app(monkeypatch, cache, "pages/5_Compute.py")
    fill_pair(at, "demo-grpo", str(models / "tiny-base"), str(models / "missing"))
    bad = (models / "questions.jsonl").read_bytes() + json.dumps(QUESTIONS[0]).encode() + b"\n{}\n"
    upload(at, bad)
    at.button(key="new.check").click().run()
    assert [e.value for e in at.exception] == []
    (shown,) = [e.value for e in at.error]
    assert "**5 problem(s)**" in shown
    assert "the pair name 'demo-grpo' is declared in" in shown
    assert "questions.jsonl, line 5: the id 'q0' of line 1 again" in shown
    assert "questions.jsonl, line 5: the question of line 1 again" in shown
    assert "questions.jsonl, line 6: no question field" in shown
    assert f"missing: {models / 'missing'} is not a folder" in shown
    assert not any("Saved the pair" in s.value for s in at.success)

    # Fixed: Save checks again, keeps the pair and its dataset, and the pickers open on them.
    at.text_input(key="new.name").set_value("tiny-made-here")
    at.text_input(key="new.post.location").set_value(str(models / "tiny-post"))
    at.text_input(key="new.upload_name").set_value("tiny-questions")
    upload(at, (models / "questions.jsonl").read_bytes())
    at.button(key="new.save").click().run()
    assert_clean(at, "Compute")
    assert any("Saved the pair **tiny-made-here**" in s.value for s in at.success)
    picker = at.selectbox(key="compute.pair")
    assert picker.value == "tiny-made-here"
    assert "tiny-made-here (pair, made here)" in picker.options
    assert at.selectbox(key="compute.dataset").value == "tiny-questions"
    offered = configured(cache=cache)
    assert offered["user_pairs"] == ["tiny-made-here"]
    assert offered["user_datasets"] == ["tiny-questions"]


def test_a_link_to_a_pair_made_here_opens_compute_on_it(monkeypatch, models, tmp_path):
    cache = tmp_path / "cache.duckdb"
    build_fixture_cache(cache)
    pair = pair_declaration(model_declaration("folder", str(models / "tiny-base")),
                            model_declaration("folder", str(models / "tiny-post")), "deepseek-math", 12,
                            "linked-set")
    save_user_pair("linked", pair, upload=Upload("q.jsonl", (models / "questions.jsonl").read_bytes()),
                   cache=str(cache))
    at = open_app(monkeypatch, cache, "pages/5_Compute.py",
                  query={"pair": "linked", "dataset": "linked-set"})
    assert_clean(at, "Compute")
    assert at.selectbox(key="compute.pair").value == "linked"
    assert at.selectbox(key="compute.dataset").value == "linked-set"


def test_an_empty_cache_offers_the_form_and_the_declared_pairs(monkeypatch, tmp_path):
    cache = tmp_path / "empty.duckdb"
    at = open_app(monkeypatch, cache, "pages/5_Compute.py")
    assert_clean(at, "Compute")
    assert at.text_input(key="new.name").value == ""
    assert at.selectbox(key="compute.pair").value == next(iter(configured()["pairs"]))
    assert not cache.exists()  # opening the page writes nothing


def test_read_only_mode_hides_the_form(monkeypatch, tmp_path):
    cache = tmp_path / "fixture.duckdb"
    build_fixture_cache(cache)
    at = open_app(monkeypatch, cache, "pages/5_Compute.py", read_only=True)
    assert [e.value for e in at.exception] == []
    assert "computing is switched off" in at.warning[0].value
    assert not [w for w in at.text_input if w.key == "new.name"]
    assert not at.button
