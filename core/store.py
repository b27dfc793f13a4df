"""The result cache: one DuckDB file holding everything a run produced, keyed by what produced it.

Layout (every key is a content hash, recipes in core/keys.py; docs/method.md section 9):
- models, datasets + questions: identity of inputs (a model is its spec plus a content fingerprint,
  a question its text and reference);
- generations (prompt and answer token ids exactly as generated), keyed by model, question content
  and generation settings, so any dataset holding the question reuses the answer; and grades;
- scores: one row per (generation, T_cut, score settings, scorer model) with the sample's loss,
  time and norms, its real-edge vector and its position parts' vectors in edge_vectors_<n_edges>, so
  identical work is shared by every run needing it; the scorer is the answer's own model, or another
  model of the run scored on its tokens (cross-scoring);
- runs, run_models, run_samples, run_alphas: what a run is (pair or series, dataset, settings), the
  questions it selected, T_bar and T_cut per alpha;
- metrics: the default-convention comparison of each run, post model and alpha;
- run_controls: the control runs (null models) of a run's post models;
- stage_timings and code versions.

`core.runstore.RunStore` is the only way a run reads and writes these tables; `core.migrations.migrate`
upgrades a cache of an older schema version.

Concurrency. DuckDB lets one process open a file read-write OR several open it read-only. So:
- one writer at a time: a job holds `<cache>.writer.lock` (a file lock) for its whole duration;
- connections are short-lived: the writer opens the file for one transaction and closes it, readers
  open it read-only for one query and close it; either side retries while the other holds the file;
- a transaction commits a complete unit (a sample's scores with its loss and time), so a killed
  writer (kill -9) loses only the unit in flight, which DuckDB rolls back on the next open.

Integrity. Taking the writer lock first checks that the folder is writable, then opens the file
read-only and checks it whole (`file_damage`): every block the database uses lies inside the file,
and every block in the file carries the checksum DuckDB stored with it (or was never written), so
damage anywhere (data, metadata or index blocks, which DuckDB itself reads only when a query needs
them) is found before anything is written. Reads check it on their own read-only connection (no
writer can change the file meanwhile), once per version. Both check the schema: every table with
this code's columns and types. A damaged file is refused with CacheCorruptError and never opened for
writing, so its bytes stay as they were; any other DuckDB failure to read or write the file is a
CacheError naming it.
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
from core.errors import CircuitdiffError, check_output_file, one_line

SCHEMA_VERSION = "3"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CACHE = "CIRCUITDIFF_CACHE"
# Retry a busy file every RETRY_S seconds, for up to this long.
OPEN_TIMEOUT_S = 30.0
RETRY_S = 0.02
# A DuckDB file starts with three 4 KiB headers; block i lies at HEADERS_BYTES + i * block size.
HEADERS_BYTES = 3 * 4096
# Each block starts with the 8-byte checksum of the rest (DuckDB's storage format; a test checks
# that every block of a fresh cache verifies, so a format change fails the suite, not a user).
BLOCK_CHECKSUM_BYTES = 8
# Blocks verified per read, to bound memory on large files.
CHECKSUM_CHUNK_BLOCKS = 64
# Words of DuckDB errors that mean the file is damaged (DuckDB raises a checksum mismatch as its
# base duckdb.Error, so these are matched on any DuckDB error).
_DAMAGE_SIGNS = ("Corrupt", "not a valid DuckDB database", "Could not read enough bytes", "checksum")
# DuckDB errors that say the file cannot be read or written (others are mistakes in a query).
_FILE_ERRORS = (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException,
                duckdb.FatalException)

TABLES = {
    "meta": """key VARCHAR PRIMARY KEY, value VARCHAR""",
    "models": """model_key VARCHAR PRIMARY KEY, label VARCHAR, spec VARCHAR, fingerprint VARCHAR,
        architecture VARCHAR, n_layers INTEGER, tokenizer_fingerprint VARCHAR, created_at TIMESTAMP""",
    "datasets": """dataset_key VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR,
        content_hash VARCHAR, n_questions INTEGER, created_at TIMESTAMP""",
    "questions": """dataset_key VARCHAR, question_id VARCHAR, question_key VARCHAR, position INTEGER,
        question VARCHAR, reference VARCHAR, PRIMARY KEY (dataset_key, question_id)""",
    # An answer is keyed by (model, question content, generation settings); dataset_key and
    # question_id say where it was first generated (provenance only).
    "generations": """generation_key VARCHAR PRIMARY KEY, model_key VARCHAR, question_key VARCHAR,
        dataset_key VARCHAR, question_id VARCHAR, gen_key VARCHAR, prompt_ids INTEGER[], answer_ids INTEGER[],
        answer_text VARCHAR, finish_reason VARCHAR, seconds DOUBLE, backend VARCHAR,
        created_at TIMESTAMP""",
    "grades": """generation_key VARCHAR PRIMARY KEY, extracted VARCHAR, correct BOOLEAN,
        rule VARCHAR, created_at TIMESTAMP""",
    "runs": """run_key VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, dataset_key VARCHAR,
        dataset_name VARCHAR, gen_key VARCHAR, gen_settings VARCHAR, selection_key VARCHAR,
        selection VARCHAR, score_key VARCHAR, score VARCHAR, n_layers INTEGER, granularity VARCHAR,
        n_candidates INTEGER, n_selected INTEGER, t_bar DOUBLE, selection_report VARCHAR,
        code_version VARCHAR, git_commit VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP""",
    # step: a series' training step of the post model (NULL where the series declares none).
    "run_models": """run_key VARCHAR, label VARCHAR, role VARCHAR, model_key VARCHAR,
        algorithm VARCHAR, position INTEGER, step INTEGER, PRIMARY KEY (run_key, label)""",
    "run_samples": """run_key VARCHAR, label VARCHAR, question_id VARCHAR, position INTEGER,
        generation_key VARCHAR, PRIMARY KEY (run_key, label, question_id)""",
    "run_alphas": """run_key VARCHAR, alpha DOUBLE, t_cut INTEGER, PRIMARY KEY (run_key, alpha)""",
    # The vector of a score row is row `vector_id` of table edge_vectors_<n_edges> (see
    # insert_scores): a fixed-size FLOAT[n] column is read by id several times faster than a list.
    # model_key is the SCORER's model: the answer's own model, or (cross-scoring) another model of
    # the run scored on this answer's tokens. part_vector_ids: the vectors, in the same table, of
    # the position parts in core.eap.POSITION_GROUPS order (NULL where they were not computed);
    # the norms are the engine's per-sample measures (NULL for rows scored before them).
    "scores": """generation_key VARCHAR, t_cut INTEGER, score_key VARCHAR, model_key VARCHAR,
        dataset_key VARCHAR, question_id VARCHAR, n_edges INTEGER, vector_id BIGINT, loss DOUBLE,
        seconds DOUBLE, n_scored_tokens INTEGER, scored_text VARCHAR, code_version VARCHAR,
        created_at TIMESTAMP, part_vector_ids BIGINT[], logit_grad_norm DOUBLE,
        logits_slot_grad_norm DOUBLE, residual_norm DOUBLE,
        PRIMARY KEY (generation_key, t_cut, score_key, model_key)""",
    # A control of a run's post model (docs/method.md section 8): a null model's comparison with the
    # base is a run of its own (control_run_key), linked here.
    "run_controls": """run_key VARCHAR, post_label VARCHAR, control VARCHAR,
        control_run_key VARCHAR, created_at TIMESTAMP, PRIMARY KEY (run_key, post_label, control)""",
    "metrics": """run_key VARCHAR, post_label VARCHAR, alpha DOUBLE, settings_key VARCHAR,
        settings VARCHAR, comparison VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, post_label, alpha, settings_key)""",
    "stage_timings": """run_key VARCHAR, stage VARCHAR, items INTEGER, seconds DOUBLE,
        code_version VARCHAR, git_commit VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, stage, created_at)""",
    "file_hashes": """path VARCHAR PRIMARY KEY, size BIGINT, mtime_ns BIGINT, sha256 VARCHAR""",
    # The faithfulness control of one model of a run at one alpha (docs/method.md section 8): the
    # report of core.faithfulness (edges' W and Delta, agreement, recovery curve) as JSON, keyed by
    # the score and ablation settings that produced it.
    "faithfulness": """run_key VARCHAR, alpha DOUBLE, label VARCHAR, settings_key VARCHAR,
        settings VARCHAR, report VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, alpha, label, settings_key)""",
    # The token view of one question of a run (docs/method.md section 8): per answer position, each
    # model's contribution to the edges that changed most, as JSON, computed on demand by a job.
    "token_views": """run_key VARCHAR, alpha DOUBLE, question_id VARCHAR, settings_key VARCHAR,
        view VARCHAR, created_at TIMESTAMP, PRIMARY KEY (run_key, alpha, question_id, settings_key)""",
    # Pairs and series made from the browser (not in pairs.toml): `declaration` is the JSON of what
    # a pairs.toml entry would hold (base, post or posts, template, max_new_tokens, dataset).
    "user_pairs": """name VARCHAR PRIMARY KEY, kind VARCHAR, declaration VARCHAR,
        created_at TIMESTAMP""",
    # Datasets uploaded from the browser: the validated JSONL itself, and its content hash.
    "user_datasets": """name VARCHAR PRIMARY KEY, source VARCHAR, sha256 VARCHAR,
        n_questions INTEGER, rows VARCHAR, created_at TIMESTAMP""",
}


# The version token at which each cache file (resolved path) was last found whole in this process:
# every Store of a file shares it, so the whole-file check runs once per version, not per reader.
_FOUND_WHOLE: dict[Path, tuple] = {}
# Likewise the version token at which each file's schema was last found current: a fresh Store (a
# fresh ResultCache, a new dashboard session) skips reading every table's columns again.
_SCHEMA_FOUND: dict[Path, tuple] = {}


class CacheError(CircuitdiffError, RuntimeError):
    """The cache cannot be used as asked; the message says why and what to do."""


class CacheCorruptError(CacheError):
    """The file is damaged or not a circuitdiff cache; it was left untouched."""


class CacheBusyError(CacheError):
    """Another process kept the file open past the timeout."""


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


def file_damage(con: duckdb.DuckDBPyConnection, path: Path) -> str | None:
    """Why the DuckDB file at `path`, open on `con`, cannot be whole, or None: every block the
    database uses (its metadata and each table's data, as DuckDB lists them) must lie inside the
    file. The header's block count cannot serve: DuckDB cuts free blocks off the file's end but
    keeps counting them."""
    total, used, block_bytes = fetch_one(
        con, "SELECT total_blocks, used_blocks, block_size FROM pragma_database_size() "
             "WHERE database_name = current_database()")
    in_file = max(path.stat().st_size - HEADERS_BYTES, 0) // block_bytes
    last = fetch_one(con, "SELECT max(block_id) FROM pragma_metadata_info()")[0]
    for (table,) in con.execute("SELECT table_name FROM duckdb_tables() "
                                "WHERE database_name = current_database()").fetchall():
        data = fetch_one(con, "SELECT max(greatest(block_id, coalesce(list_max(additional_block_ids), "
                              "-1))) FROM pragma_storage_info(?)", [table])[0]
        last = max(last if last is not None else -1, data if data is not None else -1)
    if last is not None and last >= in_file:
        return (f"block {last} is in use ({used} of {total} blocks of {block_bytes} bytes) but the "
                f"file holds only {in_file} blocks: it was cut short")
    bad = bad_blocks(path, block_bytes, in_file)
    if bad:
        shown = ", ".join(str(b) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
        fail = "fails its checksum, block" if len(bad) == 1 else "fail their checksums, blocks"
        return (f"{len(bad)} of its {in_file} blocks of {block_bytes} bytes {fail} {shown}: bytes "
                f"inside the file were overwritten")
    return None


def _block_checksums(blocks):
    """DuckDB's checksum of each row of `blocks` (uint64 words after the checksum word): 5381 xor
    the product of every word with 0xbf58476d1ce4e5b9, modulo 2^64."""
    import numpy as np

    with np.errstate(over="ignore"):
        return np.bitwise_xor.reduce(blocks * np.uint64(0xBF58476D1CE4E5B9), axis=1) ^ np.uint64(5381)


def bad_blocks(path: Path, block_bytes: int, n_blocks: int) -> list[int]:
    """The blocks among the file's first n_blocks whose stored checksum does not match their
    content. A block of zeros was allocated but never written (a writer killed while growing the
    file) and holds nothing: it is not damage. Reads the whole file once, in chunks."""
    import numpy as np

    words = block_bytes // 8
    if block_bytes % 8 or (block_bytes - BLOCK_CHECKSUM_BYTES) % 8:
        raise CacheError(f"the cache {path} has blocks of {block_bytes} bytes, which this code "
                         f"cannot verify; use the DuckDB version pinned in requirements.txt")
    bad: list[int] = []
    with open(path, "rb") as handle:
        for first in range(0, n_blocks, CHECKSUM_CHUNK_BLOCKS):
            count = min(CHECKSUM_CHUNK_BLOCKS, n_blocks - first)
            handle.seek(HEADERS_BYTES + first * block_bytes)
            chunk = np.frombuffer(handle.read(count * block_bytes), dtype="<u8").reshape(count, words)
            stored, content = chunk[:, 0], chunk[:, BLOCK_CHECKSUM_BYTES // 8:]
            mismatch = _block_checksums(content) != stored
            if mismatch.any():
                unwritten = ~chunk[mismatch].any(axis=1)
                bad.extend(int(first + i) for i in np.flatnonzero(mismatch)[~unwritten])
    return bad


@functools.cache
def expected_columns() -> dict[str, list[tuple[str, str]]]:
    """(name, type) of every column of every table in TABLES, as DuckDB names them."""
    con = duckdb.connect(":memory:")
    try:
        for name, columns in TABLES.items():
            con.execute(f"CREATE TABLE {name} ({columns})")
        return _columns(con)
    finally:
        con.close()


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name IN (SELECT unnest(?)) "
            "ORDER BY table_name, ordinal_position", [list(TABLES)]).fetchall():
        found.setdefault(table, []).append((column, kind))
    return found


def _is_file_error(error: duckdb.Error) -> bool:
    """Whether a DuckDB error is about the file (damaged, unreadable, unwritable), not the query."""
    return isinstance(error, _FILE_ERRORS) or any(sign in str(error) for sign in _DAMAGE_SIGNS)


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
                raise self._failure(error, "open") from error

    def _failure(self, error: duckdb.Error, doing: str) -> CacheError:
        """The CacheError to raise for a DuckDB error while `doing` the file: CacheCorruptError
        when the file is damaged, else one line naming the file and DuckDB's words."""
        if any(sign in str(error) for sign in _DAMAGE_SIGNS):
            return self._corrupt(one_line(error))
        return CacheError(f"cannot {doing} the cache {self.path}: {one_line(error)}; check the disk "
                          f"(space, permissions), then retry")

    def _corrupt(self, why: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"the cache file {self.path} is damaged ({why}); it was left untouched: move it aside "
            f"(or restore a copy), then rerun or re-import runs with `python -m core import` into a "
            f"new cache")

    def check_file(self) -> None:
        """Raise CacheCorruptError when the file is damaged (see file_damage); opens it read-only,
        so nothing is written to it."""
        if not self.exists() or self._found_whole(self.version_token()):
            return
        con = self._connect(read_only=True, timeout=OPEN_TIMEOUT_S)
        try:
            self._check_open_file(con)
        finally:
            con.close()

    def _check_open_file(self, con: duckdb.DuckDBPyConnection) -> None:
        """check_file on an open connection (while it is open, no writer changes the file)."""
        token = self.version_token()
        if self._found_whole(token):
            return
        try:
            damage = file_damage(con, self.path)
        except duckdb.Error as error:
            if not _is_file_error(error):
                raise
            raise self._failure(error, "read") from error
        if damage:
            raise self._corrupt(damage)
        _FOUND_WHOLE[self.path.resolve()] = token

    def _found_whole(self, token: tuple) -> bool:
        """Whether this process found the file whole at version `token`."""
        return _FOUND_WHOLE.get(self.path.resolve()) == token

    def check_writable(self) -> None:
        """Raise OutputPathError unless the cache's folder (for the file, its lock, write-ahead log
        and version files) and the file itself can be written; creates the folder if missing."""
        check_output_file(self.path, "the cache", f"make its folder writable, or point --cache or "
                                                  f"{ENV_CACHE} at a writable place")

    @contextlib.contextmanager
    def read(self, timeout: float = OPEN_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for one consistent read; the file must exist."""
        if not self.exists():
            raise CacheError(f"the cache {self.path} does not exist yet; run `python -m core run` "
                             f"or `python -m core import` to fill it")
        if self.path.is_dir():
            raise CacheError(f"the cache {self.path} is a folder; give the path of the cache file "
                             f"(e.g. {self.path / 'circuitdiff.duckdb'})")
        con = self._connect(read_only=True, timeout=timeout)
        try:
            try:
                self._check_open_file(con)
                self._check_schema(con)
                con.execute("BEGIN TRANSACTION")
                yield con
            except duckdb.Error as error:
                if not _is_file_error(error):
                    raise
                raise self._failure(error, "read") from error
        finally:
            con.close()

    @contextlib.contextmanager
    def write(self, timeout: float = OPEN_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction: committed as a whole when the block ends, rolled back on error.
        Takes the writer lock for the block unless this process already holds it."""
        with self.writer_lock(wait=True):
            con = self._connect(read_only=False, timeout=timeout)
            try:
                self._ensure_schema(con)
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    # A connection DuckDB invalidated cannot roll back; the next open discards
                    # the uncommitted work anyway.
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
                # While this connection is open no reader can open the file, so a reader never
                # sees the new data under the old version.
                self._bump_version()
            except duckdb.Error as error:
                if not _is_file_error(error):
                    raise
                raise self._failure(error, "write") from error
            finally:
                con.close()
            # This process wrote the file as it is now, holding the writer lock.
            _FOUND_WHOLE[self.path.resolve()] = self.version_token()

    @contextlib.contextmanager
    def writer_lock(self, wait: bool = False, timeout: float = OPEN_TIMEOUT_S) -> Iterator[None]:
        """Hold the cache's single-writer lock (re-entrant within this Store).

        wait=False fails at once with WriterBusyError when another process holds it. Taking it
        checks first that the cache can be written and then that the file is not damaged
        (CacheCorruptError), before anything is written."""
        import filelock

        lock = self._lock()
        first = lock.lock_counter == 0
        if first:
            self.check_writable()
        try:
            lock.acquire(timeout=timeout if wait else 0)
        except filelock.Timeout:
            raise WriterBusyError(
                f"another process is writing to the cache {self.path} (lock {self.lock_path} is "
                f"held): wait for its run to finish, or cancel it, then retry") from None
        try:
            if first:
                self.check_file()
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
        token = self.version_token()
        if _SCHEMA_FOUND.get(self.path.resolve()) == token:
            self._schema_checked = True
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
        found = row[0] if row else "none"
        if found.isdigit() and int(found) < int(SCHEMA_VERSION):
            raise CacheError(f"the cache {self.path} has schema version {found}, this code reads "
                             f"version {SCHEMA_VERSION}: run `python -m core migrate --cache "
                             f"{self.path}` once (it keeps a copy as {self.path}.v{found}.bak)")
        if found != SCHEMA_VERSION:
            raise CacheError(f"the cache {self.path} has schema version {found}, this code reads "
                             f"version {SCHEMA_VERSION}; export its runs with the matching code "
                             f"version, or use a new cache file (CIRCUITDIFF_CACHE)")
        found_columns, expected = _columns(con), expected_columns()
        if "scores" in found_columns and "part_vector_ids" not in dict(found_columns["scores"]):
            raise CacheError(f"the cache {self.path} was written before controls (its scores have "
                             f"no scorer key or position parts): run `python -m core migrate "
                             f"--cache {self.path}` once (it keeps a copy as {self.path}.v2-draft.bak)")
        for table, columns in expected.items():
            if found_columns.get(table) != columns:
                have = found_columns.get(table)
                difference = (f"the table {table} is missing" if have is None else
                              f"the table {table} has the columns {have}, schema version "
                              f"{SCHEMA_VERSION} has {columns}")
                raise self._corrupt(difference)
        self._schema_checked = True
        _SCHEMA_FOUND[self.path.resolve()] = token

    def schema_version(self) -> str | None:
        """The version the file declares (None: no cache there yet), read without checking it."""
        if not self.exists():
            return None
        con = self._connect(read_only=True, timeout=OPEN_TIMEOUT_S)
        try:
            row = fetch_one(con, "SELECT value FROM meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            return None
        finally:
            con.close()
        return row[0] if row else None

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


def vector_table(n_edges: int) -> str:
    """Name of the table of edge vectors of length n_edges (an identifier built from an int)."""
    return f"edge_vectors_{int(n_edges)}"


def insert_scores(con: duckdb.DuckDBPyConnection, rows: list[dict], vectors, parts=None) -> None:
    """Score rows (the `scores` columns but vector_id, n_edges and part_vector_ids) with their
    real-edge vectors [len(rows), n_edges] and, optionally, their position parts
    [len(rows), len(POSITION_GROUPS), n_edges], inside a write transaction. A row is keyed by
    (generation, T_cut, score settings, scorer model); rows whose key exists (in the cache or
    earlier in `rows`) are skipped. Vector ids are unique within edge_vectors_<n_edges>."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not rows:
        return
    keys = [(r["generation_key"], int(r["t_cut"]), r["score_key"], r["model_key"]) for r in rows]
    existing = set(con.execute(
        "SELECT generation_key, t_cut, score_key, model_key FROM scores "
        "WHERE generation_key IN (SELECT unnest(?))", [sorted({k[0] for k in keys})]).fetchall())
    keep = []
    for i, key in enumerate(keys):  # the first row of a key repeated within `rows` wins
        if key not in existing:
            existing.add(key)
            keep.append(i)
    if not keep:
        return
    n_edges = vectors.shape[1]
    n_parts = 0
    if parts is not None:
        parts = np.ascontiguousarray(parts, dtype=np.float32)
        if parts.ndim != 3 or parts.shape[0] != len(rows) or parts.shape[2] != n_edges:
            raise ValueError(f"position parts of shape {parts.shape} do not match {len(rows)} rows "
                             f"of {n_edges} edges")
        n_parts = parts.shape[1]
    table = vector_table(n_edges)
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} (vector_id BIGINT, edge_scores FLOAT[{n_edges}])")
    # Past the largest id of any score row (as before parts existed) and of this table (parts).
    first = fetch_one(con, f"SELECT greatest((SELECT coalesce(max(vector_id), -1) FROM scores), "
                           f"(SELECT coalesce(max(vector_id), -1) FROM {table})) + 1")[0]
    # Each kept row takes 1 + n_parts consecutive ids: its total, then its parts in order.
    ids = first + np.arange(len(keep) * (1 + n_parts), dtype=np.int64).reshape(len(keep), 1 + n_parts)
    stacked = vectors[keep][:, None, :] if not n_parts else np.concatenate(
        [vectors[keep][:, None, :], parts[keep]], axis=1)
    incoming = pa.table({"vector_id": ids.ravel(), "edge_scores": pa.FixedSizeListArray.from_arrays(
        pa.array(stacked.ravel(), type=pa.float32()), n_edges)})
    con.register("_incoming_vectors", incoming)
    try:
        con.execute(f"INSERT INTO {table} SELECT vector_id, edge_scores FROM _incoming_vectors")
    finally:
        con.unregister("_incoming_vectors")
    Store.insert_rows(con, "scores", [
        {**rows[i], "n_edges": n_edges, "vector_id": int(row_ids[0]),
         "part_vector_ids": [int(v) for v in row_ids[1:]] if n_parts else None}
        for i, row_ids in zip(keep, ids)])


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
