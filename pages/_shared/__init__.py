"""Streamlit code shared by the dashboard's pages: page setup and navigation, the sidebar selection
and its query-string sync, cached query wrappers keyed by run content, settings widgets, and figure and
table output with downloads.

A package, not a module: Streamlit 1.67 turns every pages/*.py except dot-files and __init__.py into
a page ("_"-prefixed files included, see `_mpa_v1` in streamlit/runtime/scriptrunner/
script_runner.py), while it ignores folders. Pages use the pages/ folder (not st.navigation): with
both, AppTest replays the folder's legacy navigation around st.navigation at every run and loses
widget state between runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import streamlit as st

from core.graph import ResidualGraph
from core.query import ResultCache
from core.settings import MetricSettings, Settings, SettingsError

READ_ONLY_ENV = "CIRCUITDIFF_READ_ONLY"
READ_ONLY_FLAG = "--read-only"


def read_only() -> bool:
    """Presenting mode: `streamlit run app.py -- --read-only` or CIRCUITDIFF_READ_ONLY=1."""
    return READ_ONLY_FLAG in sys.argv[1:] or os.environ.get(READ_ONLY_ENV, "") not in ("", "0")


# --- The cache ------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _result_cache(path: str) -> ResultCache:
    # One per cache file and process: its in-process memo is shared by every session.
    return ResultCache.open(path)


def cache() -> ResultCache:
    """The result cache at CIRCUITDIFF_CACHE (read at every rerun), else cache/circuitdiff.duckdb."""
    return _result_cache(str(ResultCache.open().path))


def empty_cache_message() -> None:
    st.info(f"The result cache **{cache().path}** holds no runs yet. To fill it: `make demo-run` "
            f"(the embedded demo pairs), or pick a pair and dataset on the **Compute** page, or "
            f"`python -m core run ...`. To browse another cache, start the dashboard with "
            f"`CIRCUITDIFF_CACHE=/path/to/file.duckdb`.", icon=":material/info:")


def runs() -> pd.DataFrame:
    """One row per (run, post model); re-read whenever the cache changes (a finished job shows
    up without a restart)."""
    return cache().runs()


def content_key(run_key: str) -> str:
    return cache().content_key(run_key)


# Cached queries: st.cache_data keyed by the run's content key, so a rerun of the same view costs a
# dictionary look-up and new data for the run (a job adding samples) produce a new entry.

def _load_view(path: str, run_key: str, alpha: float, post_label: str,
               granularity: str) -> tuple[ResidualGraph, np.ndarray, np.ndarray, list[str]]:
    result = _result_cache(path)
    graph = result.graph(run_key)
    base, ids = result.sample_matrices(run_key, alpha, "base")
    post, _ = result.sample_matrices(run_key, alpha, post_label)
    if granularity != graph.granularity:
        # module slots are the exact sum of the q/k/v slots (METHOD.md section 2).
        base, post = graph.to_module(base), graph.to_module(post)
        graph = ResidualGraph(graph.n_layers, granularity)
    return graph, base, post, ids


@st.cache_data(max_entries=48, show_spinner="Reading score matrices ...")
def _view_matrices(path: str, key: str, run_key: str, alpha: float, post_label: str,
                   granularity: str) -> tuple[ResidualGraph, np.ndarray, np.ndarray, list[str]]:
    return _load_view(path, run_key, alpha, post_label, granularity)


def view_matrices(sel: "Selection", alpha: float | None = None):
    """(graph, base [n, n_src, n_dst], post, question ids) of the selection at the view's
    granularity."""
    alpha = sel.alpha if alpha is None else alpha
    return _view_matrices(str(cache().path), content_key(sel.run_key), sel.run_key, alpha,
                          sel.post_label, sel.granularity)


def compared_matrices(sel: "Selection"):
    """view_matrices at the selected alpha, or a message and a stopped page when fewer than two
    questions are scored for both models (every comparison needs pairs of samples)."""
    graph, base, post, ids = view_matrices(sel)
    if len(ids) < 2:
        st.info(f"Only {len(ids)} question(s) are scored for both models at alpha {sel.alpha:g}; "
                f"the comparison needs 2 or more. Wait for the job to go on, or pick another alpha.")
        st.stop()
    return graph, base, post, ids


@st.cache_data(max_entries=32, show_spinner="Computing the comparison ...")
def _comparison(path: str, key: str, run_key: str, alpha: float, post_label: str, granularity: str,
                settings: MetricSettings):
    result = _result_cache(path)
    if granularity == result.graph(run_key).granularity:
        return result.comparison(run_key, alpha, settings, post_label)
    from core import metrics

    graph, base, post, _ = _view_matrices(path, key, run_key, alpha, post_label, granularity)
    return metrics.compare_models(base, post, graph, settings)


def comparison(sel: "Selection", alpha: float | None = None):
    alpha = sel.alpha if alpha is None else alpha
    return _comparison(str(cache().path), content_key(sel.run_key), sel.run_key, alpha,
                       sel.post_label, sel.granularity, sel.metrics)


@st.cache_data(max_entries=32, show_spinner="Testing every edge ...")
def _edge_tests(path: str, key: str, run_key: str, alpha: float, post_label: str, granularity: str,
                settings: MetricSettings) -> pd.DataFrame:
    result = _result_cache(path)
    if granularity == result.graph(run_key).granularity:
        return result.significant_edges(run_key, alpha, settings, post_label)
    from core import metrics

    graph, base, post, _ = _view_matrices(path, key, run_key, alpha, post_label, granularity)
    return metrics.significant_edges(base, post, graph, settings)


def significant_edges(sel: "Selection") -> pd.DataFrame:
    """Edges whose strength changed (paired t-test per edge, Benjamini-Hochberg at the sidebar's
    false discovery rate), ranked by |relative change|."""
    return _edge_tests(str(cache().path), content_key(sel.run_key), sel.run_key, sel.alpha,
                       sel.post_label, sel.granularity, sel.metrics)


def cache_version() -> tuple:
    """Changes with any commit to the cache file (a file stat, no query): the key of views over all
    runs, where asking every run for its content key would cost a query per run."""
    return cache().store.version_token()


@st.cache_data(max_entries=8, show_spinner="Computing the metrics of every cached run ...")
def _metric_table(path: str, version: tuple, settings: MetricSettings) -> pd.DataFrame:
    return _result_cache(path).metric_table(settings)


def metric_table(settings: MetricSettings) -> pd.DataFrame:
    return _metric_table(str(cache().path), cache_version(), settings)


@st.cache_data(max_entries=32, show_spinner="Reading the samples ...")
def _samples(path: str, key: str, run_key: str, alpha: float, post_label: str,
             settings: MetricSettings) -> pd.DataFrame:
    return _result_cache(path).samples(run_key, alpha, post_label, settings)


def samples(sel: "Selection", alpha: float | None = None) -> pd.DataFrame:
    alpha = sel.alpha if alpha is None else alpha
    return _samples(str(cache().path), content_key(sel.run_key), sel.run_key, alpha, sel.post_label,
                    sel.metrics)


def means(base: np.ndarray, post: np.ndarray) -> dict[str, np.ndarray]:
    """Mean |W| and mean W over samples of both models, [n_src, n_dst] each."""
    return {"base_abs": np.abs(base).mean(axis=0), "post_abs": np.abs(post).mean(axis=0),
            "base_signed": base.mean(axis=0), "post_signed": post.mean(axis=0)}


@st.cache_data(max_entries=8, show_spinner=False)
def _diversity_summary(path: str, version: tuple, settings: MetricSettings) -> pd.DataFrame:
    from core import metrics

    result = _result_cache(path)
    entries = []
    for run in result.runs().itertuples():
        for alpha in run.alphas:
            try:
                comparison = result.comparison(run.run_key, alpha, settings, run.post_label)
            except ValueError:
                continue  # nothing complete yet at this alpha
            entries.append((f"{run.pair}: {run.post_label}", run.dataset, alpha, comparison))
    return metrics.diversity_summary(entries)


def diversity_summary(settings: MetricSettings) -> pd.DataFrame:
    """Figure-3a counts per (pair: post model) and over all cells."""
    return _diversity_summary(str(cache().path), cache_version(), settings)


def _per_sample_frame(graph: ResidualGraph, base: np.ndarray, post: np.ndarray, ids: list[str],
                      settings: MetricSettings) -> pd.DataFrame:
    from core.metrics import per_sample_metrics

    frame = pd.DataFrame({"question_id": ids})
    if len(ids) >= 2:
        for side, scores in (("base", base), ("post", post)):
            for name, values in per_sample_metrics(scores, graph, settings).items():
                frame[f"{side}_{name}"] = values
    return frame


@st.cache_data(max_entries=32, show_spinner=False)
def _per_sample(path: str, key: str, run_key: str, alpha: float, post_label: str, granularity: str,
                settings: MetricSettings) -> pd.DataFrame:
    return _per_sample_frame(*_view_matrices(path, key, run_key, alpha, post_label, granularity),
                             settings)


@st.cache_data(max_entries=16, show_spinner="Reading every alpha of the run ...")
def _per_sample_by_alpha(path: str, key: str, run_key: str, alphas: tuple[float, ...],
                         post_label: str, granularity: str,
                         settings: MetricSettings) -> dict[float, pd.DataFrame]:
    from concurrent.futures import ThreadPoolExecutor

    def one(alpha: float) -> pd.DataFrame:
        return _per_sample_frame(*_load_view(path, run_key, alpha, post_label, granularity), settings)

    # One thread per alpha: the reads and most of numpy release the GIL, and the query layer keeps
    # a connection per thread; about 2x faster than one alpha after the other here.
    with ThreadPoolExecutor(max_workers=max(len(alphas), 1)) as pool:
        return dict(zip(alphas, pool.map(one, alphas)))


def per_sample_by_alpha(sel: Selection, alphas: tuple[float, ...]) -> dict[float, pd.DataFrame]:
    """`per_sample` at each of `alphas`, read in parallel."""
    return _per_sample_by_alpha(str(cache().path), content_key(sel.run_key), sel.run_key,
                                tuple(alphas), sel.post_label, sel.granularity, sel.metrics)


def per_sample(sel: Selection, alpha: float | None = None) -> pd.DataFrame:
    """Per-sample metrics of both models at the view's granularity and the sidebar's conventions:
    question_id, then base_<metric> and post_<metric> for intensity, kurtosis, edge_entropy and
    output_entropy (the metrics that have one value per sample)."""
    alpha = sel.alpha if alpha is None else alpha
    return _per_sample(str(cache().path), content_key(sel.run_key), sel.run_key, alpha,
                       sel.post_label, sel.granularity, sel.metrics)


@st.cache_data(max_entries=16, show_spinner=False)
def _abs_distribution_figures(path: str, key: str, run_key: str, alpha: float, post_label: str,
                              granularity: str, base_label: str):
    from core import figures

    graph, base, post, _ = _view_matrices(path, key, run_key, alpha, post_label, granularity)
    pooled = {base_label: np.abs(graph.edges(base)).ravel(),
              post_label: np.abs(graph.edges(post)).ravel()}
    colors = {base_label: figures.BASE_COLOR, post_label: figures.POST_COLOR}
    return figures.abs_histogram(pooled, colors=colors), figures.ecdf(pooled, colors=colors)


def abs_distribution_figures(sel: Selection):
    """Histogram and ECDF of |W| over real edges and samples, both models; built once per view
    (plotly figures of 2 x n x n_edges values take a while to build)."""
    return _abs_distribution_figures(str(cache().path), content_key(sel.run_key), sel.run_key,
                                     sel.alpha, sel.post_label, sel.granularity, sel.base_label)


# --- Settings widgets, generated from the settings dataclasses ------------------------------------

def _parse(text: str, kind: str) -> Any:
    if kind == "bool":
        return text.lower() in ("1", "true", "yes", "on")
    return {"int": int, "float": float}.get(kind, str)(text)


def settings_widgets(cls: type[Settings], prefix: str) -> Settings:
    """One widget per field of a settings class (from `field_specs()`), keyed `prefix.field`, in the
    current container; returns the settings, or the defaults with an error shown when the
    combination is invalid."""
    values = {}
    for spec in cls.field_specs():
        name = spec["name"]
        key = f"{prefix}.{name}"
        # Re-assigned at every run: the same key on another page is another widget, which takes
        # its value from here (so a choice survives page switches).
        st.session_state[key] = st.session_state.get(key, spec["default"])
        label = name.replace("_", " ")
        if spec["choices"] is not None:
            if st.session_state[key] not in spec["choices"]:
                st.session_state[key] = spec["default"]
            values[name] = st.selectbox(label, spec["choices"], key=key, help=spec["help"])
        elif spec["type"] == "bool":
            values[name] = st.checkbox(label, key=key, help=spec["help"])
        elif spec["type"] in ("int", "float"):
            cast = int if spec["type"] == "int" else float
            low = None if spec["low"] is None or spec["low_open"] else cast(spec["low"])
            high = None if spec["high"] is None else cast(spec["high"])
            values[name] = st.number_input(
                label, min_value=low, max_value=high, key=key, help=spec["help"],
                step=1 if cast is int else 0.01, format=None if cast is int else "%g")
        else:
            values[name] = st.text_input(label, key=key, help=spec["help"])
    try:
        return cls(**values)
    except SettingsError as error:
        st.error(f"{error} Using the defaults until it is fixed.")
        return cls()


# --- Sidebar selection, kept in the URL's query string --------------------------------------------

@dataclasses.dataclass(frozen=True)
class Selection:
    run_key: str
    pair: str
    dataset: str
    base_label: str
    post_label: str
    alphas: tuple[float, ...]
    alpha: float
    granularity: str
    metrics: MetricSettings
    image_format: str

    @property
    def title(self) -> str:
        return (f"{self.pair} · {self.dataset} · {self.base_label} → {self.post_label} · "
                f"alpha {self.alpha:g} · {self.granularity}")


# Query-string names of the sidebar widgets; metric conventions use their field names.
QUERY_KEYS = ("pair", "dataset", "run", "post", "alpha", "granularity", "image_format")
IMAGE_FORMATS = ("png", "svg")


def _load_query_string() -> None:
    """Once per browser session: put the link's values into the widgets' state. Values that do not
    fit the cache are dropped later, where the options are known."""
    if st.session_state.get("_query_loaded"):
        return
    st.session_state["_query_loaded"] = True
    params = st.query_params
    for name in QUERY_KEYS:
        if name in params:
            st.session_state[f"sel.{name}"] = params[name]
    for spec in MetricSettings.field_specs():
        if spec["name"] in params:
            try:
                st.session_state[f"metric.{spec['name']}"] = _parse(params[spec["name"]], spec["type"])
            except ValueError:
                st.warning(f"The link's {spec['name']}={params[spec['name']]!r} is not a "
                           f"{spec['type']}; using the default.")


def _choose(label: str, name: str, options: list, *, format_func: Callable = str,
            help: str | None = None, match: Callable[[Any, Any], bool] | None = None):
    """A sidebar selectbox whose state survives reruns; a stale or linked value that is no longer an
    option falls back to the first option."""
    key = f"sel.{name}"
    current = st.session_state.get(key)
    match = match or (lambda a, b: str(a) == str(b))
    found = next((o for o in options if current is not None and match(o, current)), None)
    st.session_state[key] = found if found is not None else options[0]
    return st.sidebar.selectbox(label, options, key=key, format_func=format_func, help=help)


def _same_alpha(a: float, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def sidebar(page_keys: tuple[str, ...] = ()) -> Selection | None:
    """The sidebar's selection (None on an empty cache), mirrored into the URL's query string so a
    link reopens the same view; `page_keys` are the page's own URL parameters, kept there."""
    _load_query_string()
    table = runs()
    if table.empty:
        st.sidebar.caption(f"Cache: {cache().path} (empty)")
        return None
    st.sidebar.header("Selection")
    pair = _choose("Model pair or series", "pair", sorted(table["pair"].unique()))
    rows = table[table["pair"] == pair]
    dataset = _choose("Dataset", "dataset", sorted(rows["dataset"].unique()))
    rows = rows[rows["dataset"] == dataset]
    run_keys = list(dict.fromkeys(rows["run_key"]))
    described = {k: _describe_run(rows[rows["run_key"] == k].iloc[0]) for k in run_keys}
    run_key = _choose("Run", "run", run_keys, format_func=described.get,
                      help="runs of this pair and dataset under different selection or score "
                           "settings") if len(run_keys) > 1 else run_keys[0]
    rows = rows[rows["run_key"] == run_key]
    first = rows.iloc[0]
    post_label = _choose("Post-trained model", "post", list(rows["post_label"]),
                         format_func=lambda label: f"{label} ({_algorithm(rows, label)})",
                         help=f"compared with the base model {first['base_label']}")
    alphas = tuple(float(a) for a in first["alphas"])
    if not alphas:
        st.sidebar.warning("This run has no alpha scored yet.")
        return None
    alpha = _choose("alpha (fraction of the mean answer length scored)", "alpha", list(alphas),
                    format_func=lambda a: f"{a:g}", match=_same_alpha)
    granularities = [first["granularity"]] + (["module"] if first["granularity"] == "qkv" else [])
    granularity = _choose("Graph granularity", "granularity", granularities,
                          help="qkv: one slot per q/k/v input of each attention; module: one slot "
                               "per attention block (the exact sum of its q/k/v slots)")
    with st.sidebar.expander("Metric conventions"):
        settings = settings_widgets(MetricSettings, "metric")
    with st.sidebar.expander("Presenting"):
        image_format = _choose_radio("Figure download format (camera button)", "image_format",
                                     list(IMAGE_FORMATS))
    selection = Selection(
        run_key=run_key, pair=pair, dataset=dataset, base_label=first["base_label"],
        post_label=post_label, alphas=alphas, alpha=alpha, granularity=granularity,
        metrics=settings, image_format=image_format)
    _write_query_string(selection, single_run=len(run_keys) == 1, page_keys=page_keys)
    return selection


