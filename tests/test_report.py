"""The report (core/report.py): `python -m core report` on a fixture cache writes one self-contained
HTML file with every section and figure and no reference to a script or stylesheet elsewhere; bad
requests are one `error:` line; the dashboard's result pages offer it ("Download report"), read-only
mode included. The real-browser checks (every figure of the file drawn with the network blocked, the
button's download) are in tests/test_browser.py."""

from __future__ import annotations

import html.parser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.query import ResultCache
from core.report import SECTIONS
from core.synthetic import build_fixture_cache

REPO = Path(__file__).resolve().parent.parent
# Figures per alpha: the edge-change heatmap, the |W| histogram and ECDF, the circuit; and one
# per-sample violin figure per per-sample metric over all alphas.
FIGURES_PER_ALPHA = 4
SECTION_IDS = ("table-1", "edge-heatmap", "distributions", "circuit", "provenance")


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report-cache") / "fixture.duckdb"
    build_fixture_cache(path)
    return path


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "core", "report", "--cache", str(cache), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


class Document(html.parser.HTMLParser):
    """What a report's HTML holds: section ids, plotly figure divs, inline and external scripts,
    stylesheets, and the text of table header cells."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.figures: list[str] = []
        self.scripts: list[dict] = []
        self.links: list[dict] = []
        self.headers: list[str] = []
        self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "div" and "plotly-graph-div" in (attrs.get("class") or ""):
            self.figures.append(attrs.get("id"))
        elif tag == "script":
            self.scripts.append(attrs)
        elif tag == "link":
            self.links.append(attrs)
        self._in_th = tag == "th"

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data.strip())

    def handle_endtag(self, tag):
        self._in_th = False


def remote_references(text: str) -> list[str]:
    """Every script or stylesheet the document would fetch from elsewhere."""
    found = Document(text)
    refs = [s["src"] for s in found.scripts if s.get("src")]
    refs += [link.get("href", "") for link in found.links
             if "stylesheet" in (link.get("rel") or "") or link.get("href", "").startswith("http")]
    return refs + (["@import"] if "@import" in text.split("<script", 1)[0] else [])


# --- python -m core report -------------------------------------------------------------------------

def test_cli_writes_one_self_contained_file_with_every_section_and_figure(fixture_cache, tmp_path):
    runs = ResultCache.open(fixture_cache).runs()
    series = runs[runs["pair"] == "fixture-series"].iloc[1]  # the second post model
    out = tmp_path / "report.html"
    done = cli("--run", series["run_key"], "--post", series["post_label"], "--granularity", "module",
               "--kurtosis-of", "abs", "--out", str(out), cache=fixture_cache)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == [out]  # one file, no temporary left behind
    text = out.read_text()
    document = Document(text)
    assert document.sections == list(SECTION_IDS)
    # controls and faithfulness: only where computed (test_controls_views,
    # test_faithfulness_control)
    assert len(SECTIONS) == len(SECTION_IDS) + 2
    n_alphas = len(series["alphas"])
    assert len(document.figures) == FIGURES_PER_ALPHA * n_alphas + 4
    assert len(set(document.figures)) == len(document.figures)  # ids the browser can tell apart
    # plotly.js inline, once; every other script only draws a figure
    assert remote_references(text) == []
    assert sum("plotly.js v" in part for part in text.split("<script")) == 1
    assert len(document.scripts) == 1 + len(document.figures)
    # The view asked for, and the provenance that makes the file stand alone.
    assert f"{series['base_label']} → {series['post_label']}" in text
    assert "granularity module" in text and "&quot;kurtosis_of&quot;: &quot;abs&quot;" in text
    for field in ("run key", "dataset key", "dataset content hash", "code version of the run",
                  "code version of the report", "report written", "cache"):
        assert field in document.headers
    for column in ("model_key", "fingerprint", "spec", "tokenizer_fingerprint"):
        assert column in document.headers
    assert str(fixture_cache) in text
    assert "wrote" in done.stdout and str(out) in done.stdout


def test_report_rows_are_the_read_models_comparisons_at_every_alpha(fixture_cache):
    cache = ResultCache.open(fixture_cache)
    run = cache.runs().iloc[0]
    text = cache.report_html(run["run_key"])
    for alpha in run["alphas"]:
        comparison = cache.comparison(run["run_key"], alpha)
        for metric, change in comparison.metrics.items():
            low, high = change.base_ci
            assert f"<td>{metric}</td>" in text
            assert f"<td>{change.base:.4g}</td>" in text and f"[{low:.4g}, {high:.4g}]" in text
        assert f"<h3>alpha {alpha:g} (T_cut = " in text


def test_an_alpha_with_too_few_questions_is_listed_not_drawn(fixture_cache, monkeypatch):
    cache = ResultCache.open(fixture_cache)
    run = cache.runs().iloc[0]
    real = cache.comparison
    low_alpha, high_alpha = run["alphas"]

    def comparison(run_key, alpha, **kwargs):
        if alpha == high_alpha:
            raise ValueError("only 1 question(s) are scored for every model")
        return real(run_key, alpha, **kwargs)

    monkeypatch.setattr(cache, "comparison", comparison)
    text = cache.report_html(run["run_key"])
    assert f"alpha {high_alpha:g} left out: only 1 question(s)" in text
    assert f"<h3>alpha {high_alpha:g} (T_cut" not in text and f"<h3>alpha {low_alpha:g} (T_cut" in text


def test_an_unknown_run_is_one_error_line(fixture_cache, tmp_path):
    out = tmp_path / "report.html"
    done = cli("--run", "no-such-run", "--out", str(out), cache=fixture_cache)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-run" in lines[0]
    assert "python -m core ls" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args, says", [
    (("--post", "no-such-model"), "no post-trained model 'no-such-model'"),
    (("--alpha", "0.77"), "has no alpha 0.77"),
])
def test_a_bad_view_is_one_error_line(fixture_cache, tmp_path, args, says):
    run_key = ResultCache.open(fixture_cache).runs()["run_key"].iloc[0]
    done = cli("--run", run_key, "--out", str(tmp_path / "r.html"), *args, cache=fixture_cache)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]


def test_an_out_that_is_a_directory_is_refused_before_any_work(tmp_path):
    # No cache at all: the refusal must come before the cache is read.
    done = cli("--run", "anything", "--out", str(tmp_path), cache=tmp_path / "missing.duckdb")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --out {tmp_path} is a directory; give the path of a file"
    assert list(tmp_path.iterdir()) == []


# --- The dashboard's "Download report" ------------------------------------------------------------

RESULT_PAGES = ("pages/1_Edge_heatmap.py", "pages/2_Distributions.py", "pages/3_Circuit_graph.py",
                "pages/4_Samples.py")


def open_page(monkeypatch, cache: Path, page: str, read_only: bool = False) -> AppTest:
    monkeypatch.setenv("CIRCUITDIFF_CACHE", str(cache))
    if read_only:
        monkeypatch.setenv("CIRCUITDIFF_READ_ONLY", "1")
    else:
        monkeypatch.delenv("CIRCUITDIFF_READ_ONLY", raising=False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.switch_page(page)
    return at.run()


def report_buttons(at: AppTest) -> list:
    return [b for b in at.sidebar.get("download_button") if b.proto.label == "Download report"]


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("page", RESULT_PAGES)
def test_every_result_page_offers_the_report_in_its_sidebar(monkeypatch, fixture_cache, page,
                                                            read_only):
    at = open_page(monkeypatch, fixture_cache, page, read_only=read_only)
    assert [e.value for e in at.exception] == []
    # Built on click (the browser test downloads it): the page itself builds no report.
    (button,) = report_buttons(at)
    assert button.proto.deferred_file_id


def test_no_report_is_offered_on_an_empty_cache(monkeypatch, tmp_path):
    at = open_page(monkeypatch, tmp_path / "missing.duckdb", RESULT_PAGES[0])
    assert [e.value for e in at.exception] == []
    assert report_buttons(at) == []
