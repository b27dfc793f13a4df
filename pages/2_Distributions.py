"""Distributions of edge scores: base vs post histograms and ECDFs of |W| on a log scale, and the
per-sample metrics across the run's alphas with their bootstrap intervals."""

import math

import pandas as pd
import streamlit as st

from core import figures
from core.query import PER_SAMPLE_METRICS
from core.settings import MetricSettings
from pages._shared import layout, selection, widgets


@st.cache_data(max_entries=16, show_spinner=False)
def abs_distribution_figures(path: str, content_key: str, run_key: str, alpha: float,
                             post_label: str, granularity: str, base_label: str,
                             settings: MetricSettings):
    """Histogram and ECDF of |W| over real edges and samples, both models. Cached (by the run's
    content key, so new data make a new entry): plotly figures of 2 x n x n_edges values take a
    while to build, the read model's memo holds only the values."""
    values = selection.cache().abs_values(run_key, alpha, post_label=post_label,
                                          granularity=granularity, settings=settings)
    pooled = {base_label: values["base"], post_label: values["post"]}
    colors = {base_label: figures.BASE_COLOR, post_label: figures.POST_COLOR}
    return figures.abs_histogram(pooled, colors=colors), figures.ecdf(pooled, colors=colors)


sel = layout.page_header("Distributions", links=("distributions.metric",))
if sel is not None:
    layout.report_download(sel)
    layout.require_pairs(sel)
    cache = selection.cache()
    st.subheader(f"|W| over real edges and samples, alpha {sel.alpha:g}")
    histogram, ecdf = abs_distribution_figures(str(cache.path), cache.content_key(sel.run_key),
                                               sel.run_key, sel.alpha, sel.post_label,
                                               sel.granularity, sel.base_label, sel.metrics)
    left, right = st.columns(2)
    with left:
        layout.plot(histogram, "abs_w_histogram", sel)
    with right:
        layout.plot(ecdf, "abs_w_ecdf", sel)
    st.caption(f"{sel.n_questions} questions × {cache.graph(sel.run_key, sel.granularity).n_edges} "
               f"real edges per model. Structural zeros (non-edges) are left out here; the metrics' "
               f"`flatten` convention decides whether they count there.")

    st.subheader("Per-sample metrics across alphas")
    widgets.linked("distributions.metric", PER_SAMPLE_METRICS)
    metric = st.selectbox("Metric", PER_SAMPLE_METRICS, key="distributions.metric")
    widgets.link("distributions.metric", metric)
    alphas = st.multiselect("Alphas", list(sel.alphas), default=list(sel.alphas),
                            format_func=lambda a: f"{a:g}", key="distributions.alphas")
    values, intervals = [], []
    by_alpha = cache.per_sample_by_alpha(sel.run_key, tuple(alphas), **sel.scope,
                                         settings=sel.metrics)
    for alpha, per_sample in by_alpha.items():
        if len(per_sample) < 2:
            continue
        comparison = cache.comparison(sel.run_key, alpha, **sel.scope,
                                      settings=sel.metrics).metrics[metric]
        for side, label, value, interval in (
                ("base", sel.base_label, comparison.base, comparison.base_ci),
                ("post", sel.post_label, comparison.post, comparison.post_ci)):
            values.append(pd.DataFrame({"alpha": alpha, "model": label,
                                        "value": per_sample[f"{side}_{metric}"]}))
            low, high = interval if interval is not None else (math.nan, math.nan)
            intervals.append({"alpha": alpha, "model": label, "mean": value, "ci_low": low,
                              "ci_high": high})
    if not values:
        st.info("No selected alpha has 2 or more questions scored for both models.")
        st.stop()
    frame = pd.concat(values, ignore_index=True)
    ci = pd.DataFrame(intervals)
    colors = {sel.base_label: figures.BASE_COLOR, sel.post_label: figures.POST_COLOR}
    layout.plot(figures.per_sample_violins(frame, metric, intervals=ci, colors=colors),
                f"per_sample_{metric}", sel)
    st.caption(f"Violins and boxes: one value per question. Diamonds: the model's {metric} (the mean "
               f"over questions) with its {sel.metrics.ci_level:.0%} bootstrap interval "
               f"({sel.metrics.bootstrap} resamples; none when 0).")
    layout.table(ci, f"per_sample_{metric}_intervals", hide_index=True)
