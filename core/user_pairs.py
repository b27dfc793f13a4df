"""Pairs and datasets made from the browser (the Compute page's "New pair"): validated, checked
against the real models before anything is saved, and kept in the cache (tables user_pairs and
user_datasets), not in core/pairs.toml. core.config resolves them by name like the declared ones;
a run is keyed by content (model fingerprints, dataset content), so a user pair of declared
models finds their answers and scores again.

A pair is declared in the pairs.toml vocabulary (`model_declaration`, `pair_declaration`). Checks,
each problem one message: `check_pair` in this process (reads model configs and tokenizers, no
weights), `check_new_pair` the same in a child process (the dashboard's process never imports
transformers, as core.jobs.estimate), `save_user_pair` the checks that read no model, then one
write under the cache's writer lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal, get_args

from core.config import (Config, ConfigError, PairConfig, configured, get_dataset, load_config,
                         model_entry, pair_from_entry)
from core.datasets import Dataset, DatasetError, is_path, question_from_line, read_jsonl_bytes
from core.errors import InputError
from core.models import check_same_tokenizer, config_problem, model_config, model_problem
from core.store import REPO_ROOT, Store, now
from core.templates import TEMPLATES, get_template

# Where a model of a new pair comes from: a hub id (with revision), a local folder, or a LoRA
# adapter folder on a base (a hub id or a folder).
ModelSource = Literal["hub", "folder", "adapter"]
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)
# An uploaded dataset is kept whole in the cache: MATH's 5000 questions take some 4 MiB.
MAX_DATASET_BYTES = 20 * 2**20
# Problems listed one by one; past this many, a count of the rest.
MAX_LISTED = 20
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHECK_TIMEOUT_S = 600.0


class ProblemsError(InputError):
    """What keeps a new pair or dataset from being saved, one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s): " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Upload:
    """A JSONL file uploaded from the browser: its file name and bytes."""

    filename: str
    data: bytes


# --- Declarations, in the pairs.toml vocabulary --------------------------------------------------

def _location(text: str) -> dict:
    """A hub id or a folder, as a pairs.toml model entry: a folder where one exists or the text
    is written as a path."""
    text = text.strip()
    if text.startswith(("/", ".", "~")) or Path(text).expanduser().is_dir():
        return {"path": str(Path(text).expanduser())}
    return {"hub": text}


def model_declaration(source: ModelSource, location: str, label: str = "", *,
                      revision: str = "", adapter_base: dict | str = "", algorithm: str = "") -> dict:
    """One model as a pairs.toml entry: a hub id (with `revision`), a local folder, or an adapter
    folder on `adapter_base` (a declaration, or a hub id or folder); a post model's training
    `algorithm` (shown beside its label). An empty label becomes the model's name (the hub id's
    last part, or the folder's)."""
    location = location.strip()
    if source == "hub":
        entry = {"hub": location, **({"revision": revision.strip()} if revision.strip() else {})}
    elif source == "folder":
        entry = {"path": str(Path(location).expanduser()) if location else ""}
    elif source == "adapter":
        base = adapter_base if isinstance(adapter_base, dict) else _location(adapter_base)
        entry = {"adapter": str(Path(location).expanduser()) if location else "",
                 "base": {k: v for k, v in base.items() if k != "label"}}
    else:
        raise InputError(f"model source {source!r} is not one of {list(MODEL_SOURCES)}")
    name = Path(location.rstrip("/")).name or location
    return {**entry, "label": label.strip() or name,
            **({"algorithm": algorithm.strip()} if algorithm.strip() else {})}


def pair_declaration(base: dict, post: dict, template: str, max_new_tokens: int,
                     dataset: str) -> dict:
    """A pair as a pairs.toml entry would hold it, with the dataset it is made for."""
    return {"base": base, "post": post, "template": template, "max_new_tokens": max_new_tokens,
            "dataset": dataset}


# --- Checks ------------------------------------------------------------------------------------

