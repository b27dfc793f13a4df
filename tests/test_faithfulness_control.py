"""The faithfulness control stored by a run (`--controls faithfulness`), its read-model views, the
plan's count of it, and the agreement of two scoring methods on the same pair (docs/method.md
section 8), on the tiny pair of tests/test_pipeline.py."""

import json

import numpy as np
import pytest

from core import pipeline
from core.errors import NotFoundError
from core.faithfulness import read_run_samples, run_faithfulness
from core.models import ModelSpec
from core.query import ResultCache
from core.settings import FaithfulnessSettings, MetricSettings, ScoreSettings
from core.store import Store
from test_pipeline import ALPHAS, quiet, request, world  # noqa: F401 (world: a fixture)

FAITH = FaithfulnessSettings(questions=3, edges_per_sample=4, seed=5, copies=4)


@pytest.fixture(scope="module")
def faith_run(world):  # noqa: F811
    """A run of the tiny pair with the faithfulness control, and its summary."""
    summary = pipeline.run(request(world, "faith.duckdb", controls=("faithfulness",),
                                   faithfulness=FAITH), log=quiet)
    return world / "faith.duckdb", summary


def stored_rows(path, run_key):
    with Store(path).read() as con:
        return con.execute("SELECT alpha, label, settings_key, settings, report FROM faithfulness "
                           "WHERE run_key = ? ORDER BY alpha, label", [run_key]).fetchall()


def test_one_row_per_alpha_and_model_and_a_rerun_does_nothing(world, faith_run, monkeypatch):  # noqa: F811
    path, summary = faith_run
    rows = stored_rows(path, summary.run_key)
    labels = ["tiny-base", "tiny-post"]
    assert [(alpha, label) for alpha, label, *_ in rows] == [(a, l) for a in ALPHAS for l in labels]
    assert summary.done["faithfulness"] == len(ALPHAS) * 2
    assert {key for _, _, key, _, _ in rows} == {FAITH.stored_key(ScoreSettings())}
    settings = json.loads(rows[0][3])
    assert settings["faithfulness"] == FAITH.as_dict() and settings["score"]["method"] == "eap"
    n = min(FAITH.questions, summary.selection["n_selected"])
    for alpha, label, _, _, text in rows:
        report = json.loads(text)
        assert report["t_cut"] == summary.t_cuts[alpha] and len(report["questions"]) == n
        assert report["role"] == ("base" if label == "tiny-base" else "post")
        assert len(report["edges"]) == n * FAITH.edges_per_sample

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete rerun must not load a model")
    monkeypatch.setattr(ModelSpec, "load", no_loading)
    again = pipeline.run(request(world, "faith.duckdb", controls=("faithfulness",),
                                 faithfulness=FAITH), log=quiet)
    assert set(again.done.values()) == {0}
