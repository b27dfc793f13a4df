"""The project's own pipeline on the demo pairs (base vs GRPO, DPO, SFT) at the paper's alphas,
then the metric table of those runs. A rerun finds everything in the cache and does no model work."""

from __future__ import annotations

import time

from core.demo import common

# The three pairs, then GRPO's trajectory (a series: its step-12 model is demo-grpo's, whose
# answers and scores the cache shares).
DEMO_PAIRS = ("demo-grpo", "demo-dpo", "demo-sft", "demo-grpo-steps")
DATASET = "demo"
# The base model rambles to the token cap while GRPO and SFT answer in about 12 tokens, so the
# length filters of docs/method.md section 5 (made for answers of similar length: pair-mean length
# within [0.5, 1.5] x T_bar, relative length difference <= 0.5) keep 2 of the 200 questions for base
# vs GRPO. The demo keeps every question both models answer correctly; T_cut still comes from the
# shorter model's mean length.
DEMO_SELECTION = dict(beta=0.0, gamma=10.0, delta=2.0)


def require_adapters() -> None:
    """Raises FileNotFoundError naming the first demo adapter that is missing."""
    for algorithm in common.ALGORITHMS:
        if not (common.ADAPTER_DIR / algorithm / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"adapter {common.ADAPTER_DIR / algorithm} is missing; it is "
                                    f"committed with the repository, or run `python -m core.demo "
                                    f"train {algorithm}`")


def run_demo(cache: str | None = None, log=print, progress=None):
    """The demo's runs, one pair after the other; `progress(stage, done, total)` hears each pair's
    pipeline progress with stage "<pair>: <pipeline stage>"."""
    from core import pipeline
    from core.config import RunRequest
    from core.query import ResultCache
    from core.settings import PAPER_ALPHAS, GenerationSettings, SelectionSettings

    common.setup_torch()
    require_adapters()
    began = time.monotonic()
    run_keys = []
    for pair in DEMO_PAIRS:
        # Answers are cut at the token limit the adapters were trained and evaluated with.
        request = RunRequest(
            pair=pair, dataset=DATASET, alphas=PAPER_ALPHAS, cache=cache,
            selection=SelectionSettings(**DEMO_SELECTION),
            generation=GenerationSettings(max_new_tokens=common.MAX_NEW_TOKENS))
        pair_progress = None if progress is None else (
            lambda stage, done, total, pair=pair: progress(f"{pair}: {stage}", done, total))
        summary = pipeline.run(request, progress=pair_progress, log=log)
        run_keys.append(summary.run_key)
        work = ", ".join(f"{stage} {n}" for stage, n in summary.done.items())
        log(f"{pair}: run {summary.run_key}, {summary.selection['n_selected']} questions, "
            f"T_cut {summary.t_cuts}; done now: {work}; {summary.seconds:.1f} s")
    log(f"demo pipeline: {time.monotonic() - began:.1f} s")
    table = ResultCache.open(cache).metric_table()
    return table[table["run_key"].isin(run_keys)]


def format_metric_table(table) -> str:
    """One line per pooled (pair, T_cut, metric): base -> post, the change on its scale (% from the
    log-ratio interval, or the difference) with its interval, * where the interval excludes 0, and
    the paired Wilcoxon p of per-sample metrics (docs/method.md sections 6-7)."""
    lines = []
    pooled = table[table["pooled"].astype(bool)]
    for row in pooled.sort_values(["pair", "alpha", "metric"]).itertuples():
        if row.scale == "difference":
            change = f"diff {row.change:+.3g} [{row.change_low:+.3g}, {row.change_high:+.3g}]"
        else:
            change = f"{row.change_pct:+.1f}% [{row.ci_low:+.1f}, {row.ci_high:+.1f}]"
        star = "*" if row.clear_sign else ""
        wilcoxon = "" if row.wilcoxon_p != row.wilcoxon_p else f"  p={row.wilcoxon_p:.2g}"
        lines.append(f"{row.pair:10s} alpha={row.alphas:<9} {row.metric:15s} {row.base:.4g} -> "
                     f"{row.post:.4g}  {change}{star}{wilcoxon}  n={row.n}")
    return "\n".join(lines)
