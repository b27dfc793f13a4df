"""Every cache key recipe, in one place (docs/method.md section 9: what keys what).

A key is a `stable_hash` of exactly what produced the thing it names, so the same work is found
again whoever asks for it. The pipeline, the store's migration and the synthetic caches all build
keys here; changing a recipe here changes it everywhere (and needs a schema migration in
core/store.py for caches that hold the old keys).
"""

from __future__ import annotations

from typing import Any

from core.settings import GenerationSettings, ScoreSettings, SelectionSettings, stable_hash


def model_key(identity: Any, fingerprint: str) -> str:
    """A model: what names it apart from its content (`ModelSpec.identity()`) plus its content
    fingerprint, never its label."""
    return stable_hash(["model", identity, fingerprint])


def question_key(question: str, reference: str) -> str:
    """A question by its content (text and reference), not by the dataset or id it came with: a
    prefix of a dataset, or another file holding the same question, finds its answers again."""
    return stable_hash(["question", question, reference])


def dataset_content_hash(questions: list[tuple[str, str, str]]) -> str:
    """What a dataset holds: its (id, question, reference) triples in order."""
    return stable_hash([list(q) for q in questions], length=32)


def dataset_key(name: str, content_hash: str) -> str:
    return stable_hash(["dataset", name, content_hash])


def generation_settings_key(template: str, max_new_tokens: int,
                            generation: GenerationSettings) -> str:
    """How answers are generated: the prompt template's full definition (not only its name), the
    token limit and the generation settings that can change an answer."""
    import dataclasses

    from core.templates import get_template

    return stable_hash(["gen", dataclasses.asdict(get_template(template)), max_new_tokens,
                        generation.key()])


def generation_key(model_key_: str, question_key_: str, gen_key: str) -> str:
    """One answer: (model, question content, generation settings)."""
    return stable_hash(["generation", model_key_, question_key_, gen_key])


def run_key(name: str, kind: str, model_keys: dict[str, str], dataset_key_: str, gen_key: str,
            selection: SelectionSettings, score: ScoreSettings) -> str:
    """A run: its pair or series (name, kind, labelled models), dataset, generation, selection and
    score settings."""
    return stable_hash(["run", name, kind, sorted(model_keys.items()), dataset_key_, gen_key,
                        selection.key(), score.key()])


def v1_generation_key(model_key_: str, dataset_key_: str, question_id: str, gen_key: str) -> str:
    """Schema version 1's answer key (by dataset and question id), used only to migrate v1 caches
    and by tests that build one."""
    return stable_hash(["generation", model_key_, dataset_key_, question_id, gen_key])


def legacy_generation_key(v1_key: str) -> str:
    """A v1 answer whose content key another v1 answer already took (the same question generated
    under two datasets): it keeps a key of its own, so the runs that used it read what they read."""
    return stable_hash(["generation-v1", v1_key])
