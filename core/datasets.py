"""Math question sets: JSONL in the math-evaluation-harness layout, Hugging Face datasets, and the
bundled offline set. Each loaded set carries a content hash, so the cache keys a dataset by what it
holds, not by its name.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from core import keys
from core.errors import InputError, one_line

# Field names the math-evaluation-harness files use, in order of preference.
QUESTION_FIELDS = ("question", "problem", "Question", "input")
ANSWER_FIELDS = ("answer", "final_answer", "gt", "target")
ID_FIELDS = ("id", "idx", "unique_id", "question_id")


class DatasetError(InputError):
    """A dataset cannot be read; the message names the file (or hub dataset) and line (or row)."""


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    reference: str

    @property
    def key(self) -> str:
        return keys.question_key(self.question, self.reference)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    questions: tuple[Question, ...]

    @property
    def content_hash(self) -> str:
        return keys.dataset_content_hash([(q.id, q.question, q.reference) for q in self.questions])

    @property
    def key(self) -> str:
        return keys.dataset_key(self.name, self.content_hash)

    def head(self, limit: int) -> "Dataset":
        """The first `limit` questions (all for 0), as a dataset of its own content."""
        if not limit or limit >= len(self.questions):
            return self
        return Dataset(self.name, f"{self.source} (first {limit})", self.questions[:limit])


def reference_from_record(record: dict) -> str | None:
    """The reference answer: an answer field (GSM8K's text after '####'), else the last \\boxed{} of
    a MATH-style solution."""
    from core.grading import extract_answer

    for field in ANSWER_FIELDS:
        if record.get(field) not in (None, ""):
            answer = str(record[field])
            return answer.split("####")[-1].strip() if "####" in answer else answer.strip()
    if record.get("solution"):
        return extract_answer(str(record["solution"]))
    return None


# What each field may hold: text, or (an answer, an id) a number written without quotes. Anything
# else (a list, an object, true/false) is refused rather than turned into text.
_FIELD_KINDS = {"question": (str,), "answer": (str, int, float), "id": (str, int)}


def _check_field(record: dict, field: str, kind: str, where: str) -> None:
    """Raise DatasetError when record[field], the record's `kind` field, is not of that kind."""
    value, allowed = record.get(field), _FIELD_KINDS[kind]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, allowed) or (
            isinstance(value, float) and not math.isfinite(value)):
        wanted = "text" if allowed == (str,) else "text or a number"
        raise DatasetError(f"{where}: the {kind} field {field!r} holds {type(value).__name__} "
                           f"{json.dumps(value)[:40]}, not {wanted}; write it as a JSON string")


