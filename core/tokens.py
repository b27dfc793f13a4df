"""The token view (docs/method.md section 8): for one question of a run, which answer tokens carry the
change of the edges that changed most.

W[s, d] = -sum_t O_s[t] . G_d[t] is a sum over positions. For the k edges whose mean |W| changed most
between the base and a post model (`TOKEN_VIEW_MEASURE`, over the run's questions at the alpha), each
model's own answer to the question, cut at the run's T_cut, is scored again with the run's score
settings, its answer positions apart (core.eap.score_samples(answer_positions=True)): per edge, the
first token's part, the rest of the prompt's, and one term per answer token fed as input; they sum to
the engine's W. Models are loaded from the specs the run recorded, one at a time, and refused when
their files no longer match the run's fingerprints.

Computed on demand by a job (core.jobs.start_token_view runs `python -m core tokens`), written to
the cache table `token_views` (one row per run, alpha, question and `token_view_key`) and read back
by core.query.ResultCache.token_view.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import numpy as np

from core.eap import score_samples
from core.errors import InputError, NotFoundError
from core.faithfulness import RunModel, read_run_samples
from core.query import ResultCache
from core.settings import ScoreSettings, stable_hash
from core.store import Store, now

# The edges shown are the k largest |mean|W_post| - mean|W_base||: the ratio would pick weak edges
# whose base mean is near 0.
TOKEN_VIEW_MEASURE = "difference"
# Steps a token view reports as progress: load and score the base, then the post model; write.
STEPS = 5

Progress = Callable[[str, int, int], None]


def token_view_key(post_label: str, k: int) -> str:
    """The `settings_key` of a stored view: what, besides the run, alpha and question, chose it."""
    return stable_hash(["token view", post_label, k, TOKEN_VIEW_MEASURE])


def changed_edges(cache: ResultCache, run_key: str, alpha: float, post_label: str,
                  k: int) -> list[dict]:
    """The k real edges (at the run's granularity) whose mean |W| changed most from the base to the
    post model, largest change first, with both models' mean |W|."""
    graph = cache.graph(run_key)
    change = cache.edge_change(run_key, alpha, TOKEN_VIEW_MEASURE, post_label=post_label)
    means = cache.mean_matrices(run_key, alpha, post_label=post_label)
    src, dst = np.nonzero(graph.real_edge_mask)
    order = np.argsort(-np.abs(change[src, dst]), kind="stable")[:k]
    return [{"src": graph.src_names[src[e]], "dst": graph.dst_names[dst[e]],
             "change": float(change[src[e], dst[e]]),
             "base_mean_abs": float(means["base_abs"][src[e], dst[e]]),
             "post_mean_abs": float(means["post_abs"][src[e], dst[e]])} for e in order]


@dataclasses.dataclass(frozen=True)
class _RunInfo:
    alpha: float
    post_label: str
    n_selected: int
    score: ScoreSettings


def _run_info(cache: ResultCache, run_key: str, alpha: float, post_label: str | None) -> _RunInfo:
    """The run's own alpha equal to `alpha`, the post model (None: the first), its question count
    and score settings; InputError or NotFoundError naming what is absent."""
    runs = cache.runs()
    rows = runs[runs["run_key"] == run_key]
    if rows.empty:
        raise NotFoundError(f"the cache {cache.store.path} has no run {run_key!r}; `python -m core "
                            f"ls --cache {cache.store.path}` lists its runs")
    post = rows["post_label"].iloc[0] if post_label is None else post_label
    if post not in set(rows["post_label"]):
        raise InputError(f"run {run_key} has no post model {post!r}; its post models are "
                         f"{list(rows['post_label'])}")
    row = rows.iloc[0]
    own = next((a for a in row["alphas"] if math.isclose(a, alpha, rel_tol=1e-9, abs_tol=1e-12)),
               None)
    if own is None:
        raise InputError(f"run {run_key} has no alpha {alpha}; its alphas are {row['alphas']}")
    return _RunInfo(own, post, int(row["n_selected"]),
                    ScoreSettings.from_dict(row["settings"]["score"]))


def _question_sample(entry: RunModel, question_id: str, run_key: str):
    found = [sample for sample in entry.samples if sample.id == question_id]
    if not found:
        raise NotFoundError(f"run {run_key} has no selected question {question_id!r} for "
                            f"{entry.label}; the Samples page lists the run's questions")
    return found[0]


def compute_token_view(store: Store, run_key: str, alpha: float, question_id: str,
                       post_label: str | None, k: int, device: str | None = None,
                       progress: Progress | None = None, log: Callable[[str], None] = print) -> dict:
    """The token view of one question for the base and one post model (None: the run's first),
    with the run's score settings (`device` overrides where the models run); reads the cache only."""
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    cache = ResultCache(store)
    info = _run_info(cache, run_key, alpha, post_label)
    settings = info.score if device is None else dataclasses.replace(info.score, device=device)
    edges = changed_edges(cache, run_key, info.alpha, info.post_label, k)
    graph = cache.graph(run_key)
    chosen = [(graph.src_index(e["src"]), graph.dst_index(e["dst"])) for e in edges]
    run = read_run_samples(store, run_key, info.alpha, info.n_selected)
    entries = [run.models[0], run.model(info.post_label)]  # the base first
    samples = [_question_sample(entry, question_id, run_key) for entry in entries]
    report = progress or (lambda stage, done, total: None)
    models = []
    for step, (entry, sample) in enumerate(zip(entries, samples)):
        report(f"load {entry.label}", 2 * step, STEPS)
        model = entry.load(run_key, settings)
        tokenizer = entry.spec.load_tokenizer()
        report(f"score {entry.label}", 2 * step + 1, STEPS)
        log(f"{entry.label}: question {question_id}, T_cut {sample.t_cut}")
        result = score_samples(model, [sample], settings, answer_positions=True)
        del model
        parts = result.position_parts[0]
        n_answer = sample.t_cut - 1
        models.append({
            "label": entry.label, "role": entry.role, "t_cut": sample.t_cut,
            "loss": float(result.loss[0]),
            "tokens": [tokenizer.decode([token]) for token in sample.answer_ids[:n_answer]],
            "w": [float(result.scores[0, s, d]) for s, d in chosen],
            "first_token": [float(parts[0, s, d]) for s, d in chosen],
            "prompt_rest": [float(parts[1, s, d]) for s, d in chosen],
            "contributions": [parts[2:2 + n_answer, s, d].astype(float).tolist() for s, d in chosen]})
    return {"run_key": run_key, "alpha": info.alpha, "t_cut": run.t_cut, "question_id": question_id,
            "post_label": info.post_label, "k": k, "measure": TOKEN_VIEW_MEASURE,
            "score": {"granularity": settings.granularity, "dtype": settings.dtype,
                      **settings.method_description()},
            "edges": edges, "models": models}


def write_token_view(store: Store, view: dict) -> None:
    """Store a view (replacing one of the same run, alpha, question, post model and k)."""
    with store.write() as con:
        Store.insert_rows(con, "token_views", [{
            "run_key": view["run_key"], "alpha": view["alpha"], "question_id": view["question_id"],
            "settings_key": token_view_key(view["post_label"], view["k"]),
            "view": json.dumps(view, allow_nan=False), "created_at": now()}], replace=True)


def run_token_view(store: Store, run_key: str, alpha: float, question_id: str,
                   post_label: str | None, k: int, device: str | None = None,
                   progress: Progress | None = None, log: Callable[[str], None] = print) -> dict:
    """Compute and store a token view, holding the cache's writer lock throughout (as a run does),
    so that its write cannot find the cache taken by a run started meanwhile."""
    with store.writer_lock(wait=False):
        view = compute_token_view(store, run_key, alpha, question_id, post_label, k, device,
                                  progress, log)
        report = progress or (lambda stage, done, total: None)
        report("write", STEPS - 1, STEPS)
        write_token_view(store, view)
        report("write", STEPS, STEPS)
    return view
