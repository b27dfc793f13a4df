"""Distributions of edge scores: base vs post histograms and ECDFs of |W| on a log scale, and the
per-sample metrics across the run's alphas with their bootstrap intervals."""

import math

import pandas as pd
import streamlit as st

from core import figures
from pages import _shared

# The metrics that have one value per sample (complexity and diversity are pooled over samples).
PER_SAMPLE = ("intensity", "kurtosis", "edge_entropy", "output_entropy")

sel = _shared.page_header("Distributions", links=("distributions.metric",))
if sel is not None:
    graph, base, post, ids = _shared.compared_matrices(sel)
    colors = {sel.base_label: figures.BASE_COLOR, sel.post_label: figures.POST_COLOR}
    st.subheader(f"|W| over real edges and samples, alpha {sel.alpha:g}")
    histogram, ecdf = _shared.abs_distribution_figures(sel)
    left, right = st.columns(2)
    with left:
        _shared.plot(histogram, "abs_w_histogram", sel)
    with right:
        _shared.plot(ecdf, "abs_w_ecdf", sel)
    st.caption(f"{len(ids)} questions × {graph.n_edges} real edges per model. Structural zeros "
               f"(non-edges) are left out here; the metrics' `flatten` convention decides whether "
               f"they count there.")

    st.subheader("Per-sample metrics across alphas")
    _shared.linked("distributions.metric", PER_SAMPLE)
    metric = st.selectbox("Metric", PER_SAMPLE, key="distributions.metric")
    _shared.link("distributions.metric", metric)
    alphas = st.multiselect("Alphas", list(sel.alphas), default=list(sel.alphas),
                            format_func=lambda a: f"{a:g}", key="distributions.alphas")
    values, intervals = [], []
    for alpha, per_sample in _shared.per_sample_by_alpha(sel, tuple(alphas)).items():
        if len(per_sample) < 2:
            continue
        comparison = _shared.comparison(sel, alpha).metrics[metric]
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
    _shared.plot(figures.per_sample_violins(frame, metric, intervals=ci, colors=colors),
                 f"per_sample_{metric}", sel)
    st.caption(f"Violins and boxes: one value per question. Diamonds: the model's {metric} (the mean "
               f"over questions) with its {sel.metrics.ci_level:.0%} bootstrap interval "
               f"({sel.metrics.bootstrap} resamples; none when 0).")
    _shared.table(ci, f"per_sample_{metric}_intervals", hide_index=True)
