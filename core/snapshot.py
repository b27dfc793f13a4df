"""Consistent, memoised reads of one cache file: the machinery under the read model (core/query.py).

- Every public call reads one snapshot of the cache: it opens at most one short read-only connection
  (so a writer in another process is never blocked for long and never seen half-done), and memoised
  answers it uses belong to that same snapshot, else the call is retried.
- Answers are memoised in-process per run, under the run's content key (docs/method.md section 9):
  a write to one run leaves every other run's answers warm. Answers over all runs are keyed by the
  content keys of all runs. After any commit (the version token changes) the first call re-reads
  every run's content key in one query and drops the answers of runs whose key changed; readers
  of the same file in one process share the keys read at a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import NotFoundError
from core.settings import stable_hash
from core.store import CacheBusyError, Store, fetch_one

# Everything a run's views are read from, per run, in one query: the run row, its models, alphas
# and selected questions, the scores of its answers by any scorer (its own models' and the cross
# scores; another run's job can add or share them), the grades of its answers, its stored metrics
# and its linked control runs (whose own content keys the views over them add).
_CONTENT_SQL = """
    WITH models AS (
        SELECT run_key, list(label || ':' || role || ':' || model_key || ':' || position
                             ORDER BY label) AS models
        FROM run_models GROUP BY run_key),
    alphas AS (
        SELECT run_key, list(alpha || ':' || t_cut ORDER BY alpha) AS alphas
        FROM run_alphas GROUP BY run_key),
    selected AS (SELECT run_key, count(*) AS n FROM run_samples GROUP BY run_key),
    scored AS (
        SELECT rs.run_key, count(*) AS n, max(s.created_at) AS last FROM run_samples rs
        JOIN runs r ON r.run_key = rs.run_key
        JOIN scores s ON s.generation_key = rs.generation_key AND s.score_key = r.score_key
        GROUP BY rs.run_key),
    graded AS (
        SELECT rs.run_key, count(*) AS n, max(g.created_at) AS last FROM run_samples rs
        JOIN grades g ON g.generation_key = rs.generation_key GROUP BY rs.run_key),
    stored AS (SELECT run_key, count(*) AS n, max(created_at) AS last FROM metrics GROUP BY run_key),
    controls AS (
        SELECT run_key, list(post_label || ':' || control || ':' || control_run_key
                             ORDER BY post_label, control) AS controls
        FROM run_controls GROUP BY run_key)
    SELECT r.run_key, r.updated_at, m.models, a.alphas, sel.n, sc.n, sc.last, g.n, g.last,
           st.n, st.last, ct.controls
    FROM runs r
    LEFT JOIN models m ON m.run_key = r.run_key
    LEFT JOIN alphas a ON a.run_key = r.run_key
    LEFT JOIN selected sel ON sel.run_key = r.run_key
    LEFT JOIN scored sc ON sc.run_key = r.run_key
    LEFT JOIN graded g ON g.run_key = r.run_key
    LEFT JOIN stored st ON st.run_key = r.run_key
    LEFT JOIN controls ct ON ct.run_key = r.run_key
"""


class RunNotFoundError(NotFoundError):
    """No run of that key in the cache."""


class _SnapshotMoved(Exception):
    """A commit landed between a call's first use of the content keys and its first database read."""


# The content keys last read from each cache file (resolved path) in this process: a fresh reader
# of an unchanged file (a new dashboard session) takes them instead of reading every run again.
_KEYS_FOUND: dict[Path, "_Keys"] = {}

# Attempts of a public call whose snapshot moved (each needs a commit within milliseconds).
_ATTEMPTS = 5


def public(method):
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
                    raise CacheBusyError(f"the cache {self.path} changed during each of "
                                       f"{_ATTEMPTS} attempts to read it; retry") from None
    return wrapper


@dataclasses.dataclass(frozen=True)
class _Keys:
    """Every run's content key at one version of the cache, and the key of views over all runs."""

    token: tuple
    runs: dict[str, str]
    all_runs: str

    @classmethod
    def of(cls, token: tuple, runs: dict[str, str]) -> "_Keys":
        return cls(token, runs, stable_hash(["all runs", sorted(runs.items())]))


