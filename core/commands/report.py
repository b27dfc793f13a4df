"""`python -m core report`: one self-contained HTML report of a run (core/report.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import check_output_file
from core.settings import MetricSettings
from core.vocab import GRANULARITIES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's results as one HTML file that opens offline",
        description="Table 1 with intervals at every alpha, the edge-change heatmap, the |W| "
                    "distributions, the circuit graphs, every setting and provenance; interactive "
                    "plotly figures with plotly.js embedded (no server, no network).")
    parser.add_argument("--run", required=True, help="run key (see `python -m core ls`)")
    parser.add_argument("--out", required=True, type=Path, help="HTML file to write")
    parser.add_argument("--post", help="post-trained model's label (default: the run's first)")
    parser.add_argument("--granularity", choices=GRANULARITIES,
                        help="graph granularity of the views (default: the run's own)")
    parser.add_argument("--alpha", dest="alphas", type=float, nargs="+",
                        help="alphas to show (default: every alpha of the run)")
    parser.add_argument("--cache", help="cache file (default: $CIRCUITDIFF_CACHE, else "
                                        "cache/circuitdiff.duckdb)")
    MetricSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.query import ResultCache
    from core.report import write_report

    check_output_file(args.out, "--out")  # before any work
    settings = MetricSettings.from_namespace(args)
    cache = ResultCache.open(args.cache)
    document = cache.report_html(args.run, post_label=args.post, granularity=args.granularity,
                                 settings=settings, alphas=args.alphas)
    path = write_report(args.out, document)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
