"""The read model every page shares and the sidebar selection, mirrored into the URL's query string
so that a link reopens the same view."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Callable

import pandas as pd
import streamlit as st

from core import jobs
from core.query import ResultCache
from core.settings import MetricSettings
from pages._shared import widgets

READ_ONLY_ENV = "CIRCUITDIFF_READ_ONLY"
READ_ONLY_FLAG = "--read-only"


def read_only() -> bool:
    """Presenting mode: `streamlit run app.py -- --read-only` or CIRCUITDIFF_READ_ONLY=1."""
    return READ_ONLY_FLAG in sys.argv[1:] or os.environ.get(READ_ONLY_ENV, "") not in ("", "0")


@st.cache_resource(show_spinner=False)
def _result_cache(path: str) -> ResultCache:
    # One per cache file and process: its memo, keyed per run content, is the dashboard's cache,
    # shared by every session.
    return ResultCache.open(path)


def cache() -> ResultCache:
    """The result cache at CIRCUITDIFF_CACHE (read at every rerun), else cache/circuitdiff.duckdb."""
    return _result_cache(str(ResultCache.open().path))


@dataclasses.dataclass(frozen=True)
class Selection:
    run_key: str
    pair: str
    dataset: str
    base_label: str
    post_label: str
    alphas: tuple[float, ...]
    # Questions scored for every model of the run, one count per alpha.
    n_complete: tuple[int, ...]
    alpha: float
    granularity: str
    metrics: MetricSettings
    image_format: str

    @property
    def title(self) -> str:
        return (f"{self.pair} · {self.dataset} · {self.base_label} → {self.post_label} · "
                f"alpha {self.alpha:g} · {self.granularity}")

    @property
    def scope(self) -> dict[str, str]:
        """The read model's keyword arguments that pick this selection's view of a run."""
        return {"post_label": self.post_label, "granularity": self.granularity}

    @property
    def n_questions(self) -> int:
        """Questions scored for both models at the selected alpha."""
        return self.n_complete[self.alphas.index(self.alpha)]


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
                st.session_state[f"metric.{spec['name']}"] = widgets.parse(params[spec["name"]],
                                                                            spec["type"])
            except ValueError:
                st.warning(f"The link's {spec['name']}={params[spec['name']]!r} is not a "
                           f"{spec['type']}; using the default.")


def sidebar_choice(name: str) -> str | None:
    """The sidebar's value of `name` (one of QUERY_KEYS) as this session or the link has it, for a
    page that draws no sidebar selection (Compute); None where neither has one."""
    value = st.session_state.get(f"sel.{name}", st.query_params.get(name))
    return None if value is None else str(value)


def run_choice(pair: str, dataset: str, run_key: str) -> dict[str, str]:
    """The sidebar's widget state that selects a run (for st.session_state.update, e.g. as a
    button's on_click): a page that opens on another run than the sidebar's default."""
    return {"sel.pair": pair, "sel.dataset": dataset, "sel.run": run_key}


def keep_selection() -> None:
    """On a page that draws no sidebar selection: keep the selection's widget state, which
    Streamlit drops at the end of a run that draws none of those widgets, so the next result page
    opens on the same view."""
    for key in [k for k in st.session_state if k.startswith(("sel.", "metric."))]:
        st.session_state[key] = st.session_state[key]


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


def _choose_radio(label: str, name: str, options: list):
    """`_choose` as a horizontal radio, in the current container."""
    key = f"sel.{name}"
    current = st.session_state.get(key)
    st.session_state[key] = current if current in options else options[0]
    return st.radio(label, options, key=key, horizontal=True)


def _same_alpha(a: float, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def _declared_order() -> list[str]:
    """The pairs and series in the order pairs.toml declares them, then those made here; read once
    per browser session (it opens the config and the cache). The sidebar lists a cache's pairs in
    this order, so its default is the first declared pair with results (the demo's GRPO pair)."""
    if "_declared_pairs" not in st.session_state:
        try:
            order = list(jobs.configured(cache=str(cache().path))["pairs"])
        except jobs.ConfigError:
            order = []  # a broken pairs.toml: plain alphabetical order (Compute says what is wrong)
        st.session_state["_declared_pairs"] = order
    return st.session_state["_declared_pairs"]


def sidebar(page_keys: tuple[str, ...] = ()) -> Selection | None:
    """The sidebar's selection (None on an empty cache), mirrored into the URL's query string so a
    link reopens the same view; `page_keys` are the page's own URL parameters, kept there."""
    _load_query_string()
    # Re-read whenever the cache changes: a finished job shows up without a restart.
    table = cache().runs()
    if table.empty:
        st.sidebar.caption(f"Cache: {cache().path} (empty)")
        return None
    st.sidebar.header("Selection")
    order = _declared_order()
    pair = _choose("Model pair or series", "pair", sorted(
        table["pair"].unique(), key=lambda name: (order.index(name) if name in order else len(order),
                                                  name)))
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
        settings = widgets.settings_widgets(MetricSettings, "metric")
    with st.sidebar.expander("Presenting"):
        image_format = _choose_radio("Figure download format (camera button)", "image_format",
                                     list(IMAGE_FORMATS))
    selection = Selection(
        run_key=run_key, pair=pair, dataset=dataset, base_label=first["base_label"],
        post_label=post_label, alphas=alphas, n_complete=tuple(int(n) for n in first["n_complete"]),
        alpha=alpha, granularity=granularity, metrics=settings, image_format=image_format)
    _write_query_string(selection, single_run=len(run_keys) == 1, page_keys=page_keys)
    return selection


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
