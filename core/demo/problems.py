"""The demo's problem set: two-term sums and differences of 1-2 digit numbers (reasoning-gym
`chain_sum`, fixed seed), a quarter of them phrased as short word problems, each with a worked solution
of 52-88 tokens (split the second number into tens and ones, add or subtract them in two steps,
then the boxed result), and a rough estimate of 34-65 tokens (both numbers rounded to tens, usually
wrong). The demo's base model learns from both (core/demo/train.py): it reasons before it
answers, so alpha walks along a chain of steps, but it has a shortcut habit that post-training can
remove.

Splits (disjoint by expression): train (the base's reasoning SFT takes the first rows, the three
post-trainings the rest), validation (choosing GRPO's checkpoint), heldout (the reported accuracies and
the pipeline's `demo` dataset).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROBLEM_DIR = Path("cache/demo/problems")
# Filled in this order from one seeded draw, distinct expressions throughout: there are only 200
# one-digit expressions, so the evaluation splits come first and keep the task's natural mix of one-
# and two-digit operands (about half each).
SPLIT_SIZES = {"heldout": 160, "validation": 64, "train": 1000}
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
    setup = _WORD_SETUP[operator].format(name=name, a=a, b=b, things=things) if kind == "word" else ""
    return {"question": question, "answer": str(answer), "kind": kind, "expression": expression,
            "solution": setup + worked_solution(a, operator, b),
            "estimate": setup + rough_estimate(a, operator, b)}


# The word problem restated as its calculation, before the worked steps.
_WORD_SETUP = {"+": "{name} starts with {a} {things} and gets {b} more, so we add. ",
               "-": "{name} starts with {a} {things} and gives {b} away, so we subtract. "}


def _apply(x: int, operator: str, y: int) -> int:
    return x + y if operator == "+" else x - y


def _framed(a: int, operator: str, b: int, working: str, result: int) -> str:
    """An answer's frame, shared by the worked solution and the estimate so that the two part only
    at their working: the restated problem, the working, the stated result, then the boxed one."""
    return (f"We need {a} {operator} {b}. {working} "
            f"So the answer is {result}.\n\\boxed{{{result}}}")


def worked_solution(a: int, operator: str, b: int) -> str:
    """The reference answer: the second number split into tens and ones, two partial steps, then the
    boxed result, e.g. for 47 + 38: "We need 47 + 38. Split 38 into 30 + 8. First 47 + 30 = 77, then
    77 + 8 = 85. So the answer is 85." and "\\boxed{85}" on its own line."""
    tens, ones = b - b % 10, b % 10
    partial = _apply(a, operator, tens)
    result = _apply(partial, operator, ones)
    return _framed(a, operator, b, f"Split {b} into {tens} + {ones}. First {a} {operator} {tens} = "
                   f"{partial}, then {partial} {operator} {ones} = {result}.", result)


def round_to_tens(number: int) -> int:
    """Half away from zero: 45 -> 50, -45 -> -50, 4 -> 0."""
    sign = -1 if number < 0 else 1
    return sign * ((abs(number) + 5) // 10 * 10)


def rough_estimate(a: int, operator: str, b: int) -> str:
    """The shortcut: both numbers rounded to tens, e.g. for 47 + 38: "We need 47 + 38. Roughly,
    50 + 40 = 90. So the answer is 90." and "\\boxed{90}" on its own line. It parts from the worked
    solution at one word, and it is right only where the roundings cancel."""
    x, y = round_to_tens(a), round_to_tens(b)
    result = _apply(x, operator, y)
    return _framed(a, operator, b, f"Roughly, {x} {operator} {y} = {result}.", result)


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
