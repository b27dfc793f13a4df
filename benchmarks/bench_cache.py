"""Dashboard query latency on a cache of the paper's grid size.

Fills a synthetic cache (4 pairs x 3 datasets x 4 alphas x 2 models x 100 samples, 28-32 layers,
some 36 M edge scores) through core/store.py, then times each dashboard query on a fresh
ResultCache (so in-process memoisation does not hide the database work) and prints the median
latency of each, the database size, and last `max_query_ms=<x>`.

    python benchmarks/bench_cache.py [--cache PATH] [--repeats 5] [--keep]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from core.query import ResultCache
from core.synthetic import build_synthetic_cache


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache file to fill (default: a temporary file)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench_cache_")
    path = Path(args.cache) if args.cache else Path(folder) / "paper_grid.duckdb"
    if not path.exists():
        start = time.perf_counter()
        build_synthetic_cache(path)
        print(f"filled synthetic paper-grid cache in {time.perf_counter() - start:.1f} s: {path}")
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
    runs = ResultCache.open(path).runs()
    run = runs.iloc[len(runs) // 2]
    alpha = run.alphas[1]
    print(f"runs={len(runs)} run={run.run_key} ({run.pair}, {run.dataset}, {run.n_layers} layers) "
          f"alpha={alpha}")

    # Each query on a fresh ResultCache: no memoised answer is reused.
    queries = {
        "mean_matrices": lambda c: c.mean_matrices(run.run_key, alpha),
        "view_base+post": lambda c: c.view(run.run_key, alpha, post_label=run.post_label),
        "edge_across_alphas": lambda c: c.edge_across_alphas(run.run_key, "a3", "m10"),
        "metric_table": lambda c: c.metric_table(),
        "runs": lambda c: c.runs(),
    }
    results = {}
    for name, query in queries.items():
        results[name] = median_ms(lambda: query(ResultCache.open(path)), args.repeats)
        print(f"{name}_ms={results[name]:.1f}")
    table = ResultCache.open(path).metric_table()
    print(f"metric_table_rows={len(table)}")
    print(f"db_size_mb={size / 1e6:.1f}")
    if not args.cache and not args.keep:
        for f in Path(folder).iterdir():
            f.unlink()
        os.rmdir(folder)
    print(f"max_query_ms={max(results.values()):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
