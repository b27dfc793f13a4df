"""What a fresh process pays before the dashboard's first Overview: imports, cache open, first query.

Each repeat is a new Python process that imports core.query, opens the cache and lists its runs (the
first read also runs the block checksum pass, once per process and version), then answers the
Overview. It prints the median of each part, and how many (run, post model, alpha) cells have no
comparison stored under the default MetricSettings key: those the Overview recomputes (the
permutation test) on every fresh process until the pipeline stores them.

    python benchmarks/bench_cold_start.py [--cache PATH] [--repeats 3]

Copy a cache another job may be writing first. Last line: `cold_start_ms=<median total>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("import_ms", "checksum_ms", "open_runs_ms", "overview_ms", "total_ms")


def one_process(path: str) -> dict:
    """The parts of one cold start, in this (fresh) process."""
    began = time.perf_counter()
    from core.query import ResultCache
    imported = time.perf_counter()
    cache = ResultCache.open(path)
    cache.runs()
    opened = time.perf_counter()
    cache.overview()
    done = time.perf_counter()
    return {"import_ms": (imported - began) * 1000, "open_runs_ms": (opened - imported) * 1000,
            "overview_ms": (done - opened) * 1000, "total_ms": (done - began) * 1000}


def checksum_ms(path: Path) -> float:
    """The block checksum pass alone (core.store.bad_blocks over the whole file)."""
    import duckdb

    from core.store import HEADERS_BYTES, bad_blocks, fetch_one

    con = duckdb.connect(str(path), read_only=True)
    try:
        block_bytes = fetch_one(con, "SELECT block_size FROM pragma_database_size() "
                                     "WHERE database_name = current_database()")[0]
    finally:
        con.close()
    start = time.perf_counter()
    bad_blocks(path, block_bytes, (path.stat().st_size - HEADERS_BYTES) // block_bytes)
    return (time.perf_counter() - start) * 1000


def recomputed_cells(path: Path) -> tuple[int, int]:
    """(cells the Overview's metric table compares, those without a stored default comparison)."""
    import duckdb

    from core.query import ResultCache
    from core.settings import MetricSettings

    runs = ResultCache.open(path).runs()
    con = duckdb.connect(str(path), read_only=True)
    try:
        stored = set(con.execute("SELECT run_key, post_label, alpha FROM metrics WHERE "
                                 "settings_key = ?", [MetricSettings().key()]).fetchall())
    finally:
        con.close()
    cells = [(run.run_key, run.post_label, float(alpha)) for run in runs.itertuples()
             for alpha in run.alphas]
    missing = [cell for cell in cells if not any(
        cell[:2] == have[:2] and abs(cell[2] - have[2]) < 1e-12 for have in stored)]
    return len(cells), len(missing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache" / "circuitdiff.duckdb"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.cache)))
        return 0
    path = Path(args.cache)
    if not path.is_file():
        raise SystemExit(f"no cache at {path}; give one with --cache")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--child", "--cache", str(path)], env=env,
                             cwd=REPO, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs[0]["checksum_ms"] = checksum_ms(path)  # measured once, here, apart from the opens
    cells, missing = recomputed_cells(path)
    print(f"cache={path} size_mb={path.stat().st_size / 1e6:.1f} cells={cells} "
          f"recomputed_by_overview={missing}")
    medians = {part: statistics.median(r[part] for r in runs if part in r) for part in PARTS}
    for part in PARTS[:-1]:
        print(f"{part}={medians[part]:.0f}" + (" (once, apart)" if part == "checksum_ms" else ""))
    print(f"cold_start_ms={medians['total_ms']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
