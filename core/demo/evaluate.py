"""Held-out greedy accuracy of the demo base and each post-trained model, with standard errors and
exact McNemar tests against the base (the same questions, so the comparison is paired).

The accuracies are read from the cache: the demo's runs (core/demo/run.py) generate and grade every
model's greedy answer to every held-out question, so evaluation costs no model work and counts the
very answers the analysis is made of.
"""

from __future__ import annotations

import math

from core.demo import run as demo_run


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


def graded_answers(cache: str | None = None):
    """One row per (model label, held-out question) answered in the demo's runs: correct, the
    answer's length in tokens, and whether it ended by itself (EOS) rather than at the token limit."""
    from core.store import Store

    store = Store(cache)
    with store.read() as con:
        return con.execute("""
            SELECT DISTINCT m.label, q.question_id, gr.correct, len(g.answer_ids) AS tokens,
                   g.finish_reason
            FROM runs r
            JOIN run_models rm ON rm.run_key = r.run_key
            JOIN models m ON m.model_key = rm.model_key
            JOIN questions q ON q.dataset_key = r.dataset_key
            JOIN generations g ON g.model_key = rm.model_key AND g.question_key = q.question_key
                              AND g.gen_key = r.gen_key
            JOIN grades gr ON gr.generation_key = g.generation_key
            WHERE r.dataset_name = ? AND (list_contains(?, r.name) OR r.name LIKE ?)
            ORDER BY m.label, q.question_id""",
            [demo_run.DATASET, list(demo_run.DEMO_PAIRS), f"{demo_run.SEED_NULL_PAIR}:seed:%"]).df()


def evaluate(cache: str | None = None) -> dict[str, dict]:
    """label -> accuracy summary (with mean answer tokens and the share ended by EOS), the base
    first; each post model's McNemar test is against the base on the questions both answered."""
    answers = graded_answers(cache)
    if answers.empty:
        raise FileNotFoundError("the cache holds no answers of the demo's runs; run `python -m "
                                "core.demo run` first")
    from core.config import get_pair, load_config

    base = get_pair(demo_run.DEMO_PAIRS[0], load_config()).base.label
    by_label = {label: rows.set_index("question_id") for label, rows in answers.groupby("label")}
    base_rows = by_label.pop(base)
    results = {}
    for label, rows in [(base, base_rows), *by_label.items()]:
        shared = rows.index.intersection(base_rows.index)
        summary = accuracy_summary([bool(c) for c in rows.loc[shared, "correct"]],
                                   None if label == base else
                                   [bool(c) for c in base_rows.loc[shared, "correct"]])
        summary["mean_tokens"] = float(rows["tokens"].mean())
        summary["ended"] = float((rows["finish_reason"] == "eos").mean())
        results[label] = summary
    return results


def format_row(label: str, s: dict) -> str:
    row = (f"{label:26s} {s['correct']:4d}/{s['n']} = {100 * s['accuracy']:5.1f}% "
           f"± {100 * s['standard_error']:.1f} (s.e.)  {s['mean_tokens']:.0f} tokens, "
           f"{100 * s['ended']:.0f}% ended")
    if "mcnemar_p" in s:
        row += f"  fixed {s['fixed']}, broke {s['broken']}, exact McNemar p = {s['mcnemar_p']:.2g}"
    return row
