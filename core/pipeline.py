"""A run: (pair or series, dataset, settings) -> generations, grades, selection, scores and metrics in
the cache. Every stage first asks the cache what is already there and does only the rest, so a rerun
does no model work and a killed run resumes where its last commit left it.

Stages: models (fingerprints, shared-tokenizer check) -> dataset -> generate (per model) -> grade ->
select (METHOD.md section 4) -> score (per model, per alpha) -> metrics (default conventions).
Each generation batch, and each scoring batch (a sample's scores with its loss and time), commits
in one transaction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.datasets import Dataset, load_dataset
from core.settings import GenerationSettings
from core.models import ModelSpec, check_same_tokenizer
from core.selection import Candidate, Selection, select_questions, t_cut
from core.settings import (MetricSettings, PAPER_ALPHAS, ScoreSettings, SelectionSettings,
                           check_alpha, stable_hash)
from core.store import (REPO_ROOT, Store, code_version, fetch_one, generation_key, git_commit,
                         insert_scores, now)

CONFIG_PATH = Path(__file__).resolve().parent / "pairs.toml"
STAGES = ("generate", "grade", "select", "score", "metrics")
# Grades committed per transaction (symbolic grading can take seconds per answer).
GRADE_COMMIT_EVERY = 200

Progress = Callable[[str, int, int], None]


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    label: str
    spec: ModelSpec
    algorithm: str | None = None


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """A pair (one post model) or a series (several), sharing one template and token limit."""

    name: str
    kind: str
    base: ModelEntry
    posts: tuple[ModelEntry, ...]
    template: str
    max_new_tokens: int
    # Layer count the config declares (METHOD.md section 7), checked against the model's config.
    layers: int | None = None

    @property
    def models(self) -> tuple[ModelEntry, ...]:
        return (self.base, *self.posts)


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What to run. `limit` keeps the first N questions of the dataset (0: all); `cache` is the
    cache file (None: the default)."""

    pair: str
    dataset: str
    alphas: tuple[float, ...] = PAPER_ALPHAS
    selection: SelectionSettings = SelectionSettings()
    score: ScoreSettings = ScoreSettings()
    generation: GenerationSettings = GenerationSettings()
    limit: int = 0
    cache: str | None = None
    config: str | None = None

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ValueError("give at least one alpha")
        object.__setattr__(self, "alphas", tuple(sorted({check_alpha(a) for a in self.alphas})))
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be 0 (all questions) or positive")
        # Absolute, so a job started from any working directory writes where it was asked to.
        for name in ("cache", "config"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(Path(getattr(self, name)).resolve()))

    def as_dict(self) -> dict[str, Any]:
        return {"pair": self.pair, "dataset": self.dataset, "alphas": list(self.alphas),
                "selection": self.selection.as_dict(), "score": self.score.as_dict(),
                "generation": self.generation.as_dict(), "limit": self.limit, "cache": self.cache,
                "config": self.config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRequest":
        return cls(pair=data["pair"], dataset=data["dataset"], alphas=tuple(data["alphas"]),
                   selection=SelectionSettings.from_dict(data["selection"]),
                   score=ScoreSettings.from_dict(data["score"]),
                   generation=GenerationSettings.from_dict(data["generation"]),
                   limit=data.get("limit", 0), cache=data.get("cache"), config=data.get("config"))

    def cli_args(self) -> list[str]:
        """The `python -m core run` arguments that reproduce this request."""
        args = ["--pair", self.pair, "--dataset", self.dataset, "--alpha", *map(str, self.alphas)]
        for group in (self.selection, self.score, self.generation):
            for field in dataclasses.fields(group):
                value = getattr(group, field.name)
                flag = "--" + field.name.replace("_", "-")
                if isinstance(value, bool):
                    args.append(flag if value else "--no-" + field.name.replace("_", "-"))
                else:
                    args += [flag, str(value)]
        if self.limit:
            args += ["--limit", str(self.limit)]
        if self.cache:
            args += ["--cache", str(self.cache)]
        if self.config:
            args += ["--config", str(self.config)]
        return args


@dataclasses.dataclass
class RunSummary:
    run_key: str
    selection: dict
    t_cuts: dict[float, int]
    # Work done by this call, per stage (0 everywhere on a complete rerun).
    done: dict[str, int]
    models_loaded: int
    seconds: float


# --- config ---------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else CONFIG_PATH
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read the pair config {path}: {error}") from error


def _entry(raw: dict, where: str) -> ModelEntry:
    if "label" not in raw:
        raise ConfigError(f"{where}: every model needs a `label`")
    spec_fields = {k: v for k, v in raw.items() if k not in ("label", "algorithm")}
    return ModelEntry(raw["label"], ModelSpec.from_config(spec_fields, REPO_ROOT), raw.get("algorithm"))


def get_pair(name: str, config: dict[str, Any]) -> PairConfig:
    pairs, series = config.get("pairs", {}), config.get("series", {})
    if name in pairs:
        raw, kind = pairs[name], "pair"
        posts = [raw["post"]] if "post" in raw else []
    elif name in series:
        raw, kind = series[name], "series"
        posts = raw.get("posts", [])
    else:
        raise ConfigError(f"unknown pair or series {name!r}; known pairs: {sorted(pairs)}, series: "
                          f"{sorted(series)} (core/pairs.toml)")
    if not posts or "base" not in raw:
        raise ConfigError(f"{kind} {name!r} needs a base and at least one post model")
    for key in ("template", "max_new_tokens"):
        if key not in raw:
            raise ConfigError(f"{kind} {name!r} has no `{key}`")
    base = _entry(raw["base"], f"{name}.base")
    post_entries = tuple(_entry(p, f"{name}.post") for p in posts)
    labels = [base.label] + [p.label for p in post_entries]
    if len(set(labels)) != len(labels) or "base" in labels:
        raise ConfigError(f"{kind} {name!r}: model labels {labels} must be distinct and not 'base'")
    return PairConfig(name, kind, base, post_entries, raw["template"], int(raw["max_new_tokens"]),
                      raw.get("layers"))


def get_dataset(name: str, config: dict[str, Any], limit: int = 0) -> Dataset:
    return load_dataset(name, config.get("datasets", {}), REPO_ROOT, limit=limit)


# --- keys -----------------------------------------------------------------------------------

def model_key(spec: ModelSpec, fingerprint: str) -> str:
    """A model in the cache: its spec's identity plus its content fingerprint (never its label)."""
    return stable_hash(["model", spec.identity(), fingerprint])


def generation_settings_key(pair: PairConfig, max_new_tokens: int,
                            generation: GenerationSettings) -> str:
    from core.templates import get_template

    template = dataclasses.asdict(get_template(pair.template))
    return stable_hash(["gen", template, max_new_tokens, generation.key()])


def run_key(pair: PairConfig, model_keys: dict[str, str], dataset: Dataset, gen_key: str,
            selection: SelectionSettings, score: ScoreSettings) -> str:
    return stable_hash(["run", pair.name, pair.kind, sorted(model_keys.items()), dataset.key, gen_key,
                        selection.key(), score.key()])


# --- the run --------------------------------------------------------------------------------

class _Runner:
    def __init__(self, request: RunRequest, progress: Progress | None, log: Callable[[str], None]):
        self.request = request
        self.progress = progress or (lambda stage, done, total: None)
        self.log = log
        self.store = Store(request.cache)
        self.config = load_config(request.config)
        self.pair = get_pair(request.pair, self.config)
        self.dataset = get_dataset(request.dataset, self.config, request.limit)
        self.done = dict.fromkeys(STAGES, 0)
        self.models_loaded = 0

    # Identity of models and data, and the prompts (no model weights loaded, nothing written).
    def identify(self) -> None:
        from core.templates import get_template

        self.hasher = hasher = _FileHasher(self.store)
        self.model_keys, self.fingerprints, tokenizers = {}, {}, []
        for entry in self.pair.models:
            fingerprint = entry.spec.fingerprint(hasher)
            self.fingerprints[entry.label] = fingerprint
            self.model_keys[entry.label] = model_key(entry.spec, fingerprint)
            tokenizers.append((entry.label, entry.spec.load_tokenizer()))
        self.tokenizer_fingerprint = check_same_tokenizer(tokenizers)
        self.tokenizer = tokenizers[0][1]
        self.template = get_template(self.pair.template)
        self.max_new_tokens = self.request.generation.max_new_tokens or self.pair.max_new_tokens
        self.gen_key = generation_settings_key(self.pair, self.max_new_tokens, self.request.generation)
        self.run_key = run_key(self.pair, self.model_keys, self.dataset, self.gen_key,
                               self.request.selection, self.request.score)
        self.prompts = {q.id: self.template.render(q.question, self.tokenizer)[1]
                        for q in self.dataset.questions}
        self.n_layers, self.architecture = _architecture(self.pair.base.spec)
        if self.pair.layers is not None and self.pair.layers != self.n_layers:
            raise ConfigError(f"{self.pair.kind} {self.pair.name!r} declares layers = "
                              f"{self.pair.layers} but {self.pair.base.spec} has {self.n_layers}; "
                              f"fix the config or point it at the intended model")

    def record_inputs(self) -> None:
        created = now()
        with self.store.write() as con:
            self.hasher.flush(con)
            self.store.insert_rows(con, "models", [{
                "model_key": self.model_keys[e.label], "label": e.label,
                "spec": json.dumps(e.spec.describe()), "fingerprint": self.fingerprints[e.label],
                "architecture": self.architecture, "n_layers": self.n_layers,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "created_at": created}
                for e in self.pair.models])
            self.store.insert_rows(con, "datasets", [{
                "dataset_key": self.dataset.key, "name": self.dataset.name,
                "source": self.dataset.source, "content_hash": self.dataset.content_hash,
                "n_questions": len(self.dataset.questions), "created_at": created}])
            self.store.insert_rows(con, "questions", [{
                "dataset_key": self.dataset.key, "question_id": q.id, "position": i,
                "question": q.question, "reference": q.reference}
                for i, q in enumerate(self.dataset.questions)])

    def _generation_key(self, label: str, question_id: str) -> str:
        return generation_key(self.model_keys[label], self.dataset.key, question_id, self.gen_key)

    def _existing(self, sql: str, params: list) -> set:
        with self.store.read() as con:
            return {row[0] for row in con.execute(sql, params).fetchall()}

    def generate(self) -> None:
        from core import generation

        settings = self.request.generation
        questions = {q.id: q for q in self.dataset.questions}
        for entry in self.pair.models:
            have = self._existing("SELECT question_id FROM generations WHERE model_key = ? AND "
                                  "dataset_key = ? AND gen_key = ?",
                                  [self.model_keys[entry.label], self.dataset.key, self.gen_key])
            missing = [qid for qid in questions if qid not in have]
            if not missing:
                continue
            self.log(f"generate: {entry.label}: {len(missing)} of {len(questions)} questions")
            began = time.perf_counter()
            if settings.gen_backend == "vllm":
                results = generation.generate_vllm(
                    entry.spec, self.tokenizer, [self.prompts[q] for q in missing],
                    self.max_new_tokens, self.template.stop_strings, settings.gen_dtype)
                self._store_generations(entry.label, missing, results,
                                        (time.perf_counter() - began) / len(missing), "vllm")
            else:
                model = self._load(entry, settings.gen_dtype)
                self.progress(f"generate {entry.label}", 0, len(missing))
                step = settings.gen_batch_size
                for start in range(0, len(missing), step):
                    chunk = missing[start:start + step]
                    chunk_began = time.perf_counter()
                    results = generation.generate_greedy_detailed(
                        model, self.tokenizer, [self.prompts[q] for q in chunk], self.max_new_tokens,
                        self.template.stop_strings, batch_size=step)
                    self._store_generations(entry.label, chunk, results,
                                            (time.perf_counter() - chunk_began) / len(chunk), "hf")
                    self.progress(f"generate {entry.label}", start + len(chunk), len(missing))
                _release(model)
            self._timing("generate", len(missing), time.perf_counter() - began)

    def _store_generations(self, label: str, question_ids: list[str], results, seconds: float,
                           backend: str) -> None:
        created = now()
        with self.store.write() as con:
            self.store.insert_rows(con, "generations", [{
                "generation_key": self._generation_key(label, qid),
                "model_key": self.model_keys[label], "dataset_key": self.dataset.key,
                "question_id": qid, "gen_key": self.gen_key, "prompt_ids": list(self.prompts[qid]),
                "answer_ids": list(result.answer_ids),
                "answer_text": self.tokenizer.decode(list(result.answer_ids), skip_special_tokens=True),
                "finish_reason": result.finish_reason, "seconds": seconds, "backend": backend,
                "created_at": created} for qid, result in zip(question_ids, results)])
        self.done["generate"] += len(question_ids)

    def grade(self) -> None:
        from core.grading import grade

        keys = [self._generation_key(e.label, q.id) for e in self.pair.models
                for q in self.dataset.questions]
        with self.store.read() as con:
            todo = con.execute("""
                SELECT g.generation_key, g.answer_text, q.reference FROM generations g
                JOIN questions q ON q.dataset_key = g.dataset_key AND q.question_id = g.question_id
                LEFT JOIN grades gr ON gr.generation_key = g.generation_key
                WHERE gr.generation_key IS NULL AND g.generation_key IN (SELECT unnest(?))""",
                               [keys]).fetchall()
        if not todo:
            return
        began = time.perf_counter()
        self.progress("grade", 0, len(todo))
        for start in range(0, len(todo), GRADE_COMMIT_EVERY):
            rows = []
            for key, text, reference in todo[start:start + GRADE_COMMIT_EVERY]:
                result = grade(text, reference)
                rows.append({"generation_key": key, "extracted": result.extracted,
                             "correct": result.correct, "rule": result.rule, "created_at": now()})
                self.progress("grade", start + len(rows), len(todo))
            with self.store.write() as con:
                self.store.insert_rows(con, "grades", rows)
            self.done["grade"] += len(rows)
        self._timing("grade", len(todo), time.perf_counter() - began)

    def select(self) -> Selection:
        with self.store.read() as con:
            rows = con.execute("""
                SELECT g.generation_key, len(g.answer_ids), len(g.prompt_ids), gr.correct
                FROM generations g JOIN grades gr ON gr.generation_key = g.generation_key
                WHERE g.generation_key IN (SELECT unnest(?))""",
                               [[self._generation_key(e.label, q.id) for e in self.pair.models
                                 for q in self.dataset.questions]]).fetchall()
        by_key = {key: (answer_len, prompt_len, bool(correct))
                  for key, answer_len, prompt_len, correct in rows}
        candidates = []
        for q in self.dataset.questions:
            found = [by_key[self._generation_key(e.label, q.id)] for e in self.pair.models]
            candidates.append(Candidate(q.id, tuple(f[0] for f in found), tuple(f[1] for f in found),
                                        tuple(f[2] for f in found)))
        selection = select_questions(candidates, self.request.selection, shared_prompt=True)
        self.selection = selection
        self.answer_lengths = {c.question_id: c.answer_lengths for c in candidates}
        self.t_cuts = {alpha: t_cut(alpha, selection.t_bar) for alpha in self.request.alphas}
        self.log(selection.summary())
        created = now()
        request = self.request
        report = selection.report()
        report["short_answers"] = {  # answers shorter than T_cut are scored whole (the release's slicing)
            str(alpha): sum(min(self.answer_lengths[q]) < cut for q in selection.question_ids)
            for alpha, cut in self.t_cuts.items()}
        with self.store.write() as con:
            is_new = fetch_one(con, "SELECT count(*) FROM runs WHERE run_key = ?", [self.run_key])[0] == 0
            new_alphas = [a for a in self.t_cuts if fetch_one(
                con, "SELECT count(*) FROM run_alphas WHERE run_key = ? AND alpha = ?",
                [self.run_key, a])[0] == 0]
            self.done["select"] += int(is_new or bool(new_alphas))
            self.store.insert_rows(con, "runs", [{
                "run_key": self.run_key, "name": self.pair.name, "kind": self.pair.kind,
                "dataset_key": self.dataset.key, "dataset_name": self.dataset.name,
                "gen_key": self.gen_key,
                "gen_settings": json.dumps({**request.generation.as_dict(),
                                            "template": self.pair.template,
                                            "max_new_tokens": self.max_new_tokens}),
                "selection_key": request.selection.key(),
                "selection": json.dumps(request.selection.as_dict()),
                "score_key": request.score.key(), "score": json.dumps(request.score.as_dict()),
                "n_layers": self.n_layers, "granularity": request.score.granularity,
                "n_candidates": selection.n_candidates, "n_selected": selection.n_selected,
                "t_bar": selection.t_bar, "selection_report": json.dumps(report),
                "code_version": code_version(), "git_commit": git_commit(),
                "created_at": created, "updated_at": created}])
            self.store.insert_rows(con, "run_models", [{
                "run_key": self.run_key, "label": e.label, "role": "base" if i == 0 else "post",
                "model_key": self.model_keys[e.label], "algorithm": e.algorithm, "position": i}
                for i, e in enumerate(self.pair.models)])
            self.store.insert_rows(con, "run_samples", [{
                "run_key": self.run_key, "label": e.label, "question_id": qid, "position": position,
                "generation_key": self._generation_key(e.label, qid)}
                for e in self.pair.models for position, qid in enumerate(selection.question_ids)])
            self.store.insert_rows(con, "run_alphas", [{"run_key": self.run_key, "alpha": alpha,
                                                        "t_cut": cut}
                                                       for alpha, cut in self.t_cuts.items()])
        return selection

    def score(self) -> None:
        from core.eap import Sample, score_samples

        settings = self.request.score
        for entry in self.pair.models:
            keys = {qid: self._generation_key(entry.label, qid)
                    for qid in self.selection.question_ids}
            with self.store.read() as con:
                have = set(con.execute(
                    "SELECT generation_key, t_cut FROM scores WHERE score_key = ? AND "
                    "generation_key IN (SELECT unnest(?))", [settings.key(), list(keys.values())]).fetchall())
                todo = [(alpha, cut, qid) for alpha, cut in self.t_cuts.items()
                        for qid in self.selection.question_ids if (keys[qid], cut) not in have]
                if not todo:
                    continue
                generations = {row[0]: row[1:] for row in con.execute(
                    "SELECT generation_key, prompt_ids, answer_ids FROM generations "
                    "WHERE generation_key IN (SELECT unnest(?))", [list(keys.values())]).fetchall()}
            self.log(f"score: {entry.label}: {len(todo)} samples")
            model = self._load(entry, settings.dtype)
            self.progress(f"score {entry.label}", 0, len(todo))
            began = time.perf_counter()
            for start in range(0, len(todo), settings.batch_size):
                chunk = todo[start:start + settings.batch_size]
                samples = []
                for alpha, cut, qid in chunk:
                    prompt_ids, answer_ids = generations[keys[qid]]
                    samples.append(Sample(qid, tuple(prompt_ids), tuple(answer_ids),
                                          min(cut, len(answer_ids))))
                done_before = start

                def inner(done: int, total: int, _base: int = done_before) -> None:
                    self.progress(f"score {entry.label}", _base + done, len(todo))
                result = score_samples(model, samples, settings, progress=inner)
                if result.graph.n_layers != self.n_layers:
                    raise RuntimeError(f"{entry.label} has {result.graph.n_layers} layers, the base "
                                       f"{self.n_layers}: a pair must share one architecture")
                self._store_scores(entry.label, chunk, samples, result)
            _release(model)
            self._timing("score", len(todo), time.perf_counter() - began)

    def _store_scores(self, label, chunk, samples, result) -> None:
        edges = result.graph.edges(result.scores)
        created = now()
        with self.store.write() as con:
            insert_scores(con, [{
                "generation_key": self._generation_key(label, qid), "t_cut": cut,
                "score_key": self.request.score.key(), "model_key": self.model_keys[label],
                "dataset_key": self.dataset.key, "question_id": qid, "loss": float(result.loss[i]),
                "seconds": float(result.seconds[i]), "n_scored_tokens": sample.t_cut,
                "scored_text": self.tokenizer.decode(list(sample.answer_ids[:sample.t_cut])),
                "code_version": code_version(), "created_at": created}
                for i, ((alpha, cut, qid), sample) in enumerate(zip(chunk, samples))], edges)
            con.execute("UPDATE runs SET updated_at = ? WHERE run_key = ?", [created, self.run_key])
        self.done["score"] += len(chunk)

    def metrics(self) -> None:
        from core import metrics
        from core.query import ResultCache

        settings = MetricSettings()
        cache = ResultCache(self.store)
        with self.store.read() as con:
            have = set(con.execute("SELECT post_label, alpha FROM metrics WHERE run_key = ? AND "
                                   "settings_key = ?", [self.run_key, settings.key()]).fetchall())
        if self.selection.n_selected < 2:
            self.log(f"metrics: skipped, they need at least 2 questions and {self.selection.n_selected} "
                     f"was selected; the scores are stored")
            return
        graph = cache.graph(self.run_key)
        for entry in self.pair.posts:
            for alpha in self.t_cuts:
                if (entry.label, alpha) in have:
                    continue
                base_edges, ids = cache.sample_edges(self.run_key, alpha, "base")
                if len(ids) < self.selection.n_selected:
                    continue  # not every selected question is scored (cannot happen after score)
                post_edges, _ = cache.sample_edges(self.run_key, alpha, entry.label)
                began = time.perf_counter()
                comparison = metrics.compare_models(graph.dense(base_edges), graph.dense(post_edges),
                                                    graph, settings)
                with self.store.write() as con:
                    self.store.insert_rows(con, "metrics", [{
                        "run_key": self.run_key, "post_label": entry.label, "alpha": alpha,
                        "settings_key": settings.key(), "settings": json.dumps(settings.as_dict()),
                        "comparison": json.dumps(comparison.to_dict()), "created_at": now()}])
                self.done["metrics"] += 1
                self._timing("metrics", 1, time.perf_counter() - began)

    # --- helpers ----------------------------------------------------------------------------

    def _load(self, entry: ModelEntry, dtype: str):
        self.models_loaded += 1
        return entry.spec.load(dtype=dtype, device=self.request.score.device)

    def _timing(self, stage: str, items: int, seconds: float) -> None:
        with self.store.write() as con:
            self.store.insert_rows(con, "stage_timings", [{
                "run_key": self.run_key, "stage": stage, "items": items, "seconds": seconds,
                "code_version": code_version(), "git_commit": git_commit(), "created_at": now()}])


def run(request: RunRequest, progress: Progress | None = None,
        log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) `request`; only missing work is done. Holds the cache's writer lock."""
    began = time.perf_counter()
    runner = _Runner(request, progress, log)
    with runner.store.writer_lock(wait=False):
        runner.identify()
        runner.record_inputs()
        runner.generate()
        runner.grade()
        runner.select()
        runner.score()
        runner.metrics()
    return RunSummary(runner.run_key, runner.selection.report(), runner.t_cuts, runner.done,
                      runner.models_loaded, time.perf_counter() - began)


# Seconds per item assumed by `plan` when the cache has no timing of these models yet.
DEFAULT_SECONDS = {"generate": 2.0, "score": 1.0}


def plan(request: RunRequest) -> dict[str, Any]:
    """Work items missing per stage and rough seconds, from what the cache holds; loads
    tokenizers but no model, and writes nothing."""
    runner = _Runner(request, None, lambda text: None)
    runner.identify()
    models = runner.pair.models
    n_questions = len(runner.dataset.questions)
    keys = [runner._generation_key(e.label, q.id) for e in models for q in runner.dataset.questions]
    out: dict[str, Any] = {"run_key": runner.run_key, "questions": n_questions,
                           "models": [e.label for e in models]}
    n_posts, n_alphas = len(runner.pair.posts), len(request.alphas)
    if not runner.store.exists() or not runner.store.tables_present():
        n = min(request.selection.n, n_questions)
        missing = {"generate": len(keys), "grade": len(keys), "select": 1,
                   "score": n * len(models) * n_alphas, "metrics": n_posts * n_alphas}
        seconds = dict(DEFAULT_SECONDS)
    else:
        with runner.store.read() as con:
            generated = fetch_one(con, "SELECT count(*), avg(seconds) FROM generations "
                                       "WHERE generation_key IN (SELECT unnest(?))", [keys])
            graded = fetch_one(con, "SELECT count(*) FROM grades WHERE generation_key IN (SELECT unnest(?))",
                               [keys])[0]
            run = fetch_one(con, "SELECT t_bar, n_selected FROM runs WHERE run_key = ?",
                            [runner.run_key])
            scored = fetch_one(con, """
                SELECT count(*), avg(s.seconds) FROM run_samples rs
                JOIN run_alphas a ON a.run_key = rs.run_key
                JOIN scores s ON s.generation_key = rs.generation_key AND s.t_cut = a.t_cut
                             AND s.score_key = ?
                WHERE rs.run_key = ? AND list_contains(?, a.alpha)""",
                               [request.score.key(), runner.run_key, list(request.alphas)])
            past = fetch_one(con, "SELECT avg(seconds) FROM scores WHERE model_key IN (SELECT unnest(?))",
                             [list(runner.model_keys.values())])[0]
            have_metrics = fetch_one(con, "SELECT count(*) FROM metrics WHERE run_key = ? AND "
                                          "settings_key = ? AND list_contains(?, alpha)",
                                     [runner.run_key, MetricSettings().key(), list(request.alphas)])[0]
        n = run[1] if run else min(request.selection.n, n_questions)
        missing = {"generate": len(keys) - generated[0], "grade": len(keys) - graded,
                   "select": 0 if run else 1, "score": n * len(models) * n_alphas - scored[0],
                   "metrics": n_posts * n_alphas - have_metrics}
        seconds = {"generate": generated[1] or DEFAULT_SECONDS["generate"],
                   "score": scored[1] or past or DEFAULT_SECONDS["score"]}
    out["missing"] = missing
    out["seconds"] = round(missing["generate"] * seconds["generate"]
                           + missing["score"] * seconds["score"], 1)
    return out


def _release(model) -> None:
    """Free a model's memory before the next one is loaded (two 7B models rarely fit together)."""
    import gc

    import torch

    model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _architecture(spec: ModelSpec) -> tuple[int, str]:
    """Layer count and architecture name from the (base) model's config, without loading weights."""
    from transformers import AutoConfig

    root = spec.base if spec.kind == "adapter" else spec
    try:
        config = AutoConfig.from_pretrained(root.path, revision=root.revision, trust_remote_code=False)
    except OSError as error:
        raise ValueError(f"cannot read the config of {root}: {error}") from error
    architecture = (config.architectures or [type(config).__name__])[0]
    return int(config.num_hidden_layers), architecture


class _FileHasher:
    """sha256 of files, memoised in the cache by (path, size, mtime) so large weights are hashed once."""

    def __init__(self, store: Store):
        from core.models import sha256_file

        self._hash = sha256_file
        self.known: dict[str, tuple[int, int, str]] = {}
        self.new: list[dict] = []
        if store.tables_present():
            with store.read() as con:
                self.known = {p: (s, m, h) for p, s, m, h in con.execute(
                    "SELECT path, size, mtime_ns, sha256 FROM file_hashes").fetchall()}

    def __call__(self, path) -> str:
        path = str(Path(path).resolve())
        stat = os.stat(path)
        known = self.known.get(path)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = self._hash(path)
        self.known[path] = (stat.st_size, stat.st_mtime_ns, digest)
        self.new.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "sha256": digest})
        return digest

    def flush(self, con) -> None:
        Store.insert_rows(con, "file_hashes", self.new, replace=True)
        self.new = []
