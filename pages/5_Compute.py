"""Compute: pick a pair or series, a dataset, alphas and settings, see the estimated cost, start a job
that runs in its own process (it survives page reloads and dashboard restarts), watch its stages,
cancel it. Finished results show up on the other pages without a restart."""

import datetime as dt
import json
from typing import get_args, get_type_hints

import pandas as pd
import streamlit as st

from core import jobs
from core.settings import (PAPER_ALPHAS, GenerationSettings, ScoreSettings, SelectionSettings,
                           SettingsError)
from pages._shared import layout, selection, widgets

layout.page_setup("Compute")
st.title("Compute")
if selection.read_only():  # the page list leaves it out; an old link lands here
    st.warning("Read-only mode: computing is switched off.")
    st.stop()

cache_path = str(selection.cache().path)
try:
    config = jobs.configured()
except jobs.ConfigError as error:
    st.error(str(error))
    st.stop()
pairs, datasets = config["pairs"], config["datasets"]
if not pairs or not datasets:
    st.info("No pair or dataset is configured: add them to core/pairs.toml.")
    st.stop()
selection.keep_selection()
# Open on the sidebar's pair and dataset where the config has them: the run the user is looking at,
# on data this machine has (the first configured ones may need the hub).
for key, name, options in (("compute.pair", "pair", pairs), ("compute.dataset", "dataset", datasets)):
    chosen = selection.sidebar_choice(name)
    if key not in st.session_state and chosen in options:
        st.session_state[key] = chosen

left, right = st.columns(2)
pair = left.selectbox("Model pair or series", list(pairs), key="compute.pair",
                      format_func=lambda name: f"{name} ({pairs[name]})")
dataset = right.selectbox("Dataset", datasets, key="compute.dataset")
alphas = left.multiselect("Alphas (fraction of the mean answer length scored)", list(PAPER_ALPHAS),
                          default=list(PAPER_ALPHAS), key="compute.alphas",
                          format_func=lambda a: f"{a:g}")
limit = right.number_input("Questions taken from the dataset (0: all)", min_value=0, value=0, step=10,
                           key="compute.limit",
                           help="a first look on a prefix of the dataset; selection then draws from it")
groups = st.columns(4)
with groups[0].expander("Selection settings"):
    selection_settings = widgets.settings_widgets(SelectionSettings, "compute.selection")
with groups[1].expander("Score settings"):
    score = widgets.settings_widgets(ScoreSettings, "compute.score")
with groups[2].expander("Generation settings"):
    generation = widgets.settings_widgets(GenerationSettings, "compute.generation")
with groups[3].expander("Where it runs"):
    # The executor names are RunRequest.executor's Literal type (no page imports core.executors).
    executor = st.selectbox("Executor", get_args(get_type_hints(jobs.RunRequest)["executor"]),
                            key="compute.executor",
                            help="local: in the job's own process; ray: model work sharded over "
                                 "Ray actors (install requirements-ray.txt). Results are the same.")
    ray = executor == "ray"
    ray_address = st.text_input("Ray address", key="compute.ray_address", disabled=not ray,
                                placeholder="empty: start Ray here (or $RAY_ADDRESS)",
                                help="auto (a running local cluster) or HOST:PORT")
    ray_actors = st.number_input("Ray actors", min_value=0, value=0, step=1, disabled=not ray,
                                 key="compute.ray_actors",
                                 help="0: one per GPU, or one per CPU where the cluster has no GPU")

try:
    request = jobs.RunRequest(pair=pair, dataset=dataset, alphas=tuple(alphas),
                              selection=selection_settings, score=score, generation=generation,
                              limit=int(limit), cache=cache_path, executor=executor,
                              ray_address=(ray_address.strip() or None) if ray else None,
                              ray_actors=int(ray_actors) if ray else 0)
except (ValueError, SettingsError) as error:
    st.error(f"{error}")
    st.stop()
# The request as a file is the whole command line: every setting, nothing rebuilt as flags.
request_json = json.dumps(request.as_dict(), sort_keys=True, indent=2)
caption, request_download = st.columns([4, 1])
caption.caption("Command line equivalent: `python -m core run --request request.json`, with the "
                "request file on the right.")
layout.download("request.json", request_json, "request.json", "application/json",
                container=request_download)



