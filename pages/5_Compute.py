"""Compute: pick a pair or series, a dataset, alphas and settings, see the estimated cost, start a job
that runs in its own process (it survives page reloads and dashboard restarts), watch its stages,
cancel it. Finished results show up on the other pages without a restart. "New pair" makes a pair
from models on this machine or the hub and a configured or uploaded dataset, checked before it is
saved in the cache (not in core/pairs.toml), then picked like the declared ones."""

import datetime as dt
import json
from typing import get_args, get_type_hints

import pandas as pd
import streamlit as st

from core import jobs, query
from core.settings import (PAPER_ALPHAS, FaithfulnessSettings, GenerationSettings, ScoreSettings,
                           SelectionSettings, SettingsError)
from pages._shared import layout, selection, widgets

layout.page_setup("Compute")
st.title("Compute")
if selection.read_only():  # the page list leaves it out; an old link lands here
    st.warning("Read-only mode: computing is switched off.")
    st.stop()

cache_path = str(selection.cache().path)
try:
    config = jobs.configured(cache=cache_path)
except jobs.ConfigError as error:
    st.error(str(error))
    st.stop()
pairs, datasets = config["pairs"], config["datasets"]
if config["cache_problem"]:
    st.warning(f"Pairs and datasets made here cannot be listed: {config['cache_problem']}")
selection.keep_selection()
# Open on the sidebar's pair and dataset where the config has them: the run the user is looking at,
# on data this machine has (the first configured ones may need the hub).
for key, name, options in (("compute.pair", "pair", pairs), ("compute.dataset", "dataset", datasets)):
    chosen = selection.sidebar_choice(name)
    if key not in st.session_state and chosen in options:
        st.session_state[key] = chosen
# A pair saved by the last run of this page: open on it.
saved = st.session_state.pop("new.saved", None)
if saved is not None:
    st.session_state["compute.pair"], st.session_state["compute.dataset"] = saved
    st.success(f"Saved the pair **{saved[0]}** in the cache {cache_path}, with the dataset "
               f"**{saved[1]}**; it is picked below.", icon=":material/check_circle:")

SOURCE_LABELS = {"hub": "hub id", "folder": "local folder", "adapter": "LoRA adapter folder"}


def model_inputs(role: str, key: str, pair_base: dict | None = None) -> dict:
    """One model of the new pair, in the current container, as a pairs.toml entry; an adapter's
    base defaults to `pair_base` (the post model on the pair's base)."""
    st.markdown(f"**{role}**")
    source = st.radio("From", query.MODEL_SOURCES, key=f"{key}.source", horizontal=True,
                      format_func=SOURCE_LABELS.get)
    location = st.text_input(SOURCE_LABELS[source].capitalize(), key=f"{key}.location",
                             placeholder={"hub": "org/name", "folder": "/path/to/model",
                                          "adapter": "/path/to/adapter"}[source],
                             help="a folder with config.json and *.safetensors (an adapter: "
                                  "adapter_config.json and adapter_model.safetensors); relative "
                                  "folders are taken from the repository root")
    revision = st.text_input("Revision", key=f"{key}.revision", placeholder="main",
                             help="a branch, tag or commit") if source == "hub" else ""
    adapter_base = st.text_input(
        "Adapter's base (hub id or folder)", key=f"{key}.adapter_base",
        placeholder="empty: the pair's base model" if pair_base else "org/name or /path",
    ) if source == "adapter" else ""
    label = st.text_input("Label", key=f"{key}.label", placeholder="empty: the model's name",
                          help="how the pages name this model")
    algorithm = st.text_input("Post-training algorithm", key=f"{key}.algorithm",
                              placeholder="e.g. GRPO") if pair_base is not None else ""
    return query.model_declaration(source, location, label, revision=revision,
                                   adapter_base=adapter_base or pair_base or "", algorithm=algorithm)


