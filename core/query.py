"""The dashboard's only read path into the result cache (core/store.py).

Every call opens a short read-only connection, so a run writing the cache in another process is never
blocked for long and never seen half-done (a reader waits while the writer holds the file for one
transaction). Results are memoised in-process, keyed by the cache's version token, so nothing stale is
returned after a write.

Sample matrices of a run at an alpha hold the questions scored for EVERY model of the run (a run still
being computed shows its complete questions only), in the run's selection order, so sample k of every
model is the same question.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.graph import ResidualGraph
from core.settings import MetricSettings, stable_hash
from core.store import Store, fetch_one, fetch_vectors, vector_table

METRIC_TABLE_COLUMNS = ("run_key", "pair", "dataset", "post_label", "alpha", "metric", "base", "post",
                        "change_pct", "ci_low", "ci_high", "direction", "settings_key")

# (t_cut, question) pairs of a run scored for EVERY one of its models, at any of its T_cuts.
_COMPLETE_SQL = """
    complete AS (
        SELECT s.t_cut, rs.question_id FROM run_samples rs
        JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = $score_key
        WHERE rs.run_key = $run_key
          AND s.t_cut IN (SELECT t_cut FROM run_alphas WHERE run_key = $run_key)
        GROUP BY s.t_cut, rs.question_id
        HAVING count(*) = (SELECT count(*) FROM run_models WHERE run_key = $run_key))
"""
# Joins that keep the score rows of complete questions only (`rs` run_samples, `s` scores).
_JOIN_COMPLETE = """
    JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = $score_key
    JOIN complete c ON c.question_id = rs.question_id AND c.t_cut = s.t_cut
"""


class RunNotFoundError(KeyError):
    pass


class _SnapshotMoved(Exception):
    """A commit landed between a call's first memo hit and its first database read."""


# Attempts of a public call whose snapshot moved (each needs a commit within milliseconds).
_ATTEMPTS = 5


