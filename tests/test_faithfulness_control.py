"""The faithfulness control stored by a run (`--controls faithfulness`), its read-model views, the
plan's count of it, and the agreement of two scoring methods on the same pair (docs/method.md
section 8), on the tiny pair of tests/test_pipeline.py."""

import json
import shutil
import types

import numpy as np
import pytest

from core import pipeline
from core.__main__ import main
from core.config import RunRequest
from core.errors import NotFoundError
from core.faithfulness import read_run_samples, run_faithfulness
from core.faithfulness_stats import RECOVERY_FRACTIONS
from core.graph import ResidualGraph
from core.models import ModelSpec
from core.demo.run import part_requests
from core.faithfulness_stats import AGREEMENT_STATISTICS, STRATA
from core.query import (AREA_DIFFERENCE, FAITHFULNESS_AGREEMENT_COLUMNS, K_RATIO, METRICS,
                        ResultCache)
from core.settings import FaithfulnessSettings, MetricSettings, ScoreSettings, stable_hash
from core.store import Store
from test_pipeline import ALPHAS, quiet, request, world  # noqa: F401 (world: a fixture)

FAITH = FaithfulnessSettings(questions=3, edges_per_sample=4, seed=5, copies=4)
LABELS = ("tiny-base", "tiny-post")
# The first 6 questions of the tiny dataset: half the generation of test_pipeline's runs.
LIMIT = 6


def ask(world, cache_name, **changes):  # noqa: F811
    return request(world, cache_name, limit=LIMIT, **changes)


@pytest.fixture(scope="module")
def faith(world):  # noqa: F811
    """A run of the tiny pair, then the same run with the faithfulness control; the read model
    opened between the two (so its memo has seen the run without the control), and what it showed
    then."""
    path = world / "faith.duckdb"
    plain = pipeline.run(ask(world, "faith.duckdb"), log=quiet)
    cache = ResultCache.open(path)
    before = types.SimpleNamespace(alphas=cache.faithfulness_alphas(plain.run_key),
                                   report=cache.report_html(plain.run_key, alphas=[0.5]))
    with pytest.raises(NotFoundError, match="holds no faithfulness control .* --controls faithfulness"):
        cache.recovery_areas(plain.run_key, 0.5)
    summary = pipeline.run(ask(world, "faith.duckdb", controls=("faithfulness",),
                                   faithfulness=FAITH), log=quiet)
    assert summary.run_key == plain.run_key  # a control is in no run key
    return types.SimpleNamespace(path=path, summary=summary, run_key=summary.run_key, cache=cache,
                                 before=before)


@pytest.fixture(scope="module")
def methods(world, faith):  # noqa: F811
    """A copy of the faithfulness run's cache (its answers and eap scores reused) with the same
    pair also scored with eap-ig at one and at two steps (alpha 0.5 only)."""
    path = world / "methods.duckdb"
    shutil.copy(faith.path, path)
    runs = {"eap": faith.run_key}
    for name, steps in (("ig1", 1), ("ig2", 2)):
        score = ScoreSettings(method="eap-ig", ig_steps=steps)
        runs[name] = pipeline.run(ask(world, "methods.duckdb", score=score, alphas=(0.5,)),
                                  log=quiet).run_key
    return ResultCache.open(path), runs


def stored_rows(path, run_key):
    with Store(path).read() as con:
        return con.execute("SELECT alpha, label, settings_key, settings, report FROM faithfulness "
                           "WHERE run_key = ? ORDER BY alpha, label", [run_key]).fetchall()


def test_one_row_per_alpha_and_model_and_a_rerun_does_nothing(world, faith, monkeypatch):  # noqa: F811
    rows = stored_rows(faith.path, faith.run_key)
    assert [(alpha, label) for alpha, label, *_ in rows] == [(a, l) for a in ALPHAS for l in LABELS]
    assert faith.summary.done["faithfulness"] == len(ALPHAS) * 2
    assert faith.summary.done["score"] == 0  # the control adds rows, never scores
    assert {key for _, _, key, _, _ in rows} == {FAITH.stored_key(ScoreSettings())}
    settings = json.loads(rows[0][3])
    assert settings["faithfulness"] == FAITH.as_dict() and settings["score"]["method"] == "eap"
    n = min(FAITH.questions, faith.summary.selection["n_selected"])
    for alpha, label, _, _, text in rows:
        report = json.loads(text)
        assert report["t_cut"] == faith.summary.t_cuts[alpha] and len(report["questions"]) == n
        assert report["role"] == ("base" if label == "tiny-base" else "post")
        assert len(report["edges"]) == n * FAITH.edges_per_sample

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete rerun must not load a model")
    monkeypatch.setattr(ModelSpec, "load", no_loading)
    again = pipeline.run(ask(world, "faith.duckdb", controls=("faithfulness",),
                                 faithfulness=FAITH), log=quiet)
    assert set(again.done.values()) == {0}


