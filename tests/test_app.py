"""The dashboard under Streamlit's AppTest (no browser): every page on a small fixture cache and on an
empty one, the query-string round trip, read-only mode, the Compute page's job handling, that no
page imports a model library, and the figure builders of core/figures.py."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core import figures, jobs
from core.circuit import build_circuit
from core.graph import ResidualGraph
from random_scores import random_means
from core.synthetic import build_controls_fixture, build_fixture_cache, build_synthetic_cache

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
PAGES = {"app.py": "Overview", "pages/1_Edge_heatmap.py": "Edge heatmap",
         "pages/2_Distributions.py": "Distributions", "pages/3_Circuit_graph.py": "Circuit graph",
         "pages/8_Trajectory.py": "Trajectory", "pages/4_Samples.py": "Samples",
         "pages/5_Compute.py": "Compute", "pages/6_Controls.py": "Controls",
         "pages/7_Faithfulness.py": "Faithfulness"}
RESULT_PAGES = [page for page in PAGES if page != "pages/5_Compute.py"]
# The fixture: "fixture-pair" (2 layers, one post model) and "fixture-series" (3 layers, post models
# synthetic-grpo and synthetic-dpo), one dataset, alphas 0.1 and 0.3, 8 questions.
CELLS = 6  # (run, post model, alpha) cells


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app-cache") / "fixture.duckdb"
    build_fixture_cache(path)
    return path


def open_app(monkeypatch, cache: Path, page: str = "app.py", query: dict | None = None,
             read_only: bool = False) -> AppTest:
    monkeypatch.setenv("CIRCUITDIFF_CACHE", str(cache))
    if read_only:
        monkeypatch.setenv("CIRCUITDIFF_READ_ONLY", "1")
    else:
        monkeypatch.delenv("CIRCUITDIFF_READ_ONLY", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    if page != "app.py":
        at.switch_page(page)  # the session opens on that page, as a link to it does
    return at.run()


def assert_clean(at: AppTest, title: str) -> None:
    assert [e.value for e in at.exception] == []
    assert [e.value for e in at.error] == []
    assert [t.value for t in at.title] == [title]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form {dtype, bdata, shape}."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).astype(float)
    return np.array(value, dtype=float)


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


# --- Every page -----------------------------------------------------------------------------------

def test_overview_shows_table_1_and_diversity(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache)
    assert_clean(at, "Overview")
    table = at.dataframe[0].value
    assert len(table) == CELLS
    assert {"intensity", "complexity", "edge_entropy", "kurtosis", "diversity"} <= set(table.columns)
    # base -> post and the change with its interval in every cell: intensity in %, the entropies
    # as differences in nats, kurtosis and diversity as differences (issue 26).
    number = r"[+-][\d.]+(?:e[+-]\d+)?"
    cells = table["intensity"]
    assert cells.str.contains(rf"→ .* {number}% \[{number}, {number}\]").all()
    assert table["complexity"].str.contains(rf"Δ{number} \[{number}, {number}\] nats").all()
    assert table["kurtosis"].str.contains(rf"Δ{number} \[{number}, {number}\]  p=").all()
    # Every metric has its permutation p and its Holm-adjusted p; * exactly where the latter is
    # at most 0.05.
    for metric in ("intensity", "complexity", "edge_entropy", "kurtosis", "diversity"):
        found = table[metric].str.extract(r"p=(\S+) \(Holm (\S+)\)(\*?)")
        assert found[0].notna().all(), metric
        assert ((found[1].astype(float) <= 0.05) == (found[2] == "*")).all(), metric
    # An arrow only where the interval excludes 0.
    assert (~cells.str.contains("[▲▼]")).any(), "the fixture should hold an unclear change"
    # The default primary cell, intensity at alpha 0.1, is marked, and no other.
    primary = table["alphas"].str.split(", ").apply(lambda alphas: "0.1" in alphas)
    assert primary.any()
    assert (table["intensity"].str.contains("†") == primary).all()
    for metric in ("complexity", "edge_entropy", "kurtosis", "diversity"):
        assert not table[metric].str.contains("†").any()
    captions = "\n".join(c.value for c in at.caption)
    assert f"{CELLS} (run, post model, T_cut) cells" in captions
    assert "after Holm's adjustment" in captions and "Primary cells (†)" in captions
    assert "Left out" not in captions
    assert "Diversity rose after post-training in" in markdown(at)
    assert len(charts(at)) == 1
    assert [b.proto.label for b in at.main.get("download_button")] == ["Download CSV"] * 2
    assert [b.proto.label for b in at.sidebar.get("download_button")] == ["Download report"]


def test_overview_counts_alphas_with_one_t_cut_once_and_lists_what_it_left_out(monkeypatch, tmp_path):
    from core.store import Store

    cache = tmp_path / "fixture.duckdb"
    pair_key, _ = build_fixture_cache(cache)
    with Store(cache).write() as con:  # the pair's alpha 0.3 now cuts where its 0.1 does
        con.execute("""UPDATE run_alphas SET t_cut = (SELECT t_cut FROM run_alphas
                           WHERE run_key = $run AND alpha = 0.1)
                       WHERE run_key = $run AND alpha = 0.3""", {"run": pair_key})
    at = open_app(monkeypatch, cache)
    assert_clean(at, "Overview")
    table = at.dataframe[0].value
    assert len(table) == CELLS - 1
    assert table[table["pair"] == "fixture-pair"]["alphas"].tolist() == ["0.1, 0.3"]
    captions = "\n".join(c.value for c in at.caption)
    assert "Left out: 1 cell(s)" in captions
    left_out = at.dataframe[1].value
    assert left_out["left_out"].tolist() == [f"same T_cut ({left_out['t_cut'].item()}) as alpha 0.1: "
                                             f"counted once, there"]
    assert "of 5** pooled cells" in markdown(at)


def test_edge_heatmap_masks_non_edges_and_can_hide_insignificant_edges(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/1_Edge_heatmap.py")
    assert_clean(at, "Edge heatmap")
    change, means = charts(at)
    z = array(change["data"][0]["z"])
    mask = ResidualGraph(2, "qkv").real_edge_mask
    assert np.isnan(z[~mask]).all() and np.isfinite(z[mask]).any()
    assert change["data"][0]["zmid"] == 0
    assert len(means["data"]) == 2  # base and post mean |W|, side by side
    for measure in ("difference", "normalised"):
        at.radio(key="heatmap.measure").set_value(measure).run()
        assert_clean(at, "Edge heatmap")
    at.toggle(key="heatmap.significant").set_value(True).run()
    assert_clean(at, "Edge heatmap")
    assert any("changed significantly" in c.value for c in at.caption)
    shown = array(charts(at)[0]["data"][0]["z"])
    assert np.isfinite(shown).sum() <= np.isfinite(z).sum()


def test_distributions_show_histograms_ecdfs_and_per_sample_metrics(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/2_Distributions.py")
    assert_clean(at, "Distributions")
    histogram, ecdf, violins = charts(at)
    assert histogram["layout"]["xaxis"]["type"] == "log" and ecdf["layout"]["xaxis"]["type"] == "log"
    assert sum(trace["type"] == "violin" for trace in violins["data"]) == 2  # base and post
    intervals = at.dataframe[0].value
    assert list(intervals["alpha"]) == [0.1, 0.1, 0.3, 0.3]
    assert (intervals["ci_low"] <= intervals["mean"]).all() and (intervals["mean"] <= intervals["ci_high"]).all()
    at.selectbox(key="distributions.metric").set_value("kurtosis").run()
    assert_clean(at, "Distributions")


def test_circuit_graph_highlights_the_edge_selected_in_the_table(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/3_Circuit_graph.py")
    assert_clean(at, "Circuit graph")
    edges = at.dataframe[0].value
    assert len(edges) == ResidualGraph(2, "qkv").n_edges  # k is capped at the graph's edges
    # The table is ranked by |change| and drawn in both panels.
    assert list(edges["abs_change"].abs()) == sorted(edges["abs_change"].abs(), reverse=True)
    assert len(charts(at)) == 1
    downloads = {b.proto.label: b for b in at.get("download_button")}
    assert {"Download CSV", "GraphML", "JSON"} <= set(downloads)


def test_samples_show_both_answers_with_the_scored_part_highlighted(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/4_Samples.py")
    assert_clean(at, "Samples")
    text = markdown(at)
    assert text.count("<mark") == 2 and "Reference answer" in text
    assert "correct" in text or "wrong" in text
    one, every = at.dataframe[0].value, at.dataframe[1].value
    assert len(one) == 1 and len(every) == 8
    assert {"base_kurtosis", "post_kurtosis", "base_correct", "post_correct"} <= set(every.columns)
    at.selectbox(key="samples.question").set_value(every["question_id"].iloc[3]).run()
    assert_clean(at, "Samples")


def test_compute_page_offers_the_configured_pairs(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    assert_clean(at, "Compute")
    assert {"demo-grpo (pair)", "demo (series)"} <= set(at.selectbox(key="compute.pair").options)
    assert "python -m core run --request request.json" in "\n".join(c.value for c in at.caption)
    assert {b.label for b in at.button} >= {"Estimate cost", "Start"}
    assert "request.json" in [b.proto.label for b in at.get("download_button")]


@pytest.fixture(scope="module")
def controls_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app-controls") / "controls.duckdb"
    build_controls_fixture(path)
    return path


def test_controls_page_shows_each_metric_with_its_parts_and_null(monkeypatch, controls_cache):
    at = open_app(monkeypatch, controls_cache, "pages/6_Controls.py")
    assert_clean(at, "Controls")
    table = at.dataframe[0].value
    assert list(table["metric"]) == ["intensity", "complexity", "edge_entropy", "kurtosis",
                                     "diversity", "output_entropy"]
    for column in ("weights", "tokens", "null", "no_sink", "answer_only"):
        assert table[column].notna().all(), column
    np.testing.assert_allclose(table["change"], table["weights"] + table["tokens"], rtol=1e-9)
    assert len(at.info) == 0
    assert len(charts(at)) == 1


def test_controls_page_without_controls_names_the_command(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/6_Controls.py")
    assert_clean(at, "Controls")
    assert at.dataframe[0].value["weights"].isna().all()
    messages = "\n".join(i.value for i in at.info)
    assert "--controls cross" in messages and "--controls perturb" in messages


def test_controls_page_in_read_only_mode(monkeypatch, controls_cache):
    at = open_app(monkeypatch, controls_cache, "pages/6_Controls.py", read_only=True)
    assert_clean(at, "Controls")
    assert len(at.dataframe) >= 1


def test_overview_marks_changes_within_their_null(monkeypatch, controls_cache):
    at = open_app(monkeypatch, controls_cache)
    assert_clean(at, "Overview")
    table = at.dataframe[0].value
    controlled = table[(table["pair"] == "fixture-pair")]
    uncontrolled = table[(table["pair"] != "fixture-pair")]
    assert controlled.stack().str.contains("◇").any()
    assert not uncontrolled.stack().str.contains("◇").any()
    assert any("does not exceed its null" in c.value for c in at.caption)


@pytest.mark.parametrize("page", RESULT_PAGES)
def test_every_page_on_an_empty_cache_says_what_to_do(monkeypatch, tmp_path, page):
    at = open_app(monkeypatch, tmp_path / "missing.duckdb", page)
    assert_clean(at, PAGES[page])
    assert len(at.info) == 1
    assert "holds no runs" in at.info[0].value and "make demo" in at.info[0].value


def test_compute_page_works_on_an_empty_cache(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "missing.duckdb", "pages/5_Compute.py")
    assert_clean(at, "Compute")
    assert any("No job has been started" in c.value for c in at.caption)


def test_results_written_while_the_app_runs_appear_without_a_restart(monkeypatch, tmp_path):
    cache = tmp_path / "grows.duckdb"
    at = open_app(monkeypatch, cache)
    assert "holds no runs" in at.info[0].value
    build_fixture_cache(cache)  # as a finished job would have written them
    at.run()
    assert_clean(at, "Overview")
    assert len(at.dataframe[0].value) == CELLS


# --- Query string ---------------------------------------------------------------------------------

def test_query_string_round_trip(monkeypatch, fixture_cache):
    link = {"pair": "fixture-series", "dataset": "fixture", "post": "synthetic-dpo", "alpha": "0.3",
            "granularity": "module", "kurtosis_of": "abs", "histogram_bins": "50"}
    at = open_app(monkeypatch, fixture_cache, query=link)
    assert_clean(at, "Overview")
    sidebar = at.sidebar
    assert sidebar.selectbox(key="sel.pair").value == "fixture-series"
    assert sidebar.selectbox(key="sel.post").value == "synthetic-dpo"
    assert sidebar.selectbox(key="sel.alpha").value == 0.3
    assert sidebar.selectbox(key="sel.granularity").value == "module"
    assert sidebar.selectbox(key="metric.kurtosis_of").value == "abs"
    assert sidebar.number_input(key="metric.histogram_bins").value == 50
    written = dict(at.query_params)
    assert {k: written[k] for k in link} == link  # and every other setting is spelled out
    assert written["bootstrap"] == "1000" and written["intensity_normaliser"] == "dense"

    # A change in the sidebar goes into the URL, and the URL reopens the same view elsewhere.
    sidebar.selectbox(key="sel.alpha").set_value(0.1).run()
    assert dict(at.query_params)["alpha"] == "0.1"
    again = open_app(monkeypatch, fixture_cache, "pages/1_Edge_heatmap.py", query=dict(at.query_params))
    assert_clean(again, "Edge heatmap")
    reopened = {k: v for k, v in dict(again.query_params).items() if not k.startswith("heatmap.")}
    assert reopened == dict(at.query_params)  # plus the heatmap page's own parameters
    assert again.caption[0].value == at.caption[0].value  # the selection line under the title
    # The selection survives a page switch within the session.
    at.switch_page("pages/3_Circuit_graph.py").run()
    assert at.sidebar.selectbox(key="sel.alpha").value == 0.1
    assert at.sidebar.selectbox(key="metric.kurtosis_of").value == "abs"


def test_a_link_reopens_the_page_view_too(monkeypatch, fixture_cache):
    views = {"pages/1_Edge_heatmap.py": {"heatmap.measure": "normalised",
                                         "heatmap.significant": "True"},
             "pages/2_Distributions.py": {"distributions.metric": "kurtosis"},
             "pages/3_Circuit_graph.py": {"circuit.k": "9", "circuit.by": "strength"},
             "pages/4_Samples.py": {"samples.question": "fixture-5"}}
    for page, view in views.items():
        at = open_app(monkeypatch, fixture_cache, page, query=view)
        assert_clean(at, PAGES[page])
        assert not at.warning
        written = dict(at.query_params)
        assert {k: written[k] for k in view} == view
        for key, value in view.items():
            widget = next(w for w in at.main if getattr(w, "key", None) == key)
            assert str(widget.value) == value
        # Another page keeps the selection but not this page's own parameters.
        at.switch_page("app.py").run()
        assert not set(view) & set(dict(at.query_params))
    at = open_app(monkeypatch, fixture_cache, "pages/3_Circuit_graph.py", query={"circuit.k": "9"})
    assert 0 < len(at.dataframe[0].value) <= 9  # the top 9, less those on no input-logits path


def test_a_link_that_does_not_fit_the_cache_falls_back(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, query={"pair": "no-such-pair", "alpha": "0.77",
                                                     "histogram_bins": "many"})
    assert [e.value for e in at.exception] == []
    assert at.sidebar.selectbox(key="sel.pair").value == "fixture-pair"
    assert at.sidebar.selectbox(key="sel.alpha").value == 0.1
    assert any("histogram_bins" in w.value for w in at.warning)
    at = open_app(monkeypatch, fixture_cache, "pages/3_Circuit_graph.py",
                  query={"circuit.k": "100000", "circuit.by": "size"})
    assert_clean(at, "Circuit graph")
    assert at.slider(key="circuit.k").value == ResidualGraph(2, "qkv").n_edges
    assert at.radio(key="circuit.by").value == "change"


def test_runs_of_one_pair_and_dataset_are_told_apart(monkeypatch, tmp_path):
    from core.query import ResultCache

    cache = tmp_path / "two-runs.duckdb"
    for seed in (0, 1):  # other questions, so another run of the same pair and dataset
        build_synthetic_cache(cache, n_pairs=1, n_datasets=1, alphas=(0.1,), n_samples=4,
                              layer_counts=(2,), seed=seed)
    first, second = ResultCache.open(cache).runs()["run_key"]
    at = open_app(monkeypatch, cache)
    assert_clean(at, "Overview")
    assert len(at.sidebar.selectbox(key="sel.run").options) == 2
    assert dict(at.query_params)["run"] == first
    # A link to the second run opens it, and keeps naming it page after page.
    link = {**dict(at.query_params), "run": second}
    again = open_app(monkeypatch, cache, "pages/4_Samples.py", query=link)
    assert_clean(again, "Samples")
    assert again.sidebar.selectbox(key="sel.run").value == second
    assert dict(again.query_params)["run"] == second


# --- Read-only mode -------------------------------------------------------------------------------

def test_read_only_mode_hides_compute(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, read_only=True)
    assert_clean(at, "Overview")
    labels = [link.proto.label for link in at.sidebar.get("page_link")]
    assert labels == [title for page, title in PAGES.items() if page != "pages/5_Compute.py"]
    at.switch_page("pages/5_Compute.py").run()  # an old link
    assert "Read-only mode" in at.warning[0].value
    assert not [b for b in at.button if b.label == "Start"]

    normal = open_app(monkeypatch, fixture_cache)
    assert "Compute" in [link.proto.label for link in normal.sidebar.get("page_link")]


def test_read_only_flag_on_the_command_line(monkeypatch):
    from pages._shared import selection

    monkeypatch.delenv("CIRCUITDIFF_READ_ONLY", raising=False)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    assert not selection.read_only()
    monkeypatch.setattr(sys, "argv", ["app.py", "--read-only"])
    assert selection.read_only()


# --- Compute: jobs --------------------------------------------------------------------------------

def test_a_duplicate_job_is_refused_with_a_message(monkeypatch, fixture_cache):
    def refuse(request):
        raise jobs.JobConflictError("job 1 (the same run) is still running; wait for it to finish "
                                    "or cancel it before starting another")

    monkeypatch.setattr(jobs, "start", refuse)
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Start").click().run()
    assert [e.value for e in at.error] == ["job 1 (the same run) is still running; wait for it to "
                                           "finish or cancel it before starting another"]


def test_estimate_is_shown_for_the_current_settings(monkeypatch, fixture_cache):
    plan = {"run_key": "abc", "questions": 40, "models": ["base", "post"], "seconds": 125.0,
            "missing": {"generate": 80, "grade": 80, "select": 1, "score": 16, "metrics": 2}}
    monkeypatch.setattr(jobs, "estimate", lambda request: plan)
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Estimate cost").click().run()
    assert_clean(at, "Compute")
    assert "0:02:05" in markdown(at)
    assert at.dataframe[0].value.iloc[0].to_dict() == plan["missing"]
    at.multiselect(key="compute.alphas").set_value([0.1]).run()
    assert any("estimate again" in c.value for c in at.caption)


def test_an_estimate_that_fails_shows_its_one_line_error(monkeypatch, fixture_cache):
    def fail(request):
        raise ValueError("cannot read the tokenizer of no/such/model")

    monkeypatch.setattr(jobs, "estimate", fail)
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Estimate cost").click().run()
    assert [e.value for e in at.error] == ["Cannot estimate this run: cannot read the tokenizer of "
                                           "no/such/model"]


def test_the_demo_second_part_is_offered_with_its_estimate_and_started(monkeypatch, fixture_cache):
    started = []
    monkeypatch.setattr(jobs, "demo_extras_offer", lambda cache: {"missing": 12, "seconds": 754.0})
    st.cache_data.clear()  # the page keeps its plan while the cache is unchanged
    monkeypatch.setattr(jobs, "start_demo", lambda cache, part: started.append(part) or "job-7")
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    assert_clean(at, "Compute")
    assert "about 0:12:34" in markdown(at)
    next(b for b in at.button if b.label == "Compute the demo's second part").click().run()
    assert started == ["extras"]
    assert any("Started the demo job job-7" in box.value for box in at.success)
    # Nothing to offer: the pairs have not landed, or the second part is complete.
    for offer in (None, {"missing": 0, "seconds": 0.0}):
        monkeypatch.setattr(jobs, "demo_extras_offer", lambda cache, offer=offer: offer)
        st.cache_data.clear()  # the page keeps its plan while the cache is unchanged
        at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
        assert not [b for b in at.button if b.label == "Compute the demo's second part"]


def test_a_running_job_shows_progress_and_can_be_cancelled(monkeypatch, fixture_cache, tmp_path):
    cache = tmp_path / "jobs.duckdb"
    # A stand-in for a run process: its own session, as jobs.start makes it.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               start_new_session=True)
    try:
        request = jobs.RunRequest(pair="demo-grpo", dataset="demo", alphas=(0.1,), cache=str(cache))
        path = jobs.jobs_dir(cache) / "job-1.json"
        jobs.write_status(path, job_id="job-1", request=request.as_dict(), state="running",
                          stage="score", done=3, total=10, eta_seconds=42.0, message="",
                          started_at=time.time(), pid=process.pid, log_path=str(tmp_path / "job.log"))
        at = open_app(monkeypatch, cache, "pages/5_Compute.py")
        assert_clean(at, "Compute")
        bar = at.get("progress")[0].proto
        assert bar.value == 30 and "stage score: 3/10" in bar.text and "ETA 0:00:42" in bar.text
        next(b for b in at.button if b.label == "Cancel").click().run()
        assert process.wait(timeout=15) == -signal.SIGTERM
        assert jobs.status("job-1", cache).state == "cancelled"
        assert "cancelled" in markdown(at)
    finally:
        if process.poll() is None:
            process.kill()


# --- Page load imports no model library -----------------------------------------------------------

def test_no_page_imports_a_model_library(fixture_cache):
    script = textwrap.dedent(f"""
        import sys
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({APP!r}, default_timeout=120).run()
        for page in {list(PAGES)[1:]!r}:
            at.switch_page(page).run()
            assert not at.exception, (page, [e.value for e in at.exception])
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "transformers", "peft", "trl", "accelerate"))
        print("HEAVY", heavy)
    """)
    env = {**os.environ, "CIRCUITDIFF_CACHE": str(fixture_cache)}
    env.pop("CIRCUITDIFF_READ_ONLY", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY []" in done.stdout


# --- Figure builders ------------------------------------------------------------------------------


def test_circuit_figure_uses_one_layout_for_both_models():
    graph = ResidualGraph(4, "qkv")
    circuit = build_circuit(graph, random_means(graph), set(), k=12, by="change",
                            metadata={"base_label": "base", "post_label": "post", "n_layers": 4})
    fig = figures.circuit_figure(circuit, highlight=circuit.edges["edge"].iloc[0])
    nodes = [t for t in fig.data if t.mode == "markers+text"]
    assert len(nodes) == 2
    assert list(nodes[0].x) == list(nodes[1].x) and list(nodes[0].y) == list(nodes[1].y)
    assert list(nodes[0].text) == list(nodes[1].text)
    highlighted = [t for t in fig.data if t.line is not None and t.line.width == 5]
    assert len(highlighted) == 2  # the selected edge, in both panels


def test_change_heatmap_hover_has_both_models_values():
    graph = ResidualGraph(2, "module")
    means = random_means(graph)
    change = np.where(graph.real_edge_mask, 0.5, np.nan)
    change[0, 0] = 40.0  # one outlier does not set the colour range
    fig = figures.change_heatmap(graph, change, means, "base-model", "post-model", "ratio")
    trace = fig.data[0]
    assert "base-model" in trace.hovertemplate and "post-model" in trace.hovertemplate
    assert np.asarray(trace.customdata).shape == (graph.n_src, graph.n_dst, 4)
    assert trace.zmid == 0 and trace.zmax == -trace.zmin and trace.zmax < 40.0
    assert list(trace.y) == list(graph.src_names) and list(trace.x) == list(graph.dst_names)


def test_abs_histogram_counts_fractions_and_reports_zeros():
    values = {"base": np.array([0.0, 1e-4, 1e-3, 1e-2]), "post": np.array([1e-4, 2e-4])}
    fig = figures.abs_histogram(values, n_bins=10)
    base, post = fig.data
    assert sum(base.y) == pytest.approx(0.75) and sum(post.y) == pytest.approx(1.0)
    assert "1 zeros not shown" in base.name
    assert fig.layout.xaxis.type == "log"


def test_change_summary_colours_by_the_papers_direction():
    # Diversity is reported as a difference (issue 26): the bars are the changes post - base.
    nan = float("nan")
    frame = pd.DataFrame({"cell": ["a", "b"], "scale": ["difference"] * 2,
                          "change_pct": [nan, nan], "ci_low": [nan, nan], "ci_high": [nan, nan],
                          "change": [0.05, -0.02], "change_low": [0.01, -0.04],
                          "change_high": [0.09, 0.005]})
    fig = figures.change_summary(frame, "diversity", expected_sign=1)
    bar = fig.data[0]
    assert list(bar.x) == ["b", "a"]  # sorted by change
    assert list(bar.y) == [-0.02, 0.05]
    assert list(bar.error_y.arrayminus) == pytest.approx([0.02, 0.04])
    assert list(bar.marker.color) == [figures.BASE_COLOR, figures.POST_COLOR]
    assert "(Δ)" in fig.layout.yaxis.title.text


# --- Compute: where the user is, what selection will keep, where it runs ----------------------------

def test_compute_opens_on_the_sidebars_pair_and_dataset(monkeypatch, tmp_path):
    cache = tmp_path / "configured-names.duckdb"
    # runs named after configured pairs and datasets (the paper's), none of them the first ones
    build_synthetic_cache(cache, n_pairs=2, n_datasets=2, alphas=(0.1,), n_samples=4,
                          layer_counts=(2, 2))
    configured = jobs.configured()
    first_pair, first_dataset = next(iter(configured["pairs"])), configured["datasets"][0]
    link = {"pair": "mistral", "dataset": "gsm8k"}
    assert (first_pair, first_dataset) != tuple(link.values())
    at = open_app(monkeypatch, cache, "pages/1_Edge_heatmap.py", query=link)
    at.switch_page("pages/5_Compute.py").run()
    assert_clean(at, "Compute")
    assert at.selectbox(key="compute.pair").value == "mistral"
    assert at.selectbox(key="compute.dataset").value == "gsm8k"
    # back on a result page, the sidebar still holds the selection
    at.switch_page("pages/1_Edge_heatmap.py").run()
    assert at.sidebar.selectbox(key="sel.pair").value == "mistral"
    # a sidebar pair the config does not declare leaves the first configured one
    fixture = tmp_path / "fixture.duckdb"
    build_fixture_cache(fixture)
    at = open_app(monkeypatch, fixture, "pages/5_Compute.py", query={"pair": "fixture-pair"})
    assert at.selectbox(key="compute.pair").value == first_pair


def test_the_estimate_says_what_the_selection_rules_will_keep(monkeypatch, fixture_cache):
    removed = {"not correct for every model": 30, "mean length outside [floor(beta*T_bar), "
               "floor(gamma*T_bar)]": 5, "length mismatch above delta": 3,
               "prompt lengths differ": 0, "not drawn (n reached)": 2}
    plan = {"run_key": "abc", "questions": 50, "models": ["base", "post"], "seconds": 10.0,
            "missing": {"generate": 0, "grade": 0, "select": 1, "score": 40, "metrics": 4},
            "selection": {"n_candidates": 50, "n_requested": 10, "n_selected": 10, "t_bar": 42.5,
                          "window": [21, 63], "removed": removed}}
    monkeypatch.setattr(jobs, "estimate", lambda request: plan)
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Estimate cost").click().run()
    assert_clean(at, "Compute")
    assert "will keep **10** of 50 questions" in markdown(at)
    kept = at.dataframe[1].value
    assert list(kept["removed"]) == list(removed.values())
    assert list(kept["left"]) == [20, 15, 12, 12, 10]

    # Before the answers are graded there is no selection to report: the page says why.
    del plan["selection"]
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Estimate cost").click().run()
    assert any("generated and graded" in c.value for c in at.caption)


def test_the_estimate_of_a_cached_run_shows_its_selection(monkeypatch, fixture_cache):
    from core.query import ResultCache

    run = ResultCache.open(fixture_cache).runs().iloc[0]
    plan = {"run_key": run["run_key"], "questions": 12, "models": ["base", "post"], "seconds": 0.0,
            "missing": {"generate": 0, "grade": 0, "select": 0, "score": 0, "metrics": 0}}
    monkeypatch.setattr(jobs, "estimate", lambda request: plan)
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    next(b for b in at.button if b.label == "Estimate cost").click().run()
    assert_clean(at, "Compute")
    assert (f"This run is cached already; its selection kept **{run['n_selected']}** of "
            f"{run['n_candidates']} questions") in markdown(at)


def test_compute_offers_the_executors_of_a_run_request(monkeypatch, fixture_cache):
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    assert at.selectbox(key="compute.executor").options == ["local", "ray"]
    assert at.text_input(key="compute.ray_address").disabled
    at.selectbox(key="compute.executor").set_value("ray").run()
    at.text_input(key="compute.ray_address").set_value("not an address").run()
    assert len(at.error) == 1 and "not an address" in at.error[0].value
    at.text_input(key="compute.ray_address").set_value("auto").run()
    assert_clean(at, "Compute")


def test_compute_starts_a_run_with_the_chosen_controls(monkeypatch, fixture_cache):
    started = []
    monkeypatch.setattr(jobs, "start", lambda request: started.append(request) or "job-1")
    at = open_app(monkeypatch, fixture_cache, "pages/5_Compute.py")
    at.multiselect(key="compute.controls").set_value(["cross", "faithfulness"]).run()
    at.number_input(key="compute.faithfulness.questions").set_value(4).run()
    next(b for b in at.button if b.label == "Start").click().run()
    [request] = started
    assert request.controls == ("cross", "faithfulness")
    assert request.faithfulness.questions == 4


def test_the_sidebar_lists_pairs_in_declared_order_so_the_demo_opens_on_grpo(monkeypatch, tmp_path):
    # The fixture's runs renamed as two demo pairs: alphabetically demo-dpo would come first.
    import duckdb

    path = tmp_path / "demo-names.duckdb"
    build_fixture_cache(path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE runs SET name = CASE name WHEN 'fixture-pair' THEN 'demo-grpo' "
                "ELSE 'demo-dpo' END")
    con.close()
    at = open_app(monkeypatch, path, "pages/1_Edge_heatmap.py")
    assert at.selectbox(key="sel.pair").options == ["demo-grpo", "demo-dpo"]
    assert at.selectbox(key="sel.pair").value == "demo-grpo"
