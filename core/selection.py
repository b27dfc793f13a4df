"""Question selection and answer truncation (docs/method.md section 5): the paper's released rules.

For a pair (base, post), in order:
1. keep questions both models answered correctly;
2. T_bar = min(mean base answer length, mean post answer length) over that set;
3. keep a question if its pair-mean answer length lies in [floor(beta*T_bar), floor(gamma*T_bar)];
4. drop it if |T_base - T_post| / ((T_base + T_post)/2) > delta;
5. where the models share a tokenizer and template, drop it if the prompt lengths differ;
6. draw n questions at random with the seed; the same questions for every model.
T_cut = max(floor(alpha * T_bar), 1).

A series (one base, several post models) generalises each rule to all models at once: correct for
all; T_bar the least model mean; the mean over all models in the window; the spread
(max - min) / mean at most delta; equal prompt lengths. With two models these are the pair rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from core.errors import InputError
from core.settings import SelectionSettings, check_alpha

RULES = ("not correct for every model", "mean length outside [floor(beta*T_bar), floor(gamma*T_bar)]",
         "length mismatch above delta", "prompt lengths differ", "not drawn (n reached)")


class EmptySelectionError(InputError):
    """No question survives the selection rules, so nothing can be scored (and nothing is stored)."""


class NoJointlyCorrectError(EmptySelectionError):
    """No question was answered correctly by every model."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One question's answers, one entry per model (base first)."""

    question_id: str
    answer_lengths: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    correct: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class Selection:
    question_ids: tuple[str, ...]  # in the order of the candidates
    t_bar: float
    window: tuple[int, int]
    # Candidates left after each rule, and the number each rule removed, in rule order.
    removed: dict[str, int]
    n_candidates: int
    n_requested: int

    @property
    def n_selected(self) -> int:
        return len(self.question_ids)

    def report(self) -> dict:
        """What was kept and why the rest went: stored with the run, shown by the CLI."""
        return {"n_candidates": self.n_candidates, "n_requested": self.n_requested,
                "n_selected": self.n_selected, "t_bar": self.t_bar, "window": list(self.window),
                "removed": dict(self.removed)}

    def summary(self) -> str:
        removed = "; ".join(f"{n} {rule}" for rule, n in self.removed.items() if n)
        text = (f"selected {self.n_selected} of {self.n_candidates} questions (n={self.n_requested}); "
                f"T_bar={self.t_bar:.1f}, length window {list(self.window)}")
        if self.n_selected < self.n_requested:
            text += f"; FEWER than n={self.n_requested} survived"
        return text + (f"; removed: {removed}" if removed else "")


def t_cut(alpha: float, t_bar: float) -> int:
    return max(math.floor(check_alpha(alpha) * t_bar), 1)


def select_questions(candidates: Sequence[Candidate], settings: SelectionSettings,
                     shared_prompt: bool = True) -> Selection:
    """Apply rules 1-6. `shared_prompt`: the models share tokenizer and template (rule 5 applies)."""
    if not candidates:
        raise NoJointlyCorrectError("there are no candidate questions: the dataset is empty")
    n_models = len(candidates[0].answer_lengths)
    removed = dict.fromkeys(RULES, 0)

    kept = [c for c in candidates if all(c.correct)]
    removed[RULES[0]] = len(candidates) - len(kept)
    if not kept:
        per_model = [sum(c.correct[m] for c in candidates) for m in range(n_models)]
        raise NoJointlyCorrectError(
            f"no question of {len(candidates)} was answered correctly by every model (correct per "
            f"model, base first: {per_model}), so there is nothing to compare. Check the prompt "
            f"template and token limit (answers cut off before \\boxed{{}} grade as wrong), or use "
            f"more or easier questions.")

    lengths = np.array([c.answer_lengths for c in kept], dtype=np.float64)  # [q, models]
    t_bar = float(lengths.mean(axis=0).min())
    low, high = math.floor(settings.beta * t_bar), math.floor(settings.gamma * t_bar)

    survivors = []
    for c, row in zip(kept, lengths):
        mean = row.mean()
        if not low <= mean <= high:
            removed[RULES[1]] += 1
        elif (row.max() - row.min()) / mean > settings.delta:
            removed[RULES[2]] += 1
        elif shared_prompt and len(set(c.prompt_lengths)) > 1:
            removed[RULES[3]] += 1
        else:
            survivors.append(c)

    if not survivors:
        reasons = ", ".join(f"{n} {rule}" for rule, n in list(removed.items())[1:] if n)
        raise EmptySelectionError(
            f"no question survives the selection rules: of {len(kept)} answered correctly by every "
            f"model, removed: {reasons} (T_bar={t_bar:.1f}, length window [{low}, {high}], "
            f"beta={settings.beta}, gamma={settings.gamma}, delta={settings.delta}); widen the "
            f"window (lower beta, raise gamma) or raise delta")
    if len(survivors) > settings.n:
        drawn = np.random.default_rng(settings.seed).choice(len(survivors), settings.n, replace=False)
        removed[RULES[4]] = len(survivors) - settings.n
        survivors = [survivors[i] for i in sorted(drawn)]
    return Selection(question_ids=tuple(c.question_id for c in survivors), t_bar=t_bar,
                     window=(low, high), removed=removed, n_candidates=len(candidates),
                     n_requested=settings.n)
