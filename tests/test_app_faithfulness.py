"""The Faithfulness page and the Samples page's token view under Streamlit's AppTest, on the synthetic
fixture cache with a faithfulness control and a token view written into it (in the layouts the
pipeline and core/tokens.py write), on an empty cache and in read-only mode; and their figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import figures, jobs
from core.faithfulness_stats import (AGREEMENT_STATISTICS, RECOVERY_FRACTIONS, agreement, halves,
                                     recovery_area, recovery_f, recovery_k)
from core.graph import ResidualGraph
from core.query import METHOD_AGREEMENT_COLUMNS, ResultCache
from core.runstore import RunStore
from core.settings import FaithfulnessSettings, ScoreSettings
from core.store import Store
from core.synthetic import build_fixture_cache
from core.tokens import write_token_view
from test_app import array, assert_clean, charts, markdown, open_app

PAGE = "pages/7_Faithfulness.py"
SAMPLES = "pages/4_Samples.py"
ALPHA = 0.1  # the pair's alpha with the control; its other alpha, 0.3, has none


def faithfulness_report(graph: ResidualGraph, role: str, questions: list[str], t_cut: int,
                        rng: np.random.Generator) -> dict:
    """One model's report as the faithfulness control stores it: Delta = W times noise, some of
    the random half with the other sign; losses falling from L_empty to L_full as edges are kept."""
    src, dst = np.nonzero(graph.real_edge_mask)
    edges = []
    for question in questions:
        for index, stratum in zip(rng.choice(len(src), size=6, replace=False), ["top"] * 3 + ["random"] * 3):
            w = float(rng.lognormal(-6 if stratum == "top" else -9, 1.0) * rng.choice([-1, 1]))
            flip = -1.0 if stratum == "random" and rng.random() < 0.3 else 1.0
            edges.append({"sample_id": question, "src": graph.src_names[src[index]],
                          "dst": graph.dst_names[dst[index]], "stratum": stratum, "w": w,
                          "delta": w * flip * float(rng.lognormal(0.3, 0.5))})
    kept = np.linspace(0.0, 1.0, len(RECOVERY_FRACTIONS)) ** 0.5
    losses = 3.0 - 2.0 * kept[:, None] * rng.uniform(0.8, 1.0, size=(1, len(questions)))
    losses[-1] = 1.0 + rng.uniform(0.0, 0.2, size=len(questions))
    f = recovery_f(losses)
    return {"t_cut": t_cut, "questions": questions, "role": role, "spec": {"kind": "synthetic"},
            "granularity": graph.granularity, "dtype": "float32", "method": {"name": "eap"},
            "seed": 0, "n_samples": len(questions), "n_real_edges": graph.n_edges,
            "edges_per_sample": 6, "loss": {q: 1.0 for q in questions},
            "halves": halves(len(questions)).tolist(),
            "agreement": agreement(questions, *([e[name] for e in edges]
                                                for name in ("sample_id", "stratum", "w", "delta"))),
            "edges": edges,
            "recovery": {"fractions": RECOVERY_FRACTIONS.tolist(),
                         "n_kept": np.rint(RECOVERY_FRACTIONS * graph.n_edges).astype(int).tolist(),
                         "f": f.tolist(), "area": float(recovery_area(RECOVERY_FRACTIONS, f)),
                         "k": float(recovery_k(RECOVERY_FRACTIONS, f)),
                         "loss_empty": float(losses[0].mean()), "loss_full": float(losses[-1].mean()),
                         "losses": losses.tolist()}}


def token_view(cache: ResultCache, run_key: str, question_id: str, rng: np.random.Generator) -> dict:
    """A view in core/tokens.py's layout: the 4 most changed edges, answers of 5 and 7 tokens."""
    runs = cache.runs()
    row = runs[runs["run_key"] == run_key].iloc[0]
    graph = cache.graph(run_key)
    change = cache.edge_change(run_key, ALPHA, "difference")
    src, dst = np.nonzero(graph.real_edge_mask)
    order = np.argsort(-np.abs(change[src, dst]))[:4]
    edges = [{"src": graph.src_names[src[e]], "dst": graph.dst_names[dst[e]],
              "change": float(change[src[e], dst[e]]), "base_mean_abs": 1.0, "post_mean_abs": 1.0}
             for e in order]
    models = []
    for label, role, n in ((row["base_label"], "base", 5), (row["post_label"], "post", 7)):
        contributions = rng.normal(0, 1e-3, size=(len(edges), n))
        prompt = rng.normal(0, 1e-3, size=(2, len(edges)))
        models.append({"label": label, "role": role, "t_cut": n + 1, "loss": 1.0,
                       "tokens": [" The", " sum", " is", " 4", "2", "\n", "."][:n],
                       "w": (contributions.sum(1) + prompt.sum(0)).tolist(),
                       "first_token": prompt[0].tolist(), "prompt_rest": prompt[1].tolist(),
                       "contributions": contributions.tolist()})
    return {"run_key": run_key, "alpha": ALPHA, "t_cut": 8, "question_id": question_id,
            "post_label": row["post_label"], "k": len(edges), "measure": "difference",
            "score": {"granularity": "qkv", "dtype": "float32", "name": "eap"}, "edges": edges,
            "models": models}