def _choose_radio(label: str, name: str, options: list):
    """`_choose` as a horizontal radio, in the current container."""
    key = f"sel.{name}"
    current = st.session_state.get(key)
    st.session_state[key] = current if current in options else options[0]
    return st.radio(label, options, key=key, horizontal=True)


def _algorithm(rows: pd.DataFrame, label: str) -> str:
    return str(rows[rows["post_label"] == label]["algorithm"].iloc[0])


def _describe_run(row: pd.Series) -> str:
    selection = row["settings"]["selection"]
    return (f"{row['run_key'][:8]} · n={row['n_selected']} · {row['granularity']} · "
            f"seed {selection.get('seed')} · {pd.Timestamp(row['created_at']):%Y-%m-%d %H:%M}")


def _write_query_string(sel: Selection, single_run: bool, page_keys: tuple[str, ...]) -> None:
    """The selection into the URL; of the other parameters, only this page's own stay."""
    params = {"pair": sel.pair, "dataset": sel.dataset, "post": sel.post_label,
              "alpha": f"{sel.alpha:g}", "granularity": sel.granularity,
              "image_format": sel.image_format}
    if not single_run:
        params["run"] = sel.run_key
    params.update({name: str(value) for name, value in sel.metrics.as_dict().items()})
    params.update({key: st.query_params[key] for key in page_keys if key in st.query_params})
    if dict(st.query_params) != params:
        st.query_params.from_dict(params)