def selection_outlook(estimate: dict) -> None:
    """What the selection rules (docs/method.md section 5) will likely keep: the plan's selection
    once every answer is graded, else the selection of the run already cached, else why it is not
    known yet."""
    report = estimate.get("selection")
    cached = selection.cache().runs()
    stored = cached[cached["run_key"] == estimate["run_key"]]
    if report:
        lead = "With the answers already graded, the selection rules will keep"
    elif len(stored):
        run = stored.iloc[0]
        # The stored report, over the run's own columns (a report may lack some of them).
        report = {"n_candidates": run["n_candidates"], "n_selected": run["n_selected"],
                  "n_requested": run["settings"]["selection"]["n"], "t_bar": run["t_bar"],
                  **run["selection_report"]}
        lead = "This run is cached already; its selection kept"
    if not report:
        st.caption(f"Which questions the selection rules keep (jointly correct, length window, "
                   f"length mismatch, equal prompts, then n = {selection_settings.n} drawn) is known "
                   f"once every model's answers are generated and graded, the run's first stages; "
                   f"until then the estimate counts scores for n questions, the most.")
        return
    window = f", length window {report['window']}" if "window" in report else ""
    st.markdown(f"**Selection:** {lead} **{report['n_selected']}** of {report['n_candidates']} "
                f"questions (n = {report['n_requested']} asked; T_bar {report['t_bar']:.1f} "
                f"tokens{window}).")
    removed = report.get("removed", {})
    if removed:
        left = report["n_candidates"] - pd.Series(list(removed.values())).cumsum()
        layout.table(pd.DataFrame({"rule": list(removed), "removed": list(removed.values()),
                                   "left": left.to_list()}), "selection_outlook", hide_index=True)


estimate_col, start_col, _ = st.columns([1, 1, 4])
if estimate_col.button("Estimate cost", icon=":material/calculate:", key="compute.estimate"):
    with st.spinner("Reading tokenizers, the dataset and what the cache already holds ..."):
        try:
            st.session_state["compute.estimate_result"] = (request_json, jobs.estimate(request))
        except ValueError as error:
            st.session_state["compute.estimate_result"] = (request_json, {"error": str(error)})
estimated_for, estimate = st.session_state.get("compute.estimate_result", (None, None))
if estimate is not None and estimated_for == request_json:
    if "error" in estimate:
        st.error(f"Cannot estimate this run: {estimate['error']}")
    else:
        st.markdown(f"**Estimated cost:** about **{dt.timedelta(seconds=int(estimate['seconds']))}** "
                    f"of model time for {estimate['questions']} questions and models "
                    f"{', '.join(estimate['models'])} (run `{estimate['run_key']}`); work still "
                    f"missing per stage:")
        layout.table(pd.DataFrame([estimate["missing"]]), "estimate", hide_index=True)
        selection_outlook(estimate)
elif estimate is not None:
    st.caption("The settings changed since the last estimate: estimate again.")

if start_col.button("Start", type="primary", icon=":material/play_arrow:", key="compute.start"):
    try:
        job_id = jobs.start(request)
    except jobs.JobConflictError as error:
        st.error(str(error))
    else:
        st.success(f"Started job {job_id}. It runs in its own process: reloading or closing this "
                   f"page does not stop it.")


def _duration(seconds) -> str:
    if seconds is None or pd.isna(seconds):
        return "unknown"
    return str(dt.timedelta(seconds=int(seconds)))


def job_panel() -> None:
    """Every job of this cache with its stage, progress and ETA; Cancel for the active ones."""
    found = jobs.list_jobs(cache_path)
    if not found:
        st.caption("No job has been started on this cache yet.")
        return
    for job in found:
        with st.container(border=True):
            head, button = st.columns([6, 1])
            started = dt.datetime.fromtimestamp(job.started_at).strftime("%Y-%m-%d %H:%M:%S")
            head.markdown(f"**{job.request.pair} · {job.request.dataset}** · alphas "
                          f"{', '.join(f'{a:g}' for a in job.request.alphas)} · **{job.state}** · "
                          f"started {started} · job `{job.job_id}`")
            if job.state in jobs.ACTIVE:
                if button.button("Cancel", key=f"cancel.{job.job_id}", icon=":material/stop:"):
                    jobs.cancel(job.job_id, cache_path)
                    st.rerun()
                fraction = job.done / job.total if job.total else 0.0
                st.progress(min(max(fraction, 0.0), 1.0),
                            text=f"stage {job.stage or 'starting'}: {job.done}/{job.total} · ETA "
                                 f"{_duration(job.eta_seconds)}")
            if job.message:
                st.caption(job.message)
            if job.log_path:
                st.caption(f"log: {job.log_path}")


st.subheader("Jobs")
active = any(job.state in jobs.ACTIVE for job in jobs.list_jobs(cache_path))
# While a job is active, the job panel alone refreshes every 2 s.
st.fragment(job_panel, run_every=2.0 if active else None)()
