"""The result cache: one DuckDB file holding everything a run produced, keyed by what produced it.

Layout (every key is a content hash, see `core.settings.stable_hash`):
- models, datasets + questions: identity of inputs (a model is its spec plus a content fingerprint);
- generations (prompt and answer token ids exactly as generated) and grades;
- scores: one row per (generation, T_cut, score settings) with the sample's loss and time, and its
  real-edge vector in edge_vectors_<n_edges>, so identical work is shared by every run needing it;
- runs, run_models, run_samples, run_alphas: what a run is (pair or series, dataset, settings), the
  questions it selected, T_bar and T_cut per alpha;
- metrics: the default-convention comparison of each run, post model and alpha;
- stage_timings and code versions.

Concurrency. DuckDB lets one process open a file read-write OR several open it read-only. So:
- one writer at a time: a job holds `<cache>.writer.lock` (a file lock) for its whole duration;
- connections are short-lived: the writer opens the file for one transaction and closes it, readers
  open it read-only for one query and close it; either side retries while the other holds the file;
- a transaction commits a complete unit (a sample's scores with its loss and time), so a killed
  writer (kill -9) loses only the unit in flight, which DuckDB rolls back on the next open.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb

from core import __version__
from core.settings import stable_hash

SCHEMA_VERSION = "1"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CACHE = "CIRCUITDIFF_CACHE"
# Retry a busy file every RETRY_S seconds, for up to this long.
OPEN_TIMEOUT_S = 30.0
RETRY_S = 0.02

TABLES = {
    "meta": """key VARCHAR PRIMARY KEY, value VARCHAR""",
    "models": """model_key VARCHAR PRIMARY KEY, label VARCHAR, spec VARCHAR, fingerprint VARCHAR,
        architecture VARCHAR, n_layers INTEGER, tokenizer_fingerprint VARCHAR, created_at TIMESTAMP""",
    "datasets": """dataset_key VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR,
        content_hash VARCHAR, n_questions INTEGER, created_at TIMESTAMP""",
    "questions": """dataset_key VARCHAR, question_id VARCHAR, position INTEGER, question VARCHAR,
        reference VARCHAR, PRIMARY KEY (dataset_key, question_id)""",
    "generations": """generation_key VARCHAR PRIMARY KEY, model_key VARCHAR, dataset_key VARCHAR,
        question_id VARCHAR, gen_key VARCHAR, prompt_ids INTEGER[], answer_ids INTEGER[],
        answer_text VARCHAR, finish_reason VARCHAR, seconds DOUBLE, backend VARCHAR,
        created_at TIMESTAMP""",
    "grades": """generation_key VARCHAR PRIMARY KEY, extracted VARCHAR, correct BOOLEAN,
        rule VARCHAR, created_at TIMESTAMP""",
    "runs": """run_key VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, dataset_key VARCHAR,
        dataset_name VARCHAR, gen_key VARCHAR, gen_settings VARCHAR, selection_key VARCHAR,
        selection VARCHAR, score_key VARCHAR, score VARCHAR, n_layers INTEGER, granularity VARCHAR,
        n_candidates INTEGER, n_selected INTEGER, t_bar DOUBLE, selection_report VARCHAR,
        code_version VARCHAR, git_commit VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP""",
    "run_models": """run_key VARCHAR, label VARCHAR, role VARCHAR, model_key VARCHAR,
        algorithm VARCHAR, position INTEGER, PRIMARY KEY (run_key, label)""",
    "run_samples": """run_key VARCHAR, label VARCHAR, question_id VARCHAR, position INTEGER,
        generation_key VARCHAR, PRIMARY KEY (run_key, label, question_id)""",
    "run_alphas": """run_key VARCHAR, alpha DOUBLE, t_cut INTEGER, PRIMARY KEY (run_key, alpha)""",
    # The vector of a score row is row `vector_id` of table edge_vectors_<n_edges> (see
    # insert_scores): a fixed-size FLOAT[n] column is read by id several times faster than a list.
    "scores": """generation_key VARCHAR, t_cut INTEGER, score_key VARCHAR, model_key VARCHAR,
        dataset_key VARCHAR, question_id VARCHAR, n_edges INTEGER, vector_id BIGINT, loss DOUBLE,
        seconds DOUBLE, n_scored_tokens INTEGER, scored_text VARCHAR, code_version VARCHAR,
        created_at TIMESTAMP, PRIMARY KEY (generation_key, t_cut, score_key)""",
    "metrics": """run_key VARCHAR, post_label VARCHAR, alpha DOUBLE, settings_key VARCHAR,
        settings VARCHAR, comparison VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, post_label, alpha, settings_key)""",
    "stage_timings": """run_key VARCHAR, stage VARCHAR, items INTEGER, seconds DOUBLE,
        code_version VARCHAR, git_commit VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, stage, created_at)""",
    "file_hashes": """path VARCHAR PRIMARY KEY, size BIGINT, mtime_ns BIGINT, sha256 VARCHAR""",
}


class CacheError(RuntimeError):
    """The cache cannot be used as asked; the message says why and what to do."""


class CacheCorruptError(CacheError):
    pass


class CacheBusyError(CacheError):
    pass


class WriterBusyError(CacheError):
    """Another process holds the cache's writer lock (a run, an import or a synthetic build)."""


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> tuple | None:
    """The first row of a query, or None; the result is read to the end (DuckDB refuses further
    work on a connection with an unfinished result)."""
    rows = con.execute(sql, params).fetchall()
    return rows[0] if rows else None