def _public(method):
    """Run a public query inside one session: one snapshot of the cache, one connection at most."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(self._local, "stack", None) is not None:
            return method(self, *args, **kwargs)  # nested in a session already
        for attempt in range(_ATTEMPTS):
            try:
                with self._session():
                    return method(self, *args, **kwargs)
            except _SnapshotMoved:
                if attempt == _ATTEMPTS - 1:
                    raise RuntimeError(f"the cache {self.path} changed during each of "
                                       f"{_ATTEMPTS} attempts to read it; retry") from None
    return wrapper


class ResultCache:
    """Read access to one cache file. Missing file = empty cache.

    Safe to share between threads (a dashboard serves several sessions from one instance): each
    thread has its own connection and session; the memo is shared, per cache version."""

    def __init__(self, store: Store):
        self.store = store
        self._memo: dict[tuple, Any] = {}
        self._memo_token: tuple | None = None
        self._memo_lock = threading.Lock()
        self._local = threading.local()  # per thread: stack, con, token, memo, used_memo

    @classmethod
    def open(cls, path: str | Path | None = None) -> "ResultCache":
        return cls(Store(path))

    @property
    def path(self) -> Path:
        return self.store.path

    # --- memoisation --------------------------------------------------------------------------

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` once per key and cache version. Inside one public call every answer comes
        from one version: memoised answers of that version, or reads through the call's single
        connection, which is opened on that same version (else the call is retried)."""
        with self._session():
            local = self._local
            if key in local.memo:
                local.used_memo = True
                return local.memo[key]
            value = compute()
            local.memo[key] = value
            return value

    def _memo_for(self, token: tuple) -> dict:
        with self._memo_lock:
            if token != self._memo_token:
                self._memo, self._memo_token = {}, token
            return self._memo

    @contextlib.contextmanager
    def _session(self):
        """Scope of one public call: the version it reads, its memo, and at most one read-only
        connection, opened on first read (opening the file is the largest fixed cost of a query,
        and a call served from memory opens nothing)."""
        local = self._local
        outer = getattr(local, "stack", None) is None
        if outer:
            local.stack, local.con, local.used_memo = contextlib.ExitStack(), None, False
            local.token = self.store.version_token()
            local.memo = self._memo_for(local.token)
        try:
            yield
        finally:
            if outer:
                stack, local.stack, local.con = local.stack, None, None
                stack.close()

    @contextlib.contextmanager
    def _read(self):
        with self._session():
            local = self._local
            if local.con is None:
                local.con = local.stack.enter_context(self.store.read())
                # No commit can land while the connection is open: this is the version it reads.
                token = self.store.version_token()
                if token != local.token:
                    if local.used_memo:
                        raise _SnapshotMoved()
                    local.token, local.memo = token, self._memo_for(token)
            yield local.con

    def _sql(self, sql: str, params: Any = None) -> pd.DataFrame:
        with self._read() as con:
            return con.execute(sql, params).df()

    # --- runs -----------------------------------------------------------------------------------

    def _tables_present(self) -> bool:
        if not self.store.exists():
            return False
        return self._cached(("tables",), lambda: self._sql(
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'runs'")
            ["n"].iloc[0] > 0)

    @_public
    def is_empty(self) -> bool:
        if not self._tables_present():
            return True
        return self._cached(("is_empty",), lambda: self._sql("SELECT count(*) AS n FROM runs")
                            ["n"].iloc[0] == 0)

    @_public
    def runs(self) -> pd.DataFrame:
        """One row per (run, post model). `n_complete[i]`: questions scored for every model of the
        run at `alphas[i]` (equal to n_selected once the run is complete)."""
        columns = ["run_key", "pair", "kind", "dataset", "base_label", "post_label", "algorithm",
                   "granularity", "n_layers", "alphas", "t_cuts", "n_complete", "n_selected",
                   "n_candidates",
                   "t_bar", "created_at", "updated_at", "settings", "selection_report",
                   "code_version"]
        if not self._tables_present():
            return pd.DataFrame(columns=columns)
        return self._cached(("runs",), lambda: self._runs(columns))

    def _runs(self, columns: list[str]) -> pd.DataFrame:
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
            JOIN run_models b ON b.run_key = r.run_key AND b.role = 'base'
            JOIN run_models p ON p.run_key = r.run_key AND p.role = 'post'
            ORDER BY r.created_at, r.run_key, p.position""")
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
                JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = r.score_key
                GROUP BY ALL),
            models AS (SELECT run_key, count(*) AS n FROM run_models GROUP BY run_key)
            SELECT q.run_key, q.t_cut, count(*) AS n FROM per_question q
            JOIN models m ON m.run_key = q.run_key AND m.n = q.n
            GROUP BY ALL""")
        n_complete = {(r.run_key, r.t_cut): int(r.n) for r in complete.itertuples()}
        table["n_complete"] = [[n_complete.get((key, t), 0) for t in t_cuts]
                               for key, t_cuts in zip(table["run_key"], table["t_cuts"])]
        return table[columns].reset_index(drop=True)

    def _run(self, run_key: str) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            with self._read() as con:
                row = fetch_one(con, "SELECT name, n_layers, granularity, score_key FROM runs "
                                     "WHERE run_key = ?", [run_key])
                if row is None:
                    raise RunNotFoundError(f"no run {run_key!r} in the cache {self.path}; "
                                           f"`python -m core ls` lists the cached runs")
                models = con.execute("SELECT label, role FROM run_models WHERE run_key = ? "
                                     "ORDER BY position", [run_key]).fetchall()
                alphas = dict(con.execute("SELECT alpha, t_cut FROM run_alphas WHERE run_key = ?",
                                          [run_key]).fetchall())
            return {"name": row[0], "graph": ResidualGraph(row[1], row[2]), "score_key": row[3],
                    "base": next(label for label, role in models if role == "base"),
                    "posts": [label for label, role in models if role == "post"],
                    "t_cuts": alphas}
        return self._cached(("run", run_key), load)

    @_public
    def graph(self, run_key: str) -> ResidualGraph:
        return self._run(run_key)["graph"]

    def _label(self, run_key: str, model: str | None) -> str:
        """The stored label of `model`: 'base', a label, or None for the first post model."""
        run = self._run(run_key)
        if model is None:
            return run["posts"][0]
        if model == "base":
            return run["base"]
        if model == run["base"] or model in run["posts"]:
            return model
        raise KeyError(f"run {run_key!r} has no model {model!r}; its models are 'base' "
                       f"({run['base']}) and {run['posts']}")

    def _t_cut(self, run_key: str, alpha: float) -> int:
        t_cuts = self._run(run_key)["t_cuts"]
        for known, t_cut in t_cuts.items():
            if math.isclose(known, alpha, rel_tol=1e-9, abs_tol=1e-12):
                return int(t_cut)
        raise KeyError(f"run {run_key!r} has no alpha {alpha}; its alphas are {sorted(t_cuts)}")

    # --- matrices -------------------------------------------------------------------------------

    @_public
    def sample_edges(self, run_key: str, alpha: float, model: str) -> tuple[np.ndarray, list[str]]:
        """Real-edge vectors [n, n_edges] of a model's samples, and their question ids."""
        label = self._label(run_key, model)
        return self._cached(("edges", run_key, float(alpha), label),
                            lambda: self._sample_edges(run_key, alpha, label))

    def _sample_edges(self, run_key: str, alpha: float, label: str) -> tuple[np.ndarray, list[str]]:
        run = self._run(run_key)
        params = {"run_key": run_key, "t_cut": self._t_cut(run_key, alpha),
                  "score_key": run["score_key"], "label": label}
        with self._read() as con:
            found = con.execute(f"""
                WITH {_COMPLETE_SQL}
                SELECT rs.question_id, s.vector_id FROM run_samples rs {_JOIN_COMPLETE}
                WHERE rs.run_key = $run_key AND rs.label = $label AND s.t_cut = $t_cut
                ORDER BY rs.position""", params).fetchall()
            edges = fetch_vectors(con, run["graph"].n_edges, [row[1] for row in found])
        edges.flags.writeable = False
        return edges, [row[0] for row in found]

    @_public
    def sample_matrices(self, run_key: str, alpha: float, model: str) -> tuple[np.ndarray, list[str]]:
        """Dense per-sample matrices [n, n_src, n_dst] (float32) and their question ids."""
        edges, ids = self.sample_edges(run_key, alpha, model)
        return self.graph(run_key).dense(edges), ids

    @_public
    def paired_sample_matrices(self, run_key: str, alpha: float, post_label: str | None = None
                               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Base and post matrices [n, n_src, n_dst] and their common question ids, read from one
        snapshot of the cache (two separate calls can straddle a commit of a running job)."""
        base, ids = self.sample_matrices(run_key, alpha, "base")
        post, post_ids = self.sample_matrices(run_key, alpha, self._label(run_key, post_label))
        if ids != post_ids:
            raise RuntimeError("internal: base and post question orders differ in one snapshot")
        return base, post, ids

    @_public
    def mean_matrices(self, run_key: str, alpha: float,
                      post_label: str | None = None) -> dict[str, np.ndarray]:
        post = self._label(run_key, post_label)

        def compute() -> dict[str, np.ndarray]:
            graph = self.graph(run_key)
            out = {}
            for name, model in (("base", "base"), ("post", post)):
                edges, _ = self.sample_edges(run_key, alpha, model)
                if len(edges) == 0:
                    raise ValueError(f"run {run_key!r} has no question scored for every model at "
                                     f"alpha={alpha} yet")
                out[f"{name}_abs"] = graph.dense(np.abs(edges).mean(axis=0))
                out[f"{name}_signed"] = graph.dense(edges.mean(axis=0))
            return out
        return self._cached(("mean", run_key, float(alpha), post), compute)

    @_public
    def edge_across_alphas(self, run_key: str, src: str, dst: str,
                           post_label: str | None = None) -> pd.DataFrame:
        """Mean |W| and mean W of one edge at every alpha of the run, for base and post."""
        graph = self.graph(run_key)
        s, d = graph.src_index(src), graph.dst_index(dst)
        if not graph.real_edge_mask[s, d]:
            raise ValueError(f"{src}->{dst} is not an edge: {dst} is computed before {src} is read; "
                             f"pick a source computed earlier than the slot")
        position = int(graph.real_edge_mask.ravel()[: s * graph.n_dst + d].sum())
        post = self._label(run_key, post_label)
        base = self._label(run_key, "base")
        run = self._run(run_key)

        def compute() -> pd.DataFrame:
            with self._read() as con:
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
                        rows.append({"alpha": alpha, "model": "base" if label == base else label,
                                     "mean_abs": float(np.abs(picked).mean()),
                                     "mean_signed": float(picked.mean()), "n": len(picked)})
            return pd.DataFrame(rows, columns=["alpha", "model", "mean_abs", "mean_signed", "n"])
        return self._cached(("edge", run_key, src, dst, post), compute)

    # --- metrics --------------------------------------------------------------------------------

    @_public
    def comparison(self, run_key: str, alpha: float, settings: MetricSettings = MetricSettings(),
                   post_label: str | None = None):
        """core.metrics.Comparison of base and post at alpha: stored by the pipeline for its
        default settings, computed (and memoised) for any other settings."""
        from core import metrics

        post = self._label(run_key, post_label)

        def compute():
            stored = self._stored_comparisons(settings.key()).get((run_key, post, float(alpha)))
            if stored is not None:
                return stored
            base_edges, _ = self.sample_edges(run_key, alpha, "base")
            post_edges, _ = self.sample_edges(run_key, alpha, post)
            graph = self.graph(run_key)
            return metrics.compare_models(graph.dense(base_edges), graph.dense(post_edges), graph,
                                          settings)
        return self._cached(("comparison", run_key, float(alpha), post, settings.key()), compute)

    def _stored_comparisons(self, settings_key: str) -> dict[tuple, Any]:
        from core import metrics

        def load() -> dict[tuple, Any]:
            table = self._sql("SELECT run_key, post_label, alpha, comparison FROM metrics "
                              "WHERE settings_key = ?", [settings_key])
            return {(r.run_key, r.post_label, float(r.alpha)):
                    metrics.Comparison.from_dict(json.loads(r.comparison))
                    for r in table.itertuples()}
        return self._cached(("stored_comparisons", settings_key), load)

    @_public
    def metric_table(self, settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """All runs x post models x alphas x metrics, with the change's % and its interval, and n,
        the questions it is computed on (fewer than selected while a run is being computed)."""
        from core import metrics

        def compute() -> pd.DataFrame:
            entries, keys = [], []
            stored = self._stored_comparisons(settings.key())
            for run in self.runs().itertuples():
                for alpha in run.alphas:
                    comparison = stored.get((run.run_key, run.post_label, float(alpha)))
                    try:
                        comparison = comparison or self.comparison(run.run_key, alpha, settings,
                                                                   run.post_label)
                    except ValueError:
                        continue  # nothing complete yet at this alpha
                    entries.append((run.pair, run.dataset, alpha, comparison))
                    keys += [(run.run_key, run.post_label, comparison.n_samples)] * len(comparison.metrics)
            if not entries:
                return pd.DataFrame(columns=list(METRIC_TABLE_COLUMNS) + ["ci_excludes_zero", "n"])
            table = metrics.grid_table(entries).rename(
                columns={"change_pct_low": "ci_low", "change_pct_high": "ci_high"})
            table["run_key"], table["post_label"], table["n"] = zip(*keys)
            return table[list(METRIC_TABLE_COLUMNS) + ["ci_excludes_zero", "n"]]
        return self._cached(("metric_table", settings.key()), compute)

    @_public
    def significant_edges(self, run_key: str, alpha: float,
                          settings: MetricSettings = MetricSettings(),
                          post_label: str | None = None) -> pd.DataFrame:
        from core import metrics

        post = self._label(run_key, post_label)

        def compute() -> pd.DataFrame:
            graph = self.graph(run_key)
            base_edges, _ = self.sample_edges(run_key, alpha, "base")
            post_edges, _ = self.sample_edges(run_key, alpha, post)
            return metrics.significant_edges(graph.dense(base_edges), graph.dense(post_edges),
                                             graph, settings)
        return self._cached(("significant", run_key, float(alpha), post, settings.key()), compute)

    # --- samples --------------------------------------------------------------------------------

    @_public
    def samples(self, run_key: str, alpha: float, post_label: str | None = None,
                settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
        """One row per question complete at alpha: texts, correctness, lengths, the scored
        (truncated) texts and token counts (below t_cut for an answer shorter than T_cut, which is
        scored whole), and per-sample metrics of both models (base_<metric>, post_<metric>)."""
        from core import metrics

        post = self._label(run_key, post_label)
        base = self._label(run_key, "base")
        run = self._run(run_key)

        def compute() -> pd.DataFrame:
            params = {"run_key": run_key, "t_cut": self._t_cut(run_key, alpha),
                      "score_key": run["score_key"]}
            with self._read() as con:
                table = con.execute(f"""
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
                    ORDER BY rs.position""", params).df()
            b = table[table["label"] == base].set_index("question_id")
            p = table[table["label"] == post].set_index("question_id").loc[b.index]
            out = pd.DataFrame({"question_id": b.index, "question": b["question"].to_numpy(),
                                "reference": b["reference"].to_numpy(), "t_cut": b["t_cut"].to_numpy()})
            for name, column in (("text", "answer_text"), ("correct", "correct"),
                                 ("answer", "extracted"), ("answer_len", "answer_len"),
                                 ("finish_reason", "finish_reason"), ("truncated_text", "scored_text"),
                                 ("scored_tokens", "n_scored_tokens"), ("loss", "loss")):
                out[f"base_{name}"], out[f"post_{name}"] = b[column].to_numpy(), p[column].to_numpy()
            graph = self.graph(run_key)
            for side, model in (("base", "base"), ("post", post)):
                edges, ids = self.sample_edges(run_key, alpha, model)
                if ids != list(out["question_id"]):
                    raise RuntimeError("internal: sample order differs between queries")
                if len(ids):
                    for name, values in metrics.per_sample_metrics(graph.dense(edges), graph,
                                                                   settings).items():
                        out[f"{side}_{name}"] = values
            return out
        return self._cached(("samples", run_key, float(alpha), post, settings.key()), compute)

    @_public
    def content_key(self, run_key: str) -> str:
        """Changes whenever the run's stored data change."""
        def compute() -> str:
            with self._read() as con:
                row = fetch_one(con, """
                    SELECT r.updated_at,
                           (SELECT list(alpha || ':' || t_cut ORDER BY alpha) FROM run_alphas
                            WHERE run_key = $run_key),
                           (SELECT count(*) || ':' || max(s.created_at) FROM run_samples rs
                            JOIN scores s ON s.generation_key = rs.generation_key
                                         AND s.score_key = r.score_key
                            WHERE rs.run_key = $run_key),
                           (SELECT count(*) || ':' || max(created_at) FROM metrics
                            WHERE run_key = $run_key)
                    FROM runs r WHERE r.run_key = $run_key""", {"run_key": run_key})
            if row is None:
                raise RunNotFoundError(f"no run {run_key!r} in the cache {self.path}")
            return stable_hash([run_key, *map(str, row)])
        return self._cached(("content_key", run_key), compute)
