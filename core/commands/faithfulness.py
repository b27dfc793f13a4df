"""`python -m core faithfulness`: do edge scores predict real edge ablation (docs/method.md section 8)?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.commands.score import read_samples
from core.errors import InputError, check_output_file
from core.settings import ScoreSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "faithfulness", help="ablate real edges of samples and compare the effect with edge scores",
        description="Scores samples with EAP (or EAP-IG: --method eap-ig, about --ig-steps times the "
                    "cost), then per sample removes --edges real edges one at a time (half the largest "
                    "by the mean |W| of the other half of the samples, half drawn at random, seeded), "
                    "one forward pass each: Delta = L(H_d - O_s) - L(H_d). Writes each edge's src, "
                    "dst, sample id, W and Delta; per stratum (top, random) the per-sample Spearman, "
                    "Pearson and sign agreement of W with Delta averaged over samples and the "
                    "calibration slope of Delta on W, with BCa intervals over samples; and the circuit "
                    "recovery curve f(k) (each sample's circuits ranked on the other half), its area "
                    "and the k where it reaches 0.8. At least 2 samples. Two modes: --model with "
                    "--samples (a JSONL that `python -m core "
                    "score` reads), or --run with --alpha: the run's base and post models on their own "
                    "answers to the run's first --questions selected questions, cut at the run's T_cut "
                    "for alpha (models loaded from the specs the run recorded; the cache is only read), "
                    "plus both models' recovery curves and areas with a bootstrap over questions, "
                    "paired across the models, and each post's area minus the base's.")
    parser.add_argument("--model", help="local folder or hub id (safetensors only); with --samples")
    parser.add_argument("--samples", type=Path, help="JSONL file of samples; with --model")
    parser.add_argument("--run", help="run key (`python -m core ls` lists them); with --alpha")
    parser.add_argument("--alpha", type=float, help="with --run: the alpha whose T_cut cuts the answers")
    parser.add_argument("--cache", help="with --run: cache file (default: $CIRCUITDIFF_CACHE, else "
                                        "cache/circuitdiff.duckdb)")
    parser.add_argument("--questions", type=int, default=10,
                        help="with --run: the run's first N selected questions (default: 10)")
    parser.add_argument("--stored", action="store_true",
                        help="with --run (no --alpha): print the run's stored faithfulness control "
                             "(`run --controls faithfulness`) at each of its alphas as Markdown; "
                             "computes nothing")
    parser.add_argument("--edges", type=int,
                        help="real edges ablated per sample (all of them when it exceeds their "
                             "number); required unless --stored")
    parser.add_argument("--out", type=Path, help="output JSON file; required unless --stored")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half of the edges")
    parser.add_argument("--copies", type=int, default=8,
                        help="interventions per forward pass, as copies of one sample (memory grows "
                             "with it; results do not depend on it)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); 1 can be faster on a busy machine")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from the hub (off by default; --model only)")
    ScoreSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.stored:
        if args.run is None or args.alpha is not None or args.model or args.samples:
            raise InputError("--stored takes --run (and --cache) only: it prints the control the "
                             "run stored at every alpha")
        print(stored_markdown(args.run, args.cache))
        return 0
    if args.edges is None or args.out is None:
        raise InputError("give --edges N and --out FILE (or --stored with --run to print a stored "
                         "control)")
    by_samples = args.model is not None or args.samples is not None
    by_run = args.run is not None or args.alpha is not None
    if by_samples == by_run or (by_samples and None in (args.model, args.samples)) or (
            by_run and None in (args.run, args.alpha)):
        raise InputError("give either --model with --samples, or --run with --alpha")
    if args.edges < 1 or args.copies < 1:
        raise InputError(f"--edges ({args.edges}) and --copies ({args.copies}) must be at least 1")
    check_output_file(args.out, "--out")
    settings = ScoreSettings.from_namespace(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if by_run:
        report = _run_mode(args, settings)
    else:
        report = _samples_mode(args, settings)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=False))
    return 0


def _samples_mode(args: argparse.Namespace, settings: ScoreSettings) -> dict:
    from core.faithfulness import faithfulness_report
    from core.models import load_causal_lm

    samples = read_samples(args.samples)
    model = load_causal_lm(args.model, settings.dtype, settings.device, args.trust_remote_code)
    report = faithfulness_report(model, samples, settings, args.edges, args.seed, args.copies)
    print(f"wrote {len(report['edges'])} ablated edges of {len(samples)} samples to {args.out}: "
          f"{_summary(report)}")
    return {"model": args.model, "samples": str(args.samples), **report}


def _run_mode(args: argparse.Namespace, settings: ScoreSettings) -> dict:
    from core.faithfulness import read_run_samples, run_faithfulness
    from core.store import Store

    store = Store(args.cache)
    run = read_run_samples(store, args.run, args.alpha, args.questions)
    report = run_faithfulness(run, settings, args.edges, args.seed, args.copies)
    comparison = report["recovery_comparison"]
    level = f"{comparison['ci_level']:.0%}"
    print(f"wrote run {run.name} ({run.run_key}) at alpha {run.alpha} (T_cut {run.t_cut}), "
          f"{len(run.question_ids)} questions, to {args.out}")
    for label, model_report in report["models"].items():
        print(f"  {label}: {_summary(model_report)} {_interval(comparison['models'][label]['area_interval'])}")
    for label, difference in comparison["area_difference"].items():
        print(f"  area {label} - {comparison['base']}: {difference['difference']:+.3f} "
              f"{_interval(difference['interval'])} ({level}, {comparison['bootstrap']} replicates "
              f"over questions)")
        ratio = comparison["k_ratio"][label]
        print(f"  80% recovery k of {label} / {comparison['base']}: {ratio['ratio']:.3g} "
              f"{_interval(ratio['interval'])}")
    return {"cache": str(store.path), **report}


def _summary(report: dict) -> str:
    agreement = "; ".join(
        f"{stratum} edges: " + ", ".join(f"{name.replace('_', ' ')} {_shown(value['value'])}"
                                         for name, value in statistics.items())
        for stratum, statistics in report["agreement"].items())
    return (f"{agreement}; recovery area {_shown(report['recovery']['area'])}, 80% recovery at "
            f"k = {_shown(report['recovery']['k'])}")


def _interval(bounds: list[float]) -> str:
    return "" if any(b is None or b != b for b in bounds) else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _shown(value: float | None) -> str:
    return "undefined" if value is None or value != value else f"{value:.3f}"


def stored_markdown(run_key: str, cache: str | None) -> str:
    """The run's stored faithfulness control as Markdown, read through the read model: per alpha
    and model, each stratum's agreement of W with Delta (per-question means with BCa intervals,
    cross-fitted) and the kept fraction k at which circuit recovery reaches 0.8."""
    from core.query import ResultCache

    cache_view = ResultCache.open(cache)
    alphas = cache_view.faithfulness_alphas(run_key)
    if not alphas:
        raise InputError(f"the run {run_key} has no stored faithfulness control; compute it with "
                         f"`python -m core run ... --controls faithfulness`")
    lines = ["| alpha | model | edges | Spearman | Pearson | same sign | slope of Delta on W |",
             "|---|---|---|---|---|---|---|"]
    recovery = ["| alpha | model | k at 80% recovery |", "|---|---|---|"]
    for alpha in alphas:
        agreement = cache_view.faithfulness_agreement(run_key, alpha)
        for (label, stratum), rows in agreement.groupby(["label", "stratum"], sort=False):
            cell = {row.statistic: f"{_shown(row.value)} {_interval([row.low, row.high])}"
                    for row in rows.itertuples()}
            lines.append(f"| {alpha:g} | {label} | {stratum} ({int(rows['n_edges'].iloc[0])} over "
                         f"{int(rows['n_questions'].iloc[0])} questions) | {cell.get('spearman', '')} | "
                         f"{cell.get('pearson', '')} | {cell.get('sign_agreement', '')} | "
                         f"{cell.get('calibration_slope', '')} |")
        for row in cache_view.recovery_k(run_key, alpha).itertuples():
            recovery.append(f"| {alpha:g} | {row.label} | {_shown(row.k)} {_interval([row.low, row.high])} |")
    return "\n".join(lines + [""] + recovery)
