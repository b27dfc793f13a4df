"""Controls: is the selected pair's change at the selected alpha real, and is it the weights?
(docs/method.md section 8). One table and one figure, per metric: the change post - base with its
interval, its weights part (post on base's tokens - base) and tokens part (post - post on base's
tokens), the null model's change and whether the change exceeds it, the change under the other
position variants, and each per-sample metric's correlation with the loss. What is not computed
yet is said, with the command that computes it."""

import streamlit as st

from core import figures
from core.query import CONTROLS_COMMAND
from pages._shared import layout, selection

sel = layout.page_header("Controls")
if sel is not None:
    layout.report_download(sel)
    layout.require_pairs(sel)
    cache = selection.cache()
    summary = cache.controls_summary(sel.run_key, sel.alpha, **sel.scope, settings=sel.metrics)
    level = f"{sel.metrics.ci_level:.0%}"
    st.markdown(
        f"Each metric's change post − base (metric units) with its {level} paired-bootstrap "
        "interval, split into **weights** (post scored on the base's answers − base: same tokens, "
        "other weights) and **tokens** (post − post scored on the base's answers: same weights, "
        "other tokens); they add up to the change exactly. **null**: the change of a matched "
        "random perturbation of the base (or a seed null) at the nearest T_cut; "
        "**exceeds_null**: the change's interval excludes 0 and lies beyond the null's change. "
        f"no_sink / answer_only: the change without the first token's part / from the answer "
        f"tokens' part only (this table's positions: {sel.metrics.positions}). loss_rho: each "
        "per-sample metric's Spearman correlation with the per-sample loss, per model.")
    layout.table(summary.table, "controls", hide_index=True)
    layout.plot(figures.controls_bars(summary.table), "controls", sel)
    st.caption("Bars: the change, its weights and tokens parts and the null model's change, one "
               "panel per metric; whiskers: the bootstrap intervals. A part that is not computed "
               "has no bar.")
    labels = {"cross": "Weights vs tokens", "null": "Null model", "positions": "Position variants"}
    for control, message in summary.missing.items():
        st.info(f"**{labels[control]}: not computed.** {message}", icon=":material/info:")
    if summary.missing:
        st.caption(f"Controls are computed with the run: `{CONTROLS_COMMAND}` (cross: each model "
                   f"on the other's answers; perturb: a matched random perturbation of the base).")
