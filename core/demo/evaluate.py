"""Held-out greedy accuracy of the base model and each adapter, with standard errors and exact
McNemar tests against the base (the same questions, so the comparison is paired)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from core.demo import common, problems

RESULT_DIR = Path("cache/demo")


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs at 1/2."""
    from scipy.stats import binomtest

    discordant = fixed + broken
    return 1.0 if discordant == 0 else float(binomtest(fixed, discordant, 0.5).pvalue)


def accuracy_summary(correct: list[bool], base_correct: list[bool] | None = None) -> dict:
    n = len(correct)
    accuracy = sum(correct) / n
    summary = {"n": n, "correct": sum(correct), "accuracy": accuracy,
               "standard_error": math.sqrt(accuracy * (1 - accuracy) / n)}
    if base_correct is not None:
        fixed = sum(c and not b for c, b in zip(correct, base_correct))
        broken = sum(b and not c for c, b in zip(correct, base_correct))
        summary.update(fixed=fixed, broken=broken, mcnemar_p=mcnemar_exact(fixed, broken))
    return summary


def evaluate(split: str = "heldout", names=("base", *common.ALGORITHMS), log=print) -> dict:
    """Evaluate `names` (base and/or adapters) and merge them into the stored results of this split;
    the base is evaluated first when it is not stored yet (the tests compare against it)."""
    unknown = set(names) - {"base", *common.ALGORITHMS}
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from base, "
                         f"{', '.join(common.ALGORITHMS)}")
    common.setup_torch()
    rows = problems.load(split)
    tokenizer = common.load_tokenizer()
    path = result_path(split)
    results: dict = (json.loads(path.read_text()) if path.is_file() else
                     {"split": split, "max_new_tokens": common.MAX_NEW_TOKENS, "models": {}})
    if results["max_new_tokens"] != common.MAX_NEW_TOKENS:
        results["models"] = {}  # measured under another token limit: start over
        results["max_new_tokens"] = common.MAX_NEW_TOKENS
    todo = [n for n in ("base", *common.ALGORITHMS)
            if n in names or (n == "base" and "base" not in results["models"])]
    for name in todo:
        adapter = None if name == "base" else common.ADAPTER_DIR / name
        started = time.monotonic()
        texts, grades = common.greedy_grades(common.load_model(adapter), tokenizer, rows)
        correct = [g.correct for g in grades]
        base_correct = None if name == "base" else [a["correct"] for a in
                                                     results["models"]["base"]["answers"]]
        summary = accuracy_summary(correct, base_correct)
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["boxed_share"] = sum(g.rule == "boxed" for g in grades) / len(rows)
        summary["answers"] = [{"id": r["id"], "text": t, "extracted": g.extracted, "correct": g.correct}
                              for r, t, g in zip(rows, texts, grades)]
        results["models"][name] = summary
        log(format_row(name, summary))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    if "base" in todo:  # a new base result invalidates the stored comparisons
        for name in set(results["models"]) - set(todo):
            del results["models"][name]
        path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def result_path(split: str) -> Path:
    return RESULT_DIR / f"evaluation-{split}.json"


def format_row(name: str, s: dict) -> str:
    row = (f"{name:5s} {s['correct']:4d}/{s['n']} = {100 * s['accuracy']:5.1f}% "
           f"± {100 * s['standard_error']:.1f} (s.e.)  boxed {100 * s['boxed_share']:.0f}%  {s['seconds']:.0f} s")
    if "mcnemar_p" in s:
        row += f"  fixed {s['fixed']}, broke {s['broken']}, exact McNemar p = {s['mcnemar_p']:.2g}"
    return row