def question_from_record(record: dict, position: int, where: str, question_field: str | None = None,
                         answer_field: str | None = None, id_field: str | None = None) -> Question:
    """The question of one record; `position` (from 0) is its id when it has none, `where` names
    it in errors (file and line, or hub dataset and row, both counted from 1)."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    fields = {"question": (question_field,) if question_field else QUESTION_FIELDS,
              "answer": (answer_field,) if answer_field else ANSWER_FIELDS + ("solution",),
              "id": (id_field,) if id_field else ID_FIELDS}
    for kind, names in fields.items():
        for name in names:
            _check_field(record, name, kind, where)
    question = next((record[f] for f in fields["question"] if record.get(f) not in (None, "")), None)
    if question is None:
        raise DatasetError(f"{where}: no question field (looked for {list(fields['question'])})")
    if answer_field:
        answer = record.get(answer_field)
        reference = reference_from_record({"answer": answer}) if answer is not None else None
    else:
        reference = reference_from_record(record)
    if reference is None:
        raise DatasetError(f"{where}: no reference answer (looked for {list(fields['answer'])})")
    qid = next((record[f] for f in fields["id"] if record.get(f) not in (None, "")), position)
    return Question(str(qid), str(question), str(reference))


def question_from_line(raw: bytes, position: int, where: str, **fields) -> Question | None:
    """The question on one JSONL line (None: a blank line); `position` (from 0) is its id when it
    has none, `where` names the line in errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where}: not UTF-8 text ({error.reason} at byte "
                           f"{error.start})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise DatasetError(f"{where}: not a JSON object ({one_line(error)})") from None
    return question_from_record(record, position, where, **fields)


def _questions(lines: Iterable[bytes], where: str, **fields) -> tuple[Question, ...]:
    """The questions of JSONL lines, raising at the first bad one; `where` names the file."""
    return tuple(question for position, raw in enumerate(lines)
                 if (question := question_from_line(raw, position, f"{where}, line {position + 1}",
                                                    **fields)) is not None)


def read_jsonl(path: str | os.PathLike, name: str | None = None, **fields) -> Dataset:
    """A JSONL file, one question per line; blank lines are skipped. A question without an id
    takes its line's position counted from 0 (the ids cached runs were keyed by); errors count
    lines from 1."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist" if not path.exists() else
                           f"dataset path {path} is not a file; give a .jsonl file")
    with open(path, "rb") as handle:
        questions = _questions(handle, str(path), **fields)
    return _checked(Dataset(name or path.stem, f"jsonl:{path}", questions))


def read_jsonl_bytes(data: bytes, name: str, source: str) -> Dataset:
    """JSONL held in memory (an uploaded file, as the cache keeps it), read as read_jsonl reads a
    file (BytesIO cuts lines where a file does, so ids and line numbers agree); `source` names it
    in errors and in the dataset's provenance."""
    return _checked(Dataset(name, source, _questions(io.BytesIO(data), source)))


def read_hub(repo_id: str, name: str, config: str | None = None, split: str = "test",
             **fields) -> Dataset:
    """A Hugging Face dataset (from the hub, or the local datasets cache when offline)."""
    import datasets

    try:
        rows = datasets.load_dataset(repo_id, config, split=split)
    except Exception as error:  # noqa: BLE001 - network, missing cache, bad config all end here
        raise DatasetError(f"cannot load hub dataset {repo_id!r} (config {config}, split {split}): "
                           f"{error}. Offline, put a JSONL copy where the config's `jsonl` "
                           f"points.") from error
    questions = tuple(question_from_record(dict(row), i, f"{repo_id}, row {i + 1}", **fields)
                      for i, row in enumerate(rows))
    return _checked(Dataset(name, f"hub:{repo_id}:{config or ''}:{split}", questions))


def _checked(dataset: Dataset) -> Dataset:
    if not dataset.questions:
        raise DatasetError(f"dataset {dataset.name!r} ({dataset.source}) holds no question")
    seen: set[str] = set()
    for q in dataset.questions:
        if q.id in seen:
            raise DatasetError(f"dataset {dataset.name!r} ({dataset.source}) has the question id "
                               f"{q.id!r} twice; ids must be unique")
        seen.add(q.id)
    return dataset


def is_path(name: str) -> bool:
    """Whether a dataset name is a path to a JSONL file rather than a name."""
    return name.endswith(".jsonl") or os.sep in name


def load_dataset(name: str, config: dict[str, dict], root: Path, limit: int = 0) -> Dataset:
    """A dataset named in the config (its `jsonl` file if present, else its `hub` entry), or a
    path to a JSONL file."""
    if name not in config:
        if is_path(name):
            return read_jsonl(name).head(limit)
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(config)}, or give a path to a "
                           f".jsonl file")
    entry = config[name]
    fields = {k: entry[k] for k in ("question_field", "answer_field", "id_field") if k in entry}
    jsonl = Path(entry["jsonl"]) if "jsonl" in entry else None
    if jsonl is not None and not jsonl.is_absolute():
        jsonl = root / jsonl
    if jsonl is not None and jsonl.is_file():
        return read_jsonl(jsonl, name, **fields).head(limit)
    if "hub" in entry:
        return read_hub(entry["hub"], name, entry.get("config"), entry.get("split", "test"),
                        **fields).head(limit)
    raise DatasetError(f"dataset {name!r}: its file {jsonl} does not exist; put the JSONL there "
                       f"(math-evaluation-harness layout)")