def parse_bool(text: str) -> bool:
    return _parse(text, "bool")


def linked(key: str, options=None, parse: Callable[[str], Any] = str) -> None:
    """Before a page widget keyed `key` (one of the page's `page_header(links=...)`): the first time
    in a session, take its value from the link, if it parses and is one of `options`."""
    flag = f"_linked.{key}"
    if st.session_state.get(flag):
        return
    st.session_state[flag] = True
    if key not in st.query_params:
        return
    try:
        value = parse(st.query_params[key])
    except ValueError:
        return
    if options is None or value in options:
        st.session_state[key] = value


def link(key: str, value: Any) -> None:
    """After a page widget keyed `key`: its value goes into the URL, so a link reopens this view."""
    text = str(value)
    if st.query_params.get(key) != text:
        st.query_params[key] = text


# Every page, in order: (script, label, icon). Streamlit's own list is switched off
# (client.showSidebarNavigation in .streamlit/config.toml) so that read-only mode can leave out Compute.
NAVIGATION = (
    ("app.py", "Overview", ":material/table_chart:"),
    ("pages/1_Edge_heatmap.py", "Edge heatmap", ":material/grid_on:"),
    ("pages/2_Distributions.py", "Distributions", ":material/bar_chart:"),
    ("pages/3_Circuit_graph.py", "Circuit graph", ":material/account_tree:"),
    ("pages/4_Samples.py", "Samples", ":material/article:"),
    ("pages/5_Compute.py", "Compute", ":material/play_circle:"),
)
COMPUTE_PAGE = "pages/5_Compute.py"


