"""Dashboard query latency on a synthetic cache of the paper's grid, alone or against another commit.

Fills a synthetic cache (4 pairs x 3 datasets x 4 alphas x 2 models x 100 samples, 28-32 layers,
some 40 M edge scores; --small: 2 pairs x 1 dataset, 6.3 M) through core/store.py, then times
each dashboard query on a fresh ResultCache (so in-process memoisation does not hide the database
work). Each side runs in its own worker process, which verifies the file once (untimed) and then
answers the queries it is sent (a fresh process's first open is not timed here).

    python benchmarks/bench_cache.py [--small] [--cache PATH] [--repeats 5] [--keep]
    python benchmarks/bench_cache.py --against REV [--small] [--repeats 5]

Alone: the median of each query, last line `max_query_ms=<x>`. With --against REV: the cache is
built once by this tree; a git worktree of REV (in a temporary folder) answers the same queries
on the same file through the same Python, interleaved with this tree (this, REV, this, REV, ...
per query and repeat) so that the machine's load hits both alike; it prints both medians and
their ratio per query, and last `max_query_ratio=<this tree's slowest / REV's slowest>` over the
queries both trees have. REV must read this tree's schema: a different SCHEMA_VERSION is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_GRID = {"n_pairs": 2, "n_datasets": 1}


def queries(spec: dict) -> dict:
    """The dashboard's queries, each a function of a fresh ResultCache; a query whose method this
    tree lacks is left out (an older commit)."""
    run_key, alpha, post = spec["run_key"], spec["alpha"], spec["post_label"]
    every = {
        "mean_matrices": ("mean_matrices", lambda c: c.mean_matrices(run_key, alpha)),
        "view_base+post": ("view", lambda c: c.view(run_key, alpha, post_label=post)),
        "edge_across_alphas": ("edge_across_alphas",
                               lambda c: c.edge_across_alphas(run_key, "a3", "m10")),
        "metric_table": ("metric_table", lambda c: c.metric_table()),
        "overview": ("overview", lambda c: c.overview()),
        "runs": ("runs", lambda c: c.runs()),
    }
    from core.query import ResultCache
    return {name: query for name, (method, query) in every.items() if hasattr(ResultCache, method)}


def worker(path: str, spec: dict) -> int:
    """Answer query names read from stdin with their milliseconds on a fresh ResultCache."""
    from core import store
    from core.query import ResultCache

    ResultCache.open(path).runs()  # the per-process check of the file, untimed
    available = queries(spec)
    print(json.dumps({"schema": store.SCHEMA_VERSION, "queries": list(available)}), flush=True)
    for line in sys.stdin:
        query = available[line.strip()]
        start = time.perf_counter()
        query(ResultCache.open(path))
        print(f"{(time.perf_counter() - start) * 1000:.3f}", flush=True)
    return 0


class Side:
    """A worker process of the tree at `root`, importing its `core`."""

    def __init__(self, root: Path, path: Path, spec: dict):
        env = dict(os.environ, PYTHONPATH=str(root))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(path), "--spec", json.dumps(spec)],
            cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the worker of {root} exited before answering (see its error above)")
        hello = json.loads(line)
        self.schema, self.queries = hello["schema"], hello["queries"]

    def time(self, name: str) -> float:
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def build(path: Path, small: bool) -> None:
    from core.synthetic import build_synthetic_cache

    start = time.perf_counter()
    build_synthetic_cache(path, **(SMALL_GRID if small else {}))
    print(f"filled synthetic {'small' if small else 'paper-grid'} cache in "
          f"{time.perf_counter() - start:.1f} s: {path}")


def pick_run(path: Path) -> dict:
    from core.query import ResultCache

    runs = ResultCache.open(path).runs()
    run = runs.iloc[len(runs) // 2]
    spec = {"run_key": run.run_key, "alpha": float(run.alphas[1]), "post_label": run.post_label}
    print(f"runs={len(runs)} run={run.run_key} ({run.pair}, {run.dataset}, {run.n_layers} layers) "
          f"alpha={spec['alpha']}")
    return spec


def add_worktree(rev: str, folder: Path) -> Path:
    tree = folder / f"bench-{rev}"
    out = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"git worktree add {rev} failed: {out.stderr.strip()}")
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache file to use or fill (default: a temporary file)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache")
    parser.add_argument("--small", action="store_true",
                        help="2 pairs x 1 dataset instead of the paper's 4 x 3 (a loaded machine)")
    parser.add_argument("--against", metavar="REV", help="a commit to compare with, interleaved")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.spec))

    folder = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    path = Path(args.cache) if args.cache else folder / "paper_grid.duckdb"
    tree = None
    sides: list[Side] = []
    try:
        if not path.exists():
            build(path, args.small)
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
        print(f"db_size_mb={size / 1e6:.1f}")
        spec = pick_run(path)
        sides.append(Side(REPO, path, spec))
        if args.against:
            tree = add_worktree(args.against, folder)
            sides.append(Side(tree, path, spec))
            if sides[1].schema != sides[0].schema:
                raise SystemExit(f"{args.against} reads cache schema {sides[1].schema}, this tree "
                                 f"writes {sides[0].schema}: the same cache cannot serve both")
        names = [name for name in sides[0].queries if all(name in s.queries for s in sides)]
        times: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.repeats):
            for name in names:
                for index, side in enumerate(sides):
                    times.setdefault((index, name), []).append(side.time(name))
        medians = {key: statistics.median(values) for key, values in times.items()}
        for name in names:
            line = f"{name}_ms={medians[0, name]:.1f}"
            if args.against:
                line += (f" {args.against}_ms={medians[1, name]:.1f} "
                         f"ratio={medians[0, name] / medians[1, name]:.2f}")
            print(line)
        only_here = [name for name in sides[0].queries if name not in names]
        if only_here:
            print(f"not in {args.against}: {', '.join(only_here)}")
        slowest = [max(medians[index, name] for name in names) for index in range(len(sides))]
        print(f"max_query_ms={slowest[0]:.1f}")
        if args.against:
            print(f"{args.against}_max_query_ms={slowest[1]:.1f}")
            print(f"max_query_ratio={slowest[0] / slowest[1]:.3f}")
    finally:
        for side in sides:
            side.close()
        if tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
        if not args.cache and not args.keep:
            shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
