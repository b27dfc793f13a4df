"""The read model: every view the dashboard shows, shaped for the page, from the result cache
(core/store.py). Pages lay views out; they compute nothing themselves.

Views take the graph granularity (None = the run's own; a `module` view of a `qkv` run sums each
attention block's q/k/v slots, docs/method.md section 2) and the metric conventions
(MetricSettings, docs/method.md section 6). Views that compare the two models' samples need at least
MIN_QUESTIONS questions complete for every model at the alpha and raise TooFewQuestionsError (a
ValueError whose message the page can show) otherwise.

Sample matrices of a run at an alpha hold the questions scored for EVERY model of the run (a run still
being computed shows its complete questions only), in the run's selection order, so sample k of every
model is the same question.

Consistency and caching (one snapshot per call, a memo per run's content key): core/snapshot.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import metrics, trajectory
from core.circuit import Circuit, build_circuit
from core.errors import NotFoundError
from core.faithfulness_stats import agreement, compare_recovery, rank_correlation
from core.graph import ResidualGraph
from core.settings import MetricSettings, ScoreSettings, SelectionSettings
from core.snapshot import SnapshotReader, public
from core.store import Store, fetch_one, fetch_vectors, vector_table
from core.vocab import GRANULARITIES, ROLES

# Re-exported for the pages, which may import only this module of the read side.
from core.circuit import RANK_BY  # noqa: F401
from core.faithfulness_stats import RECOVERY_TARGET  # noqa: F401
from core.metrics import (EDGE_MEASURES, METRICS, PAPER_DIRECTION, PER_SAMPLE_METRICS,  # noqa: F401
                          PRIMARY_MARK, AllZeroSampleError, overview_cell)
from core.snapshot import RunNotFoundError  # noqa: F401
# The Compute page's "New pair": declare, check (in a child process) and save a pair made there.
from core.user_pairs import (MAX_DATASET_BYTES, MODEL_SOURCES, TEMPLATE_NAMES,  # noqa: F401
                             ProblemsError, Upload, check_new_pair, model_declaration,
                             pair_declaration, save_user_pair)

BASE_ROLE, POST_ROLE = ROLES
# Every view comparing samples needs pairs of them (diversity correlates pairs; the bootstrap and
# the per-edge tests need more than one question).
MIN_QUESTIONS = 2

# ci_low, ci_high: the % change's (log-ratio) interval, NaN on the difference scale; change_low,
# change_high: the difference's; `scale` says which one is reported (core.metrics.CHANGE_SCALES).
METRIC_TABLE_COLUMNS = ("run_key", "pair", "dataset", "post_label", "alpha", "metric", "base", "post",
                        "change_pct", "ci_low", "ci_high", "direction", "settings_key", "scale",
                        "change", "change_low", "change_high", "clear_sign", "p", "wilcoxon_p",
                        "n", "t_cut", "alphas", "pooled", "left_out")
# The Overview's rows (`overview`): the pooled cells of the metrics shown, with the permutation p
# Holm-adjusted across them and the primary cells (MetricSettings.primary) marked.
OVERVIEW_COLUMNS = (*METRIC_TABLE_COLUMNS, "p_holm", "primary")
# One row per (run, post model, alpha): whether the Overview and the Figure-3a summary pool it, and
# why not (docs/method.md section 7).
POOLING_COLUMNS = ("run_key", "pair", "dataset", "post_label", "alpha", "t_cut", "alphas",
                   "n_complete", "n_selected", "pooled", "left_out")
RUNS_COLUMNS = ("run_key", "pair", "kind", "dataset", "base_label", "post_label", "algorithm",
                "granularity", "n_layers", "alphas", "t_cuts", "n_complete", "n_selected",
                "n_candidates", "t_bar", "created_at", "updated_at", "settings", "selection_report",
                "code_version")
# Columns of `samples` besides question_id and the per-sample metrics: (shown name, stored column)
# for each model, as base_<name> and post_<name>.
_SAMPLE_FIELDS = (("text", "answer_text"), ("correct", "correct"), ("answer", "extracted"),
                  ("answer_len", "answer_len"), ("finish_reason", "finish_reason"),
                  ("truncated_text", "scored_text"), ("scored_tokens", "n_scored_tokens"),
                  ("loss", "loss"))

# (t_cut, question) pairs of a run scored for EVERY one of its models, at any of its T_cuts; a
# model's own scores only (scorer = the answer's model: cross scores are the controls').
_COMPLETE_SQL = """
    complete AS (
        SELECT s.t_cut, rs.question_id FROM run_samples rs
        JOIN run_models own ON own.run_key = rs.run_key AND own.label = rs.label
        JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = $score_key
                     AND s.model_key = own.model_key
        WHERE rs.run_key = $run_key
          AND s.t_cut IN (SELECT t_cut FROM run_alphas WHERE run_key = $run_key)
        GROUP BY s.t_cut, rs.question_id
        HAVING count(*) = (SELECT count(*) FROM run_models WHERE run_key = $run_key))
"""
# Joins that keep the own score rows of complete questions only (`rs` run_samples, `s` scores).
_JOIN_COMPLETE = """
    JOIN run_models own ON own.run_key = rs.run_key AND own.label = rs.label
    JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = $score_key
                 AND s.model_key = own.model_key
    JOIN complete c ON c.question_id = rs.question_id AND c.t_cut = s.t_cut
"""


# Fields that cannot change a result (batch size, device): a difference in them is no reason.
_NOT_IN_KEY = {cls: {f.name for f in dataclasses.fields(cls) if not f.metadata.get("in_key", True)}
               for cls in (ScoreSettings, SelectionSettings)}


@dataclasses.dataclass(frozen=True)
class ControlsSummary:
    """`ResultCache.controls_summary`: the table, and per control not computed (cross, null,
    positions) the message saying what to run."""

    table: pd.DataFrame
    missing: dict[str, str]


def _variant(settings: MetricSettings) -> tuple[str, str]:
    """The metric settings that change the matrices themselves (docs/method.md section 8)."""
    return settings.positions, settings.normalise


def _settings_difference(settings: dict[str, dict], reference: dict[str, dict]) -> str:
    """Why a run is not pooled: its score and selection settings that differ from the pooled
    group's, e.g. "selection beta 0.0 (pooled: 0.5)"."""
    differences = [f"{group} {name} {value} (pooled: {reference[group].get(name)})"
                   for group, cls in (("score", ScoreSettings), ("selection", SelectionSettings))
                   for name, value in settings[group].items()
                   if value != reference[group].get(name) and name not in _NOT_IN_KEY[cls]]
    return "settings differ from the pooled runs': " + ", ".join(differences)


def _method_label(settings: ScoreSettings) -> str:
    """A scoring method as the views name it: "eap", or "eap-ig (5 steps, zero baseline)"."""
    if settings.method == "eap-ig":
        return f"eap-ig ({settings.ig_steps} steps, {settings.ig_baseline} baseline)"
    return settings.method


class TooFewQuestionsError(ValueError):
    """A view that compares samples was asked for where fewer than MIN_QUESTIONS questions are
    complete for every model of the run; the message says how many and what to do."""


class ControlNotComputedError(ValueError):
    """A controls view or metric variant needs data the run does not hold yet (cross scores, a null
    run, position parts or norms); the message names the command that computes it."""


# The command that computes the controls of a run, for the messages that ask for it.
CONTROLS_COMMAND = "python -m core run --pair PAIR --dataset DATASET ... --controls cross,perturb"
# Columns of `decomposition`: per part (total, weights, tokens) its point value and interval.
DECOMPOSITION_COLUMNS = ("metric", *(f"{part}{suffix}" for part in metrics.DECOMPOSITION_PARTS
                                     for suffix in ("", "_low", "_high")),
                         "symmetric_weights", "symmetric_tokens", "n")
# Columns of `controls_summary`'s table: the change on the difference scale (post - base) and its
# parts, the null's change, the position variants' changes, the loss correlations.
CONTROLS_COLUMNS = ("metric", "change", "change_low", "change_high", "weights", "weights_low",
                    "weights_high", "tokens", "tokens_low", "tokens_high", "null", "null_low",
                    "null_high", "exceeds_null", "no_sink", "answer_only", "loss_rho_base",
                    "loss_rho_post")
NULL_MARK_COLUMNS = ("run_key", "post_label", "alpha", "metric", "exceeds_null")
# Columns of `null_comparison`: the real change and each linked null run's change at its nearest
# T_cut, on the reported scale of each (`change_pct` NaN on the difference scale).
NULL_COLUMNS = ("metric", "control", "change", "change_low", "change_high", "change_pct",
                "change_pct_low", "change_pct_high", "scale", "null_change", "null_change_low",
                "null_change_high", "null_change_pct", "null_scale", "null_alpha", "null_t_cut",
                "null_n", "exceeds_null", "control_run_key")
# The command that computes the faithfulness control, for the messages that ask for it.
FAITHFULNESS_COMMAND = ("python -m core run --pair PAIR --dataset DATASET ... --controls "
                        "faithfulness")
# Columns of the faithfulness views (docs/method.md section 8), one model per `label`.
FAITHFULNESS_EDGE_COLUMNS = ("label", "role", "sample_id", "src", "dst", "stratum", "w", "delta")
# One row per model, stratum (core.faithfulness_stats.STRATA) and statistic (AGREEMENT_STATISTICS).
FAITHFULNESS_AGREEMENT_COLUMNS = ("label", "role", "stratum", "statistic", "value", "low", "high",
                                  "n_questions", "n_edges")