@pytest.fixture(scope="module")
def faith_cache(tmp_path_factory):
    """The fixture cache; its pair has the faithfulness control at alpha 0.1 and a token view of
    its second question. Returns (path, pair run key, that question's id)."""
    path = tmp_path_factory.mktemp("app-faithfulness") / "faithfulness.duckdb"
    pair, _ = build_fixture_cache(path)
    cache = ResultCache.open(path)
    rng = np.random.default_rng(5)
    samples = cache.samples(pair, ALPHA)
    questions = list(samples["question_id"][:4])
    runs = RunStore(Store(path))
    settings, score = FaithfulnessSettings(questions=4, edges_per_sample=6), ScoreSettings()
    table = cache.runs()
    row = table[table["run_key"] == pair].iloc[0]
    for label, role in ((row["base_label"], "base"), (row["post_label"], "post")):
        runs.write_faithfulness(pair, ALPHA, label, settings.stored_key(score),
                                settings.stored_settings(score),
                                faithfulness_report(cache.graph(pair), role, questions,
                                                    int(samples["t_cut"].iloc[0]), rng))
    write_token_view(Store(path), token_view(cache, pair, questions[1], rng))
    return path, pair, questions[1]


def pair_query(alpha: float = ALPHA) -> dict:
    return {"pair": "fixture-pair", "alpha": f"{alpha:g}"}


def test_the_page_shows_scatter_correlations_recovery_and_areas(monkeypatch, faith_cache):
    path, pair, _ = faith_cache
    at = open_app(monkeypatch, path, PAGE, query=pair_query())
    assert_clean(at, "Faithfulness")
    scatter, recovery = charts(at)
    titles = [a["text"] for a in scatter["layout"]["annotations"]]
    assert len(titles) == 2
    # Each panel names its model and the agreement of each stratum apart, never pooled.
    assert all(t.count("Spearman") == 2 and "top by |W|: Spearman" in t
               and "drawn at random: Spearman" in t for t in titles), titles
    edges = ResultCache.open(path).faithfulness_edges(pair, ALPHA)
    points = [t for t in scatter["data"] if t.get("mode") == "markers"]
    assert {t["name"] for t in points} == {"top by |W|", "drawn at random"}
    assert sum(len(array(t["x"])) for t in points) == len(edges) == 2 * 4 * 6
    # One sign-preserving log scale for both axes: the diagonal is Delta = W.
    assert scatter["layout"]["xaxis"]["ticktext"] == scatter["layout"]["yaxis"]["ticktext"]
    assert "0" in scatter["layout"]["xaxis"]["ticktext"]
    assert recovery["layout"]["xaxis"]["type"] == "log"
    lines = [t for t in recovery["data"] if t.get("mode") == "lines+markers"]
    assert len(lines) == 2 and all("area" in t["name"] for t in lines)
    assert all(array(t["x"]).min() > 0 for t in lines), "k = 0 cannot sit on a log axis"
    assert sum(t.get("fill") == "toself" for t in recovery["data"]) == 2
    agreement_table, areas, needed = (frame.value for frame in at.dataframe[:3])
    # Per model, stratum (never pooled) and statistic, with BCa intervals over the 4 questions.
    assert len(agreement_table) == 2 * 2 * len(AGREEMENT_STATISTICS)
    assert set(agreement_table["stratum"]) == {"top", "random"}
    assert set(agreement_table["statistic"]) == set(AGREEMENT_STATISTICS)
    assert (agreement_table["low"] <= agreement_table["value"]).all()
    assert (agreement_table["value"] <= agreement_table["high"]).all()
    assert list(areas["role"]) == ["base", "post", "post - base"]
    assert (areas["low"] <= areas["area"]).all() and (areas["area"] <= areas["high"]).all()
    assert list(needed["role"]) == ["base", "post", "post / base"]
    assert (needed["low"] <= needed["k"]).all() and (needed["k"] <= needed["high"]).all()
    assert any("f first reaches 0.8" in c.value for c in at.caption)
    assert any("another method" in c.value for c in at.caption)