def test_other_settings_add_rows_of_their_own_and_copies_are_in_no_key():
    assert FAITH.replace(copies=1).stored_key(ScoreSettings()) == FAITH.stored_key(ScoreSettings())
    keys = {FAITH.stored_key(ScoreSettings()), FAITH.replace(seed=6).stored_key(ScoreSettings()),
            FAITH.replace(edges_per_sample=5).stored_key(ScoreSettings()),
            FAITH.replace(questions=2).stored_key(ScoreSettings()),
            FAITH.stored_key(ScoreSettings(method="eap-ig", ig_steps=2))}
    assert len(keys) == 5


def test_views_hold_what_core_faithfulness_computes_on_the_same_samples_edges_and_seed(faith):
    cache, run_key = faith.cache, faith.run_key
    assert faith.before.alphas == [] and cache.faithfulness_alphas(run_key) == list(ALPHAS)
    direct = run_faithfulness(read_run_samples(Store(faith.path), run_key, 0.5, FAITH.questions),
                              ScoreSettings(), FAITH.edges_per_sample, FAITH.seed, FAITH.copies,
                              log=quiet)
    edges = cache.faithfulness_edges(run_key, 0.5)
    for label in LABELS:
        expected = direct["models"][label]["edges"]
        found = edges[edges["label"] == label].drop(columns=["label", "role"]).to_dict("records")
        assert [row.keys() for row in found] == [row.keys() for row in expected]
        for row, want in zip(found, expected, strict=True):
            assert {k: row[k] for k in ("sample_id", "src", "dst", "stratum")} == \
                {k: want[k] for k in ("sample_id", "src", "dst", "stratum")}
            assert row["w"] == pytest.approx(want["w"], rel=1e-9, abs=1e-12)
            assert row["delta"] == pytest.approx(want["delta"], rel=1e-9, abs=1e-12)
    agreement = cache.faithfulness_agreement(run_key, 0.5)
    assert list(agreement.columns) == list(FAITHFULNESS_AGREEMENT_COLUMNS)
    assert list(agreement["stratum"]) == [s for s in STRATA for _ in AGREEMENT_STATISTICS] * 2
    table = agreement.set_index(["label", "stratum", "statistic"])
    for label in LABELS:
        want = direct["models"][label]["agreement"]  # under the same default MetricSettings
        for stratum in STRATA:
            for name in AGREEMENT_STATISTICS:
                got, expected = table.loc[(label, stratum, name)], want[stratum][name]
                assert got["n_edges"] == expected["n_edges"] == \
                    len(direct["questions"]) * FAITH.edges_per_sample // 2
                if expected["value"] is None:
                    assert np.isnan(got["value"])
                    continue
                assert got["value"] == pytest.approx(expected["value"], rel=1e-9)
                assert [got["low"], got["high"]] == pytest.approx(expected["interval"], rel=1e-9)
                if name != "calibration_slope":
                    assert -1 <= got["value"] <= 1
    comparison = direct["recovery_comparison"]
    areas = cache.recovery_areas(run_key, 0.5).set_index("role")
    assert list(areas.index) == ["base", "post", AREA_DIFFERENCE]
    for role, label in zip(("base", "post"), LABELS):
        assert areas.loc[role, "area"] == pytest.approx(comparison["models"][label]["area"],
                                                        rel=1e-9)
        assert [areas.loc[role, "low"], areas.loc[role, "high"]] == pytest.approx(
            comparison["models"][label]["area_interval"], rel=1e-9)
    difference = comparison["area_difference"]["tiny-post"]
    assert areas.loc[AREA_DIFFERENCE, "area"] == pytest.approx(difference["difference"], rel=1e-9)
    assert areas.loc[AREA_DIFFERENCE, "label"] == "tiny-post - tiny-base"
    needed = cache.recovery_k(run_key, 0.5).set_index("role")
    assert list(needed.index) == ["base", "post", K_RATIO]
    for role, label in zip(("base", "post"), LABELS):
        assert needed.loc[role, "k"] == pytest.approx(comparison["models"][label]["k"], rel=1e-9)
        assert needed.loc[role, "k"] == pytest.approx(direct["models"][label]["recovery"]["k"])
    assert needed.loc[K_RATIO, "k"] == pytest.approx(
        comparison["k_ratio"]["tiny-post"]["ratio"], rel=1e-9)
    curves = cache.recovery_curves(run_key, 0.5)
    assert len(curves) == 2 * len(RECOVERY_FRACTIONS)
    for label in LABELS:
        curve = curves[curves["label"] == label]
        np.testing.assert_allclose(curve["f"], comparison["models"][label]["f"], rtol=1e-9)
        np.testing.assert_allclose(curve["fraction"], RECOVERY_FRACTIONS)
        assert curve["f"].iloc[0] == 0 and curve["f"].iloc[-1] == 1
        assert (curve["low"] <= curve["high"]).all()