RECOVERY_CURVE_COLUMNS = ("label", "role", "fraction", "n_kept", "f", "low", "high")
RECOVERY_AREA_COLUMNS = ("label", "role", "area", "low", "high")
# `recovery_k`: the kept fraction where recovery reaches faithfulness_stats.RECOVERY_TARGET; its row
# of role K_RATIO holds the post's k over the base's.
RECOVERY_K_COLUMNS = ("label", "role", "k", "low", "high")
K_RATIO = "post / base"
# The role of `recovery_areas`' row of the post's area minus the base's.
AREA_DIFFERENCE = "post - base"
METHOD_RUN_COLUMNS = ("run_key", "method", "ig_steps", "dtype", "alphas", "n_selected",
                      "created_at")
# Columns of `method_agreement`: per other-method run, rows of kind "edges" (per model, the Spearman
# correlation of the two methods' mean |W| over the real edges) and "metric" (per metric, both
# changes post - base, their clear signs and whether their signs agree).
METHOD_AGREEMENT_COLUMNS = ("other_run_key", "method", "other_method", "kind", "name", "role",
                            "spearman", "n", "change", "other_change", "clear_sign",
                            "other_clear_sign", "agrees")


@dataclasses.dataclass(frozen=True)
class PairView:
    """Both models' per-sample matrices [n, n_src, n_dst] (float32, read-only) at one alpha and
    granularity; sample k of both is question_ids[k]."""

    graph: ResidualGraph
    base: np.ndarray
    post: np.ndarray
    question_ids: tuple[str, ...]


