"""Server-side render time of every dashboard page on the paper-scale synthetic cache.

The cache: core.synthetic.build_synthetic_cache (4 pairs x 3 datasets x 4 alphas x 2 models x 100
questions, 28-32 layers), built in a temporary folder unless --cache names an existing one. Each page
runs under Streamlit's AppTest in this process, after one warm-up pass over a small fixture cache so
that module imports are not counted. Per page it prints:
- first_ms: the first open on this cache (the page's queries and computations, cached after);
- again_ms: the median of --repeats further opens (what a user sees on coming back, or when another
  session opens the same view).
Last line: `max_page_ms=<x>`, the largest first_ms.

    .venv/bin/python benchmarks/bench_pages.py [--cache FILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.synthetic import build_fixture_cache, build_synthetic_cache

REPO = Path(__file__).resolve().parent.parent

APP = str(REPO / "app.py")
PAGES = ("app.py", "pages/1_Edge_heatmap.py", "pages/2_Distributions.py", "pages/3_Circuit_graph.py",
         "pages/4_Samples.py", "pages/5_Compute.py")


def open_page(page: str) -> float:
    """Seconds of the script run that opens `page` in a new session. The session first opens another
    page that reads no results, because AppTest's first run in a session also scans the installed
    packages for components (about 0.5 s here), which a server does once at startup."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page("pages/4_Samples.py" if page == "pages/5_Compute.py" else "pages/5_Compute.py")
    at.run()
    at.switch_page(page)
    began = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - began
    if at.exception:
        raise RuntimeError(f"{page} raised: {at.exception[0].value}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="paper-scale cache to use (built there if missing)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("CIRCUITDIFF_READ_ONLY", None)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["CIRCUITDIFF_CACHE"] = str(Path(folder) / "warmup.duckdb")
        build_fixture_cache(os.environ["CIRCUITDIFF_CACHE"])
        for page in PAGES:
            open_page(page)

        cache = args.cache or Path(folder) / "synthetic.duckdb"
        if not cache.exists():
            began = time.perf_counter()
            build_synthetic_cache(cache)
            print(f"built the paper-scale synthetic cache {cache} in {time.perf_counter() - began:.0f} s")
        os.environ["CIRCUITDIFF_CACHE"] = str(cache)
        firsts = []
        for page in PAGES:
            first = open_page(page)
            again = statistics.median(open_page(page) for _ in range(args.repeats))
            firsts.append(first)
            print(f"{page:28s} first_ms={first * 1000:8.1f}  again_ms={again * 1000:8.1f}")
    print(f"max_page_ms={max(firsts) * 1000:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