def page_setup(title: str) -> None:
    """Wide layout, the browser tab's title and the page list in the sidebar."""
    st.set_page_config(page_title=f"{title} · circuitdiff", page_icon=":material/difference:",
                       layout="wide")
    for script, label, icon in NAVIGATION:
        if script == COMPUTE_PAGE and read_only():
            continue
        st.sidebar.page_link(script, label=label, icon=icon)
    if read_only():
        st.sidebar.caption("Read-only mode: Compute is hidden.")
    st.sidebar.divider()


def page_header(title: str, links: tuple[str, ...] = ()) -> Selection | None:
    """Page setup, the sidebar selection and the page title; on an empty cache, says what to do and
    returns None. `links`: keys of the page's widgets that the URL keeps (see `linked`, `link`)."""
    page_setup(title)
    sel = sidebar(links)
    st.title(title)
    if sel is None:
        empty_cache_message()
        return None
    st.caption(sel.title)
    return sel


# --- Output ---------------------------------------------------------------------------------------

def plot(fig, name: str, sel: Selection | None = None, **kwargs) -> Any:
    """A plotly figure whose camera button saves `name` as PNG or SVG (sidebar choice)."""
    fmt = sel.image_format if sel is not None else "png"
    config = {"displaylogo": False,
              "toImageButtonOptions": {"format": fmt, "filename": name, "scale": 2}}
    return st.plotly_chart(fig, config=config, **kwargs)