def test_another_methods_agreement_is_shown_where_there_is_one(monkeypatch, faith_cache):
    path, pair, _ = faith_cache
    rows = [{"other_run_key": "other", "method": "eap", "other_method": "eap-ig (5 steps, zero "
             "baseline)", "kind": "edges", "name": label, "role": role, "spearman": 0.9, "n": 10}
            for label, role in (("b", "base"), ("p", "post"))]
    rows.append({"other_run_key": "other", "method": "eap", "other_method": "eap-ig", "kind": "metric",
                 "name": "intensity", "n": 8, "change": 0.1, "other_change": 0.2,
                 "clear_sign": True, "other_clear_sign": False, "agrees": True})
    table = pd.DataFrame(rows, columns=list(METHOD_AGREEMENT_COLUMNS))
    monkeypatch.setattr(ResultCache, "method_agreement", lambda self, *a, **k: table)
    at = open_app(monkeypatch, path, PAGE, query=pair_query())
    assert_clean(at, "Faithfulness")
    edges, metrics = at.dataframe[3].value, at.dataframe[4].value
    assert list(edges["spearman"]) == [0.9, 0.9] and list(metrics["name"]) == ["intensity"]


def test_an_alpha_without_the_control_names_the_computed_ones(monkeypatch, faith_cache):
    path, pair, _ = faith_cache
    at = open_app(monkeypatch, path, PAGE, query=pair_query(0.3))
    assert_clean(at, "Faithfulness")
    assert "computed at alpha 0.1" in at.info[0].value and not charts(at)


def test_a_run_without_the_control_says_how_to_compute_it(monkeypatch, faith_cache):
    path, _, _ = faith_cache
    at = open_app(monkeypatch, path, PAGE, query={"pair": "fixture-series"})
    assert_clean(at, "Faithfulness")
    message = at.info[0].value
    assert "not computed" in message
    assert "python -m core run --pair fixture-series --dataset fixture ... --controls faithfulness" \
        in message
    assert "Compute" in message and not charts(at)


def test_the_page_on_an_empty_cache_and_read_only(monkeypatch, tmp_path, faith_cache):
    at = open_app(monkeypatch, tmp_path / "missing.duckdb", PAGE)
    assert_clean(at, "Faithfulness")
    assert len(at.info) == 1 and "holds no runs" in at.info[0].value
    path, pair, _ = faith_cache
    at = open_app(monkeypatch, path, PAGE, query=pair_query(), read_only=True)
    assert_clean(at, "Faithfulness")
    assert len(charts(at)) == 2


def open_question(monkeypatch, path, question_id: str, read_only: bool = False):
    return open_app(monkeypatch, path, SAMPLES, read_only=read_only,
                    query={**pair_query(), "samples.question": question_id})


