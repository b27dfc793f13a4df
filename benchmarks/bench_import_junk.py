"""Peak memory of `python -m core import` on an export padded with junk rows (issue 29, item 8).

Exports the fixture cache's pair run into OUT/export, appends N rows to one of its tables
(stage_timings: rows that name the run, so only the manifest's row bounds can tell them from real
ones), fixes that file's checksum and row count in the manifest as a forger would, writes an empty
target cache OUT/cache.duckdb, then imports in a child process and prints its exit status, its last
line, its peak resident memory (VmHWM, which starts afresh at exec, where the child's ru_maxrss
would count this process's memory at fork), and whether the target cache's bytes changed.

    python benchmarks/bench_import_junk.py OUT [--rows 5000000]

The same export can be imported by another version of the code (for a before/after comparison):
    cd OTHER_CHECKOUT && /usr/bin/time -v python -m core import OUT/export --cache OUT/cache.duckdb
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.exchange import MANIFEST, export_run
from core.store import REPO_ROOT, Store
from core.synthetic import build_fixture_cache


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pad_stage_timings(folder: Path, rows: int) -> None:
    """Append `rows` stage timings of the exported run, each at its own time."""
    file = folder / "stage_timings.parquet"
    table = pq.read_table(file)
    run_key = json.loads((folder / MANIFEST).read_text())["run_key"]
    start = dt.datetime(2020, 1, 1)
    junk = pa.table({
        "run_key": pa.array([run_key] * rows), "stage": pa.array(["score"] * rows),
        "items": pa.array([1] * rows, pa.int32()), "seconds": pa.array([1.0] * rows),
        "code_version": pa.array(["junk"] * rows), "git_commit": pa.array(["junk"] * rows),
        "created_at": pa.array([start + dt.timedelta(microseconds=i) for i in range(rows)],
                               pa.timestamp("us"))}).cast(table.schema)
    padded = pa.concat_tables([table, junk])
    pq.write_table(padded, file)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = next(e for e in manifest["files"] if e["path"] == file.name)
    entry["rows"], entry["sha256"] = padded.num_rows, sha256(file)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new folder for the export and the target cache")
    parser.add_argument("--rows", type=int, default=5_000_000, help="junk rows to append")
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    source = args.out / "source.duckdb"
    pair, _ = build_fixture_cache(source)
    export_run(Store(source), pair, args.out / "export")
    pad_stage_timings(args.out / "export", args.rows)
    target = args.out / "cache.duckdb"
    with Store(target).write():
        pass
    before = sha256(target)
    code = ("import re, sys\nfrom pathlib import Path\nfrom core.__main__ import main\n"
            f"status = main(['import', {str(args.out / 'export')!r}, '--cache', {str(target)!r}])\n"
            "peak = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1]\n"
            "print(f'{status} {int(peak) / 1024:.0f}', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    status, peak_mb = lines[-1].split()
    said = (lines[-2:-1] or done.stdout.strip().splitlines()[-1:] or [""])[0]
    print(f"junk rows: {args.rows}; exit status {status}: {said}")
    print(f"target cache bytes {'unchanged' if sha256(target) == before else 'CHANGED'}")
    print(f"import_peak_rss_mb={peak_mb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
