"""Compute: pick a pair or series, a dataset, alphas and settings, see the estimated cost, start a job
that runs in its own process (it survives page reloads and dashboard restarts), watch its stages,
cancel it. Finished results show up on the other pages without a restart."""

import datetime as dt

import pandas as pd
import streamlit as st

from core import jobs
from core.generation import GenerationSettings
from core.settings import PAPER_ALPHAS, ScoreSettings, SelectionSettings, SettingsError
from pages import _shared

st.title("Compute")
if _shared.read_only():  # app.py leaves the page out; a stale link lands here
    st.warning("Read-only mode: computing is switched off.")
    st.stop()

choices = jobs.choices()
pair_names = list(choices["pairs"])
if not pair_names or not choices["datasets"]:
    st.info(f"No pair or dataset is configured; add them to {choices['config']}.")
    st.stop()

left, right = st.columns(2)
pair = left.selectbox("Model pair or series", pair_names, key="compute.pair",
                      format_func=lambda name: choices["pairs"][name])
dataset = right.selectbox("Dataset", list(choices["datasets"]), key="compute.dataset",
                          format_func=lambda name: choices["datasets"][name])
alphas = left.multiselect("Alphas (fraction of the mean answer length scored)", list(PAPER_ALPHAS),
                          default=list(PAPER_ALPHAS), accept_new_options=True, key="compute.alphas",
                          format_func=lambda a: f"{float(a):g}")
limit = right.number_input("Questions taken from the dataset (0: all)", min_value=0, value=0, step=10,
                           key="compute.limit",
                           help="a first look on a prefix of the dataset; selection then draws from it")

groups = st.columns(3)
with groups[0].expander("Selection settings"):
    selection = _shared.settings_widgets(SelectionSettings, "compute.selection")
with groups[1].expander("Score settings"):
    score = _shared.settings_widgets(ScoreSettings, "compute.score")
with groups[2].expander("Generation settings"):
    generation = _shared.settings_widgets(GenerationSettings, "compute.generation")

try:
    request = jobs.RunRequest(pair=pair, dataset=dataset, alphas=tuple(float(a) for a in alphas),
                              selection=selection, score=score, generation=generation,
                              limit=int(limit), cache=str(_shared.cache().path))
except (ValueError, SettingsError) as error:
    st.error(str(error))
    st.stop()

with st.spinner("Estimating the cost ..."):
    try:
        estimate = jobs.estimate(request)
    except (ValueError, KeyError, FileNotFoundError) as error:
        st.error(f"Cannot estimate this run: {error}")
        st.stop()
st.subheader("Estimated cost")
_shared.table(pd.DataFrame([{"item": k, "estimate": str(v)} for k, v in estimate.items()]),
              "estimate", hide_index=True)
st.caption("Equivalent command line: `python -m core run " + " ".join(request.cli_args()) + "`")

if st.button("Start", type="primary", icon=":material/play_arrow:", key="compute.start"):
    try:
        job_id = jobs.start(request)
    except jobs.JobConflictError as error:
        st.error(str(error))
    else:
        st.success(f"Started job {job_id}; it runs in its own process, so this page can be closed.")


def _eta(seconds) -> str:
    if seconds is None or pd.isna(seconds):
        return "unknown"
    return str(dt.timedelta(seconds=int(seconds)))


def job_panel() -> None:
    """Every job with its stage, progress and ETA; cancel buttons for the active ones."""
    found = jobs.list_jobs()
    if not found:
        st.caption("No job has been started from this cache yet.")
        return
    for job in found:
        with st.container(border=True):
            head, button = st.columns([5, 1])
            head.markdown(f"**{job.request.pair} · {job.request.dataset}** · job `{job.job_id}` · "
                          f"**{job.state}** · started {job.started_at:%Y-%m-%d %H:%M:%S}")
            if job.state in jobs.ACTIVE_STATES:
                if button.button("Cancel", key=f"cancel.{job.job_id}", icon=":material/stop:"):
                    jobs.cancel(job.job_id)
                    st.rerun(scope="fragment")
                fraction = job.done / job.total if job.total else 0.0
                st.progress(min(max(fraction, 0.0), 1.0),
                            text=f"stage {job.stage}: {job.done}/{job.total} · ETA {_eta(job.eta_seconds)}")
            if job.message:
                st.caption(job.message)


st.subheader("Jobs")
active = any(job.state in jobs.ACTIVE_STATES for job in jobs.list_jobs())
# Refresh the job panel alone every 2 s while a job is active.
st.fragment(job_panel, run_every=2.0 if active else None)()
