"""`python -m core run | plan | ls | export | import | migrate`: the pipeline and the cache from the
command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.settings import (PAPER_ALPHAS, FaithfulnessSettings, GenerationSettings, ScoreSettings,
                           SelectionSettings)
from core.vocab import CONTROLS, EXECUTORS


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run", help="generate, grade, select, truncate and score a pair or series on a dataset",
        description="Fills the cache with everything the run needs; a rerun does only what is "
                    "missing, and a killed run resumes from its last commit.")
    _request_arguments(run)
    run.add_argument("--job-id", help=argparse.SUPPRESS)
    run.set_defaults(handler=run_command)

    plan = subparsers.add_parser(
        "plan", help="what a run would compute (work missing per stage, rough seconds); loads no model",
        description="Asks the cache what a run is missing, as the run's stages ask it; writes nothing.")
    _request_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the estimate as one JSON line")
    plan.set_defaults(handler=plan_command)

    ls = subparsers.add_parser("ls", help="list the cached runs")
    _cache_argument(ls)
    ls.set_defaults(handler=ls_command)

    export = subparsers.add_parser("export", help="write a run to Parquet files in a folder")
    export.add_argument("--run", required=True, help="run key (see `python -m core ls`)")
    export.add_argument("--out", required=True, type=Path, help="folder to write")
    _cache_argument(export)
    export.set_defaults(handler=export_command)

    imp = subparsers.add_parser("import", help="add a run exported with `export` to the cache")
    imp.add_argument("folder", type=Path, help="folder written by `python -m core export`")
    _cache_argument(imp)
    imp.set_defaults(handler=import_command)


    migrate = subparsers.add_parser(
        "migrate", help="upgrade a cache of an older schema version (keeps a copy of it)",
        description="Copies the cache to <cache>.v<version>.bak, then rewrites it to this code's "
                    "schema in one transaction.")
    _cache_argument(migrate)
    migrate.set_defaults(handler=migrate_command)


def _cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", help="cache file (default: $CIRCUITDIFF_CACHE, else "
                                        "cache/circuitdiff.duckdb)")


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    """A run request: a file written by RunRequest.to_file (`--request`), or flags."""
    parser.add_argument("--request", type=Path,
                        help="run request JSON file (RunRequest.to_file); replaces every other flag")
    parser.add_argument("--pair", help="pair or series name from core/pairs.toml")
    parser.add_argument("--dataset", help="dataset name from core/pairs.toml, or a .jsonl")
    parser.add_argument("--alpha", dest="alphas", type=float, nargs="+", default=list(PAPER_ALPHAS),
                        help="fractions of T_bar kept: T_cut = max(floor(alpha*T_bar), 1)")
    parser.add_argument("--limit", type=int, default=0,
                        help="consider only the first N questions of the dataset (0: all)")
    parser.add_argument("--config", help="pair config file (default: core/pairs.toml)")
    _cache_argument(parser)
    where = parser.add_argument_group("where model work runs (results do not depend on it)")
    where.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: this process; ray: Ray actors, one model replica each (one GPU "
                            "each where the cluster has GPUs); needs requirements-ray.txt")
    where.add_argument("--ray-address",
                       help="auto (the cluster this machine belongs to) or HOST:PORT of the head "
                            "node; default: RAY_ADDRESS, else start Ray on this machine")
    where.add_argument("--ray-actors", type=int, default=0,
                       help="Ray actors (model replicas); 0: one per GPU, or per CPU without GPUs")
    controls = parser.add_argument_group("controls (docs/method.md section 8)")
    controls.add_argument("--controls", type=_control_names, default=(),
                          help=f"comma-separated, of {', '.join(CONTROLS)}: cross scores each model "
                               f"on the other's answers; perturb and seed run a null model (a "
                               f"matched random update of the base; the pair's seed_null) against "
                               f"the base as a linked run; faithfulness ablates real edges of each "
                               f"model at each alpha and compares the effect with W (--faith-*)")
    controls.add_argument("--perturb-seed", type=int, default=0,
                          help="seed of the perturbation null's random direction")
    FaithfulnessSettings.add_arguments(controls)
    for group in (SelectionSettings, ScoreSettings, GenerationSettings):
        group.add_arguments(parser.add_argument_group(group.__name__))


def _control_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in CONTROLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown control(s) {unknown}; choose from "
                                         f"{', '.join(CONTROLS)}")
    return names


def _request(args: argparse.Namespace):
    from core.config import RunRequest

    if args.request is not None:
        if (args.pair or args.dataset or args.cache or args.config or args.executor != "local"
                or args.ray_address or args.ray_actors):
            raise ValueError("--request FILE names the pair, dataset, cache, config and executor "
                             "itself: give it without --pair, --dataset, --cache, --config, "
                             "--executor, --ray-address or --ray-actors")
        return RunRequest.from_file(args.request)
    if not (args.pair and args.dataset):
        raise ValueError("give --pair and --dataset (or --request FILE)")
    return RunRequest(pair=args.pair, dataset=args.dataset, alphas=tuple(args.alphas),
                      selection=SelectionSettings.from_namespace(args),
                      score=ScoreSettings.from_namespace(args),
                      generation=GenerationSettings.from_namespace(args), limit=args.limit,
                      cache=args.cache, config=args.config, executor=args.executor,
                      ray_address=args.ray_address, ray_actors=args.ray_actors,
                      controls=args.controls, perturb_seed=args.perturb_seed,
                      faithfulness=FaithfulnessSettings.from_namespace(args))


class _Bars:
    """One tqdm bar per stage, with rate and ETA; also feeds a job status file when given."""

    def __init__(self, reporter=None):
        self.stage, self.bar, self.reporter = None, None, reporter

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage, self.bar = stage, tqdm(total=total, desc=stage, unit="item", leave=True)
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()
        if self.reporter is not None:
            self.reporter.progress(stage, done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_command(args: argparse.Namespace) -> int:
    from core import jobs, pipeline

    reporter = None
    if args.job_id:
        # jobs.start writes the request beside the job's status file.
        folder = args.request.parent if args.request else jobs.jobs_dir(args.cache)
        reporter = jobs.JobReporter(folder / f"{args.job_id}.json")
    bars = _Bars(reporter)
    try:
        if reporter:
            reporter.running()
        request = _request(args)
        from tqdm import tqdm

        summary = pipeline.run(request, progress=bars, log=tqdm.write)
    except BaseException as error:
        bars.close()
        if reporter:
            reporter.finish("failed", f"{type(error).__name__}: {error}")
        raise
    bars.close()
    work = ", ".join(f"{stage} {n}" for stage, n in summary.done.items())
    print(f"run {summary.run_key}: {summary.selection['n_selected']} questions, T_cut "
          f"{ {a: t for a, t in summary.t_cuts.items()} }; done now: {work}; "
          f"{summary.seconds:.1f} s")
    for name, run_key in summary.control_runs.items():
        print(f"control {name}: run {run_key}")
    if reporter:
        reporter.finish("done", f"run {summary.run_key} complete")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from core import pipeline

    estimate = pipeline.plan(_request(args))
    if args.json:
        print(json.dumps(estimate))
        return 0
    work = ", ".join(f"{stage} {n}" for stage, n in estimate["missing"].items())
    print(f"run {estimate['run_key']} ({', '.join(estimate['models'])}; {estimate['questions']} "
          f"questions): missing {work}; about {estimate['seconds']:.0f} s")
    for name, control in estimate["controls"].items():
        work = ", ".join(f"{stage} {n}" for stage, n in control["missing"].items())
        print(f"control {name}: run {control['run_key']}: missing {work}")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    from core.migrations import migrate
    from core.store import SCHEMA_VERSION, Store

    store = Store(args.cache)
    backup = migrate(store, log=lambda text: print(text, file=sys.stderr))
    if backup is None:
        print(f"{store.path} is at schema version {SCHEMA_VERSION} already (or absent): nothing to do")
    else:
        print(f"migrated {store.path} to schema version {SCHEMA_VERSION}; the old file is kept as "
              f"{backup}")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    from core.query import ResultCache

    cache = ResultCache.open(args.cache)
    runs = cache.runs()
    if runs.empty:
        print(f"no runs in {cache.path}")
        return 0
    for row in runs.itertuples():
        created = row.created_at.strftime("%Y-%m-%d %H:%M") if hasattr(row.created_at, "strftime") \
            else str(row.created_at)
        print(f"{row.run_key}  {row.pair:<14} {row.dataset:<12} {row.base_label} -> {row.post_label} "
              f"({row.algorithm})  n={row.n_selected}  alphas={row.alphas}  T_bar={row.t_bar:.1f}  "
              f"{created}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from core.exchange import export_run
    from core.store import Store

    began = time.perf_counter()
    counts = export_run(Store(args.cache), args.run, args.out)
    print(f"exported run {args.run} to {args.out} ({sum(counts.values())} rows, "
          f"{time.perf_counter() - began:.1f} s)")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from core.exchange import import_run
    from core.store import Store

    store = Store(args.cache)
    counts = import_run(store, args.folder)
    print(f"imported {args.folder} into {store.path}: {counts.get('runs', 0)} run(s), "
          f"{counts.get('scores', 0)} score rows")
    return 0
