"""Time of all metrics for one run of the paper's size on CPU.

One run: 100 questions x 4,193 edges (32 layers, qkv), base and post-trained model, heavy-tailed
synthetic float32 scores. Times compare_models (every metric of both models on complexity's fixed
range, 1,000 paired bootstrap resamples, the Wilcoxon tests), significant_edges (per-edge paired
t-tests + BH) and edge_change (all three measures), prints the median of each stage over the repeats
and last `seconds=<x>`, the median total.

    python benchmarks/bench_metrics.py [--repeats 5] [--bootstrap 1000]

BLAS runs on one thread unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise: the largest
product here is 100 x 8,385 by its transpose, too small to gain from threads, and on a shared
machine with busy cores a multi-threaded OpenBLAS spins (measured 70x slower on this 2-core box).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from core.graph import ResidualGraph  # noqa: E402
from core.metrics import (EDGE_MEASURES, MetricChange, compare_models, edge_change,  # noqa: E402
                          significant_edges)
from core.settings import MetricSettings  # noqa: E402


def paper_sized_run(graph: ResidualGraph, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Signed scores: a per-edge scale shared by the samples times Student-t noise; post is ~15%
    stronger with lighter tails."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(-7.0, 1.5, size=graph.n_edges)
    base = scale * rng.standard_t(2.5, size=(n, graph.n_edges))
    post = 1.15 * scale * rng.standard_t(4.0, size=(n, graph.n_edges))
    return graph.dense(base.astype(np.float32)), graph.dense(post.astype(np.float32))


def _change(name: str, m: MetricChange) -> str:
    if m.scale == "log_ratio":
        return f"{name} {m.change_pct:+.1f}% [{m.change_pct_ci[0]:+.1f}, {m.change_pct_ci[1]:+.1f}]"
    return f"{name} {m.change:+.3g} [{m.change_ci[0]:+.3g}, {m.change_ci[1]:+.3g}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()

    graph = ResidualGraph(32, "qkv")
    base, post = paper_sized_run(graph, args.samples)
    settings = MetricSettings(bootstrap=args.bootstrap)
    stages = {
        "compare_models": lambda: compare_models(base, post, graph, settings),
        "significant_edges": lambda: significant_edges(base, post, graph, settings),
        "edge_change": lambda: [edge_change(base, post, graph, m) for m in EDGE_MEASURES],
    }
    print(f"{args.samples} samples x {graph.n_edges} edges ({graph.n_src} x {graph.n_dst} dense), "
          f"both models, {args.bootstrap} bootstrap resamples, BLAS threads "
          f"{os.environ['OPENBLAS_NUM_THREADS']}, {args.repeats} repeats")
    totals = []
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.repeats):
        total = 0.0
        for name, stage in stages.items():
            start = time.perf_counter()
            stage()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            total += elapsed
        totals.append(total)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} s (min {min(values):.3f})")
    comparison = compare_models(base, post, graph, settings)
    print("changes (% [CI] on the log_ratio scale, post - base [CI] on the difference scale): "
          + ", ".join(_change(name, m) for name, m in comparison.metrics.items())
          if args.bootstrap else "no bootstrap")
    print(f"seconds={statistics.median(totals):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
