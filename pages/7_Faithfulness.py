"""Faithfulness: do the edge scores predict real ablation? (docs/method.md section 8). For the selected
run, post model and alpha: each model's score W against the real effect Delta of removing the edge
(scatter, and per stratum of edges the per-question correlations and the calibration slope with their
intervals), the circuit recovery curves f(k) with their intervals, areas and the k where they reach
0.8, all cross-fitted (edges ranked on one half of the questions, evaluated on the other), and, where
the same pair was also scored with another method, how far the two methods agree. What is not
computed yet is said, with the command that computes it."""

import math

import streamlit as st

from core import figures
from core.query import AREA_DIFFERENCE, K_RATIO, RECOVERY_TARGET, TooFewQuestionsError
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
    agreement = cache.faithfulness_agreement(sel.run_key, sel.alpha, **scope,
                                             settings=sel.metrics)
    layout.plot(figures.faithfulness_scatter(edges, agreement), "faithfulness_scatter", sel)
    st.caption("Each point is one edge of one question: its EAP score W (x) and the loss change Delta "
               "when the edge is really removed (y), on a sign-preserving log scale (asinh: linear "
               "near 0). On the dashed diagonal Delta = W, the first-order score would be exact. Red: "
               "the largest edges by the mean |W| of the other half of the questions (so no question "
               "picks the edges it is judged on); grey: edges drawn at random.")
    layout.table(agreement.drop(columns=["role"]), "faithfulness_agreement", data=agreement,
                 hide_index=True)
    st.caption(f"Per model and stratum, never pooled (a pooled number would depend on how many edges "
               f"of each stratum were drawn): the Spearman and Pearson correlation of W with Delta "
               f"and the fraction of edges with the same sign, each computed within a question and "
               f"averaged over the questions where defined (n_questions); the calibration slope is "
               f"the least-squares slope of Delta on W over the stratum's edges (1: W predicts the "
               f"size of the real effect; below 1: it overstates it). low, high: {level} BCa "
               f"intervals from a bootstrap over questions. Empty where undefined.")

    st.subheader("Circuit recovery")
    curves = cache.recovery_curves(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    areas = cache.recovery_areas(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    layout.plot(figures.recovery_figure(curves, areas), "recovery_curves", sel)
    st.caption(f"f(k) = (L_empty − L_k) / (L_empty − L_full): keep the fraction k of real edges with "
               f"the largest mean |W| over the other half of the questions, remove the others, and "
               f"average the loss over both halves. Bands: {level} BCa intervals from a bootstrap "
               f"over questions. The area is the mean of f over log k; row '{AREA_DIFFERENCE}': the "
               f"post model's area minus the base's, with its paired interval. A smaller area: the "
               f"model needs more edges for the same recovery.")
    layout.table(areas, "recovery_areas", hide_index=True)
    needed = cache.recovery_k(sel.run_key, sel.alpha, **scope, settings=sel.metrics)
    layout.table(needed, "recovery_k", hide_index=True)
    st.caption(f"k: the fraction of real edges kept where f first reaches {RECOVERY_TARGET:g} "
               f"(interpolated in log k between the curve's points; 0.001 means at most 0.1%), "
               f"with its {level} interval; row '{K_RATIO}': the post model's k over the base's, "
               f"paired (above 1: the post model needs more edges for the same recovery).")

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
