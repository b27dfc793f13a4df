"""`python -m core run | ls | export | import`: the pipeline and the cache from the command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.settings import GenerationSettings
from core.settings import PAPER_ALPHAS, ScoreSettings, SelectionSettings


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run", help="generate, grade, select, truncate and score a pair or series on a dataset",
        description="Fills the cache with everything the run needs; a rerun does only what is "
                    "missing, and a killed run resumes from its last commit.")
    run.add_argument("--pair", required=True, help="pair or series name from core/pairs.toml")
    run.add_argument("--dataset", required=True, help="dataset name from core/pairs.toml, or a .jsonl")
    run.add_argument("--alpha", dest="alphas", type=float, nargs="+", default=list(PAPER_ALPHAS),
                     help="fractions of T_bar kept: T_cut = max(floor(alpha*T_bar), 1)")
    run.add_argument("--limit", type=int, default=0,
                     help="consider only the first N questions of the dataset (0: all)")
    run.add_argument("--config", help="pair config file (default: core/pairs.toml)")
    run.add_argument("--job-id", help=argparse.SUPPRESS)
    _cache_argument(run)
    for group in (SelectionSettings, ScoreSettings, GenerationSettings):
        group.add_arguments(run.add_argument_group(group.__name__))
    run.set_defaults(handler=run_command)

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


def _cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", help="cache file (default: $CIRCUITDIFF_CACHE, else "
                                        "cache/circuitdiff.duckdb)")


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

    reporter = jobs.JobReporter(args.job_id, args.cache) if args.job_id else None
    bars = _Bars(reporter)
    try:
        if reporter:
            reporter.running()
        request = pipeline.RunRequest(
            pair=args.pair, dataset=args.dataset, alphas=tuple(args.alphas),
            selection=SelectionSettings.from_namespace(args), score=ScoreSettings.from_namespace(args),
            generation=GenerationSettings.from_namespace(args), limit=args.limit, cache=args.cache,
            config=args.config)
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
    if reporter:
        reporter.finish("done", f"run {summary.run_key} complete")
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
    from core.store import Store, export_run

    began = time.perf_counter()
    counts = export_run(Store(args.cache), args.run, args.out)
    print(f"exported run {args.run} to {args.out} ({sum(counts.values())} rows, "
          f"{time.perf_counter() - began:.1f} s)")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from core.store import Store, import_run

    store = Store(args.cache)
    counts = import_run(store, args.folder)
    print(f"imported {args.folder} into {store.path}: {counts.get('runs', 0)} run(s), "
          f"{counts.get('scores', 0)} score rows")
    return 0