def test_samples_show_the_stored_token_view(monkeypatch, faith_cache):
    path, pair, question = faith_cache
    for read_only in (False, True):
        at = open_question(monkeypatch, path, question, read_only)
        assert_clean(at, "Samples")
        (chart,) = charts(at)
        heatmaps = [t for t in chart["data"] if t["type"] == "heatmap"]
        assert [array(t["z"]).shape for t in heatmaps] == [(4, 5), (4, 7)]
        assert chart["layout"]["xaxis"]["ticktext"][0] == "␣The"
        assert chart["layout"]["xaxis2"]["ticktext"][5] == "⏎"
        assert "sum to W" in "\n".join(c.value for c in at.caption)
        buttons = [b.label for b in at.button]
        assert ("Compute again" in buttons) != read_only


def test_samples_start_a_token_view_job_for_a_question_without_one(monkeypatch, faith_cache):
    path, pair, question = faith_cache
    other = ResultCache.open(path).samples(pair, ALPHA)["question_id"].iloc[0]
    assert other != question
    started = []
    monkeypatch.setattr(jobs, "start_token_view", lambda *args: started.append(args) or "job")
    at = open_question(monkeypatch, path, other)
    assert_clean(at, "Samples")
    assert not charts(at)
    next(b for b in at.button if b.label == "Compute the token view").click().run()
    assert started == [(str(path), pair, ALPHA, other, "synthetic-rl", jobs.TOKEN_VIEW_EDGES)]
    at = open_question(monkeypatch, path, other, read_only=True)
    assert not [b for b in at.button if "Compute" in b.label]
    assert f"python -m core tokens --run {pair} --alpha 0.1 --question {other}" in markdown(at) + \
        "\n".join(c.value for c in at.caption)


def test_token_view_figure_shares_one_colour_range_and_names_long_answers_by_position():
    rng = np.random.default_rng(0)
    tokens = [f" t{i}" for i in range(figures.MAX_TOKEN_TICKS + 1)]
    view = {"edges": [{"src": "input", "dst": "m0"}],
            "models": [{"label": label, "role": role, "t_cut": n + 1, "tokens": tokens[:n],
                        "contributions": rng.normal(0, scale, size=(1, n)).tolist(),
                        "w": [0.0], "first_token": [0.0], "prompt_rest": [0.0]}
                       for label, role, n, scale in (("b", "base", 3, 1.0), ("p", "post", len(tokens), 5.0))]}
    fig = figures.token_view_figure(view).to_dict()
    ranges = {(t["zmin"], t["zmax"]) for t in fig["data"]}
    assert len(ranges) == 1 and next(iter(ranges))[1] > 1.0
    assert list(fig["layout"]["xaxis"]["ticktext"]) == ["␣t0", "␣t1", "␣t2"]
    assert fig["layout"]["xaxis2"]["title"]["text"] == "answer position"


def test_the_stored_control_prints_as_markdown_from_the_cli(faith_cache, capsys):
    """`python -m core faithfulness --run RUN --stored`: the README's table, read from the cache."""
    from core.__main__ import main

    path, pair, _ = faith_cache
    assert main(["faithfulness", "--run", pair, "--cache", str(path), "--stored"]) == 0
    out = capsys.readouterr().out
    agreement = ResultCache.open(path).faithfulness_agreement(pair, ALPHA)
    rows = [line for line in out.splitlines() if line.startswith(f"| {ALPHA:g} |")]
    # One agreement row per model and stratum, then one recovery row per model and the ratio.
    n_pairs = agreement.groupby(["label", "stratum"]).ngroups
    assert n_pairs == 4 and len(rows) == n_pairs + 3
    spearman = agreement[agreement["statistic"] == "spearman"].iloc[0]
    assert f"{spearman['value']:.3f} [{spearman['low']:.3f}, {spearman['high']:.3f}]" in out
    assert main(["faithfulness", "--run", "nope", "--cache", str(path), "--stored"]) == 2
