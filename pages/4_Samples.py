"""Samples: each selected question with both models' answers and correctness, the scored (truncated)
part of each answer highlighted, and the per-sample metrics."""

import html

import pandas as pd
import streamlit as st

from core import figures
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

    st.subheader("All selected questions")
    overview = table[["question_id", "base_correct", "post_correct", "base_answer_len",
                      "post_answer_len", "t_cut", "base_loss", "post_loss", *metric_names]]
    layout.table(overview, f"samples_alpha_{sel.alpha:g}", data=table, hide_index=True)