def default_cache_path() -> Path:
    return Path(os.environ.get(ENV_CACHE) or REPO_ROOT / "cache" / "circuitdiff.duckdb")


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> str:
    commit = git_commit()
    return f"{__version__}+{commit[:12]}" if commit else __version__


def _is_lock_conflict(error: Exception) -> bool:
    text = str(error)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


class Store:
    """Access to one cache file. Cheap to create; holds no connection between calls."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.lock_path = Path(str(self.path) + ".writer.lock")
        self.version_path = Path(str(self.path) + ".version")
        self._schema_checked = False

    def exists(self) -> bool:
        return self.path.exists()

    def version_token(self) -> tuple:
        """Changes whenever a transaction commits, without opening the database: what in-process
        memoisation keys on. Every commit rewrites `<cache>.version` (file times alone can miss two
        quick commits that leave the file sizes unchanged); the file stats also cover a writer killed
        between its commit and that rewrite."""
        token: list = []
        try:
            token.append(self.version_path.read_text())
        except FileNotFoundError:
            token.append(None)
        for file in (self.path, Path(str(self.path) + ".wal")):
            try:
                stat = file.stat()
                token.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                token.append(None)
        return tuple(token)

    def _bump_version(self) -> None:
        temporary = self.version_path.with_name(f".{self.version_path.name}.{os.getpid()}")
        temporary.write_text(uuid.uuid4().hex)
        os.replace(temporary, self.version_path)

    # --- connections ------------------------------------------------------------------------

    def _connect(self, read_only: bool, timeout: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as error:
                if _is_lock_conflict(error):
                    if time.monotonic() > deadline:
                        raise CacheBusyError(
                            f"the cache {self.path} stayed locked by another process for "
                            f"{timeout:.0f} s ({error}); wait for it to finish and retry") from error
                    time.sleep(RETRY_S)
                    continue
                if "not a valid DuckDB database" in str(error) or "Corrupt" in str(error):
                    raise CacheCorruptError(
                        f"the cache file {self.path} is not a readable DuckDB database ({error}). "
                        f"It was left untouched: move it aside (or delete it) to start an empty "
                        f"cache, then re-import runs with `python -m core import`.") from error
                raise CacheError(f"cannot open the cache {self.path}: {error}") from error

    @contextlib.contextmanager
    def read(self, timeout: float = OPEN_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for one consistent read; the file must exist."""
        if not self.exists():
            raise CacheError(f"the cache {self.path} does not exist yet; run `python -m core run` "
                             f"or `python -m core import` to fill it")
        con = self._connect(read_only=True, timeout=timeout)
        try:
            self._check_schema(con)
            con.execute("BEGIN TRANSACTION")
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def write(self, timeout: float = OPEN_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction: committed as a whole when the block ends, rolled back on error.
        Takes the writer lock for the block unless this process already holds it."""
        with self.writer_lock(wait=True):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = self._connect(read_only=False, timeout=timeout)
            try:
                self._ensure_schema(con)
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
                # While this connection is open no reader can open the file, so a reader never
                # sees the new data under the old version.
                self._bump_version()
            finally:
                con.close()

    @contextlib.contextmanager
    def writer_lock(self, wait: bool = False, timeout: float = OPEN_TIMEOUT_S) -> Iterator[None]:
        """Hold the cache's single-writer lock (re-entrant within this Store).

        wait=False fails at once with WriterBusyError when another process holds it."""
        import filelock

        lock = self._lock()
        try:
            lock.acquire(timeout=timeout if wait else 0)
        except filelock.Timeout:
            raise WriterBusyError(
                f"another process is writing to the cache {self.path} (lock {self.lock_path} is "
                f"held): wait for its run to finish, or cancel it, then retry") from None
        try:
            yield
        finally:
            lock.release()

    def writer_active(self) -> bool:
        """Whether some process holds the writer lock now."""
        import filelock

        probe = filelock.FileLock(str(self.lock_path), is_singleton=False)
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            return True
        probe.release()
        return False

    def _lock(self):
        import filelock

        if not hasattr(self, "_filelock"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._filelock = filelock.FileLock(str(self.lock_path), is_singleton=False)
        return self._filelock

    # --- schema -------------------------------------------------------------------------------

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        if self._schema_checked:
            return
        existing = {row[0] for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if "meta" in existing:
            self._check_schema(con)
        elif existing:
            raise CacheCorruptError(f"the file {self.path} is a DuckDB database but not a "
                                    f"circuitdiff cache (no meta table); point CIRCUITDIFF_CACHE "
                                    f"elsewhere. It was left untouched.")
        con.execute("BEGIN TRANSACTION")
        for name, columns in TABLES.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('created_at', ?)",
                    [SCHEMA_VERSION, now().isoformat()])
        con.execute("COMMIT")
        self._schema_checked = True

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        if self._schema_checked:
            return
        try:
            row = fetch_one(con, "SELECT value FROM meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            # An empty database: the first write creates the tables.
            if fetch_one(con, "SELECT count(*) FROM information_schema.tables")[0] == 0:
                return
            raise CacheCorruptError(f"the file {self.path} is a DuckDB database but not a "
                                    f"circuitdiff cache (no meta table); point CIRCUITDIFF_CACHE "
                                    f"elsewhere. It was left untouched.") from None
        if row is None or row[0] != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise CacheError(f"the cache {self.path} has schema version {found}, this code reads "
                             f"version {SCHEMA_VERSION}; export its runs with the matching code "
                             f"version, or use a new cache file (CIRCUITDIFF_CACHE)")
        self._schema_checked = True

    def tables_present(self) -> bool:
        if not self.exists():
            return False
        with self.read() as con:
            return fetch_one(con, "SELECT count(*) FROM information_schema.tables WHERE "
                                  "table_name = 'runs'")[0] > 0

    # --- inserts (inside a `write()` block) ---------------------------------------------------

    @staticmethod
    def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict],
                    replace: bool = False) -> None:
        """Insert dict rows; existing keys are kept (or replaced with replace=True)."""
        if not rows:
            return
        if table not in TABLES:
            raise KeyError(f"unknown cache table {table!r}")
        columns = list(rows[0])
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        placeholders = ", ".join("?" for _ in columns)
        con.executemany(f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
                        [[row[c] for c in columns] for row in rows])

    @staticmethod
    def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, arrow_table,
                     replace: bool = False) -> None:
        """Bulk insert of a pyarrow table whose columns are a subset of the table's."""
        if table not in TABLES:
            raise KeyError(f"unknown cache table {table!r}")
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        columns = ", ".join(arrow_table.column_names)
        con.register("_incoming", arrow_table)
        try:
            con.execute(f"{verb} INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        finally:
            con.unregister("_incoming")


def vector_table(n_edges: int) -> str:
    """Name of the table of edge vectors of length n_edges (an identifier built from an int)."""
    return f"edge_vectors_{int(n_edges)}"


def insert_scores(con: duckdb.DuckDBPyConnection, rows: list[dict], vectors) -> None:
    """Score rows (the `scores` columns but vector_id and n_edges) with their real-edge vectors
    [len(rows), n_edges], inside a write transaction. Rows whose key exists are skipped."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not rows:
        return
    keys = [(r["generation_key"], int(r["t_cut"]), r["score_key"]) for r in rows]
    existing = set(con.execute(
        "SELECT generation_key, t_cut, score_key FROM scores WHERE generation_key IN (SELECT unnest(?))",
        [sorted({k[0] for k in keys})]).fetchall())
    keep = [i for i, k in enumerate(keys) if k not in existing]
    if not keep:
        return
    n_edges = vectors.shape[1]
    table = vector_table(n_edges)
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} (vector_id BIGINT, edge_scores FLOAT[{n_edges}])")
    first = fetch_one(con, "SELECT coalesce(max(vector_id), -1) + 1 FROM scores")[0]
    ids = np.arange(first, first + len(keep), dtype=np.int64)
    incoming = pa.table({"vector_id": ids, "edge_scores": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors[keep].ravel(), type=pa.float32()), n_edges)})
    con.register("_incoming_vectors", incoming)
    try:
        con.execute(f"INSERT INTO {table} SELECT vector_id, edge_scores FROM _incoming_vectors")
    finally:
        con.unregister("_incoming_vectors")
    Store.insert_rows(con, "scores", [{**rows[i], "n_edges": n_edges, "vector_id": int(vector_id)}
                                      for i, vector_id in zip(keep, ids)])


def fetch_vectors(con: duckdb.DuckDBPyConnection, n_edges: int, vector_ids: list[int]):
    """Edge vectors [len(vector_ids), n_edges] (float32), in the order of vector_ids."""
    import numpy as np

    if not vector_ids:
        return np.zeros((0, n_edges), dtype=np.float32)
    table = con.sql(f"SELECT vector_id, edge_scores FROM {vector_table(n_edges)} "
                    f"WHERE vector_id IN (SELECT unnest($ids))",
                    params={"ids": [int(i) for i in vector_ids]}).to_arrow_table()
    column = table.column("edge_scores").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    row_of = {v: i for i, v in enumerate(table.column("vector_id").to_pylist())}
    return values.reshape(len(table), n_edges)[[row_of[int(i)] for i in vector_ids]]


def generation_key(model_key: str, dataset_key: str, question_id: str, gen_key: str) -> str:
    return stable_hash(["generation", model_key, dataset_key, question_id, gen_key])


# --- export / import: a run as Parquet files, so a run computed on a GPU server is browsed elsewhere

# Rows of each table that belong to a run ($run_key), its models and dataset.
_EXPORT_SQL = {
    "runs": "SELECT * FROM runs WHERE run_key = $run_key",
    "run_models": "SELECT * FROM run_models WHERE run_key = $run_key",
    "run_samples": "SELECT * FROM run_samples WHERE run_key = $run_key",
    "run_alphas": "SELECT * FROM run_alphas WHERE run_key = $run_key",
    "metrics": "SELECT * FROM metrics WHERE run_key = $run_key",
    "stage_timings": "SELECT * FROM stage_timings WHERE run_key = $run_key",
    "models": "SELECT * FROM models WHERE model_key IN "
              "(SELECT model_key FROM run_models WHERE run_key = $run_key)",
    "datasets": "SELECT * FROM datasets WHERE dataset_key = "
                "(SELECT dataset_key FROM runs WHERE run_key = $run_key)",
    "questions": "SELECT * FROM questions WHERE dataset_key = "
                 "(SELECT dataset_key FROM runs WHERE run_key = $run_key)",
    "generations": "SELECT g.* FROM generations g JOIN runs r ON r.run_key = $run_key "
                   "AND g.dataset_key = r.dataset_key AND g.gen_key = r.gen_key WHERE g.model_key IN "
                   "(SELECT model_key FROM run_models WHERE run_key = $run_key)",
    "grades": "SELECT gr.* FROM grades gr JOIN generations g USING (generation_key) "
              "JOIN runs r ON r.run_key = $run_key AND g.dataset_key = r.dataset_key "
              "AND g.gen_key = r.gen_key WHERE g.model_key IN "
              "(SELECT model_key FROM run_models WHERE run_key = $run_key)",
    "scores": "SELECT s.* FROM scores s JOIN run_samples rs ON rs.generation_key = s.generation_key "
              "AND rs.run_key = $run_key JOIN runs r ON r.run_key = rs.run_key "
              "AND s.score_key = r.score_key "
              "WHERE s.t_cut IN (SELECT t_cut FROM run_alphas WHERE run_key = $run_key)",
}


def export_run(store: Store, run_key: str, folder: str | os.PathLike) -> dict[str, int]:
    """Write the run's rows to `folder`/<table>.parquet (vectors to vectors_<n>.parquet); returns
    rows written per file."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    with store.read() as con:
        if fetch_one(con, "SELECT count(*) FROM runs WHERE run_key = ?", [run_key])[0] == 0:
            raise CacheError(f"no run {run_key!r} in the cache {store.path}; `python -m core ls` "
                             f"lists the cached runs")
        for table, sql in _EXPORT_SQL.items():
            rows = con.sql(sql, params={"run_key": run_key}).to_arrow_table()
            pq.write_table(rows, folder / f"{table}.parquet")
            counts[table] = rows.num_rows
            if table == "scores":
                for n_edges in sorted(set(rows.column("n_edges").to_pylist())):
                    ids = [v for v, n in zip(rows.column("vector_id").to_pylist(),
                                             rows.column("n_edges").to_pylist()) if n == n_edges]
                    vectors = con.sql(f"SELECT vector_id, edge_scores FROM {vector_table(n_edges)} "
                                      f"WHERE vector_id IN (SELECT unnest($ids))",
                                      params={"ids": ids}).to_arrow_table()
                    pq.write_table(vectors, folder / f"vectors_{n_edges}.parquet")
                    counts[f"vectors_{n_edges}"] = vectors.num_rows
    return counts


def import_run(store: Store, folder: str | os.PathLike) -> dict[str, int]:
    """Add an exported run to the cache (rows already present are kept); one transaction."""
    import numpy as np
    import pyarrow.parquet as pq

    folder = Path(folder)
    missing = [t for t in _EXPORT_SQL if not (folder / f"{t}.parquet").exists()]
    if missing:
        raise CacheError(f"{folder} is not an exported run: {', '.join(missing)}.parquet missing; "
                         f"export one with `python -m core export`")
    counts = {}
    with store.write() as con:
        for table in _EXPORT_SQL:
            rows = pq.read_table(folder / f"{table}.parquet")
            counts[table] = rows.num_rows
            if table != "scores":
                Store.insert_arrow(con, table, rows)
                continue
            records = rows.to_pylist()
            for n_edges in sorted({r["n_edges"] for r in records}):
                vectors = pq.read_table(folder / f"vectors_{n_edges}.parquet")
                by_id = dict(zip(vectors.column("vector_id").to_pylist(),
                                 vectors.column("edge_scores").to_pylist()))
                group = [r for r in records if r["n_edges"] == n_edges]
                matrix = np.array([by_id[r["vector_id"]] for r in group], dtype=np.float32)
                insert_scores(con, [{k: v for k, v in r.items() if k not in ("vector_id", "n_edges")}
                                    for r in group], matrix.reshape(len(group), n_edges))
    return counts