def table(frame: pd.DataFrame, name: str, *, data: pd.DataFrame | None = None, **kwargs) -> Any:
    """A dataframe (or a Styler of it) with a CSV download of `data` (default: the frame)."""
    if isinstance(frame, pd.DataFrame) and "column_config" not in kwargs:
        # Four significant digits: edge scores are ~1e-3, which a fixed 4 decimals would flatten.
        kwargs["column_config"] = {column: st.column_config.NumberColumn(format="%.4g")
                                   for column in frame.columns
                                   if pd.api.types.is_float_dtype(frame[column])}
    shown = st.dataframe(frame, **kwargs)
    source = data if data is not None else (frame.data if hasattr(frame, "data") else frame)
    st.download_button("Download CSV", data=lambda: source.to_csv(index=False), file_name=f"{name}.csv",
                       mime="text/csv", key=f"csv.{name}", on_click="ignore", icon=":material/download:")
    return shown


# --- Compute --------------------------------------------------------------------------------------

_ESTIMATE_SCRIPT = """
import json, sys
from core import jobs
from core.pipeline import RunRequest
print(json.dumps(jobs.estimate(RunRequest.from_dict(json.loads(sys.argv[1])))))
"""


def estimate(request) -> dict[str, Any]:
    """core.jobs.estimate of a RunRequest, in a child process: it reads the models' tokenizers
    (transformers), which the dashboard's own process never imports. Raises ValueError with the
    child's error message."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-c", _ESTIMATE_SCRIPT, json.dumps(request.as_dict())],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"the estimate exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])
