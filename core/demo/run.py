"""The project's own pipeline on the demo at the paper's alphas, in two parts, each a background job
of its own (core/jobs.py start_demo): "pairs" (`make demo`), the three pairs base vs GRPO, DPO and SFT
with GRPO's seed null; then "extras", which the dashboard offers once the pairs have landed: GRPO's
trajectory (the series demo-grpo-steps) and the faithfulness control of the GRPO pair. A rerun finds
everything in the cache and does no model work."""

from __future__ import annotations

import time

from core.demo import common

# The three pairs; GRPO's runs with its seed null (`--controls seed`, docs/method.md section 8).
DEMO_PAIRS = ("demo-grpo", "demo-dpo", "demo-sft")
SEED_NULL_PAIR = "demo-grpo"
TRAJECTORY_SERIES = "demo-grpo-steps"
DATASET = "demo"
PARTS = ("pairs", "extras")
# Questions drawn from those the paper's rules keep (its beta, gamma, delta; docs/method.md section
# 5): 40 of those kept per pair, so that scoring, one forward and backward pass per question, model
# and T_cut, takes minutes on 2 cores.
DEMO_QUESTIONS = 40
# The faithfulness control's questions (of those 40): its statistics rank edges on one half and
# evaluate them on the other, and average per-question correlations with a bootstrap over questions
# (docs/method.md section 8), so each half needs enough questions for an interval to mean something.
FAITHFULNESS_QUESTIONS = 20


def require_adapters() -> None:
    """Raises FileNotFoundError naming the first demo adapter that is missing."""
    for name in (common.REASONING_SFT, *common.ALGORITHMS, common.SEED_NULL):
        if not (common.ADAPTER_DIR / name / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"adapter {common.ADAPTER_DIR / name} is missing; it is "
                                    f"committed with the repository, or run `python -m core.demo "
                                    f"train {name}`")


def part_requests(part: str, cache: str | None = None) -> list:
    """The runs of one part of the demo (PARTS), in order, with the paper's selection rules."""
    from core.config import RunRequest
    from core.settings import (PAPER_ALPHAS, FaithfulnessSettings, GenerationSettings, ScoreSettings,
                               SelectionSettings)

    def request(pair: str, controls: tuple[str, ...] = ()) -> RunRequest:
        return RunRequest(pair=pair, dataset=DATASET, alphas=PAPER_ALPHAS, cache=cache,
                          selection=SelectionSettings(n=DEMO_QUESTIONS),
                          generation=GenerationSettings(gen_batch_size=common.GENERATION_BATCH),
                          score=ScoreSettings(batch_size=common.SCORE_BATCH,
                                              batches_per_commit=common.SCORE_BATCHES_PER_COMMIT),
                          controls=controls,
                          faithfulness=FaithfulnessSettings(questions=FAITHFULNESS_QUESTIONS))

    if part == "pairs":
        return [request(pair, ("seed",) if pair == SEED_NULL_PAIR else ()) for pair in DEMO_PAIRS]
    if part == "extras":
        # The GRPO pair's run is the pairs part's; only its faithfulness rows are new.
        return [request(TRAJECTORY_SERIES), request(SEED_NULL_PAIR, ("faithfulness",))]
    raise ValueError(f"unknown demo part {part!r}; the parts are {list(PARTS)}")


def run_demo(cache: str | None = None, part: str = "pairs", log=print, progress=None):
    """One part of the demo's runs, one after the other; `progress(stage, done, total)` hears each
    run's pipeline progress with stage "<pair>: <pipeline stage>". Returns the metric table of the
    part's runs as the Overview shows them (Holm across the cache's cells)."""
    from core import pipeline
    from core.commands.metrics import TABLE_METRICS
    from core.query import ResultCache

    common.setup_torch()
    require_adapters()
    began = time.monotonic()
    run_keys = []
    for request in part_requests(part, cache):
        pair = request.pair
        pair_progress = None if progress is None else (
            lambda stage, done, total, pair=pair: progress(f"{pair}: {stage}", done, total))
        summary = pipeline.run(request, progress=pair_progress, log=log)
        run_keys.append(summary.run_key)
        work = ", ".join(f"{stage} {n}" for stage, n in summary.done.items())
        log(f"{pair}: run {summary.run_key}, {summary.selection['n_selected']} questions, "
            f"T_cut {summary.t_cuts}; done now: {work}; {summary.seconds:.1f} s")
    log(f"demo {part}: {time.monotonic() - began:.1f} s")
    table = ResultCache.open(cache).overview(shown=TABLE_METRICS)
    return table[table["run_key"].isin(run_keys)]
