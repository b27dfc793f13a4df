"""Calibration of the metric statistics on paired data whose truth is known (docs/method.md section 7).

Simulated runs shaped like EAP scores: every sample's matrix is a per-edge scale shared by all
samples, times a question effect shared by base and post (heavy-tailed: lognormal, sigma 1), times a
lognormal per-sample scale of each model (exp(0.5 z)), times Student-t entries of which 60% are the
question's own pattern (shared by both models) and the rest the sample's; signs mostly positive.
Two cases per sample size n:
- null: post is drawn exactly as base is (given the question effects): every metric's true change
  is 0;
- gain: post = GAIN x such a draw, a planted change of known size: intensity's true change is
  100 (GAIN - 1)% and every scale-free metric's (complexity, edge entropy, kurtosis, diversity,
  output entropy) is 0.
Per metric it prints the false-positive rate of the paired permutation test (p <= 1 - ci_level) and
of the interval (excluding the true 0), in the null case and, for the scale-free metrics, in the
gain case, and the coverage of the true change by the reported interval (bootstrap-t) in both
cases. The last line is `worst_fpr=<x> worst_coverage=<y>` at n = 40 (the largest false-positive
rate and the smallest coverage over every metric, case and kind). A 95% level and 400 data sets
give each rate a binomial standard error of about 0.011.

    python benchmarks/bench_calibration.py [--datasets 400] [--n 20 40 100] [--plasmode]

--plasmode also resamples the demo's own per-question values (cache/circuitdiff.duckdb, or
CIRCUITDIFF_CACHE): for each pooled run and alpha, n questions drawn with replacement and each
question's base and post swapped at random, so there is no change by construction; it prints the
false-positive rates of the test and the interval over those data sets.

BLAS runs on one thread (as in bench_metrics.py: the products here are small).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from core.graph import ResidualGraph  # noqa: E402
from core.metrics import METRICS, compare_models  # noqa: E402
from core.settings import MetricSettings  # noqa: E402

GRAPH = ResidualGraph(4, "qkv")  # 9 x 17 entries, 77 real edges: small, and enough for the shapes
GAIN = 1.3
CASES = {"null": 1.0, "gain": GAIN}
SETTINGS = MetricSettings(bootstrap=1000, permutations=2000)


def simulated_pair(n: int, gain: float, rng: np.random.Generator,
                   graph: ResidualGraph = GRAPH) -> tuple[np.ndarray, np.ndarray]:
    """(base, post) dense [n, n_src, n_dst]; post = gain x a draw from base's law given the
    questions."""
    edge_scale = np.random.default_rng(7).lognormal(0.0, 1.0, size=graph.n_edges)  # fixed
    question = rng.lognormal(0.0, 1.0, size=(n, 1))
    pattern = np.abs(rng.standard_t(4, size=(n, graph.n_edges)))

    def draw() -> np.ndarray:
        scale = np.exp(0.5 * rng.standard_normal((n, 1)))
        own = np.abs(rng.standard_t(4, size=(n, graph.n_edges)))
        signs = rng.choice([-1.0, 1.0], size=(n, graph.n_edges), p=[0.3, 0.7])
        return graph.dense(edge_scale * question * scale * (0.6 * pattern + 0.4 * own) * signs)

    return draw(), gain * draw()


def true_change(metric: str, gain: float) -> float:
    """The planted change on the reported scale: % for intensity, 0 for every scale-free metric."""
    return 100.0 * (gain - 1.0) if metric == "intensity" else 0.0


def rates(n: int, datasets: int, settings: MetricSettings, seed: int = 0) -> dict[str, dict]:
    """Per metric: test_fpr and interval_fpr (null case, and gain case for the scale-free
    metrics, keyed `<kind>_<case>`), coverage_null and coverage_gain."""
    level = 1.0 - settings.ci_level
    found: dict[str, dict[str, list]] = {name: {} for name in METRICS}
    for case, gain in CASES.items():
        for d in range(datasets):
            rng = np.random.default_rng([seed, n, d, int(gain * 1000)])
            comparison = compare_models(*simulated_pair(n, gain, rng), GRAPH, settings)
            for name, m in comparison.metrics.items():
                truth = true_change(name, gain)
                low, high = m.interval
                record = found[name]
                record.setdefault(f"coverage_{case}", []).append(low <= truth <= high)
                if truth == 0.0:
                    record.setdefault(f"test_fpr_{case}", []).append(m.p <= level)
                    record.setdefault(f"interval_fpr_{case}", []).append(not low <= 0 <= high)
    return {name: {kind: float(np.mean(values)) for kind, values in record.items()}
            for name, record in found.items()}


KINDS = ("test_fpr_null", "interval_fpr_null", "test_fpr_gain", "interval_fpr_gain",
         "coverage_null", "coverage_gain")


def print_table(n: int, table: dict[str, dict]) -> None:
    print(f"n={n}")
    print(f"  {'metric':15s}" + "".join(f"{kind:>19s}" for kind in KINDS))
    for name, row in table.items():
        cells = "".join(f"{row[kind]:19.3f}" if kind in row else f"{'-':>19s}" for kind in KINDS)
        print(f"  {name:15s}{cells}")


def worst(table: dict[str, dict]) -> tuple[float, float]:
    fpr = max(value for row in table.values() for kind, value in row.items() if "fpr" in kind)
    coverage = min(value for row in table.values() for kind, value in row.items()
                   if kind.startswith("coverage"))
    return fpr, coverage


def plasmode(datasets: int, settings: MetricSettings, seed: int = 0) -> int:
    """The null resampled from the demo cache's own questions; prints its table, returns 0, or 1
    where the cache holds no pooled run."""
    from core.query import ResultCache

    cache = ResultCache.open(os.environ.get("CIRCUITDIFF_CACHE"))
    pooling = cache.pooling() if not cache.is_empty() else None
    if pooling is None or not pooling["pooled"].any():
        print("plasmode: the cache holds no pooled run; build the demo first (make demo-run)")
        return 1
    level = 1.0 - settings.ci_level
    rng = np.random.default_rng(seed)
    cells = pooling[pooling["pooled"]]
    found = {name: {"test": [], "interval": []} for name in METRICS}
    for d in range(datasets):
        row = cells.iloc[d % len(cells)]
        view = cache.view(row.run_key, row.alpha, post_label=row.post_label)
        n = len(view.question_ids)
        draw = rng.integers(0, n, size=n)
        swap = rng.integers(0, 2, size=n).astype(bool)[:, None, None]
        base = np.where(swap, view.post[draw], view.base[draw])
        post = np.where(swap, view.base[draw], view.post[draw])
        comparison = compare_models(base, post, view.graph, settings)
        for name, m in comparison.metrics.items():
            low, high = m.interval
            found[name]["test"].append(m.p <= level)
            found[name]["interval"].append(not low <= 0 <= high)
    print(f"plasmode: {datasets} data sets resampled from {len(cells)} pooled cells of the demo "
          f"cache (questions drawn with replacement, base and post swapped per question at random)")
    print(f"  {'metric':15s}{'test_fpr':>12s}{'interval_fpr':>14s}")
    for name, record in found.items():
        print(f"  {name:15s}{np.mean(record['test']):12.3f}{np.mean(record['interval']):14.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=400, help="data sets per case and n")
    parser.add_argument("--n", type=int, nargs="+", default=[20, 40, 100],
                        help="questions per data set; the last line reports n = 40 (or the "
                             "first n given where 40 is not)")
    parser.add_argument("--bootstrap", type=int, default=SETTINGS.bootstrap)
    parser.add_argument("--permutations", type=int, default=SETTINGS.permutations)
    parser.add_argument("--plasmode", action="store_true",
                        help="also resample the demo cache's own questions under the null")
    args = parser.parse_args()
    settings = SETTINGS.replace(bootstrap=args.bootstrap, permutations=args.permutations)
    began = time.perf_counter()
    print(f"{args.datasets} data sets per case and n; GAIN {GAIN}; {settings.bootstrap} bootstrap "
          f"resamples, {settings.permutations} permutations, level {settings.ci_level}")
    tables = {}
    for n in args.n:
        tables[n] = rates(n, args.datasets, settings)
        print_table(n, tables[n])
    if args.plasmode:
        plasmode(args.datasets, settings)
    print(f"seconds={time.perf_counter() - began:.1f}")
    fpr, coverage = worst(tables[40 if 40 in tables else args.n[0]])
    print(f"worst_fpr={fpr:.3f} worst_coverage={coverage:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