def test_recovery_without_bootstrap_has_nan_intervals(faith):
    none = MetricSettings(bootstrap=0)
    areas = faith.cache.recovery_areas(faith.run_key, 0.1, settings=none)
    assert areas[["low", "high"]].isna().all().all() and areas["area"].notna().all()
    needed = faith.cache.recovery_k(faith.run_key, 0.1, settings=none)
    assert needed[["low", "high"]].isna().all().all() and needed["k"].notna().all()
    agreement = faith.cache.faithfulness_agreement(faith.run_key, 0.1, settings=none)
    assert agreement[["low", "high"]].isna().all().all()
    assert faith.cache.recovery_curves(faith.run_key, 0.1, settings=none)["low"].isna().all()


def test_absent_runs_alphas_models_and_controls_are_not_found_errors(faith, methods):
    cache, run_key = faith.cache, faith.run_key
    for view in (cache.faithfulness_edges, cache.faithfulness_agreement, cache.recovery_curves,
                 cache.recovery_areas, cache.recovery_k):
        with pytest.raises(NotFoundError, match="no run 'nope'"):
            view("nope", 0.5)
        with pytest.raises(NotFoundError, match=r"has no alpha 0.3; its alphas are \[0.1, 0.5\]"):
            view(run_key, 0.3)
        with pytest.raises(NotFoundError, match="has no model 'nobody'"):
            view(run_key, 0.5, post_label="nobody")
    with pytest.raises(NotFoundError, match="no run 'nope'"):
        cache.faithfulness_alphas("nope")
    other, runs = methods
    assert other.faithfulness_alphas(runs["ig2"]) == []
    with pytest.raises(NotFoundError, match="holds no faithfulness control .* --controls faithfulness"):
        other.faithfulness_edges(runs["ig2"], 0.5)


def test_method_agreement_finds_the_other_method_runs_of_the_same_pair(methods, faith):
    cache, runs = methods
    listed = cache.method_runs(runs["eap"])
    assert list(listed["run_key"]) == [runs["ig1"], runs["ig2"]]
    assert list(listed["method"]) == ["eap-ig (1 steps, zero baseline)",
                                      "eap-ig (2 steps, zero baseline)"]
    assert list(cache.method_runs(runs["ig2"])["run_key"]) == [runs["eap"], runs["ig1"]]
    assert cache.method_agreement(runs["eap"], 0.1) is None  # no other method at alpha 0.1
    assert faith.cache.method_agreement(faith.run_key, 0.5) is None  # no other run at all
    table = cache.method_agreement(runs["eap"], 0.5)
    edges, changes = table[table["kind"] == "edges"], table[table["kind"] == "metric"]
    assert len(edges) == 2 * 2 and len(changes) == 2 * len(METRICS)
    assert edges["spearman"].between(-1, 1).all()
    assert set(changes["agrees"].dropna()) <= {True, False}
    # EAP-IG with one step is EAP (gradients at the real input): rank correlation 1, every change
    # the same.
    one = table[table["other_run_key"] == runs["ig1"]]
    assert one[one["kind"] == "edges"]["spearman"].to_numpy() == pytest.approx(1, abs=1e-9)
    same = one[one["kind"] == "metric"]
    np.testing.assert_allclose(same["change"], same["other_change"], rtol=1e-4, atol=1e-9)
    assert same["agrees"].all()
    two = table[(table["other_run_key"] == runs["ig2"]) & (table["kind"] == "edges")]
    assert (two["spearman"] < 1 - 1e-9).all(), "two IG steps are not EAP"


