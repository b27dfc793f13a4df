"""Cost of controls: a whole run of a tiny pair (random 2-layer Llamas, post = base plus noise) with
and without `--controls cross,perturb`, each on a fresh cache, in one process, interleaved so both
see the same machine state; prints the median seconds of each and their ratio.

    python benchmarks/bench_controls.py [--repeats 3] [--questions 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from core import pipeline
from core.config import RunRequest
from core.generation import generate_greedy
from core.grading import extract_answer
from core.models import load_causal_lm
from core.settings import SelectionSettings
from core.synthetic import build_tiny_model, tiny_tokenizer
from core.templates import get_template

MAX_NEW = 12


def build_pair(root: Path, n_questions: int) -> Path:
    """A tiny pair and a dataset the base answers (references are its own answers); returns the
    config file."""
    tokenizer = tiny_tokenizer()
    build_tiny_model(root / "base", tokenizer, seed=0)
    build_tiny_model(root / "post", tokenizer, seed=1, perturb_from=root / "base", perturbation=0.001)
    questions = [f"What is {a} plus {b}" for a in range(4) for b in range(3)][:n_questions]
    template = get_template("deepseek-math")
    answers = generate_greedy(load_causal_lm(str(root / "base")), tokenizer,
                              [template.render(q, tokenizer)[1] for q in questions], MAX_NEW,
                              template.stop_strings)
    with open(root / "data.jsonl", "w") as f:
        for i, (q, a) in enumerate(zip(questions, answers)):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": extract_answer(
                tokenizer.decode(a, skip_special_tokens=True))}) + "\n")
    config = root / "pairs.toml"
    config.write_text(f"""
[pairs.tiny]
base = {{ path = "{root / 'base'}", label = "tiny-base" }}
post = {{ path = "{root / 'post'}", label = "tiny-post" }}
template = "deepseek-math"
max_new_tokens = {MAX_NEW}

[datasets.tiny]
jsonl = "{root / 'data.jsonl'}"
""")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = build_pair(root, args.questions)
        times: dict[tuple[str, ...], list[float]] = {(): [], ("cross", "perturb"): []}
        for repeat in range(args.repeats):
            for controls in times:
                request = RunRequest(pair="tiny", dataset="tiny", alphas=(0.1, 0.5),
                                     selection=SelectionSettings(n=args.questions, beta=0.0,
                                                                 gamma=10.0, delta=2.0),
                                     cache=str(root / f"cache-{repeat}-{len(controls)}.duckdb"),
                                     config=str(config), controls=controls)
                began = time.perf_counter()
                pipeline.run(request, log=lambda text: None)
                times[controls].append(time.perf_counter() - began)
        plain, controlled = (statistics.median(times[c]) for c in times)
        print(f"run without controls: {plain:.2f} s (median of {args.repeats})")
        print(f"run with --controls cross,perturb: {controlled:.2f} s")
        print(f"ratio={controlled / plain:.2f}")


if __name__ == "__main__":
    main()
