"""A run: (pair or series, dataset, settings) -> generations, grades, selection, scores and metrics in
the cache. Every stage first asks the run store what is missing and does only that, so a rerun does
no model work and a killed run resumes where its last commit left it.

Stages (core.vocab.STAGES): identify models and data -> generate (per model) -> grade -> select
(docs/method.md section 5) -> score (per model, an answer's cuts together) -> metrics (default
conventions, docs/method.md section 6). Each generation batch commits in one transaction, and so do
each ScoreSettings.batches_per_commit scoring batches (each sample's scores with its loss and time).
Then the request's controls (CONTROL_STEPS, docs/method.md section 8), each doing only what is
missing too. `plan` asks the run store the same questions and reports what the stages would do.

Model work (generation, scoring) runs on the request's executor (core/executors.py): in this process,
or on Ray actors. Either way the stages cut the same chunks and this process alone commits them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import keys
from core.config import (ConfigError, ModelEntry, PairConfig, RunRequest, get_dataset, get_pair,
                         load_config)
from core.errors import InputError
from core.executors import GenerationJob, make_executor
from core.faithfulness_stats import RECOVERY_FRACTIONS
from core.graph import ResidualGraph
from core.migrations import migrate
from core.models import ModelSpec, check_loadable, check_same_tokenizer, model_config
from core.runstore import RunStore
from core.selection import (Candidate, EmptySelectionError, Selection, select_questions,
                            t_cut)
from core.settings import MetricSettings, ScoreSettings
from core.store import Store
from core.vocab import NULL_CONTROLS, STAGES

# Grades committed per transaction (symbolic grading can take seconds per answer).
GRADE_COMMIT_EVERY = 200
# Seconds per item assumed by `plan` when the cache has no timing of these models yet ("score": one
# eap forward + backward pass of a sample; EAP-IG makes ig_steps of them).
DEFAULT_SECONDS = {"generate": 2.0, "score": 1.0}
# A forward pass's share of the time of a forward + backward pass, for the faithfulness control's
# forward-only ablations in `plan`.
FORWARD_SHARE = 1 / 3

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class RunSummary:
    run_key: str
    selection: dict
    t_cuts: dict[float, int]
    # Work done by this call, per stage (0 everywhere on a complete rerun).
    done: dict[str, int]
    # Model replicas loaded (by the executor: one per model and stage in this process, one per
    # actor and model on Ray).
    models_loaded: int
    seconds: float
    # Control runs: "<control>:<post label>" -> the run key of the null model vs the base.
    control_runs: dict[str, str] = dataclasses.field(default_factory=dict)


class _Runner:
    def __init__(self, request: RunRequest, progress: Progress | None, log: Callable[[str], None],
                 executor=None, pair: PairConfig | None = None):
        """`pair`: a pair built here (a control's null model vs the base) instead of the
        request's configured one."""
        self.request = request
        self.executor = executor
        self.progress = progress or (lambda stage, done, total: None)
        self.log = log
        self.store = Store(request.cache)
        self.runs = RunStore(self.store)
        config = load_config(request.config, request.cache)
        self.pair = pair or get_pair(request.pair, config)
        self.dataset = get_dataset(request.dataset, config, request.limit)
        # Work per stage, and per control ("cross", and each null's run).
        self.done = dict.fromkeys(STAGES + request.controls, 0)
        self.control_runs: dict[str, str] = {}

    # Identity of models and data, and the prompts (no model weights loaded, nothing written).
    def identify(self) -> None:
        from core.adapters import position_limit
        from core.templates import get_template

        # Every model's files first: a post model that cannot load is found before the base generates.
        check_loadable([(entry.label, entry.spec) for entry in self.pair.models])
        self.hasher = hasher = _FileHasher(self.runs)
        self.model_keys, self.fingerprints, tokenizers = {}, {}, []
        for entry in self.pair.models:
            fingerprint = entry.spec.fingerprint(hasher)
            self.fingerprints[entry.label] = fingerprint
            self.model_keys[entry.label] = keys.model_key(entry.spec.identity(), fingerprint)
            tokenizers.append((entry.label, entry.spec.load_tokenizer()))
        self.template = get_template(self.pair.template)
        # What must match is what the run feeds both models: the vocabulary and the prompts' ids.
        self.tokenizer_fingerprint = check_same_tokenizer(tokenizers, self.template,
                                                          self.dataset.questions)
        self.tokenizer = tokenizers[0][1]
        self.max_new_tokens = self.request.generation.max_new_tokens or self.pair.max_new_tokens
        self.gen_key = keys.generation_settings_key(self.pair.template, self.max_new_tokens,
                                                    self.request.generation)
        self.run_key = keys.run_key(self.pair.name, self.pair.kind, self.model_keys, self.dataset.key,
                                    self.gen_key, self.request.selection, self.request.score)
        self.questions = {q.id: q for q in self.dataset.questions}
        self.prompts = {q.id: self.template.render(q.question, self.tokenizer)[1]
                        for q in self.dataset.questions}
        config = model_config(self.pair.base.spec)
        self.n_layers = int(config.num_hidden_layers)
        self.architecture = (config.architectures or [type(config).__name__])[0]
        self._check_positions(position_limit(config))
        if self.pair.layers is not None and self.pair.layers != self.n_layers:
            raise ConfigError(f"{self.pair.kind} {self.pair.name!r} declares layers = "
                              f"{self.pair.layers} but {self.pair.base.spec} has {self.n_layers}; "
                              f"fix the config or point it at the intended model")

    def _check_positions(self, limit: int | None) -> None:
        """Refuse, before any generation, questions whose prompt plus max_new_tokens answer tokens
        would run past a learned position table of `limit` rows."""
        if limit is None:
            return
        room = limit - self.max_new_tokens + 1  # the last answer token is never fed back
        too_long = sorted(q for q, ids in self.prompts.items() if len(ids) > room)
        if too_long:
            longest = max(len(self.prompts[q]) for q in too_long)
            fix = (f"lower max_new_tokens to at most {limit - longest + 1}, or leave those "
                   f"questions out of the dataset" if longest < limit else
                   "leave those questions out of the dataset (their prompts alone fill it)")
            raise InputError(
                f"{len(too_long)} question(s) of dataset {self.dataset.name!r} (first "
                f"{too_long[0]!r}, up to {longest} prompt tokens) would run past the "
                f"{limit} positions {self.pair.base.spec} has embeddings for with "
                f"max_new_tokens {self.max_new_tokens}; {fix}")

    def generation_key(self, label: str, question_id: str) -> str:
        return keys.generation_key(self.model_keys[label], self.questions[question_id].key,
                                   self.gen_key)

    def generation_keys(self, entries: tuple[ModelEntry, ...] | None = None) -> list[str]:
        """The answers the run needs (of `entries`, default every model), one per question."""
        return [self.generation_key(e.label, q) for e in entries or self.pair.models
                for q in self.questions]

    def record_inputs(self) -> None:
        self.runs.write_inputs([{
            "model_key": self.model_keys[e.label], "label": e.label,
            "spec": json.dumps(e.spec.describe()), "fingerprint": self.fingerprints[e.label],
            "architecture": self.architecture, "n_layers": self.n_layers,
            "tokenizer_fingerprint": self.tokenizer_fingerprint} for e in self.pair.models],
            self.dataset, self.hasher.take_new())

    def generate(self) -> None:
        settings = self.request.generation
        for entry in self.pair.models:
            missing_keys = set(self.runs.missing_generations(self.generation_keys((entry,))))
            # One question per missing answer (two ids with the same content share an answer).
            missing = list({self.generation_key(entry.label, q): q for q in self.questions
                            if self.generation_key(entry.label, q) in missing_keys}.values())
            if not missing:
                continue
            self.log(f"generate: {entry.label}: {len(missing)} of {len(self.questions)} questions")
            began = time.perf_counter()
            job = GenerationJob(entry.spec, self.tokenizer, self.max_new_tokens,
                                tuple(self.template.stop_strings), settings, self.request.score.device)
            # vLLM batches a whole shard itself: one chunk per model replica, one commit each.
            size = (math.ceil(len(missing) / self.executor.replicas)
                    if settings.gen_backend == "vllm" else settings.gen_batch_size)
            chunks = [missing[start:start + size] for start in range(0, len(missing), size)]
            self.progress(f"generate {entry.label}", 0, len(missing))
            done = 0
            for index, generated in self.executor.generate(
                    job, [[self.prompts[q] for q in chunk] for chunk in chunks]):
                self._store_generations(entry.label, chunks[index], generated)
                done += len(chunks[index])
                self.progress(f"generate {entry.label}", done, len(missing))
            self.executor.release()
            self.runs.write_timing(self.run_key, "generate", len(missing), time.perf_counter() - began)

    def _store_generations(self, label: str, question_ids: list[str], generated) -> None:
        seconds, backend = generated.seconds, generated.backend
        self.runs.write_generations([{
            "generation_key": self.generation_key(label, qid), "model_key": self.model_keys[label],
            "question_key": self.questions[qid].key, "dataset_key": self.dataset.key,
            "question_id": qid, "gen_key": self.gen_key, "prompt_ids": list(self.prompts[qid]),
            "answer_ids": list(result.answer_ids),
            "answer_text": self.tokenizer.decode(list(result.answer_ids), skip_special_tokens=True),
            "finish_reason": result.finish_reason, "seconds": seconds, "backend": backend}
            for qid, result in zip(question_ids, generated.generations)])
        self.done["generate"] += len(question_ids)

    def grade(self) -> None:
        from core.grading import grade

        todo = self.runs.ungraded(self.generation_keys())
        if not todo:
            return
        began = time.perf_counter()
        self.progress("grade", 0, len(todo))
        for start in range(0, len(todo), GRADE_COMMIT_EVERY):
            rows = []
            for key, text, reference in todo[start:start + GRADE_COMMIT_EVERY]:
                result = grade(text, reference)
                rows.append({"generation_key": key, "extracted": result.extracted,
                             "correct": result.correct, "rule": result.rule})
                self.progress("grade", start + len(rows), len(todo))
            self.runs.write_grades(rows)
            self.done["grade"] += len(rows)
        self.runs.write_timing(self.run_key, "grade", len(todo), time.perf_counter() - began)

    def choose(self) -> dict[str, tuple[int, ...]]:
        """The selection and T_cut per alpha, from the graded answers (nothing written); returns
        each question's answer lengths."""
        found = self.runs.selection_candidates(self.generation_keys())
        candidates = []
        for qid in self.questions:
            lengths = [found[self.generation_key(e.label, qid)] for e in self.pair.models]
            candidates.append(Candidate(qid, tuple(f[0] for f in lengths),
                                        tuple(f[1] for f in lengths), tuple(f[2] for f in lengths)))
        self.selection = select_questions(candidates, self.request.selection, shared_prompt=True)
        self.t_cuts = {alpha: t_cut(alpha, self.selection.t_bar) for alpha in self.request.alphas}
        return {c.question_id: c.answer_lengths for c in candidates}

    def select(self) -> Selection:
        answer_lengths = self.choose()
        selection = self.selection
        self.log(selection.summary())
        request = self.request
        report = selection.report()
        report["short_answers"] = {  # answers shorter than T_cut are scored whole (the release's slicing)
            str(alpha): sum(min(answer_lengths[q]) < cut for q in selection.question_ids)
            for alpha, cut in self.t_cuts.items()}
        changed = self.runs.write_run(
            {"run_key": self.run_key, "name": self.pair.name, "kind": self.pair.kind,
             "dataset_key": self.dataset.key, "dataset_name": self.dataset.name,
             "gen_key": self.gen_key,
             "gen_settings": json.dumps({**request.generation.as_dict(), "template": self.pair.template,
                                         "max_new_tokens": self.max_new_tokens}),
             "selection_key": request.selection.key(),
             "selection": json.dumps(request.selection.as_dict()),
             "score_key": request.score.key(), "score": json.dumps(request.score.as_dict()),
             "n_layers": self.n_layers, "granularity": request.score.granularity,
             "n_candidates": selection.n_candidates, "n_selected": selection.n_selected,
             "t_bar": selection.t_bar, "selection_report": json.dumps(report)},
            [{"label": e.label, "role": "base" if i == 0 else "post",
              "model_key": self.model_keys[e.label], "algorithm": e.algorithm, "position": i,
              "step": e.step}
             for i, e in enumerate(self.pair.models)],
            [{"label": e.label, "question_id": qid, "position": position,
              "generation_key": self.generation_key(e.label, qid)}
             for e in self.pair.models for position, qid in enumerate(selection.question_ids)],
            self.t_cuts)
        self.done["select"] += int(changed)
        return selection

    def wanted_scores(self, entry: ModelEntry, question_ids=None,
                      t_cuts: dict[float, int] | None = None) -> list[tuple[str, int]]:
        """(generation key, T_cut) of every answer of `entry` the run scores, each once (two alphas
        can cut at the same token); by default the selection's questions and T_cuts."""
        question_ids = self.selection.question_ids if question_ids is None else question_ids
        t_cuts = self.t_cuts if t_cuts is None else t_cuts
        return list(dict.fromkeys((self.generation_key(entry.label, qid), cut)
                                  for qid in question_ids for cut in t_cuts.values()))

    def cross_pairs(self) -> list[tuple[ModelEntry, ModelEntry]]:
        """(scorer, answers) of cross-scoring: each post model on the base's answers and back."""
        return [pair for post in self.pair.posts
                for pair in ((post, self.pair.base), (self.pair.base, post))]

    def score(self) -> None:
        for entry in self.pair.models:
            self._score(entry, entry, "score")

    def cross(self) -> None:
        """Cross-scoring (docs/method.md section 8): S(post, base tokens) and S(base, post
        tokens) at the run's T_cuts, stored as score rows of their scorer."""
        for scorer, tokens in self.cross_pairs():
            self._score(scorer, tokens, "cross")

    def _score(self, scorer: ModelEntry, tokens: ModelEntry, stage: str) -> None:
        """Score `scorer` on the selected answers of `tokens` (its own, or cross), in commit-sized
        chunks through the executor, doing only what the cache lacks. A chunk holds
        `batches_per_commit` batches of `batch_size` rows (core.eap.shared_rows: the cuts of one
        answer that share a forward pass)."""
        from core.eap import Sample, shared_rows

        settings = self.request.score
        question_of = {self.generation_key(tokens.label, q): q for q in self.selection.question_ids}
        todo = self.runs.missing_scores(self.wanted_scores(tokens), settings.key(),
                                        self.model_keys[scorer.label])
        if not todo:
            return
        name = scorer.label if scorer == tokens else f"{scorer.label} on {tokens.label}'s answers"
        answers = self.runs.generation_tokens(list(question_of))
        self.log(f"{stage}: {name}: {len(todo)} samples")
        every_sample = [Sample(question_of[key], tuple(answers[key][0]), tuple(answers[key][1]),
                               min(cut, len(answers[key][1]))) for key, cut in todo]
        rows = shared_rows(every_sample)
        size = settings.batch_size * settings.batches_per_commit
        chunk_rows = [[i for row in rows[start:start + size] for i in row]
                      for start in range(0, len(rows), size)]
        chunks = [[todo[i] for i in chunk] for chunk in chunk_rows]
        samples = [[every_sample[i] for i in chunk] for chunk in chunk_rows]
        self.progress(f"{stage} {name}", 0, len(todo))
        began = time.perf_counter()
        done = 0
        for index, result in self.executor.score(scorer.spec, settings, samples):
            if result.graph.n_layers != self.n_layers:
                raise InputError(f"{scorer.label} has {result.graph.n_layers} layers, the base "
                                 f"{self.n_layers}: a pair must share one architecture")
            done += len(chunks[index])
            # Reported before the commit, so a progress bar shows work the executor finished.
            self.progress(f"{stage} {name}", done, len(todo))
            self._store_scores(scorer.label, chunks[index], samples[index], result)
            self.done[stage] += len(chunks[index])
        self.executor.release()
        self.runs.write_timing(self.run_key, stage, len(todo), time.perf_counter() - began)

    def _store_scores(self, scorer_label, chunk, samples, result) -> None:
        import numpy as np

        graph = result.graph
        parts = (None if result.position_parts is None else
                 np.stack([graph.edges(result.position_parts[:, g])
                           for g in range(result.position_parts.shape[1])], axis=1))
        self.runs.write_scores(self.run_key, [{
            "generation_key": key, "t_cut": cut, "score_key": self.request.score.key(),
            "model_key": self.model_keys[scorer_label], "dataset_key": self.dataset.key,
            "question_id": sample.id, "loss": float(result.loss[i]),
            "seconds": float(result.seconds[i]), "n_scored_tokens": sample.t_cut,
            "scored_text": self.tokenizer.decode(list(sample.answer_ids[:sample.t_cut])),
            "logit_grad_norm": float(result.logit_grad_norm[i]),
            "logits_slot_grad_norm": float(result.logits_slot_grad_norm[i]),
            "residual_norm": float(result.residual_norm[i])}
            for i, ((key, cut), sample) in enumerate(zip(chunk, samples))],
            graph.edges(result.scores), parts)

    # --- null models (docs/method.md section 8) ------------------------------------------------

    def null_pairs(self, control: str) -> list[tuple[str, PairConfig]]:
        """(post label, the pair base vs null model) of a null control, one per post model."""
        if control == "perturb":
            nulls = [(post.label, ModelEntry(
                f"{post.label}-perturb{self.request.perturb_seed}",
                ModelSpec.perturbed(self.pair.base.spec, post.spec, self.request.perturb_seed),
                "random perturbation")) for post in self.pair.posts]
        elif self.pair.seed_null is None:
            raise InputError(f"--controls seed needs a seed null model: give the pair "
                             f"{self.pair.name!r} a `seed_null = {{...}}` in its config (a "
                             f"post-training that differs only in seed)")
        else:
            nulls = [(self.pair.posts[0].label, self.pair.seed_null)]
        return [(label, dataclasses.replace(
            self.pair, name=f"{self.pair.name}:{control}:{label}", kind="pair", posts=(entry,),
            seed_null=None)) for label, entry in nulls]

    def null_runner(self, pair: PairConfig) -> "_Runner":
        request = dataclasses.replace(self.request, controls=())
        runner = _Runner(request, self.progress, self.log, self.executor, pair=pair)
        # This run's Store holds the writer lock (re-entrant within one Store only).
        runner.store, runner.runs = self.store, self.runs
        return runner

    def null_control(self, control: str) -> None:
        """Run each null model against the base through every stage, as a pair run of its own,
        and link it to this run."""
        for post_label, pair in self.null_pairs(control):
            self.log(f"{control}: {pair.posts[0].label} vs {pair.base.label} ({pair.posts[0].spec})")
            runner = self.null_runner(pair)
            try:
                runner.execute()
            except EmptySelectionError as error:
                # A null that solves nothing the base solves has no comparison to show; the run
                # itself is complete, so say so and go on.
                self.log(f"{control}: no control run for {post_label}: {error}")
                continue
            self.runs.write_control(self.run_key, post_label, control, runner.run_key)
            self.control_runs[f"{control}:{post_label}"] = runner.run_key
            self.done[control] += sum(runner.done.values())

    # --- faithfulness (docs/method.md section 8) ------------------------------------------------

    def wanted_faithfulness(self) -> list[tuple[float, str]]:
        return [(alpha, entry.label) for alpha in self.request.alphas for entry in self.pair.models]

    def faithfulness(self) -> None:
        """The faithfulness control: core.faithfulness.model_faithfulness of each model at each
        alpha on the run's first questions, under the run's score settings; one model in memory at
        a time, each (alpha, model) committed as one row."""
        from core.faithfulness import model_faithfulness, read_run_samples

        settings, score = self.request.faithfulness, self.request.score
        settings_key = settings.stored_key(score)
        todo = self.runs.missing_faithfulness(self.run_key, settings_key, self.wanted_faithfulness())
        if not todo:
            return
        self.progress("faithfulness", 0, len(todo))
        for entry in self.pair.models:
            alphas = [alpha for alpha, label in todo if label == entry.label]
            if not alphas:
                continue
            self.log(f"faithfulness: {entry.label} at alphas {alphas}: {settings.edges_per_sample} "
                     f"edges on each of the first {settings.questions} questions, and recovery")
            # The executor's replica (if any) goes first: two large models rarely fit together.
            self.executor.release()
            model = entry.spec.load(dtype=score.dtype, device=score.device)
            for alpha in alphas:
                began = time.perf_counter()
                run = read_run_samples(self.store, self.run_key, alpha, settings.questions)
                report = model_faithfulness(run.model(entry.label), model, score,
                                            settings.edges_per_sample, settings.seed, settings.copies)
                self.runs.write_faithfulness(self.run_key, alpha, entry.label, settings_key,
                                             settings.stored_settings(score),
                                             {"t_cut": run.t_cut, "questions": run.question_ids,
                                              **report})
                self.runs.write_timing(self.run_key, "faithfulness", 1, time.perf_counter() - began)
                self.done["faithfulness"] += 1
                self.progress("faithfulness", self.done["faithfulness"], len(todo))
            del model

    def execute(self) -> None:
        """Every stage, then the request's controls (after metrics: the default comparison never
        waits for them)."""
        self.identify()
        self.record_inputs()
        self.generate()
        self.grade()
        self.select()
        self.score()
        self.metrics()
        for control in self.request.controls:
            CONTROL_STEPS[control](self)

    def wanted_metrics(self) -> list[tuple[str, float]]:
        return [(entry.label, alpha) for entry in self.pair.posts for alpha in self.request.alphas]

    def metrics(self) -> None:
        from core.query import ResultCache

        settings = MetricSettings()
        todo = self.runs.missing_metrics(self.run_key, settings.key(), self.wanted_metrics())
        if self.selection.n_selected < 2:
            self.log(f"metrics: skipped, they need at least 2 questions and {self.selection.n_selected} "
                     f"was selected; the scores are stored")
            return
        cache = ResultCache(self.store)
        for label, alpha in todo:
            _, ids = cache.sample_edges(self.run_key, alpha, "base")
            if len(ids) < self.selection.n_selected:
                continue  # not every selected question is scored (cannot happen after score)
            began = time.perf_counter()
            comparison = cache.comparison(self.run_key, alpha, post_label=label, settings=settings)
            self.runs.write_metrics(self.run_key, label, alpha, settings, comparison.to_dict())
            self.done["metrics"] += 1
            self.runs.write_timing(self.run_key, "metrics", 1, time.perf_counter() - began)


def run(request: RunRequest, progress: Progress | None = None,
        log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) `request`; only missing work is done. Holds the cache's writer lock; a cache
    of an older schema version is migrated first (a copy of it is kept, see migrations.migrate)."""
    began = time.perf_counter()
    executor = make_executor(request.executor, request.ray_address, request.ray_actors,
                             request.score.device, log)
    runner = _Runner(request, progress, log, executor)
    try:
        with runner.store.writer_lock(wait=False):
            migrate(runner.store, log)
            runner.execute()
    finally:
        executor.close()
    return RunSummary(runner.run_key, runner.selection.report(), runner.t_cuts, runner.done,
                      executor.models_loaded, time.perf_counter() - began, runner.control_runs)


# What each control of core.vocab.CONTROLS does, given the run's runner after its stages; a
# new control (e.g. faithfulness) is one entry here and one name there.
CONTROL_STEPS: dict[str, Callable[[_Runner], None]] = {
    "cross": _Runner.cross,
    "perturb": lambda runner: runner.null_control("perturb"),
    "seed": lambda runner: runner.null_control("seed"),
    "faithfulness": _Runner.faithfulness,
}


def plan(request: RunRequest) -> dict[str, Any]:
    """Work items missing per stage, as the stages will count them, and rough seconds; asks the run
    store what the stages ask. Loads tokenizers but no model, and writes nothing. Which questions
    are selected is known once every answer is graded; before that, scores are counted for n
    questions (the most). Controls: "cross" and "faithfulness" (reports, one per model and alpha)
    are counted like stages; each null model's run is planned in full under `controls` ("<control>:
    <post label>" -> its plan). Seconds: each stage's (`stage_seconds`) from these models' past
    timings per sample, scaled by the passes of the score method (EAP-IG: ig_steps), plus the null
    runs'."""
    runner = _Runner(request, None, lambda text: None)
    return _plan(runner)


def _plan(runner: _Runner) -> dict[str, Any]:
    request = runner.request
    runner.identify()
    runs, models = runner.runs, runner.pair.models
    keys_ = runner.generation_keys()
    generate = len(runs.missing_generations(keys_))
    grade = generate + len(runs.ungraded(keys_))
    state = runs.run_state(runner.run_key)
    select = 1 if state is None else int(bool(set(request.alphas) - set(state.t_cuts)))
    selection = None  # known once every answer is graded and the run is not cached yet
    n_cross = len(runner.cross_pairs()) if "cross" in request.controls else 0
    if state is None and grade:
        n_selected = min(request.selection.n, len(runner.questions))
        score = n_selected * len(models) * len(request.alphas)
        cross = n_selected * n_cross * len(request.alphas)
    else:
        if state is None:
            runner.choose()  # the selection the select stage will make
            question_ids, t_cuts = runner.selection.question_ids, runner.t_cuts
            n_selected = runner.selection.n_selected
            selection = runner.selection.report()
        else:
            t_cuts = {a: state.t_cuts.get(a, t_cut(a, state.t_bar)) for a in request.alphas}
            base = runner.pair.base.label
            selected = {key for label, key in state.samples if label == base}
            question_ids = [qid for qid in runner.questions
                            if runner.generation_key(base, qid) in selected]
            n_selected = state.n_selected

        def missing(scorer: ModelEntry, tokens: ModelEntry) -> int:
            return len(runs.missing_scores(runner.wanted_scores(tokens, question_ids, t_cuts),
                                           request.score.key(), runner.model_keys[scorer.label]))
        score = sum(missing(entry, entry) for entry in models)
        cross = sum(missing(scorer, tokens) for scorer, tokens in runner.cross_pairs()[:n_cross])
    metrics = (len(runs.missing_metrics(runner.run_key, MetricSettings().key(), runner.wanted_metrics()))
               if n_selected >= 2 else 0)
    missing_work = {"generate": generate, "grade": grade, "select": select, "score": score,
                    "metrics": metrics}
    if "cross" in request.controls:
        missing_work["cross"] = cross
    if "faithfulness" in request.controls:
        missing_work["faithfulness"] = (
            len(runner.wanted_faithfulness()) if state is None else len(runs.missing_faithfulness(
                runner.run_key, request.faithfulness.stored_key(request.score),
                runner.wanted_faithfulness())))
    past = runs.past_seconds(list(runner.model_keys.values()))
    one_pass = _seconds_per_pass(past["score"])
    per_sample = one_pass * request.score.passes
    stage_seconds = {"generate": generate * (past["generate"] or DEFAULT_SECONDS["generate"]),
                     "score": score * per_sample}
    if "cross" in request.controls:
        stage_seconds["cross"] = cross * per_sample
    if "faithfulness" in request.controls:
        stage_seconds["faithfulness"] = (missing_work["faithfulness"]
                                         * min(request.faithfulness.questions, n_selected)
                                         * _faithfulness_passes(runner) * one_pass)
    plans = {f"{control}:{label}": _plan(runner.null_runner(pair))
             for control in request.controls if control in NULL_CONTROLS
             for label, pair in runner.null_pairs(control)}
    return {"run_key": runner.run_key, "questions": len(runner.questions),
            "models": [e.label for e in models], "missing": missing_work, "selection": selection,
            "seconds": round(sum(stage_seconds.values())
                             + sum(p["seconds"] for p in plans.values()), 1),
            "stage_seconds": {stage: round(value, 1) for stage, value in stage_seconds.items()},
            "controls": plans}


def _seconds_per_pass(scored: list[tuple[dict, float, int]]) -> float:
    """Seconds of one eap pass of a sample: the models' past scoring time per sample, each score
    key's divided by its method's passes (a forward and a backward pass, less where an answer's cuts
    shared the forward pass); DEFAULT_SECONDS where none is known."""
    known = [(seconds, n, settings) for settings, seconds, n in scored if seconds is not None]
    if not known:
        return DEFAULT_SECONDS["score"]
    total = sum(seconds * n / ScoreSettings.method_of(settings).passes
                for seconds, n, settings in known)
    return total / sum(n for _, n, _ in known)


def _faithfulness_passes(runner: _Runner) -> float:
    """One question's faithfulness work in eap passes: scoring it (the method's passes), then one
    forward pass per ablated edge, one clean, and one per recovery fraction."""
    request = runner.request
    n_edges = ResidualGraph(runner.n_layers, request.score.granularity).n_edges
    forward = min(request.faithfulness.edges_per_sample, n_edges) + 1 + len(RECOVERY_FRACTIONS)
    return request.score.passes + FORWARD_SHARE * forward


class _FileHasher:
    """sha256 of files, memoised in the cache by (path, size, mtime) so large weights are hashed once."""

    def __init__(self, runs: RunStore):
        from core.models import sha256_file

        self._hash = sha256_file
        self.known = runs.file_hashes()
        self.new: list[dict] = []

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

    def take_new(self) -> list[dict]:
        """Hashes computed since the last call, to be written with the run's inputs."""
        new, self.new = self.new, []
        return new