def test_plan_counts_the_faithfulness_rows_and_their_seconds(world, faith):  # noqa: F811
    fresh = ask(world, "plan-faith.duckdb", controls=("faithfulness",), faithfulness=FAITH)
    planned = pipeline.plan(fresh)
    assert planned["missing"]["faithfulness"] == len(ALPHAS) * 2
    n_questions = min(FAITH.questions, LIMIT)  # before grading: n questions, the most
    n_edges = ResidualGraph(2, "qkv").n_edges
    passes = 1 + pipeline.FORWARD_SHARE * (min(FAITH.edges_per_sample, n_edges) + 1
                                           + len(RECOVERY_FRACTIONS))
    assert planned["stage_seconds"]["faithfulness"] == pytest.approx(
        len(ALPHAS) * 2 * n_questions * passes * pipeline.DEFAULT_SECONDS["score"], abs=0.1)
    assert "faithfulness" not in pipeline.plan(ask(world, "plan-faith.duckdb"))["missing"]
    done = ask(world, "faith.duckdb", controls=("faithfulness",), faithfulness=FAITH)
    again = pipeline.plan(done)
    assert again["missing"]["faithfulness"] == 0 and again["stage_seconds"]["faithfulness"] == 0
    more = pipeline.plan(ask(world, "faith.duckdb", controls=("faithfulness",),
                                 faithfulness=FAITH.replace(seed=9)))
    assert more["missing"]["faithfulness"] == len(ALPHAS) * 2


def test_plan_seconds_of_scoring_scale_with_eap_ig_steps(world):  # noqa: F811
    eap = pipeline.plan(ask(world, "plan-ig.duckdb"))
    ig = pipeline.plan(ask(world, "plan-ig.duckdb",
                               score=ScoreSettings(method="eap-ig", ig_steps=4)))
    assert eap["missing"]["score"] == ig["missing"]["score"] > 0
    assert ig["stage_seconds"]["score"] == pytest.approx(4 * eap["stage_seconds"]["score"])
    # Past timings count per eap pass: an EAP-IG sample of 4 steps that took 4 s is 1 s a pass.
    eap_record, ig_record = ScoreSettings().as_dict(), ScoreSettings(method="eap-ig",
                                                                     ig_steps=4).as_dict()
    assert pipeline._seconds_per_pass([(eap_record, 1.0, 10), (ig_record, 4.0, 30)]) == 1.0
    assert pipeline._seconds_per_pass([]) == pipeline.DEFAULT_SECONDS["score"]


def test_cli_flags_and_request_files_carry_the_settings(world, faith, tmp_path, capsys):  # noqa: F811
    flags = ["--pair", "tiny", "--dataset", "tiny", "--alpha", *map(str, ALPHAS), "--n", "6",
             "--limit", str(LIMIT), "--beta", "0", "--gamma", "10", "--delta", "2",
             "--config", str(world / "pairs.toml"),
             "--cache", str(faith.path), "--controls", "faithfulness", "--faith-questions", "3",
             "--faith-edges-per-sample", "4", "--faith-seed", "5"]
    assert main(["plan", *flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"]["faithfulness"] == 0
    assert main(["plan", *flags[:-1], "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"]["faithfulness"] == len(ALPHAS) * 2
    asked = ask(world, "faith.duckdb", controls=("faithfulness",), faithfulness=FAITH)
    assert RunRequest.from_file(asked.to_file(tmp_path / "request.json")) == asked


def test_the_report_has_a_faithfulness_section_where_computed(faith, methods):
    assert 'id="faithfulness"' not in faith.before.report
    text = faith.cache.report_html(faith.run_key, alphas=[0.5])
    assert 'id="faithfulness"' in text and "W vs Delta" in text and "Recovery areas" in text
    assert "Edges kept for 0.8 recovery" in text and "calibration_slope" in text
    assert "tiny-post - tiny-base" in text and "Another scoring method" not in text
    cache, runs = methods
    text = cache.report_html(runs["ig2"], alphas=[0.5])
    assert 'id="faithfulness"' in text and "Another scoring method" in text
    assert "Recovery areas" not in text


def test_rows_written_before_cross_fitting_are_not_read_as_cross_fitted(faith, tmp_path):
    """A report without `halves` (ranked on the questions it evaluated) under another key: the
    views leave it out, and the control's key differs from the one such rows were written under."""
    path = tmp_path / "old.duckdb"
    shutil.copy(faith.path, path)
    rows = stored_rows(path, faith.run_key)
    with Store(path).write() as con:
        for alpha, label, _, _, text in rows:
            report = json.loads(text)
            del report["halves"]
            con.execute("UPDATE faithfulness SET report = ?, settings_key = 'old' WHERE run_key = ? "
                        "AND alpha = ? AND label = ?", [json.dumps(report), faith.run_key, alpha,
                                                        label])
    assert ResultCache.open(path).faithfulness_alphas(faith.run_key) == []
    # The key recipe before cross-fitting: the control finds no row under it and computes anew.
    before = stable_hash({"group": FAITH.group, **FAITH.key_dict(), "score": ScoreSettings().key()})
    assert FAITH.stored_key(ScoreSettings()) != before


def test_the_demos_faithfulness_control_uses_at_least_20_questions():
    (control,) = [request for request in part_requests("extras") if "faithfulness" in request.controls]
    assert control.faithfulness.questions >= 20
