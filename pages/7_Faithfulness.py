"""Faithfulness: do the edge scores predict real ablation? (docs/method.md section 8). For the selected
run, post model and alpha: each model's score W against the real effect Delta of removing the edge
(scatter and correlations), the circuit recovery curves f(k) with their intervals and areas, and, where
the same pair was also scored with another method, how far the two methods agree. What is not
computed yet is said, with the command that computes it."""

import math

import streamlit as st

from core import figures
from core.query import AREA_DIFFERENCE, TooFewQuestionsError
from pages._shared import layout, selection

sel = layout.page_header("Faithfulness")
if sel is not None:
    layout.report_download(sel)
    cache = selection.cache()
    alphas = cache.faithfulness_alphas(sel.run_key)
    command = (f"python -m core run --pair {sel.pair} --dataset {sel.dataset} ... --controls "
               f"faithfulness")
    if not alphas:
        st.info(
            f"**Faithfulness is not computed for this run.** It removes real edges one at a time "
            f"and compares the loss change Delta with the score W, and keeps the top edges by mean "
            f"|W| to see how much of the loss they recover. Compute it with `{command}` (the "
            f"`...` being this run's own settings, so only the control is computed; `--faith-"
            f"questions`, `--faith-edges-per-sample` and `--faith-seed` size it), or on the "
            f"**Compute** page: this run's settings with *faithfulness* chosen under Controls.",
            icon=":material/info:")
        st.stop()
    if not any(math.isclose(sel.alpha, alpha, rel_tol=1e-9) for alpha in alphas):
        st.info(f"Faithfulness is computed at alpha {', '.join(f'{a:g}' for a in alphas)} for this "
                f"run, not at {sel.alpha:g}: pick one of those in the sidebar, or compute it here "
                f"with `{command}` and this alpha.", icon=":material/info:")
        st.stop()
    scope = {"post_label": sel.post_label}
    level = f"{sel.metrics.ci_level:.0%}"

    st.subheader("Edge scores against real ablation")
    edges = cache.faithfulness_edges(sel.run_key, sel.alpha, **scope)
    agreement = cache.faithfulness_agreement(sel.run_key, sel.alpha, **scope)
    layout.plot(figures.faithfulness_scatter(edges, agreement), "faithfulness_scatter", sel)
    st.caption("Each point is one edge of one question: its EAP score W (x) and the loss change Delta "
               "when the edge is really removed (y), on a sign-preserving log scale (asinh: linear "
               "near 0). On the dashed diagonal Delta = W, the first-order score would be exact. Red: "
               "the largest edges by |W| of each question; grey: edges drawn at random.")
    layout.table(agreement, "faithfulness_agreement", hide_index=True)
    st.caption("Per model and stratum: Spearman and Pearson correlation of W with Delta, and the "
               "fraction of edges where their signs agree (empty where undefined).")

    st.subheader("Circuit recovery")
    curves = cache.recovery_curves(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    areas = cache.recovery_areas(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    layout.plot(figures.recovery_figure(curves, areas), "recovery_curves", sel)
    st.caption(f"f(k) = (L_empty − L_k) / (L_empty − L_full): keep the fraction k of real edges with "
               f"the largest mean |W|, remove the others. Bands: {level} intervals from a bootstrap "
               f"over questions. The area is the mean of f over log k; row '{AREA_DIFFERENCE}': the "
               f"post model's area minus the base's, with its paired interval. A smaller area: the "
               f"model needs more edges for the same recovery.")
    layout.table(areas, "recovery_areas", hide_index=True)

    st.subheader("Agreement with another scoring method")
    try:
        methods = cache.method_agreement(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    except TooFewQuestionsError as error:
        st.info(str(error), icon=":material/info:")
    else:
        if methods is None:
            st.caption(f"No run of this pair, dataset and selection scored with another method "
                       f"holds alpha {sel.alpha:g}. Run the same pair again with `--method eap-ig` "
                       f"(or `--method eap`) to compare the methods' edge ranks and metric "
                       f"directions here.")
        else:
            edge_rows = methods[methods["kind"] == "edges"]
            layout.table(edge_rows[["other_method", "name", "role", "spearman", "n"]],
                         "method_agreement_edges", data=edge_rows, hide_index=True)
            st.caption("Per model: the Spearman rank correlation of the two methods' mean |W| over "
                       "the real edges.")
            metric_rows = methods[methods["kind"] == "metric"]
            layout.table(metric_rows[["other_method", "name", "change", "other_change",
                                      "clear_sign", "other_clear_sign", "agrees"]],
                         "method_agreement_metrics", data=metric_rows, hide_index=True)
            st.caption("Per metric: the change post − base under each method, whether its interval "
                       "excludes 0 (clear sign), and whether the two changes have the same sign.")