class SnapshotReader:
    """Snapshot sessions, content keys and the per-run memo over one Store; a subclass adds the
    public queries (decorated with `public`) and reads through `_cached` and `_sql`.

    Safe to share between threads: each thread has its own session and connection; the memo is
    shared."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()  # guards _keys and _memo
        self._keys: _Keys | None = None
        self._memo: dict[str, dict[tuple, Any]] = {}  # content key (scope) -> view key -> answer
        self._local = threading.local()  # per thread: stack, con, keys, used_keys

    @property
    def path(self) -> Path:
        return self.store.path

    # --- sessions, content keys and the memo ---------------------------------------------------

    @contextlib.contextmanager
    def _session(self):
        """Scope of one public call: the content keys of the version it reads, and at most one
        read-only connection. A call whose keys are current opens nothing until it must read;
        after a commit, the call opens its connection first and reads the new keys on it."""
        local = self._local
        if getattr(local, "stack", None) is not None:
            yield
            return
        local.stack, local.con, local.used_keys = contextlib.ExitStack(), None, False
        try:
            token = self.store.version_token()
            with self._lock:
                local.keys = self._keys if self._keys is not None and self._keys.token == token \
                    else None
            if local.keys is None:
                if self.store.exists():
                    self._connection()
                else:
                    local.keys = self._publish(_Keys.of(token, {}))
            yield
        finally:
            stack, local.stack, local.con = local.stack, None, None
            stack.close()

    def _connection(self):
        """The call's read-only connection, opened on first use. While it is open no commit can
        land, so the version read right after opening is the one every query of the call sees."""
        local = self._local
        if local.con is None:
            local.con = local.stack.enter_context(self.store.read())
            token = self.store.version_token()
            if local.keys is None or local.keys.token != token:
                if local.used_keys:
                    raise _SnapshotMoved()
                shared = _KEYS_FOUND.get(self.path.resolve())
                if shared is None or shared.token != token:
                    shared = _KEYS_FOUND[self.path.resolve()] = _Keys.of(
                        token, self._read_content_keys(local.con))
                local.keys = self._publish(shared)
        return local.con

    @staticmethod
    def _read_content_keys(con) -> dict[str, str]:
        has_runs = fetch_one(con, "SELECT count(*) FROM information_schema.tables "
                                  "WHERE table_name = 'runs'")[0] > 0
        if not has_runs:
            return {}
        return {row[0]: stable_hash([*map(str, row)]) for row in con.execute(_CONTENT_SQL).fetchall()}

    def _publish(self, keys: _Keys) -> _Keys:
        """Make `keys` the current ones; answers of runs whose content changed are dropped."""
        with self._lock:
            if self._keys is None or self._keys.token != keys.token:
                live = set(keys.runs.values()) | {keys.all_runs}
                self._memo = {scope: answers for scope, answers in self._memo.items()
                              if scope in live}
                self._keys = keys
        return keys

    def _scope(self, run_key: str | None) -> str:
        """The memo scope of a run's views (its content key), or of views over all runs (None)."""
        local = self._local
        local.used_keys = True
        if run_key is None:
            return local.keys.all_runs
        try:
            return local.keys.runs[run_key]
        except KeyError:
            raise RunNotFoundError(f"no run {run_key!r} in the cache {self.path}; "
                                   f"`python -m core ls` lists the cached runs") from None

    def _run_keys(self) -> dict[str, str]:
        """Every run's content key in the current call's snapshot."""
        self._local.used_keys = True
        return self._local.keys.runs

    def _cached(self, run_key: str | None, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` once per key and content of the run (`run_key`, or None: all runs)."""
        with self._session():
            scope = self._scope(run_key)
            with self._lock:
                answers = self._memo.get(scope)
                if answers is not None and key in answers:
                    return answers[key]
            value = compute()
            with self._lock:
                # Kept only while the scope is current (another thread may have moved on).
                if self._keys is not None and scope in (self._keys.all_runs,
                                                        *self._keys.runs.values()):
                    self._memo.setdefault(scope, {})[key] = value
            return value

    def _sql(self, sql: str, params: Any = None) -> pd.DataFrame:
        return self._connection().execute(sql, params).df()