class ResultCache(SnapshotReader):
    """Read access to one cache file. Missing file = empty cache. Safe to share between threads (a
    dashboard serves several sessions from one instance)."""

    @classmethod
    def open(cls, path: str | Path | None = None) -> "ResultCache":
        return cls(Store(path))

    # --- runs -----------------------------------------------------------------------------------

    def version(self) -> tuple:
        """The cache's version token (a file stat, no query): changes with every commit; the key of
        figures over all runs."""
        return self.store.version_token()

    @public
    def content_key(self, run_key: str) -> str:
        """Changes whenever the run's stored data change."""
        return self._scope(run_key)

    @public
    def is_empty(self) -> bool:
        return not self._run_keys()

    @public
    def runs(self) -> pd.DataFrame:
        """One row per (run, post model). `n_complete[i]`: questions scored for every model of the
        run at `alphas[i]` (equal to n_selected once the run is complete)."""
        if self.is_empty():
            return pd.DataFrame(columns=list(RUNS_COLUMNS))
        return self._cached(None, ("runs",), self._runs)

    def _runs(self) -> pd.DataFrame:
        table = self._sql("""
            SELECT r.run_key, r.name AS pair, r.kind, r.dataset_name AS dataset,
                   b.label AS base_label, p.label AS post_label, p.algorithm, r.granularity,
                   r.n_layers, r.n_selected, r.n_candidates, r.t_bar, r.created_at, r.updated_at,
                   r.selection, r.score, r.gen_settings, r.selection_report, r.code_version,
                   (SELECT list(alpha ORDER BY alpha) FROM run_alphas a WHERE a.run_key = r.run_key)
                       AS alphas,
                   (SELECT list(t_cut ORDER BY alpha) FROM run_alphas a WHERE a.run_key = r.run_key)
                       AS t_cuts
            FROM runs r
            JOIN run_models b ON b.run_key = r.run_key AND b.role = $base
            JOIN run_models p ON p.run_key = r.run_key AND p.role = $post
            ORDER BY r.created_at, r.run_key, p.position""", {"base": BASE_ROLE, "post": POST_ROLE})
        table["alphas"] = [list(map(float, a)) if a is not None else [] for a in table["alphas"]]
        table["t_cuts"] = [list(map(int, t)) if t is not None else [] for t in table["t_cuts"]]
        table["settings"] = [{"selection": json.loads(s), "score": json.loads(c),
                              "generation": json.loads(g)}
                             for s, c, g in zip(table["selection"], table["score"],
                                                table["gen_settings"])]
        table["selection_report"] = [json.loads(s) if s else {} for s in table["selection_report"]]
        complete = self._sql("""
            WITH per_question AS (
                SELECT rs.run_key, s.t_cut, rs.question_id, count(*) AS n FROM run_samples rs
                JOIN runs r ON r.run_key = rs.run_key
                JOIN run_models own ON own.run_key = rs.run_key AND own.label = rs.label
                JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = r.score_key
                             AND s.model_key = own.model_key
                GROUP BY ALL),
            models AS (SELECT run_key, count(*) AS n FROM run_models GROUP BY run_key)
            SELECT q.run_key, q.t_cut, count(*) AS n FROM per_question q
            JOIN models m ON m.run_key = q.run_key AND m.n = q.n
            GROUP BY ALL""")
        n_complete = {(r.run_key, r.t_cut): int(r.n) for r in complete.itertuples()}
        table["n_complete"] = [[n_complete.get((key, t), 0) for t in t_cuts]
                               for key, t_cuts in zip(table["run_key"], table["t_cuts"])]
        return table[list(RUNS_COLUMNS)].reset_index(drop=True)

    def _run(self, run_key: str) -> dict[str, Any]:
        return self._cached(run_key, ("run",), lambda: self._runs_described()[run_key])

    def _runs_described(self) -> dict[str, dict[str, Any]]:
        """Every run's name, graph, score key, models and T_cuts, read in three queries: views over
        all runs (the metric table, the Overview) need each, and a query per run cost more."""
        def load() -> dict[str, dict[str, Any]]:
            con = self._connection()
            models: dict[str, list[tuple[str, str]]] = {}
            for key, label, role in con.execute("SELECT run_key, label, role FROM run_models "
                                                "ORDER BY run_key, position").fetchall():
                models.setdefault(key, []).append((label, role))
            alphas: dict[str, dict[float, int]] = {}
            for key, alpha, t_cut in con.execute("SELECT run_key, alpha, t_cut FROM run_alphas"
                                                 ).fetchall():
                alphas.setdefault(key, {})[alpha] = t_cut
            return {key: {"name": name, "graph": ResidualGraph(n_layers, granularity),
                          "score_key": score_key,
                          "base": next(label for label, role in models[key] if role == BASE_ROLE),
                          "posts": [label for label, role in models[key] if role == POST_ROLE],
                          "t_cuts": alphas.get(key, {})}
                    for key, name, n_layers, granularity, score_key in con.execute(
                        "SELECT run_key, name, n_layers, granularity, score_key FROM runs"
                    ).fetchall()}
        return self._cached(None, ("runs described",), load)

    def _label(self, run_key: str, model: str | None) -> str:
        """The stored label of `model`: 'base', a label, or None for the first post model."""
        run = self._run(run_key)
        if model is None:
            return run["posts"][0]
        if model == BASE_ROLE:
            return run["base"]
        if model == run["base"] or model in run["posts"]:
            return model
        raise KeyError(f"run {run_key!r} has no model {model!r}; its models are 'base' "
                       f"({run['base']}) and {run['posts']}")

    def _alpha(self, run_key: str, alpha: float) -> tuple[float, int]:
        """The run's own alpha equal to `alpha` (up to rounding) and its T_cut."""
        t_cuts = self._run(run_key)["t_cuts"]
        for known, t_cut in t_cuts.items():
            if math.isclose(known, alpha, rel_tol=1e-9, abs_tol=1e-12):
                return float(known), int(t_cut)
        raise KeyError(f"run {run_key!r} has no alpha {alpha}; its alphas are {sorted(t_cuts)}")

    def _granularity(self, run_key: str, granularity: str | None) -> str:
        own = self._run(run_key)["graph"].granularity
        if granularity is None or granularity == own:
            return own
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is not one of {list(GRANULARITIES)}")
        if own == "module":
            raise ValueError(f"run {run_key!r} is scored at granularity module; a {granularity} "
                             f"view needs its slots scored apart: rerun with --granularity "
                             f"{granularity}")
        return granularity

    @public
    def graph(self, run_key: str, granularity: str | None = None) -> ResidualGraph:
        """The residual graph of the run's views at `granularity` (None: the run's own)."""
        own = self._run(run_key)["graph"]
        view = self._granularity(run_key, granularity)
        return own if view == own.granularity else ResidualGraph(own.n_layers, view)

    # --- sample matrices ------------------------------------------------------------------------

    @public
    def sample_edges(self, run_key: str, alpha: float, model: str) -> tuple[np.ndarray, list[str]]:
        """Real-edge vectors [n, n_edges] of a model's samples at the run's own granularity
        (read-only float32), and their question ids."""
        label = self._label(run_key, model)
        alpha, t_cut = self._alpha(run_key, alpha)
        return self._cached(run_key, ("edges", alpha, label),
                            lambda: self._read_edges(run_key, t_cut, label))

    def _read_edges(self, run_key: str, t_cut: int, label: str) -> tuple[np.ndarray, list[str]]:
        run = self._run(run_key)
        con = self._connection()
        found = con.execute(f"""
            WITH {_COMPLETE_SQL}
            SELECT rs.question_id, s.vector_id FROM run_samples rs {_JOIN_COMPLETE}
            WHERE rs.run_key = $run_key AND rs.label = $label AND s.t_cut = $t_cut
            ORDER BY rs.position""", {"run_key": run_key, "t_cut": t_cut,
                                      "score_key": run["score_key"], "label": label}).fetchall()
        edges = fetch_vectors(con, run["graph"].n_edges, [row[1] for row in found])
        edges.flags.writeable = False
        return edges, [row[0] for row in found]

    @public
    def view(self, run_key: str, alpha: float, *, post_label: str | None = None,
             granularity: str | None = None,
             settings: MetricSettings = MetricSettings()) -> PairView:
        """Base and post matrices of the questions complete at alpha (possibly fewer than
        MIN_QUESTIONS while a run is being computed), from one snapshot of the cache, under the
        metric variant of `settings.positions` and `settings.normalise` (docs/method.md section 8;
        the other metric settings do not change the matrices)."""
        post = self._label(run_key, post_label)
        alpha, t_cut = self._alpha(run_key, alpha)
        granularity = self._granularity(run_key, granularity)
        variant = _variant(settings)
        if variant != _variant(MetricSettings()):
            def compute_variant() -> PairView:
                ids = self.view(run_key, alpha, post_label=post, granularity=granularity).question_ids
                base = self._label(run_key, BASE_ROLE)
                matrices = [self._scored(run_key, t_cut, label, label, ids, granularity, settings)
                            for label in (base, post)]
                return PairView(self.graph(run_key, granularity), *matrices, ids)
            return self._cached(run_key, ("view", alpha, post, granularity, variant),
                                compute_variant)

        def compute() -> PairView:
            own = self._run(run_key)["graph"]
            base_edges, ids = self.sample_edges(run_key, alpha, BASE_ROLE)
            post_edges, post_ids = self.sample_edges(run_key, alpha, post)
            if ids != post_ids:
                raise RuntimeError("internal: base and post question orders differ in one snapshot")
            base, post_scores = own.dense(base_edges), own.dense(post_edges)
            if granularity != own.granularity:
                # module slots are the exact sum of the q/k/v slots (docs/method.md section 2)
                base, post_scores = own.to_module(base), own.to_module(post_scores)
            for matrix in (base, post_scores):
                matrix.flags.writeable = False
            return PairView(self.graph(run_key, granularity), base, post_scores, tuple(ids))
        return self._cached(run_key, ("view", alpha, post, granularity), compute)

    def _scored(self, run_key: str, t_cut: int, scorer: str, tokens: str, question_ids,
                granularity: str, settings: MetricSettings) -> np.ndarray:
        """Dense matrices [n, n_src, n_dst] (read-only) of the model `scorer` on the answers of
        `tokens` (a label each; equal labels: a model's own scores) for `question_ids` in order,
        under the variant of `settings`. ControlNotComputedError where a score, its position parts
        or its norm is not stored."""
        run = self._run(run_key)
        own = run["graph"]
        con = self._connection()
        found = {row[0]: row[1:] for row in con.execute("""
            SELECT rs.question_id, s.vector_id, s.part_vector_ids, s.logit_grad_norm
            FROM run_samples rs
            JOIN run_models m ON m.run_key = rs.run_key AND m.label = $scorer
            JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = $score_key
                         AND s.t_cut = $t_cut AND s.model_key = m.model_key
            WHERE rs.run_key = $run_key AND rs.label = $tokens""",
            {"run_key": run_key, "scorer": scorer, "tokens": tokens, "t_cut": t_cut,
             "score_key": run["score_key"]}).fetchall()}
        missing = [q for q in question_ids if q not in found]
        if missing:
            raise ControlNotComputedError(
                f"run {run_key} holds no scores of {scorer} on {tokens}'s answers at T_cut {t_cut} "
                f"for {len(missing)} of {len(question_ids)} questions; cross-scoring computes "
                f"them: `{CONTROLS_COMMAND}`")
        rows = [found[q] for q in question_ids]
        edges = fetch_vectors(con, own.n_edges, [row[0] for row in rows])
        parts = None
        if settings.positions != "all":
            if any(row[1] is None for row in rows):
                raise ControlNotComputedError(
                    f"run {run_key}'s scores of {scorer} at T_cut {t_cut} were stored without "
                    f"position parts (scored before they were kept), so positions="
                    f"{settings.positions} cannot be computed; score the run into a new cache "
                    f"(CIRCUITDIFF_CACHE=... `python -m core run ...`) to keep them")
            ids = [int(i) for row in rows for i in row[1]]
            parts = fetch_vectors(con, own.n_edges, ids).reshape(len(rows), -1, own.n_edges)
        norms = None
        if settings.normalise != "none":
            if any(row[2] is None for row in rows):
                raise ControlNotComputedError(
                    f"run {run_key}'s scores of {scorer} at T_cut {t_cut} were stored without "
                    f"their logit-gradient norms (scored before they were kept), so normalise="
                    f"{settings.normalise} cannot be computed; score the run into a new cache "
                    f"to keep them")
            norms = np.array([row[2] for row in rows], dtype=np.float64)
        matrices = own.dense(metrics.score_variant(parts, edges, norms, settings))
        if granularity != own.granularity:
            matrices = own.to_module(matrices)  # exact (docs/method.md section 2)
        matrices.flags.writeable = False
        return matrices

    def _compared(self, run_key: str, alpha: float, post_label: str | None,
                  granularity: str | None, settings: MetricSettings = MetricSettings()) -> PairView:
        """`view` under the settings' variant, checked to hold enough questions to compare the
        models."""
        pair = self.view(run_key, alpha, post_label=post_label, granularity=granularity,
                         settings=settings)
        if len(pair.question_ids) < MIN_QUESTIONS:
            raise TooFewQuestionsError(
                f"only {len(pair.question_ids)} question(s) are scored for every model of run "
                f"{run_key} at alpha {alpha:g}; comparing the models needs {MIN_QUESTIONS} or more. "
                f"Wait for its job to score more, or pick another alpha.")
        return pair

    def _view_key(self, name: str, run_key: str, alpha: float, post_label: str | None,
                  granularity: str | None, *extra: Any) -> tuple:
        """Memo key of a view of (alpha, post model, granularity): the run's own names for each."""
        return (name, self._alpha(run_key, alpha)[0], self._label(run_key, post_label),
                self._granularity(run_key, granularity), *extra)

    @public
    def mean_matrices(self, run_key: str, alpha: float, *, post_label: str | None = None,
                      granularity: str | None = None,
                      settings: MetricSettings = MetricSettings()) -> dict[str, np.ndarray]:
        """Mean |W| and mean W over questions of both models: base_abs, post_abs, base_signed,
        post_signed, each [n_src, n_dst] (under the settings' positions and normalise variant)."""
        def compute() -> dict[str, np.ndarray]:
            pair = self._compared(run_key, alpha, post_label, granularity, settings)
            return {"base_abs": np.abs(pair.base).mean(axis=0),
                    "post_abs": np.abs(pair.post).mean(axis=0),
                    "base_signed": pair.base.mean(axis=0), "post_signed": pair.post.mean(axis=0)}
        return self._cached(run_key, self._view_key("mean", run_key, alpha, post_label, granularity,
                                                    *_variant(settings)), compute)

    @public
    def edge_change(self, run_key: str, alpha: float, measure: str, *,
                    post_label: str | None = None, granularity: str | None = None,
                    settings: MetricSettings = MetricSettings()) -> np.ndarray:
        """core.metrics.edge_change of base and post: [n_src, n_dst], NaN at non-edges."""
        def compute() -> np.ndarray:
            pair = self._compared(run_key, alpha, post_label, granularity, settings)
            return metrics.edge_change(pair.base, pair.post, pair.graph, measure)
        return self._cached(run_key, self._view_key("edge_change", run_key, alpha, post_label,
                                                    granularity, measure, *_variant(settings)),
                            compute)

    @public
    def abs_values(self, run_key: str, alpha: float, *, post_label: str | None = None,
                   granularity: str | None = None,
                   settings: MetricSettings = MetricSettings()) -> dict[str, np.ndarray]:
        """|W| pooled over real edges and questions, 1-D per model: {"base": ..., "post": ...}."""
        def compute() -> dict[str, np.ndarray]:
            pair = self._compared(run_key, alpha, post_label, granularity, settings)
            return {"base": np.abs(pair.graph.edges(pair.base)).ravel(),
                    "post": np.abs(pair.graph.edges(pair.post)).ravel()}
        return self._cached(run_key, self._view_key("abs", run_key, alpha, post_label, granularity,
                                                    *_variant(settings)), compute)

    @public
    def edge_across_alphas(self, run_key: str, src: str, dst: str, *,
                           post_label: str | None = None) -> pd.DataFrame:
        """Mean |W| and mean W of one edge (at the run's own granularity) at every alpha of the run,
        for base and post."""
        graph = self.graph(run_key)
        s, d = graph.src_index(src), graph.dst_index(dst)
        if not graph.real_edge_mask[s, d]:
            raise ValueError(f"{src}->{dst} is not an edge: {dst} is computed before {src} is read; "
                             f"pick a source computed earlier than the slot")
        position = int(graph.real_edge_mask.ravel()[: s * graph.n_dst + d].sum())
        post = self._label(run_key, post_label)
        base = self._label(run_key, BASE_ROLE)
        run = self._run(run_key)

        def compute() -> pd.DataFrame:
            con = self._connection()
            found = con.execute(f"""
                WITH {_COMPLETE_SQL}
                SELECT s.t_cut, rs.label, s.vector_id FROM run_samples rs {_JOIN_COMPLETE}
                WHERE rs.run_key = $run_key AND list_contains($labels, rs.label)""",
                                {"run_key": run_key, "score_key": run["score_key"],
                                 "labels": [base, post]}).fetchall()
            value_of = dict(con.execute(
                f"SELECT vector_id, edge_scores[$position] FROM {vector_table(graph.n_edges)} "
                f"WHERE vector_id IN (SELECT unnest($ids))",
                {"position": position + 1, "ids": [r[2] for r in found]}).fetchall())
            rows = []
            for alpha, t_cut in sorted(run["t_cuts"].items()):
                for label in (base, post):
                    picked = np.array([value_of[v] for t, lab, v in found
                                       if t == t_cut and lab == label], dtype=np.float64)
                    if len(picked):
                        rows.append({"alpha": alpha, "model": BASE_ROLE if label == base else label,
                                     "mean_abs": float(np.abs(picked).mean()),
                                     "mean_signed": float(picked.mean()), "n": len(picked)})
            return pd.DataFrame(rows, columns=["alpha", "model", "mean_abs", "mean_signed", "n"])
        return self._cached(run_key, ("edge", src, dst, post), compute)

    # --- metrics --------------------------------------------------------------------------------

    @public
    def comparison(self, run_key: str, alpha: float, *, post_label: str | None = None,
                   granularity: str | None = None, settings: MetricSettings = MetricSettings()):
        """core.metrics.Comparison of base and post at alpha: the pipeline's stored one for its
        default settings at the run's own granularity, else computed (and memoised)."""
        key = self._view_key("comparison", run_key, alpha, post_label, granularity, settings.key())
        _, alpha, post, granularity, _ = key

        def compute():
            if granularity == self._run(run_key)["graph"].granularity:
                stored = self._stored_comparisons(settings.key()).get((run_key, post, alpha))
                if stored is not None:
                    return stored
            pair = self._compared(run_key, alpha, post, granularity, settings)
            return metrics.compare_models(pair.base, pair.post, pair.graph, settings)
        return self._cached(run_key, key, compute)

    def _stored_comparisons(self, settings_key: str) -> dict[tuple, Any]:
        def load() -> dict[tuple, Any]:
            table = self._sql("SELECT run_key, post_label, alpha, comparison FROM metrics "
                              "WHERE settings_key = ?", [settings_key])
            return {(r.run_key, r.post_label, float(r.alpha)):
                    metrics.Comparison.from_dict(json.loads(r.comparison))
                    for r in table.itertuples()}
        return self._cached(None, ("stored_comparisons", settings_key), load)

    def _comparisons_of_every_run(self, settings: MetricSettings) -> Iterable[tuple[Any, float, Any]]:
        """(runs row, alpha, comparison) for every run, post model and alpha that has enough
        complete questions, at each run's own granularity."""
        for run in self.runs().itertuples():
            for alpha in run.alphas:
                try:
                    comparison = self.comparison(run.run_key, alpha, post_label=run.post_label,
                                                 settings=settings)
                except TooFewQuestionsError:
                    continue  # nothing to compare yet at this alpha
                yield run, alpha, comparison

    @public
    def metric_table(self, settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """All runs x post models x alphas x metrics with enough complete questions: base -> post,
        the change on its scale with its interval, clear_sign (+1/-1 where the reported interval
        lies above/below 0), the paired permutation p, the Wilcoxon p of the per-sample metrics (a
        secondary column, docs/method.md section 7), n (the questions it is computed on, fewer
        than selected while a run is being computed), and the `pooling` columns (t_cut, alphas,
        pooled, left_out)."""
        def compute() -> pd.DataFrame:
            entries, keys = [], []
            for run, alpha, comparison in self._comparisons_of_every_run(settings):
                entries.append((run.pair, run.dataset, alpha, comparison))
                keys += [(run.run_key, run.post_label, comparison.n_samples)] * len(comparison.metrics)
            if not entries:
                return pd.DataFrame(columns=list(METRIC_TABLE_COLUMNS))
            table = metrics.grid_table(entries).rename(
                columns={"change_pct_low": "ci_low", "change_pct_high": "ci_high"})
            table["run_key"], table["post_label"], table["n"] = zip(*keys)
            pooling = self.pooling()[["run_key", "post_label", "alpha", "t_cut", "alphas", "pooled",
                                      "left_out"]]
            table = table.merge(pooling, on=["run_key", "post_label", "alpha"], how="left")
            return table[list(METRIC_TABLE_COLUMNS)]
        return self._cached(None, ("metric_table", settings.key()), compute)

    @public
    def overview(self, settings: MetricSettings = MetricSettings(),
                 shown: Iterable[str] = METRICS) -> pd.DataFrame:
        """The Overview's table (OVERVIEW_COLUMNS): the pooled rows of `metric_table` for the
        metrics `shown`, `p_holm` the permutation p Holm-adjusted across exactly these cells (the
        family a reader scans), and `primary` where the cell is one that settings.primary declares
        (its metric, at an alpha among the cell's `alphas`): the cell a claim rests on, tested at
        1 - ci_level on its own p."""
        shown = [name for name in METRICS if name in set(shown)]
        table = self.metric_table(settings)
        table = table[table["pooled"].astype(bool) & table["metric"].isin(shown)]
        table = table.reset_index(drop=True)
        table["p_holm"] = metrics.holm(table["p"])
        declared = settings.primary_cells
        table["primary"] = [
            any(metric == name and any(math.isclose(alpha, float(a), rel_tol=1e-9)
                                       for a in str(alphas).split(", "))
                for name, alpha in declared)
            for metric, alphas in zip(table["metric"], table["alphas"])]
        return table[list(OVERVIEW_COLUMNS)]

    @public
    def pooling(self) -> pd.DataFrame:
        """Which (run, post model, alpha) cells the Overview and the Figure-3a summary pool, and
        why each other cell is left out (`left_out`, empty for a pooled cell). Pooled: every
        selected question scored for every model at that alpha (n_complete == n_selected); alphas
        of a run with the same T_cut counted once, as the first of them (`alphas` names them all,
        e.g. "0.03, 0.1"); and the runs' score and selection settings those of the pooled group:
        the settings shared by the most such cells (ties: the earliest run's). A null model's run
        (a control, linked in run_controls) is never pooled: it says what an update of that size
        does, not what post-training did; the Controls page shows it beside the change it controls.
        Metric settings are one argument of every pooled view, so they are identical by
        construction."""
        if self.is_empty():
            return pd.DataFrame(columns=list(POOLING_COLUMNS))
        return self._cached(None, ("pooling",), self._pooling)

    def _pooling(self) -> pd.DataFrame:
        runs = self.runs()
        keys = {row.run_key: (row.score_key, row.selection_key) for row in
                self._sql("SELECT run_key, score_key, selection_key FROM runs").itertuples()}
        controlling = dict(self._sql("SELECT control_run_key, run_key FROM run_controls")
                           .itertuples(index=False))
        rows = []
        for run in runs.itertuples():
            same_t_cut: dict[int, list[float]] = {}
            for alpha, t_cut in zip(run.alphas, run.t_cuts):
                same_t_cut.setdefault(t_cut, []).append(alpha)
            for alpha, t_cut, n_complete in zip(run.alphas, run.t_cuts, run.n_complete):
                first = same_t_cut[t_cut][0]
                if run.run_key in controlling:
                    reason = (f"a null model's run, the control of run {controlling[run.run_key]} "
                              f"(Controls page)")
                elif n_complete < run.n_selected or run.n_selected < MIN_QUESTIONS:
                    reason = (f"{n_complete} of {run.n_selected} selected questions scored for every "
                              f"model at this alpha")
                elif alpha != first:
                    reason = f"same T_cut ({t_cut}) as alpha {first:g}: counted once, there"
                else:
                    reason = ""
                rows.append({"run_key": run.run_key, "pair": run.pair, "dataset": run.dataset,
                             "post_label": run.post_label, "alpha": alpha, "t_cut": t_cut,
                             "alphas": ", ".join(f"{a:g}" for a in same_t_cut[t_cut]),
                             "n_complete": n_complete, "n_selected": run.n_selected,
                             "left_out": reason, "settings": run.settings,
                             "group": keys[run.run_key]})
        table = pd.DataFrame(rows)
        counted = table[table["left_out"] == ""]
        if len(counted):
            sizes = counted.groupby("group", sort=False).size()  # in order of first appearance
            pooled_group = sizes.idxmax()
            reference = counted[counted["group"] == pooled_group].iloc[0]["settings"]
            other = (table["left_out"] == "") & (table["group"] != pooled_group)
            table.loc[other, "left_out"] = [_settings_difference(settings, reference)
                                            for settings in table.loc[other, "settings"]]
        table["pooled"] = table["left_out"] == ""
        return table[list(POOLING_COLUMNS)]

    @public
    def diversity_summary(self, settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Figure-3a counts of inter-sample diversity per (pair: post model) and over all cells,
        over the pooled cells only (`pooling`)."""
        def compute() -> pd.DataFrame:
            pooled = self.pooling()
            pooled = set(zip(*(pooled[pooled["pooled"]][c] for c in ("run_key", "post_label",
                                                                       "alpha"))))
            return metrics.diversity_summary(
                (f"{run.pair}: {run.post_label}", run.dataset, alpha, comparison)
                for run, alpha, comparison in self._comparisons_of_every_run(settings)
                if (run.run_key, run.post_label, alpha) in pooled)
        return self._cached(None, ("diversity_summary", settings.key()), compute)

    @public
    def loss_correlation(self, run_key: str, alpha: float, *, post_label: str | None = None,
                         granularity: str | None = None,
                         settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Per model (`model` base or post, and its `label`) and per-sample metric: the Spearman
        correlation (`rho`) of the metric with the per-sample loss stored with the scores, its
        two-sided p and n, over the questions complete at alpha (core.metrics.loss_correlation)."""
        def compute() -> pd.DataFrame:
            samples = self.samples(run_key, alpha, post_label=post_label, granularity=granularity,
                                   settings=settings)
            labels = {BASE_ROLE: self._label(run_key, BASE_ROLE),
                      POST_ROLE: self._label(run_key, post_label)}
            frames = []
            for role, label in labels.items():
                frame = metrics.loss_correlation(
                    {name: samples[f"{role}_{name}"].to_numpy() for name in PER_SAMPLE_METRICS},
                    samples[f"{role}_loss"].to_numpy())
                frame.insert(0, "model", role)
                frame.insert(1, "label", label)
                frames.append(frame)
            return pd.concat(frames, ignore_index=True)
        return self._cached(run_key, self._view_key("loss_correlation", run_key, alpha, post_label,
                                                    granularity, settings.key()), compute)

    # --- controls (docs/method.md section 8) ---------------------------------------------------

    @public
    def decomposition(self, run_key: str, alpha: float, *, post_label: str | None = None,
                      granularity: str | None = None,
                      settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Each metric's change total = weights + tokens (core.metrics.decompose) from the cross
        scores S(post, base's tokens), with paired-bootstrap intervals (`<part>_low/_high`), the
        symmetric path's parts through S(base, post's tokens) where those are stored (else NaN),
        and n. ControlNotComputedError where the cross scores are missing."""
        post = self._label(run_key, post_label)

        def compute() -> pd.DataFrame:
            pair = self._compared(run_key, alpha, post, granularity, settings)
            base = self._label(run_key, BASE_ROLE)
            _, t_cut = self._alpha(run_key, alpha)
            cross = [pair.question_ids, pair.graph.granularity, settings]
            post_on_base = self._scored(run_key, t_cut, post, base, *cross)
            try:
                base_on_post = self._scored(run_key, t_cut, base, post, *cross)
            except ControlNotComputedError:
                base_on_post = None  # the symmetric path is optional
            result = metrics.decompose(pair.base, pair.post, post_on_base, pair.graph, settings,
                                       base_on_post=base_on_post)
            rows = []
            for name in METRICS:
                row = {"metric": name, "n": result.n_samples}
                for part in metrics.DECOMPOSITION_PARTS:
                    low, high = result.intervals[part][name] or (math.nan, math.nan)
                    row |= {part: result.values[part][name], f"{part}_low": low,
                            f"{part}_high": high}
                for part in ("symmetric_weights", "symmetric_tokens"):
                    row[part] = result.values.get(part, {}).get(name, math.nan)
                rows.append(row)
            return pd.DataFrame(rows, columns=list(DECOMPOSITION_COLUMNS))
        return self._cached(run_key, self._view_key("decomposition", run_key, alpha, post,
                                                    granularity, settings.key()), compute)

    @public
    def controls(self, run_key: str, post_label: str | None = None) -> pd.DataFrame:
        """The run's linked control runs of one post model: control ('perturb' | 'seed') and
        control_run_key, those in this cache only."""
        post = self._label(run_key, post_label)

        def compute() -> pd.DataFrame:
            return self._sql("SELECT control, control_run_key FROM run_controls "
                             "WHERE run_key = $run_key AND post_label = $post ORDER BY control",
                             {"run_key": run_key, "post": post})
        table = self._cached(run_key, ("controls", post), compute)
        known = self._run_keys()
        return table[[key in known for key in table["control_run_key"]]].reset_index(drop=True)

    @public
    def null_comparison(self, run_key: str, alpha: float, *, post_label: str | None = None,
                        granularity: str | None = None,
                        settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Each metric's real change beside the change of every linked null run (its own pair run,
        base vs null model) at the null run's alpha whose T_cut is nearest this alpha's (ties: the
        nearest alpha), and `exceeds_null` (core.metrics.exceeds_null: the real change is clear and
        its interval lies beyond the null's point change). ControlNotComputedError where no null
        run is linked, or none has enough questions."""
        post = self._label(run_key, post_label)
        alpha, t_cut = self._alpha(run_key, alpha)
        linked = self.controls(run_key, post)
        if linked.empty:
            raise ControlNotComputedError(
                f"run {run_key} has no null model run for {post} in this cache; `--controls "
                f"perturb` (a matched random perturbation of the base) or `--controls seed` adds "
                f"one: `{CONTROLS_COMMAND}`")
        # The answer depends on the null runs' content too: their content keys are in the key.
        scopes = tuple((key, self._scope(key)) for key in linked["control_run_key"])

        def compute() -> pd.DataFrame:
            real = self.comparison(run_key, alpha, post_label=post, granularity=granularity,
                                   settings=settings)
            rows = []
            for control, null_run in zip(linked["control"], linked["control_run_key"]):
                null_t_cuts = self._run(null_run)["t_cuts"]
                null_alpha = min(null_t_cuts, key=lambda a: (abs(null_t_cuts[a] - t_cut),
                                                            abs(a - alpha)))
                try:
                    null = self.comparison(null_run, null_alpha, granularity=granularity,
                                           settings=settings)
                except TooFewQuestionsError:
                    continue
                for name in METRICS:
                    m, z = real.metrics[name], null.metrics[name]
                    change_low, change_high = m.change_ci or (math.nan, math.nan)
                    pct_low, pct_high = m.change_pct_ci or (math.nan, math.nan)
                    null_low, null_high = z.change_ci or (math.nan, math.nan)
                    rows.append({
                        "metric": name, "control": control, "change": m.change,
                        "change_low": change_low, "change_high": change_high,
                        "change_pct": m.change_pct, "change_pct_low": pct_low,
                        "change_pct_high": pct_high, "scale": m.scale, "null_change": z.change,
                        "null_change_low": null_low, "null_change_high": null_high,
                        "null_change_pct": z.change_pct, "null_scale": z.scale,
                        "null_alpha": null_alpha, "null_t_cut": null_t_cuts[null_alpha],
                        "null_n": null.n_samples, "exceeds_null": metrics.exceeds_null(m, z),
                        "control_run_key": null_run})
            if not rows:
                raise TooFewQuestionsError(
                    f"the null run(s) of {run_key} for {post} have fewer than {MIN_QUESTIONS} "
                    f"questions scored; wait for their job, or rerun `{CONTROLS_COMMAND}`")
            return pd.DataFrame(rows, columns=list(NULL_COLUMNS))
        return self._cached(run_key, self._view_key("null", run_key, alpha, post, granularity,
                                                    settings.key(), scopes), compute)

    @public
    def controls_summary(self, run_key: str, alpha: float, *, post_label: str | None = None,
                         granularity: str | None = None,
                         settings: MetricSettings = MetricSettings()) -> ControlsSummary:
        """The Controls page's one table (CONTROLS_COLUMNS, one row per metric): the change
        post - base with its interval (the decomposition's total where cross scores exist: its
        complexity grid spans them, so the parts add up exactly), its weights and tokens parts
        (`decomposition`), the first
        null run's change (`null_comparison`) and whether the change exceeds it, the change under
        the other position variants (no_sink, answer_only), and the Spearman correlation of each
        per-sample metric with the loss per model. Columns of a control not computed are NaN, and
        `missing` says why, naming the command."""
        post = self._label(run_key, post_label)

        def compute() -> ControlsSummary:
            scope = {"post_label": post, "granularity": granularity}
            real = self.comparison(run_key, alpha, **scope, settings=settings)
            table = pd.DataFrame({"metric": list(METRICS)}).set_index("metric", drop=False)
            for name, m in real.metrics.items():
                low, high = m.change_ci or (math.nan, math.nan)
                table.loc[name, ["change", "change_low", "change_high"]] = m.change, low, high
            missing: dict[str, str] = {}
            try:
                parts = self.decomposition(run_key, alpha, **scope, settings=settings)
                parts = parts.set_index("metric")
                # The decomposition's own total, exactly weights + tokens (it equals the
                # comparison's change; under shared-quantile its complexity grid spans the cross
                # scores too). Its intervals are the bootstrap's, like its parts'.
                for part in ("total", "weights", "tokens"):
                    for suffix in ("", "_low", "_high"):
                        column = "change" if part == "total" else part
                        table[f"{column}{suffix}"] = parts[f"{part}{suffix}"]
            except ControlNotComputedError as error:
                missing["cross"] = str(error)
            try:
                null = self.null_comparison(run_key, alpha, **scope, settings=settings)
                null = null.drop_duplicates("metric").set_index("metric")
                table["null"] = null["null_change"]
                table["null_low"], table["null_high"] = (null["null_change_low"],
                                                         null["null_change_high"])
                table["exceeds_null"] = null["exceeds_null"]
            except (ControlNotComputedError, TooFewQuestionsError) as error:
                missing["null"] = str(error)
            for positions, column in (("no-sink", "no_sink"), ("answer-only", "answer_only")):
                if positions == settings.positions:
                    table[column] = table["change"]
                    continue
                try:
                    variant = self.comparison(run_key, alpha, **scope,
                                              settings=settings.replace(positions=positions))
                    table[column] = [variant.metrics[name].change for name in table.index]
                except (ControlNotComputedError, AllZeroSampleError) as error:
                    missing["positions"] = str(error)
            correlation = self.loss_correlation(run_key, alpha, **scope, settings=settings)
            for role in ROLES:
                rho = correlation[correlation["model"] == role].set_index("metric")["rho"]
                table[f"loss_rho_{role}"] = rho
            return ControlsSummary(table.reindex(columns=list(CONTROLS_COLUMNS))
                                   .reset_index(drop=True), missing)
        return self._cached(run_key, self._view_key("controls_summary", run_key, alpha, post,
                                                    granularity, settings.key()), compute)

    @public
    def null_marks(self, settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Every (run, post model, alpha, metric) with a linked null run: whether the change
        exceeds its null's (`null_comparison`; the first null where there are several must be
        exceeded by each: `exceeds_null` is their conjunction)."""
        def compute() -> pd.DataFrame:
            rows = []
            for run in self.runs().itertuples():
                if self.controls(run.run_key, run.post_label).empty:
                    continue
                for alpha in run.alphas:
                    try:
                        table = self.null_comparison(run.run_key, alpha,
                                                     post_label=run.post_label, settings=settings)
                    except (ControlNotComputedError, TooFewQuestionsError):
                        continue
                    for metric, exceeds in table.groupby("metric")["exceeds_null"].all().items():
                        rows.append({"run_key": run.run_key, "post_label": run.post_label,
                                     "alpha": alpha, "metric": metric,
                                     "exceeds_null": bool(exceeds)})
            return pd.DataFrame(rows, columns=list(NULL_MARK_COLUMNS))
        return self._cached(None, ("null_marks", settings.key()), compute)

    # --- faithfulness and method agreement (docs/method.md section 8) --------------------------

    def _faithfulness(self, run_key: str) -> dict[float, dict[str, dict]]:
        """The run's stored faithfulness reports, alpha -> label -> report: at each alpha those of
        the most recently written settings that hold the base and at least one post model. Reports
        written before cross-fitting (without `halves`) are left out: their top edges and circuits
        were ranked on the questions that evaluated them (a rerun of the control replaces them,
        under another settings key)."""
        def load() -> dict[float, dict[str, dict]]:
            table = self._sql("SELECT alpha, label, settings_key, report, created_at "
                              "FROM faithfulness WHERE run_key = ?", [run_key])
            groups: dict[tuple, dict[str, tuple]] = {}
            for row in table.itertuples():
                groups.setdefault((float(row.alpha), row.settings_key), {})[row.label] = (
                    row.created_at, row.report)
            base = self._run(run_key)["base"]
            chosen = {}
            for (alpha, _), reports in sorted(groups.items(), key=lambda item: max(
                    created for created, _ in item[1].values())):
                loaded = {label: json.loads(text) for label, (_, text) in reports.items()}
                if base in loaded and len(loaded) > 1 and all("halves" in report
                                                              for report in loaded.values()):
                    chosen[alpha] = loaded
            return chosen
        return self._cached(run_key, ("faithfulness",), load)

    def _faithfulness_pair(self, run_key: str, alpha: float,
                           post_label: str | None) -> tuple[float, str, str, dict, dict]:
        """(the run's alpha, base label, post label, base report, post report); NotFoundError
        naming what is absent (the run, alpha or model, or the control at this alpha)."""
        try:
            post = self._label(run_key, post_label)
            alpha = self._alpha(run_key, alpha)[0]
        except NotFoundError:
            raise
        except KeyError as error:
            raise NotFoundError(error.args[0]) from None
        base = self._run(run_key)["base"]
        reports = self._faithfulness(run_key).get(alpha, {})
        if base not in reports or post not in reports:
            computed = ", ".join(f"{a:g}" for a in self.faithfulness_alphas(run_key)) or "none"
            raise NotFoundError(f"run {run_key} holds no faithfulness control of {base} and {post} "
                                f"at alpha {alpha:g} (alphas with it: {computed}); "
                                f"`{FAITHFULNESS_COMMAND}` computes it")
        return alpha, base, post, reports[base], reports[post]

    @public
    def faithfulness_alphas(self, run_key: str) -> list[float]:
        """The run's alphas with a stored faithfulness control (base and a post model); empty
        where none is (FAITHFULNESS_COMMAND computes it)."""
        return sorted(self._faithfulness(run_key))

    @public
    def faithfulness_edges(self, run_key: str, alpha: float, *,
                           post_label: str | None = None) -> pd.DataFrame:
        """Every ablated edge of the base and the post model (FAITHFULNESS_EDGE_COLUMNS): its
        question, stratum ("top" by |W| or "random"), score W and real effect Delta."""
        alpha, base, post, base_report, post_report = self._faithfulness_pair(run_key, alpha,
                                                                              post_label)

        def compute() -> pd.DataFrame:
            rows = [{"label": label, "role": report["role"], **edge}
                    for label, report in ((base, base_report), (post, post_report))
                    for edge in report["edges"]]
            return pd.DataFrame(rows, columns=list(FAITHFULNESS_EDGE_COLUMNS))
        return self._cached(run_key, ("faithfulness_edges", alpha, post), compute)

    @public
    def faithfulness_agreement(self, run_key: str, alpha: float, *,
                               post_label: str | None = None,
                               settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """core.faithfulness_stats.agreement of each model from its stored edges: per stratum
        (STRATA: the top edges by the other half's mean |W|, the random draw; never pooled) the
        per-question Spearman, Pearson and sign agreement of W with Delta averaged over questions,
        and the calibration slope of Delta on W, each with its BCa interval from a bootstrap over
        questions (the settings' replicate count, level and seed). NaN where undefined or with
        bootstrap 0 (FAITHFULNESS_AGREEMENT_COLUMNS)."""
        alpha, base, post, base_report, post_report = self._faithfulness_pair(run_key, alpha,
                                                                              post_label)

        def compute() -> pd.DataFrame:
            rows = []
            for label, report in ((base, base_report), (post, post_report)):
                edges = report["edges"]
                found = agreement(report["questions"], *([edge[name] for edge in edges] for name in
                                                         ("sample_id", "stratum", "w", "delta")),
                                  settings)
                for stratum, statistics in found.items():
                    for name, value in statistics.items():
                        low, high = value["interval"] or (math.nan, math.nan)
                        rows.append({"label": label, "role": report["role"], "stratum": stratum,
                                     "statistic": name,
                                     "value": math.nan if value["value"] is None else value["value"],
                                     "low": low, "high": high, "n_questions": value["n_questions"],
                                     "n_edges": value["n_edges"]})
            return pd.DataFrame(rows, columns=list(FAITHFULNESS_AGREEMENT_COLUMNS))
        return self._cached(run_key, ("faithfulness_agreement", alpha, post, settings.key()),
                            compute)

    def _recovery(self, run_key: str, alpha: float, post_label: str | None,
                  settings: MetricSettings) -> tuple[str, str, dict, list[int]]:
        """(base label, post label, core.faithfulness_stats.compare_recovery of both models from
        their stored losses, the real edges kept at each fraction); the bootstrap over questions
        is paired and takes the settings' replicate count, level and seed."""
        alpha, base, post, base_report, post_report = self._faithfulness_pair(run_key, alpha,
                                                                              post_label)

        def compute() -> dict:
            if base_report["questions"] != post_report["questions"]:
                raise RuntimeError(f"internal: the faithfulness reports of {base} and {post} at "
                                   f"alpha {alpha:g} hold different questions")
            losses = {label: np.asarray(report["recovery"]["losses"], dtype=np.float64)
                      for label, report in ((base, base_report), (post, post_report))}
            return compare_recovery(np.asarray(base_report["recovery"]["fractions"]), losses,
                                    base, settings)
        comparison = self._cached(run_key, ("recovery", alpha, post, settings.key()), compute)
        return base, post, comparison, base_report["recovery"]["n_kept"]

    @public
    def recovery_curves(self, run_key: str, alpha: float, *, post_label: str | None = None,
                        settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """Circuit recovery f(k) of the base and post model at each kept fraction k of real edges
        (RECOVERY_CURVE_COLUMNS; k = 0 first, where f = 0, and k = 1 last, where f = 1), with its
        interval from a bootstrap over questions (NaN with bootstrap 0)."""
        base, post, comparison, n_kept = self._recovery(run_key, alpha, post_label, settings)
        frames = []
        for label, role in ((base, BASE_ROLE), (post, POST_ROLE)):
            model = comparison["models"][label]
            low, high = model["f_interval"] or ([math.nan] * len(model["f"]),) * 2
            frames.append(pd.DataFrame({"label": label, "role": role,
                                        "fraction": comparison["fractions"], "n_kept": n_kept,
                                        "f": model["f"], "low": low, "high": high}))
        return pd.concat(frames, ignore_index=True)[list(RECOVERY_CURVE_COLUMNS)]

    @public
    def recovery_areas(self, run_key: str, alpha: float, *, post_label: str | None = None,
                       settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """The area of each model's recovery curve over log k with its bootstrap interval, and a
        last row of role AREA_DIFFERENCE: the post's area minus the base's with its paired
        interval (each replicate draws one set of questions for both models). NaN intervals with
        bootstrap 0."""
        base, post, comparison, _ = self._recovery(run_key, alpha, post_label, settings)
        rows = []
        for label, role in ((base, BASE_ROLE), (post, POST_ROLE)):
            model = comparison["models"][label]
            low, high = model["area_interval"] or (math.nan, math.nan)
            rows.append({"label": label, "role": role, "area": model["area"], "low": low,
                         "high": high})
        difference = comparison["area_difference"][post]
        low, high = difference["interval"] or (math.nan, math.nan)
        rows.append({"label": f"{post} - {base}", "role": AREA_DIFFERENCE,
                     "area": difference["difference"], "low": low, "high": high})
        return pd.DataFrame(rows, columns=list(RECOVERY_AREA_COLUMNS))

    @public
    def recovery_k(self, run_key: str, alpha: float, *, post_label: str | None = None,
                   settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """The kept fraction k of real edges where each model's recovery first reaches
        core.faithfulness_stats.RECOVERY_TARGET (interpolated in log k), with its bootstrap
        interval, and a last row of role K_RATIO: the post's k over the base's with its paired
        interval (above 1: the post needs more edges). NaN intervals with bootstrap 0."""
        base, post, comparison, _ = self._recovery(run_key, alpha, post_label, settings)
        rows = []
        for label, role in ((base, BASE_ROLE), (post, POST_ROLE)):
            model = comparison["models"][label]
            low, high = model["k_interval"] or (math.nan, math.nan)
            rows.append({"label": label, "role": role, "k": model["k"], "low": low, "high": high})
        ratio = comparison["k_ratio"][post]
        low, high = ratio["interval"] or (math.nan, math.nan)
        rows.append({"label": f"{post} / {base}", "role": K_RATIO, "k": ratio["ratio"], "low": low,
                     "high": high})
        return pd.DataFrame(rows, columns=list(RECOVERY_K_COLUMNS))

    @public
    def method_runs(self, run_key: str) -> pd.DataFrame:
        """The runs of the same pair or series, models, dataset, generation, selection and
        granularity as this run but another scoring method (ScoreSettings.method, or EAP-IG's
        steps or baseline), oldest first (METHOD_RUN_COLUMNS; `method` e.g. "eap", "eap-ig (5 steps, zero
        baseline)")."""
        self._run(run_key)  # an unknown run fails here

        def compute() -> pd.DataFrame:
            table = self._sql("""
                WITH models AS (
                    SELECT run_key, list(label || ':' || model_key ORDER BY label) AS models
                    FROM run_models GROUP BY run_key)
                SELECT r.run_key, r.score, r.n_selected, r.created_at,
                       (SELECT list(alpha ORDER BY alpha) FROM run_alphas a
                        WHERE a.run_key = r.run_key) AS alphas,
                       r.run_key = $run_key AS own
                FROM runs r JOIN runs me ON me.run_key = $run_key
                JOIN models m ON m.run_key = r.run_key JOIN models mm ON mm.run_key = me.run_key
                WHERE r.name = me.name AND r.kind = me.kind AND r.dataset_key = me.dataset_key
                  AND r.gen_key = me.gen_key AND r.selection_key = me.selection_key
                  AND r.granularity = me.granularity AND m.models = mm.models
                ORDER BY r.created_at, r.run_key""", {"run_key": run_key})
            settings = [json.loads(score) for score in table["score"]]
            methods = [ScoreSettings.method_of(score) for score in settings]
            own = next(method for method, is_own in zip(methods, table["own"]) if is_own)
            rows = [{"run_key": row.run_key, "method": _method_label(method),
                     "ig_steps": method.ig_steps if method.method == "eap-ig" else math.nan,
                     "dtype": score.get("dtype"), "alphas": [float(a) for a in row.alphas],
                     "n_selected": row.n_selected, "created_at": row.created_at}
                    for row, method, score in zip(table.itertuples(), methods, settings)
                    if method.method_description() != own.method_description()]
            return pd.DataFrame(rows, columns=list(METHOD_RUN_COLUMNS))
        # Another run can appear at any time: the answer is keyed by every run's content.
        return self._cached(None, ("method_runs", run_key), compute)

    @public
    def method_agreement(self, run_key: str, alpha: float, *, post_label: str | None = None,
                         settings: MetricSettings = MetricSettings()) -> pd.DataFrame | None:
        """How far this run's scoring method agrees with another's on the same answers (the
        `method_runs` that hold this alpha): per model, the Spearman correlation of the two
        methods' mean |W| over real edges; per metric of `comparison`, both changes and whether
        their signs agree (METHOD_AGREEMENT_COLUMNS). None where no other-method run holds this
        alpha; TooFewQuestionsError where none has enough questions scored."""
        post = self._label(run_key, post_label)
        alpha = self._alpha(run_key, alpha)[0]
        others = self.method_runs(run_key)
        others = others[[any(math.isclose(a, alpha, rel_tol=1e-9) for a in alphas)
                         for alphas in others["alphas"]]]
        if others.empty:
            return None
        base = self._label(run_key, BASE_ROLE)
        method = _method_label(ScoreSettings.method_of(json.loads(fetch_one(
            self._connection(), "SELECT score FROM runs WHERE run_key = ?", [run_key])[0])))
        scopes = tuple((key, self._scope(key)) for key in others["run_key"])

        def compute() -> pd.DataFrame:
            graph = self.graph(run_key)
            own = self.comparison(run_key, alpha, post_label=post, settings=settings)
            means = self.mean_matrices(run_key, alpha, post_label=post)
            rows = []
            for other in others.itertuples():
                try:
                    theirs = self.comparison(other.run_key, alpha, post_label=post,
                                             settings=settings)
                    their_means = self.mean_matrices(other.run_key, alpha, post_label=post)
                except TooFewQuestionsError:
                    continue
                common = {"other_run_key": other.run_key, "method": method,
                          "other_method": other.method}
                for label, role in ((base, BASE_ROLE), (post, POST_ROLE)):
                    rho = rank_correlation(graph.edges(means[f"{role}_abs"]),
                                           graph.edges(their_means[f"{role}_abs"]))
                    rows.append({**common, "kind": "edges", "name": label, "role": role,
                                 "spearman": math.nan if rho is None else rho,
                                 "n": graph.n_edges})
                for name in METRICS:
                    mine, other_change = own.metrics[name], theirs.metrics[name]
                    rows.append({**common, "kind": "metric", "name": name,
                                 "n": min(own.n_samples, theirs.n_samples),
                                 "change": mine.change, "other_change": other_change.change,
                                 "clear_sign": mine.clear_sign,
                                 "other_clear_sign": other_change.clear_sign,
                                 "agrees": bool(np.sign(mine.change) == np.sign(other_change.change))
                                 if np.isfinite([mine.change, other_change.change]).all()
                                 else pd.NA})
            if not rows:
                raise TooFewQuestionsError(
                    f"the runs of {run_key}'s pair under another scoring method have fewer than "
                    f"{MIN_QUESTIONS} questions scored at alpha {alpha:g}; wait for their job")
            table = pd.DataFrame(rows, columns=list(METHOD_AGREEMENT_COLUMNS))
            table["agrees"] = table["agrees"].astype("boolean")
            return table
        return self._cached(run_key, ("method_agreement", alpha, post, settings.key(), scopes),
                            compute)

    @public
    def significant_edges(self, run_key: str, alpha: float, *, post_label: str | None = None,
                          granularity: str | None = None,
                          settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """core.metrics.significant_edges: edges whose strength changed (paired t-test per edge,
        Benjamini-Hochberg at settings.fdr), largest |relative change| first."""
        def compute() -> pd.DataFrame:
            pair = self._compared(run_key, alpha, post_label, granularity, settings)
            return metrics.significant_edges(pair.base, pair.post, pair.graph, settings)
        return self._cached(run_key, self._view_key("significant", run_key, alpha, post_label,
                                                    granularity, settings.key()), compute)

    @public
    def per_sample(self, run_key: str, alpha: float, *, post_label: str | None = None,
                   granularity: str | None = None,
                   settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """question_id, then base_<metric> and post_<metric> for the metrics that have one value
        per sample (intensity, edge_entropy, kurtosis, output_entropy)."""
        def compute() -> pd.DataFrame:
            pair = self._compared(run_key, alpha, post_label, granularity, settings)
            frame = pd.DataFrame({"question_id": list(pair.question_ids)})
            for side, scores in ((BASE_ROLE, pair.base), (POST_ROLE, pair.post)):
                for name, values in metrics.per_sample_metrics(scores, pair.graph, settings).items():
                    frame[f"{side}_{name}"] = values
            return frame
        return self._cached(run_key, self._view_key("per_sample", run_key, alpha, post_label,
                                                    granularity, settings.key()), compute)

    @public
    def per_sample_by_alpha(self, run_key: str, alphas: Iterable[float], *,
                            post_label: str | None = None, granularity: str | None = None,
                            settings: MetricSettings = MetricSettings()) -> dict[float, pd.DataFrame]:
        """`per_sample` at each of `alphas` that has enough questions (the others are left out),
        read in parallel threads."""
        alphas = list(alphas)
        self._label(run_key, post_label)  # an unknown run or model fails here, before any thread
        # Held open until this call ends: no commit can land, so every thread reads this version.
        self._connection()

        def one(alpha: float) -> pd.DataFrame | None:
            try:
                return self.per_sample(run_key, alpha, post_label=post_label,
                                       granularity=granularity, settings=settings)
            except TooFewQuestionsError:
                return None

        # One thread per alpha: the reads and most of numpy release the GIL (about 2x faster than
        # one alpha after the other on the paper's grid).
        with ThreadPoolExecutor(max_workers=max(len(alphas), 1)) as pool:
            frames = dict(zip(alphas, pool.map(one, alphas)))
        return {alpha: frame for alpha, frame in frames.items() if frame is not None}

    # --- samples --------------------------------------------------------------------------------

    @public
    def samples(self, run_key: str, alpha: float, *, post_label: str | None = None,
                granularity: str | None = None,
                settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """One row per question complete at alpha: texts, correctness, lengths, the scored
        (truncated) texts and token counts (below t_cut for an answer shorter than T_cut, which is
        scored whole), losses, and the `per_sample` metrics at the granularity (so, like them, it
        needs MIN_QUESTIONS questions)."""
        post = self._label(run_key, post_label)
        base = self._label(run_key, BASE_ROLE)
        alpha, t_cut = self._alpha(run_key, alpha)
        run = self._run(run_key)

        def compute() -> pd.DataFrame:
            metrics = self.per_sample(run_key, alpha, post_label=post, granularity=granularity,
                                      settings=settings)
            table = self._connection().execute(f"""
                WITH {_COMPLETE_SQL}
                SELECT rs.label, rs.position, rs.question_id, q.question, q.reference,
                       g.answer_text, gr.correct, len(g.answer_ids) AS answer_len,
                       g.finish_reason, gr.extracted, s.t_cut, s.n_scored_tokens,
                       s.scored_text, s.loss
                FROM run_samples rs {_JOIN_COMPLETE}
                JOIN runs r ON r.run_key = rs.run_key
                JOIN generations g ON g.generation_key = rs.generation_key
                LEFT JOIN grades gr ON gr.generation_key = rs.generation_key
                JOIN questions q ON q.dataset_key = r.dataset_key
                                AND q.question_id = rs.question_id
                WHERE rs.run_key = $run_key AND s.t_cut = $t_cut
                ORDER BY rs.position""", {"run_key": run_key, "t_cut": t_cut,
                                          "score_key": run["score_key"]}).df()
            b = table[table["label"] == base].set_index("question_id")
            p = table[table["label"] == post].set_index("question_id").loc[b.index]
            out = pd.DataFrame({"question_id": b.index, "question": b["question"].to_numpy(),
                                "reference": b["reference"].to_numpy(), "t_cut": b["t_cut"].to_numpy()})
            for name, column in _SAMPLE_FIELDS:
                out[f"{BASE_ROLE}_{name}"] = b[column].to_numpy()
                out[f"{POST_ROLE}_{name}"] = p[column].to_numpy()
            if list(out["question_id"]) != list(metrics["question_id"]):
                raise RuntimeError("internal: sample order differs between queries")
            return out.merge(metrics, on="question_id", how="left")
        return self._cached(run_key, self._view_key("samples", run_key, alpha, post, granularity,
                                                    settings.key()), compute)

    # --- circuit --------------------------------------------------------------------------------

    @public
    def token_view(self, run_key: str, alpha: float, question_id: str, *,
                   post_label: str | None = None) -> dict | None:
        """The stored token view of one question for the base and the post model (core/tokens.py;
        the newest where several k were computed), or None. Not memoised: a job adds views without
        changing the run's content key."""
        post = self._label(run_key, post_label)
        alpha, _ = self._alpha(run_key, alpha)
        stored = self._sql("SELECT view FROM token_views WHERE run_key = ? AND alpha = ? AND "
                           "question_id = ? ORDER BY created_at DESC",
                           [run_key, alpha, question_id])
        views = (json.loads(text) for text in stored["view"])
        return next((view for view in views if view["post_label"] == post), None)

    @public
    def circuit(self, run_key: str, alpha: float, *, k: int, by: str = "change",
                post_label: str | None = None, granularity: str | None = None,
                settings: MetricSettings = MetricSettings()) -> Circuit:
        """The top-k edges by change or strength, pruned to input -> logits paths, each marked
        significant when the per-edge test at settings.fdr found it (core.circuit)."""
        key = self._view_key("circuit", run_key, alpha, post_label, granularity, int(k), by,
                             settings.key())
        _, alpha, post, granularity = key[:4]

        def compute() -> Circuit:
            pair = self._compared(run_key, alpha, post, granularity, settings)
            means = self.mean_matrices(run_key, alpha, post_label=post, granularity=granularity,
                                       settings=settings)
            tests = self.significant_edges(run_key, alpha, post_label=post, granularity=granularity,
                                           settings=settings)
            metadata = {"run": run_key, "alpha": alpha, "granularity": granularity,
                        "base_label": self._label(run_key, BASE_ROLE), "post_label": post,
                        "n_layers": pair.graph.n_layers, "n_questions": len(pair.question_ids),
                        "fdr": settings.fdr}
            return build_circuit(pair.graph, means, set(tests["edge"]), k=k, by=by,
                                 metadata=metadata)
        return self._cached(run_key, key, compute)

    # --- trajectory of a series (docs/method.md section 7, core/trajectory.py) ---------------------

    @public
    def series_runs(self) -> pd.DataFrame:
        """Runs that are series: run_key, name, dataset, n_steps, post_labels and steps (each post
        model's training step, in order) and `declared` (whether pairs.toml gave the steps; else
        they are the positions 1..n)."""
        if self.is_empty():
            return pd.DataFrame(columns=list(trajectory.SERIES_COLUMNS))

        def compute() -> pd.DataFrame:
            table = self._sql("""
                SELECT r.run_key, r.name, r.dataset_name AS dataset FROM runs r
                WHERE r.kind = $series ORDER BY r.created_at, r.run_key""",
                              {"series": trajectory.SERIES_KIND})
            found = [self._checkpoints(key) for key in table["run_key"]]
            table["n_steps"] = [len(steps) for steps, _ in found]
            table["post_labels"] = [[label for label, _ in steps] for steps, _ in found]
            table["steps"] = [[step for _, step in steps] for steps, _ in found]
            table["declared"] = [declared for _, declared in found]
            return table[list(trajectory.SERIES_COLUMNS)]
        return self._cached(None, ("series_runs",), compute)

    def _checkpoints(self, run_key: str) -> tuple[list[tuple[str, int]], bool]:
        """core.trajectory.checkpoints of a run: (label, step) per post model, whether declared."""
        def load() -> tuple[list[tuple[str, int]], bool]:
            con = self._connection()
            name, kind = fetch_one(con, "SELECT name, kind FROM runs WHERE run_key = ?", [run_key])
            posts = con.execute("SELECT label, step FROM run_models WHERE run_key = ? AND role = ? "
                                "ORDER BY position", [run_key, POST_ROLE]).fetchall()
            return trajectory.checkpoints(run_key, name, kind, [tuple(row) for row in posts])
        return self._cached(run_key, ("checkpoints",), load)

    def _checkpoint(self, run_key: str, step: int) -> str:
        """The label of the run's post model at `step`."""
        steps, _ = self._checkpoints(run_key)
        for label, known in steps:
            if known == step:
                return label
        raise NotFoundError(f"run {run_key} has no checkpoint at step {step}; its steps are "
                            f"{[known for _, known in steps]}")

    @public
    def trajectory_metrics(self, run_key: str, alpha: float, *, granularity: str | None = None,
                           settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """core.trajectory.TRAJECTORY_COLUMNS: each metric's change post - base (metric units)
        with its paired interval at every step of a series (`comparison` of each post model), the
        base as step 0 with change 0. InputError for a pair run."""
        steps, _ = self._checkpoints(run_key)

        def compute() -> pd.DataFrame:
            comparisons = [self.comparison(run_key, alpha, post_label=label,
                                           granularity=granularity, settings=settings)
                           for label, _ in steps]
            return trajectory.metric_rows(steps, self._label(run_key, BASE_ROLE), comparisons)
        return self._cached(run_key, ("trajectory_metrics", self._alpha(run_key, alpha)[0],
                                      self._granularity(run_key, granularity), settings.key()),
                            compute)

    @public
    def trajectory_change(self, run_key: str, alpha: float, step: int, *,
                          measure: str = "normalised", granularity: str | None = None,
                          settings: MetricSettings = MetricSettings()
                          ) -> tuple[ResidualGraph, np.ndarray, dict[str, np.ndarray]]:
        """(graph, edge_change, mean_matrices) of the series' post model at `step` against the
        base: what figures.change_heatmap draws."""
        scope = {"post_label": self._checkpoint(run_key, step), "granularity": granularity,
                 "settings": settings}
        return (self.graph(run_key, granularity),
                self.edge_change(run_key, alpha, measure, **scope),
                self.mean_matrices(run_key, alpha, **scope))

    @public
    def edge_trends(self, run_key: str, alpha: float, *, measure: str = "normalised",
                    granularity: str | None = None,
                    settings: MetricSettings = MetricSettings()) -> trajectory.EdgeTrends:
        """core.trajectory.edge_trends over the series' steps: every real edge's change at each
        step (`edge_change` in `measure`), its slope against the step with a bootstrap interval
        over the questions every model of the series holds, its permutation p over the step labels
        and Benjamini-Hochberg q at settings.fdr; and the smallest p these steps allow."""
        steps, _ = self._checkpoints(run_key)

        def compute() -> trajectory.EdgeTrends:
            pairs = [self._compared(run_key, alpha, label, granularity, settings)
                     for label, _ in steps]
            graph = pairs[0].graph
            if any(pair.question_ids != pairs[0].question_ids for pair in pairs):
                raise RuntimeError("internal: the checkpoints of one series hold different questions")
            return trajectory.edge_trends(graph, [step for _, step in steps],
                                          graph.edges(np.abs(pairs[0].base)),
                                          np.stack([graph.edges(np.abs(pair.post)) for pair in pairs]),
                                          measure, settings)
        return self._cached(run_key, ("edge_trends", self._alpha(run_key, alpha)[0],
                                      self._granularity(run_key, granularity), measure,
                                      settings.key()), compute)

    # --- report ---------------------------------------------------------------------------------

    @public
    def provenance(self, run_key: str) -> dict[str, Any]:
        """What produced the run, beyond its settings: its models (role, label, algorithm, key,
        fingerprint, architecture, layers, tokenizer fingerprint, spec) as a DataFrame, the keys
        and commit of the run, and its dataset record (key, source, content hash, size)."""
        self._run(run_key)  # an unknown run fails here, naming the command that lists runs

        def compute() -> dict[str, Any]:
            models = self._sql("""
                SELECT rm.role, rm.label, rm.algorithm, rm.model_key, m.fingerprint, m.architecture,
                       m.n_layers, m.tokenizer_fingerprint, m.spec
                FROM run_models rm LEFT JOIN models m ON m.model_key = rm.model_key
                WHERE rm.run_key = ? ORDER BY rm.position""", [run_key])
            row = self._sql("""
                SELECT r.git_commit, r.gen_key, r.selection_key, r.score_key, d.dataset_key,
                       d.source, d.content_hash, d.n_questions
                FROM runs r LEFT JOIN datasets d ON d.dataset_key = r.dataset_key
                WHERE r.run_key = ?""", [run_key]).iloc[0].to_dict()
            return {"models": models,
                    "run": {k: row[k] for k in ("git_commit", "gen_key", "selection_key",
                                                "score_key")},
                    "dataset": {k: row[k] for k in ("dataset_key", "source", "content_hash",
                                                    "n_questions")}}
        return self._cached(run_key, ("provenance", run_key), compute)

    @public
    def report_html(self, run_key: str, *, post_label: str | None = None,
                    granularity: str | None = None, settings: MetricSettings = MetricSettings(),
                    alphas: Iterable[float] | None = None) -> str:
        """One self-contained HTML report of the run's view (core/report.py), read from one
        snapshot of the cache: Table 1 at every alpha, heatmaps, distributions, circuits and
        provenance, with plotly.js embedded (no network needed to open it)."""
        from core import report  # plotly.js (4.8 MB) is read only when a report is asked for

        return report.build_report(self, run_key, post_label=post_label, granularity=granularity,
                                   settings=settings, alphas=None if alphas is None else list(alphas))