def new_pair_form() -> None:
    """Name, base and post model, template, token limit and dataset of a new pair; Check lists
    every problem (run in a child process: it reads configs and tokenizers), Save checks again and
    saves the pair in the cache."""
    name = st.text_input("Name of the new pair", key="new.name", placeholder="my-pair",
                         help="letters, digits, '.', '_' and '-'; not a name core/pairs.toml has")
    base_column, post_column = st.columns(2)
    with base_column:
        base = model_inputs("Base model", "new.base")
    with post_column:
        post = model_inputs("Post-trained model", "new.post", pair_base=base)
    template_column, tokens_column, source_column = st.columns(3)
    template = template_column.selectbox("Prompt template", query.TEMPLATE_NAMES, key="new.template",
                                         help="how a question becomes a prompt (core/templates.py)")
    max_new_tokens = tokens_column.number_input("Answer token limit", min_value=1, value=512,
                                                step=64, key="new.max_new_tokens")
    upload = None
    if source_column.radio("Dataset", ["configured", "upload"], key="new.dataset_source",
                           horizontal=True) == "configured":
        dataset = st.selectbox("Configured dataset", datasets, key="new.dataset")
    else:
        file = st.file_uploader(
            "JSONL file, one question per line", type=["jsonl"], key="new.upload",
            max_upload_size=query.MAX_DATASET_BYTES // 2**20,
            help="fields as the math-evaluation-harness files have them: question (or problem), "
                 "answer (or solution with a \\boxed{} answer), and an optional id")
        dataset = st.text_input("Dataset name", key="new.upload_name",
                                placeholder=file.name.removesuffix(".jsonl") if file else "my-set")
        if file is not None:
            dataset = dataset.strip() or file.name.removesuffix(".jsonl")
            upload = query.Upload(file.name, file.getvalue())
    declaration = query.pair_declaration(base, post, template, int(max_new_tokens), dataset)
    arguments = dict(upload=upload, cache=cache_path)
    # What was checked: the result shows until an input changes.
    checked = json.dumps([name, declaration, upload and upload.filename,
                          upload and len(upload.data)], sort_keys=True)
    check_column, save_column, _ = st.columns([1, 1, 4])
    if check_column.button("Check", icon=":material/fact_check:", key="new.check"):
        with st.spinner("Reading the models' configs and tokenizers ..."):
            st.session_state["new.problems"] = (checked, query.check_new_pair(
                name.strip(), declaration, **arguments))
    if save_column.button("Save", type="primary", icon=":material/save:", key="new.save"):
        with st.spinner("Checking, then saving ..."):
            problems = query.check_new_pair(name.strip(), declaration, **arguments)
            if not problems:
                try:
                    query.save_user_pair(name.strip(), declaration, **arguments)
                except query.ProblemsError as error:
                    problems = error.problems
                except jobs.CircuitdiffError as error:  # a run holds the cache's writer lock
                    problems = [str(error)]
                else:
                    st.session_state["new.saved"] = (name.strip(), dataset)
                    st.session_state.pop("new.problems", None)
                    st.rerun()
            st.session_state["new.problems"] = (checked, problems)
    checked_for, problems = st.session_state.get("new.problems", (None, None))
    if problems is not None and checked_for == checked:
        if problems:
            # Paths and globs are shown as written, not as Markdown.
            st.error(f"**{len(problems)} problem(s)** to fix before saving:\n\n" + "\n".join(
                f"- {problem}".replace("*", "\\*").replace("$", "\\$") for problem in problems))
        else:
            st.success("No problem found: the models load, their architecture is supported and "
                       "they share a tokenizer on this dataset's prompts. Save to pick the pair.")


with st.expander("New pair: models on this machine or the hub, a configured or uploaded dataset",
                 icon=":material/add_circle:"):
    new_pair_form()
if not pairs or not datasets:
    st.info("No pair or dataset is configured yet: make one above, or add them to core/pairs.toml.")
    st.stop()

