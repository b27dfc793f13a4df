"""`python -m core faithfulness`: do EAP scores predict real edge ablation (docs/method.md section 8)?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.commands.score import read_samples
from core.settings import ScoreSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "faithfulness", help="ablate real edges of samples and compare the effect with EAP scores",
        description="Scores the samples (the JSONL that `python -m core score` reads) with EAP, then per "
                    "sample removes --edges real edges one at a time (half the largest by |W|, half "
                    "drawn at random, seeded), one forward pass each: Delta = L(H_d - O_s) - L(H_d). "
                    "Writes each edge's src, dst, sample id, W and Delta, the Spearman, Pearson and sign "
                    "agreement of W with Delta, and the circuit recovery curve f(k) with its area.")
    parser.add_argument("--model", required=True, help="local folder or hub id (safetensors only)")
    parser.add_argument("--samples", required=True, type=Path, help="JSONL file of samples")
    parser.add_argument("--edges", required=True, type=int,
                        help="real edges ablated per sample (all of them when it exceeds their number)")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half of the edges")
    parser.add_argument("--copies", type=int, default=8,
                        help="interventions per forward pass, as copies of one sample (memory grows "
                             "with it; results do not depend on it)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code from the hub (off by default)")
    ScoreSettings.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.faithfulness import faithfulness_report
    from core.models import load_causal_lm

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the path of the JSON file to write")
    if args.edges < 1 or args.copies < 1:
        raise ValueError(f"--edges ({args.edges}) and --copies ({args.copies}) must be at least 1")
    settings = ScoreSettings.from_namespace(args)
    samples = read_samples(args.samples)
    model = load_causal_lm(args.model, settings.dtype, settings.device, args.trust_remote_code)
    report = faithfulness_report(model, samples, settings, args.edges, args.seed, args.copies)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "samples": str(args.samples), **report},
                                   indent=1, allow_nan=False))
    agreement = report["agreement"]
    print(f"wrote {agreement['n']} ablated edges of {len(samples)} samples to {args.out}: spearman "
          f"{_shown(agreement['spearman'])}, pearson {_shown(agreement['pearson'])}, sign agreement "
          f"{_shown(agreement['sign_agreement'])}, recovery area {_shown(report['recovery']['area'])}")
    return 0


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
