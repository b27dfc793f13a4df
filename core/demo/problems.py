"""The demo's problem set: two-term sums and differences of 1-2 digit numbers (reasoning-gym
`chain_sum`, fixed seed), a third of them phrased as short word problems. The base model answers 16%
of the held-out items correctly within 48 new tokens (README), so post-training has room to help and
to hurt.

Splits (disjoint by expression): train (training prompts of all three adapters), validation (choosing
GRPO's checkpoint), heldout (the reported accuracies and the pipeline's `demo` dataset).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROBLEM_DIR = Path("cache/demo/problems")
# Filled in this order from one seeded draw, distinct expressions throughout: there are only 200
# one-digit expressions, so the evaluation splits come first and keep the task's natural mix of one-
# and two-digit operands (about half each).
SPLIT_SIZES = {"heldout": 200, "validation": 100, "train": 1000}
SEED = 20250926
# reasoning-gym draws with replacement; draw enough to fill all splits with distinct expressions.
DRAWN = 4000
# Share of problems phrased as word problems (subtractions with a negative result stay arithmetic).
WORD_SHARE = 1 / 3

_WORD_SUM = ("{name} has {a} {things}. {pronoun} gets {b} more. How many {things} does {name} have now?")
_WORD_DIFFERENCE = ("{name} has {a} {things} and gives {b} of them away. How many {things} does {name} "
                    "have left?")
_NAMES = (("Anna", "She"), ("Ben", "He"), ("Carla", "She"), ("David", "He"), ("Emma", "She"),
          ("Farid", "He"), ("Grace", "She"), ("Hugo", "He"))
_THINGS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "stamps", "cards")


def generate() -> dict[str, list[dict]]:
    import reasoning_gym

    drawn = reasoning_gym.create_dataset("chain_sum", min_terms=2, max_terms=2, min_digits=1,
                                         max_digits=2, size=DRAWN, seed=SEED)
    rng = random.Random(SEED)
    seen, items = set(), []
    for entry in drawn:
        expression = entry["metadata"]["expression"]
        if expression in seen:
            continue
        seen.add(expression)
        items.append(_phrase(entry, expression, rng))
    needed = sum(SPLIT_SIZES.values())
    if len(items) < needed:
        raise RuntimeError(f"only {len(items)} distinct problems drawn, {needed} needed; raise DRAWN")
    splits, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = [{"id": f"{split}-{i:04d}", **item}
                         for i, item in enumerate(items[start:start + size])]
        start += size
    return splits


def _phrase(entry: dict, expression: str, rng: random.Random) -> dict:
    a_text, operator, b_text = expression.split()
    a, b, answer = int(a_text), int(b_text), int(entry["answer"])
    # A word problem needs a non-negative count; draw the phrasing first so the RNG stream does not
    # depend on the numbers.
    as_word = rng.random() < WORD_SHARE
    name, pronoun = rng.choice(_NAMES)
    things = rng.choice(_THINGS)
    if as_word and (operator == "+" or answer >= 0):
        template = _WORD_SUM if operator == "+" else _WORD_DIFFERENCE
        question = template.format(name=name, pronoun=pronoun, a=a, b=b, things=things)
        kind = "word"
    else:
        question = entry["question"]
        kind = "arithmetic"
    solution = f"{a} {operator} {b} = {answer}.\n\\boxed{{{answer}}}"
    return {"question": question, "answer": str(answer), "kind": kind, "expression": expression,
            "solution": solution}


def write(folder: Path = PROBLEM_DIR) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate().items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[split] = path
    return paths


def load(split: str, folder: Path = PROBLEM_DIR) -> list[dict]:
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLIT_SIZES)}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m core.demo problems`")
    with path.open() as lines:
        return [json.loads(line) for line in lines]