left, right = st.columns(2)
pair = left.selectbox("Model pair or series", list(pairs), key="compute.pair",
                      format_func=lambda name: f"{name} ({pairs[name]}"
                                               + (", made here)" if name in config["user_pairs"]
                                                  else ")"))
dataset = right.selectbox("Dataset", datasets, key="compute.dataset")
alphas = left.multiselect("Alphas (fraction of the mean answer length scored)", list(PAPER_ALPHAS),
                          default=list(PAPER_ALPHAS), key="compute.alphas",
                          format_func=lambda a: f"{a:g}")
limit = right.number_input("Questions taken from the dataset (0: all)", min_value=0, value=0, step=10,
                           key="compute.limit",
                           help="a first look on a prefix of the dataset; selection then draws from it")
groups = st.columns(5)
with groups[0].expander("Selection settings"):
    selection_settings = widgets.settings_widgets(SelectionSettings, "compute.selection")
with groups[1].expander("Score settings"):
    score = widgets.settings_widgets(ScoreSettings, "compute.score")
with groups[2].expander("Generation settings"):
    generation = widgets.settings_widgets(GenerationSettings, "compute.generation")
with groups[3].expander("Controls"):
    controls = st.multiselect(
        "Controls", list(jobs.CONTROLS), key="compute.controls",
        help="docs/method.md section 8. cross: each model scored on the other's answers (weights vs "
             "tokens); perturb: a matched random update of the base as a null model; seed: the "
             "pair's seed_null, if declared; faithfulness: real edge ablation and circuit recovery")
    faithfulness = (widgets.settings_widgets(FaithfulnessSettings, "compute.faithfulness")
                    if "faithfulness" in controls else FaithfulnessSettings())
with groups[4].expander("Where it runs"):
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
                              controls=tuple(controls), faithfulness=faithfulness,
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
        st.markdown(f"**Estimated cost:** about **{jobs.format_duration(estimate['seconds'])}** "
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
                                 f"{jobs.format_duration(job.eta_seconds)}")
            if job.message:
                st.caption(job.message)
            if job.log_path:
                st.caption(f"log: {job.log_path}")


@st.cache_data(ttl=600, show_spinner="Estimating the demo's second part ...")
def demo_extras_offer(path: str, modified: float) -> dict | None:
    # Planning runs child processes that load tokenizers (seconds): again when the cache changes.
    return jobs.demo_extras_offer(path)


def demo_extras_panel() -> None:
    """The demo's second part, offered once its pairs have landed and no job is running (a job
    changes the cache, and with it the estimate, at every stage)."""
    if jobs.active_jobs(cache_path):
        return
    modified = selection.cache().path.stat().st_mtime if selection.cache().path.exists() else 0.0
    offer = demo_extras_offer(cache_path, modified)
    if offer is None or not offer["missing"]:
        return
    with st.container(border=True):
        st.markdown(f"**The demo's second part**: GRPO's training trajectory (the series "
                    f"`demo-grpo-steps`) and the faithfulness control of `demo-grpo` (real edge "
                    f"ablation and circuit recovery). Estimated from this cache's timings: about "
                    f"{jobs.format_duration(offer['seconds'])}.")
        if st.button("Compute the demo's second part", icon=":material/play_arrow:"):
            try:
                job_id = jobs.start_demo(cache_path, "extras")
            except jobs.JobConflictError as error:
                st.error(str(error))
            else:
                st.session_state["compute.demo_started"] = job_id
                st.rerun()  # the banner of the next run shows the job


started_demo = st.session_state.pop("compute.demo_started", None)
if started_demo is not None:
    st.success(f"Started the demo job {started_demo}; the banner above shows its progress and each "
               f"run appears on the other pages as it lands.", icon=":material/check_circle:")


demo_extras_panel()
st.subheader("Jobs")
active = any(job.state in jobs.ACTIVE for job in jobs.list_jobs(cache_path))
# While a job is active, the job panel alone refreshes every 2 s.
st.fragment(job_panel, run_every=2.0 if active else None)()