def _listed(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more problem(s)"]


def name_problems(name: str, what: str, declared: list[str], made: list[str],
                  config: Config) -> list[str]:
    """Why `name` cannot name a new `what` ("pair" or "dataset"): none, or one message."""
    if not name:
        return [f"give the new {what} a name"]
    if not NAME_RULE.fullmatch(name) or is_path(name):
        return [f"the {what} name {name!r} may hold only letters, digits, '.', '_' and '-' (up to "
                f"64, the first a letter or digit) and may not end in .jsonl"]
    if name in declared:
        return [f"the {what} name {name!r} is declared in {config.path}; pick another name"]
    if name in made:
        return [f"a {what} named {name!r} was made from the browser already; pick another name, or "
                f"select that {what}"]
    return []


def dataset_problems(name: str, upload: Upload, config: Config) -> tuple[Dataset | None, list[str]]:
    """The uploaded dataset (None where it has problems) and every problem of it: its name, its
    size, and each line (JSON, fields as core.datasets reads them, duplicate ids and questions)."""
    offered = configured(config.path, config.cache)
    problems = name_problems(name, "dataset", list(config.datasets), offered["user_datasets"],
                             config)
    where = upload.filename or "the uploaded file"
    if len(upload.data) > MAX_DATASET_BYTES:
        return None, problems + [f"{where} holds {len(upload.data) / 2**20:.1f} MiB; a dataset "
                                 f"uploaded here holds at most {MAX_DATASET_BYTES / 2**20:.0f} MiB "
                                 f"(give a larger one a `jsonl` entry in core/pairs.toml)"]
    first_line: dict[tuple[str, str], int] = {}
    line_problems, n_questions = [], 0
    for position, raw in enumerate(io.BytesIO(upload.data)):
        line = position + 1
        try:
            question = question_from_line(raw, position, f"{where}, line {line}")
        except DatasetError as error:
            line_problems.append(str(error))
            continue
        if question is None:
            continue
        n_questions += 1
        for field, value in (("id", question.id), ("question", question.question.strip())):
            if (field, value) in first_line:
                shown = f"id {value!r}" if field == "id" else "question"
                line_problems.append(f"{where}, line {line}: the {shown} of line "
                                     f"{first_line[(field, value)]} again; each {field} once")
            else:
                first_line[(field, value)] = line
    if not n_questions and not line_problems:
        line_problems.append(f"{where} holds no question: give one JSON object per line with a "
                             f"question and an answer field")
    problems += line_problems
    if problems:
        return None, _listed(problems)
    return read_jsonl_bytes(upload.data, name, f"upload:{upload.filename}"), []


# What each location of a model entry holds, as the form names it.
LOCATION_NAMES = {"hub": "hub id", "path": "folder", "adapter": "adapter folder"}


def _blank_locations(entry, role: str) -> list[str]:
    """A message for each hub id or folder of a model entry left empty, or for an entry (or an
    adapter's base) that is not an object of pairs.toml's model keys."""
    if not isinstance(entry, dict):
        return [f"{role}: must be an object with one of the keys {list(LOCATION_NAMES)}, not "
                f"{type(entry).__name__} {json.dumps(entry)[:40]}"]
    blank = [f"{role}: give its {what}" for key, what in LOCATION_NAMES.items()
             if key in entry and not str(entry[key]).strip()]
    if "base" in entry:
        blank += _blank_locations(entry["base"], f"{role}'s adapter base")
    return blank


def declaration_problems(name: str, declaration: dict, config: Config,
                         uploading: bool = False) -> tuple[PairConfig | None, list[str]]:
    """The pair (None where it cannot be built) and every problem of its declaration: the name,
    template, token limit, dataset (configured, or `uploading`: the upload's own problems are
    dataset_problems'), model entries and labels."""
    offered = configured(config.path, config.cache)
    declared = list(config.pairs) + list(config.series)
    problems = name_problems(name, "pair", declared, offered["user_pairs"], config)
    template = declaration.get("template")
    if not isinstance(template, str) or template not in TEMPLATES:
        problems.append(f"prompt template {template!r} is not one of {list(TEMPLATES)}")
    limit = declaration.get("max_new_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        problems.append(f"max_new_tokens = {limit!r}: give the answer token limit, a positive "
                        f"integer")
    dataset = declaration.get("dataset")
    if not uploading and (not isinstance(dataset, str) or dataset not in offered["datasets"]):
        problems.append(f"dataset {dataset!r} is neither configured nor uploaded; known: "
                        f"{offered['datasets']}")
    blank = [message for role in ("base", "post")
             for message in _blank_locations(declaration.get(role, {}), f"{role} model")]
    if blank:
        return None, problems + blank
    try:
        pair = pair_from_entry(name or "new", "pair", declaration, "the new pair")
    except (ConfigError, InputError, ValueError) as error:
        return None, problems + [str(error)]
    return pair, problems


def file_problems(declaration: dict) -> list[str]:
    """Each model whose files are missing or unsafe (not safetensors), read without loading; an
    entry that names no model is declaration_problems' to report."""
    problems = []
    for role in ("base", "post"):
        raw = declaration.get(role)
        if not isinstance(raw, dict) or _blank_locations(raw, role):
            continue
        try:
            entry = model_entry(raw, f"{role} model")
        except (ConfigError, InputError, ValueError):
            continue
        if problem := model_problem(entry.spec):
            problems.append(f"{entry.label}: {problem}")
    return problems


def architecture_problems(pair: PairConfig) -> list[str]:
    """Each model's architecture and weight shapes, read from its config and weight headers
    (core.models.config_problem), and the base's layer count."""
    problems, layers = [], {}
    for entry in pair.models:
        if problem := config_problem(entry.spec):
            problems.append(f"{entry.label}: {problem}")
            continue
        layers[entry.label] = getattr(model_config(entry.spec), "num_hidden_layers", None)
    if len(set(layers.values())) > 1:
        problems.append(f"the models have different layer counts {layers}; a pair shares one "
                        f"architecture")
    return problems


def tokenizer_problems(pair: PairConfig, questions) -> list[str]:
    """Whether every model would be fed the same prompt ids (core.models.check_same_tokenizer on
    the dataset's questions with the pair's template)."""
    try:
        tokenizers = [(entry.label, entry.spec.load_tokenizer()) for entry in pair.models]
        check_same_tokenizer(tokenizers, get_template(pair.template), questions)
    except InputError as error:
        return [str(error)]
    except ValueError as error:  # e.g. a chat template the tokenizer does not have
        return [f"the prompt template {pair.template!r} cannot render the questions: "
                f"{' '.join(str(error).split())}"]
    return []


def check_pair(name: str, declaration: dict, *, upload: Upload | None = None,
               config_path: str | None = None, cache: str | None = None) -> list[str]:
    """Every problem of a new pair and of its uploaded dataset, one message each (none: it can be
    saved): names, declaration, the models' files, architectures and tokenizers on the dataset's
    questions. Reads model configs and tokenizers, no weights."""
    if not isinstance(declaration, dict):
        return [f"the pair's declaration must be an object (base, post, template, "
                f"max_new_tokens, dataset), not {type(declaration).__name__}"]
    config = load_config(config_path, cache)
    new_dataset, problems = (dataset_problems(declaration.get("dataset", ""), upload, config)
                             if upload is not None else (None, []))
    pair, found = declaration_problems(name, declaration, config, upload is not None)
    missing = file_problems(declaration)
    problems += found + missing
    if pair is None or missing:  # the rest reads the models' files
        return problems
    problems += architecture_problems(pair)
    if found or (upload is not None and new_dataset is None):
        return problems  # the prompts need a known template and a readable dataset
    try:
        dataset = new_dataset or get_dataset(declaration["dataset"], config)
    except InputError as error:
        return problems + [str(error)]
    return problems + tokenizer_problems(pair, dataset.questions)


def check_new_pair(name: str, declaration: dict, *, upload: Upload | None = None,
                   config_path: str | None = None, cache: str | None = None) -> list[str]:
    """check_pair in a child process (it imports transformers, which the dashboard's process
    never does); its problems, or the child's own failure as one."""
    with tempfile.TemporaryDirectory(prefix="circuitdiff-check-") as folder:
        request = {"name": name, "declaration": declaration, "config_path": config_path,
                   "cache": cache, "upload": None}
        if upload is not None:
            (Path(folder) / "upload.jsonl").write_bytes(upload.data)
            request["upload"] = {"filename": upload.filename,
                                 "path": str(Path(folder) / "upload.jsonl")}
        (Path(folder) / "check.json").write_text(json.dumps(request))
        try:
            done = subprocess.run([sys.executable, "-m", "core.user_pairs",
                                   str(Path(folder) / "check.json")], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return [f"the check took longer than {CHECK_TIMEOUT_S:.0f} s; check that the models' "
                    f"configs and tokenizers are reachable"]
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return [f"the check failed: {lines[-1] if lines else f'exit status {done.returncode}'}"]
    return json.loads(done.stdout.strip().splitlines()[-1])["problems"]


# --- Saving --------------------------------------------------------------------------------------

def save_user_pair(name: str, declaration: dict, *, upload: Upload | None = None,
                   config_path: str | None = None, cache: str | None = None) -> None:
    """Save a new pair (and its uploaded dataset, named by the declaration's `dataset`) in the
    cache, after the checks that read no model (check_pair or check_new_pair does the rest). Raises
    ProblemsError listing them, or WriterBusyError while a run writes to the cache."""
    store = Store(cache)
    # The names are checked under the writer lock: another session may save the same one.
    with store.writer_lock(wait=False):
        config = load_config(config_path, cache)
        dataset, problems = (dataset_problems(declaration.get("dataset", ""), upload, config)
                             if upload is not None else (None, []))
        problems += declaration_problems(name, declaration, config, upload is not None)[1]
        problems += file_problems(declaration)
        if problems:
            raise ProblemsError(problems)
        created = now()
        with store.write() as con:
            if dataset is not None:
                Store.insert_rows(con, "user_datasets", [{
                    "name": dataset.name, "source": upload.filename,
                    "sha256": hashlib.sha256(upload.data).hexdigest(),
                    "n_questions": len(dataset.questions), "rows": upload.data.decode("utf-8"),
                    "created_at": created}])
            Store.insert_rows(con, "user_pairs", [{
                "name": name, "kind": "pair", "declaration": json.dumps(declaration),
                "created_at": created}])


def _check_command(request_path: str) -> None:
    """The child process of check_new_pair: prints {"problems": [...]} as one JSON line."""
    request = json.loads(Path(request_path).read_text())
    upload = request["upload"]
    problems = check_pair(request["name"], request["declaration"],
                          upload=None if upload is None else Upload(
                              upload["filename"], Path(upload["path"]).read_bytes()),
                          config_path=request["config_path"], cache=request["cache"])
    print(json.dumps({"problems": problems}))


if __name__ == "__main__":
    _check_command(sys.argv[1])
