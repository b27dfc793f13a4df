"""Samples: each selected question with both models' answers and correctness, the scored (truncated)
part of each answer highlighted, and the per-sample metrics."""

import html

import pandas as pd
import streamlit as st

from core import figures, jobs
from core.query import PER_SAMPLE_METRICS
from pages._shared import layout, selection, widgets


def answer_html(text: str, scored: str, color: str) -> str:
    """The answer with its scored prefix (answer[:T_cut]) highlighted; `$` is escaped so Markdown
    does not read maths into it."""
    def escape(part: str) -> str:
        return html.escape(part).replace("$", "&#36;")

    if scored and text.startswith(scored):
        body = (f"<mark style='background:{color}55;color:inherit'>{escape(scored)}</mark>"
                f"{escape(text[len(scored):])}")
    else:  # detokenised prefix differs from the stored text (whitespace merges): show both
        body = (f"<mark style='background:{color}55;color:inherit'>{escape(scored)}</mark>"
                f"<br><em>full answer:</em><br>{escape(text)}")
    return f"<div style='white-space:pre-wrap;font-family:monospace;font-size:0.85em'>{body}</div>"


def verdict(correct) -> str:
    if pd.isna(correct):
        return "not graded"
    return ":green[:material/check_circle: correct]" if bool(correct) else ":red[:material/cancel: wrong]"


def token_view_command(sel: selection.Selection, question_id: str) -> str:
    return (f"python -m core tokens --run {sel.run_key} --alpha {sel.alpha:g} --question "
            f"{question_id} --post {sel.post_label}")


def token_job_panel(sel: selection.Selection, question_id: str) -> None:
    """The token-view job of this question: its progress while it runs, its error if it failed;
    when a job this session watched finishes, the page reruns to show the stored view."""
    job = jobs.token_view_job(str(selection.cache().path), sel.run_key, sel.alpha, question_id,
                              sel.post_label)
    if job is None:
        return
    watched = st.session_state.get("samples.token_job") == job.job_id
    if job.state in jobs.ACTIVE:
        st.session_state["samples.token_job"] = job.job_id
        fraction = job.done / job.total if job.total else 0.0
        st.progress(min(max(fraction, 0.0), 1.0),
                    text=f"token view ({job.k} edges): {job.stage or 'starting'}, {job.done}/"
                         f"{job.total}")
    elif job.state == "failed":
        st.error(f"The token view could not be computed: {job.message}")
        if job.log_path:
            st.caption(f"log: {job.log_path}")
    elif job.state == "done" and watched:
        del st.session_state["samples.token_job"]
        st.rerun()


def token_view_section(sel: selection.Selection, question_id: str) -> None:
    """The question's stored token view; outside read-only mode, a button that computes it (a job)
    with the job's progress."""
    st.subheader("Which answer tokens carry the change")
    view = selection.cache().token_view(sel.run_key, sel.alpha, question_id,
                                        post_label=sel.post_label)
    if view is not None:
        layout.plot(figures.token_view_figure(view), f"token_view_{question_id}", sel)
        st.caption(f"The {len(view['edges'])} edges whose mean |W| changed most from the base to "
                   f"{view['post_label']} (mean |W| difference over this run's questions at alpha "
                   f"{view['alpha']:g}), rows in that order; per model, on its own answer, each "
                   f"answer token's term of the edge's W on this question (the residual stream at "
                   f"that token; the prompt's part is on hover; the terms and the prompt's part "
                   f"sum to W). Scores: {view['score']['name']}, {view['score']['dtype']}.")
    if selection.read_only():
        if view is None:
            st.caption(f"No token view is stored for this question; `{token_view_command(sel, question_id)}` "
                       f"computes one.")
        return
    job = jobs.token_view_job(str(selection.cache().path), sel.run_key, sel.alpha, question_id,
                              sel.post_label)
    running = job is not None and job.state in jobs.ACTIVE
    left, right = st.columns([1, 4])
    k = left.number_input("Edges shown", min_value=1, max_value=64, value=jobs.TOKEN_VIEW_EDGES,
                          step=1, key="samples.token_edges")
    right.caption(f"Scores this question again for both models with each answer position apart "
                  f"(a job: it loads each model once; `{token_view_command(sel, question_id)}` "
                  f"does the same).")
    if right.button("Compute again" if view is not None else "Compute the token view",
                    icon=":material/play_arrow:", key="samples.token_start", disabled=running):
        try:
            jobs.start_token_view(str(selection.cache().path), sel.run_key, sel.alpha, question_id,
                                  sel.post_label, int(k))
        except jobs.JobConflictError as error:
            st.error(str(error))
        else:
            running = True
    # While the job runs, its panel alone refreshes every 2 s.
    st.fragment(token_job_panel, run_every=2.0 if running else None)(sel, question_id)


sel = layout.page_header("Samples", links=("samples.question",))
if sel is not None:
    layout.report_download(sel)
    try:
        table = selection.cache().samples(sel.run_key, sel.alpha, **sel.scope, settings=sel.metrics)
    except ValueError as error:  # e.g. too few questions for the per-sample metrics
        st.warning(f"The samples of this run cannot be shown yet: {error}")
        st.stop()
    if table.empty:
        st.info(f"No question is scored for both models at alpha {sel.alpha:g} yet.")
        st.stop()
    # Per-sample metrics at the view's granularity and the sidebar's conventions; all NaN while
    # fewer than two questions are complete, and then not shown.
    metric_names = [column for column in (f"{side}_{name}" for side in ("base", "post")
                                          for name in PER_SAMPLE_METRICS)
                    if table[column].notna().any()]

    labels = {q: f"{q}: {text[:90]}" for q, text in zip(table["question_id"], table["question"])}
    widgets.linked("samples.question", list(table["question_id"]))
    question_id = st.selectbox(f"Question ({len(table)} selected for both models)",
                               list(table["question_id"]), format_func=labels.get,
                               key="samples.question")
    widgets.link("samples.question", question_id)
    row = table[table["question_id"] == question_id].iloc[0]
    st.markdown(f"**Question.** {row['question']}")
    st.markdown(f"**Reference answer:** `{row['reference']}` · scored tokens T_cut = "
                f"**{row['t_cut']}** (alpha {sel.alpha:g})")
    columns = st.columns(2)
    for column, side, label, color in ((columns[0], "base", sel.base_label, figures.BASE_COLOR),
                                       (columns[1], "post", sel.post_label, figures.POST_COLOR)):
        with column:
            st.markdown(f"#### {label}")
            st.markdown(f"{verdict(row[f'{side}_correct'])} · extracted `{row[f'{side}_answer']}` · "
                        f"{row[f'{side}_answer_len']} answer tokens · loss "
                        f"{row[f'{side}_loss']:.4g}")
            st.markdown(answer_html(str(row[f"{side}_text"]), str(row[f"{side}_truncated_text"]),
                                    color), unsafe_allow_html=True)
    st.caption("Highlighted: the first T_cut answer tokens, the part whose self-entropy the edge "
               "scores attribute.")
    if metric_names:
        st.markdown("**Per-sample metrics of this question**")
        layout.table(pd.DataFrame([row[["question_id", *metric_names]]]),
                     f"sample_{question_id}_metrics", hide_index=True)

    token_view_section(sel, question_id)

    st.subheader("All selected questions")
    overview = table[["question_id", "base_correct", "post_correct", "base_answer_len",
                      "post_answer_len", "t_cut", "base_loss", "post_loss", *metric_names]]
    layout.table(overview, f"samples_alpha_{sel.alpha:g}", data=table, hide_index=True)
