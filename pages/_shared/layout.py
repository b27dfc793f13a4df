"""Page layout: setup and the page list, the header every result page opens with, and figure and
table output with their downloads."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import streamlit as st

from core import jobs
from pages._shared.selection import Selection, cache, read_only, sidebar

# Every page, in order: (script, label, icon). Streamlit's own list is switched off
# (client.showSidebarNavigation in .streamlit/config.toml) so that read-only mode can leave out Compute.
NAVIGATION = (
    ("app.py", "Overview", ":material/table_chart:"),
    ("pages/1_Edge_heatmap.py", "Edge heatmap", ":material/grid_on:"),
    ("pages/2_Distributions.py", "Distributions", ":material/bar_chart:"),
    ("pages/3_Circuit_graph.py", "Circuit graph", ":material/account_tree:"),
    ("pages/8_Trajectory.py", "Trajectory", ":material/timeline:"),
    ("pages/4_Samples.py", "Samples", ":material/article:"),
    ("pages/6_Controls.py", "Controls", ":material/rule:"),
    ("pages/7_Faithfulness.py", "Faithfulness", ":material/fact_check:"),
    ("pages/5_Compute.py", "Compute", ":material/play_circle:"),
)
COMPUTE_PAGE = "pages/5_Compute.py"


def page_setup(title: str) -> None:
    """Wide layout, the browser tab's title, the page list in the sidebar and, while demo or run
    jobs are active, a banner with their progress."""
    st.set_page_config(page_title=f"{title} · circuitdiff", page_icon=":material/difference:",
                       layout="wide")
    for script, label, icon in NAVIGATION:
        if script == COMPUTE_PAGE and read_only():
            continue
        st.sidebar.page_link(script, label=label, icon=icon)
    if read_only():
        st.sidebar.caption("Read-only mode: Compute is hidden.")
    st.sidebar.divider()
    active = jobs.active_jobs(cache().path)
    # While a job is active the banner alone refreshes every 2 s; the whole page reruns when a
    # job's stage changes or a job ends, so that what the job stored shows up.
    st.session_state["_job_stages"] = _stages(active)
    st.fragment(job_banner, run_every=2.0 if active else None)()


def page_header(title: str, links: tuple[str, ...] = ()) -> Selection | None:
    """Page setup, the sidebar selection and the page title; on an empty cache, says what to do and
    returns None. `links`: keys of the page's widgets that the URL keeps (see widgets.linked,
    widgets.link)."""
    page_setup(title)
    sel = sidebar(links)
    st.title(title)
    if sel is None:
        st.info(f"The result cache **{cache().path}** holds no runs yet. To fill it: `make demo` "
                f"(the embedded demo, computed in the background while the dashboard runs), or pick a pair and dataset on the **Compute** page, or "
                f"`python -m core run ...`. To browse another cache, start the dashboard with "
                f"`CIRCUITDIFF_CACHE=/path/to/file.duckdb`.", icon=":material/info:")
        return None
    st.caption(sel.title)
    return sel


def _stages(active: list[jobs.JobProgress]) -> dict[str, str]:
    return {job.job_id: job.stage for job in active}


def job_banner() -> None:
    """A line per active demo or run job: its stage, progress and ETA."""
    active = jobs.active_jobs(cache().path)
    if _stages(active) != st.session_state.get("_job_stages"):
        st.rerun()
    for job in active:
        text, button = st.columns([12, 1], vertical_alignment="center")
        text.info(f"**{job.label}** is computing ({job.state}): stage {job.stage or 'starting'}, "
                  f"{job.done}/{job.total} · ETA {jobs.format_duration(job.eta_seconds)}. Results "
                  f"appear as each run lands.", icon=":material/hourglass_top:")
        if not read_only() and button.button(
                "Cancel", key=f"banner.cancel.{job.job_id}", icon=":material/stop:",
                help="stop the job; what it has stored stays, and starting it again resumes"):
            jobs.cancel_progress(job, cache().path)
            st.rerun()


def report_download(sel: Selection) -> None:
    """The sidebar's "Download report": the selected run, post model, granularity and metric
    conventions at every alpha as one HTML file that opens offline (core/report.py), built on
    click. Shown in read-only mode too: it is how a presenter hands the results on."""
    reader = cache()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_",
                  f"circuitdiff_{sel.pair}_{sel.post_label}_{sel.run_key[:8]}")
    st.sidebar.divider()
    download("Download report", lambda: reader.report_html(sel.run_key, **sel.scope,
                                                           settings=sel.metrics),
             f"{name}.html", "text/html", container=st.sidebar)
    st.sidebar.caption("One HTML file: Table 1, heatmaps, distributions and circuits at every "
                       "alpha of this run, with settings and provenance; opens without a network.")


def require_pairs(sel: Selection) -> None:
    """Stops the page with a message when fewer than two questions are scored for both models at
    the selected alpha: every comparison needs pairs of samples."""
    if sel.n_questions < 2:
        st.info(f"Only {sel.n_questions} question(s) are scored for both models at alpha "
                f"{sel.alpha:g}; the comparison needs 2 or more. Wait for the job to go on, or pick "
                f"another alpha.")
        st.stop()


def plot(fig, name: str, sel: Selection | None = None, **kwargs) -> Any:
    """A plotly figure whose camera button saves `name` as PNG or SVG (sidebar choice)."""
    fmt = sel.image_format if sel is not None else "png"
    config = {"displaylogo": False,
              "toImageButtonOptions": {"format": fmt, "filename": name, "scale": 2}}
    return st.plotly_chart(fig, config=config, **kwargs)


def download(label: str, data, file_name: str, mime: str, container=st) -> None:
    """A download button that does not rerun the page; `data` may be a callable, built on click."""
    container.download_button(label, data=data, file_name=file_name, mime=mime,
                              key=f"download.{file_name}", on_click="ignore",
                              icon=":material/download:")


def table(frame: pd.DataFrame, name: str, *, data: pd.DataFrame | None = None, **kwargs) -> Any:
    """A dataframe (or a Styler of it) with a CSV download of `data` (default: the frame)."""
    if isinstance(frame, pd.DataFrame) and "column_config" not in kwargs:
        # Four significant digits: edge scores are ~1e-3, which a fixed 4 decimals would flatten.
        kwargs["column_config"] = {column: st.column_config.NumberColumn(format="%.4g")
                                   for column in frame.columns
                                   if pd.api.types.is_float_dtype(frame[column])}
    shown = st.dataframe(frame, **kwargs)
    source = data if data is not None else (frame.data if hasattr(frame, "data") else frame)
    download("Download CSV", lambda: source.to_csv(index=False), f"{name}.csv", "text/csv")
    return shown
