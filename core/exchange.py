"""Export and import of one run: how a run computed on a GPU server is browsed on another machine.

An export is a folder of Parquet files, one per cache table (the run's rows only) and one per edge
vector length, plus `manifest.json`: the format, the cache schema version, the code version, and for
every file its table, columns and types, row count and sha256.

An exported folder comes from someone else, so import trusts nothing in it: it checks the manifest,
that every file lies inside the folder, each checksum, each file's columns and types against this
code's schema (`core.store.TABLES`, never the file's own names) and row count, that keys are unique,
every value of a floating-point column (edge vectors, losses, norms, alphas) is finite, every row
belongs to the exported run and every score has its vector, all before the cache is opened. Each
table's rows are bounded before its file is read: the manifest's declared count must not exceed
what the run can have, given the tables loaded before it (`_ROW_BOUNDS`: a run's samples are at most
its models times its selected questions, ...), and a file holding more rows than declared is refused
from its footer, so junk rows cost neither memory nor time. Only then does import write, in one
transaction (rows already in the cache are kept). Any refusal is one line saying what is wrong, in
which file and table, and what to do; the cache is left as it was (docs/method.md section 9).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from core.store import (SCHEMA_VERSION, TABLES, CacheError, Store, code_version, fetch_one,
                        insert_scores, vector_table)
from core.vocab import CONTROLS, STAGES

FORMAT = "circuitdiff-run-export"
MANIFEST = "manifest.json"
# The manifest's name for files of edge vectors; their cache table is store.vector_table(n_edges).
VECTORS = "edge_vectors"

# The rows of each table that belong to a run ($run_key): its models, its dataset's questions, and
# its models' answers to those questions under its generation settings with their grades, wherever
# the answers were first generated. Import loads the tables in this order: each table's row bound
# (_ROW_BOUNDS) counts rows of tables before it.
_RUN_ROWS = {
    "runs": "SELECT * FROM runs WHERE run_key = $run_key",
    "datasets": "SELECT * FROM datasets WHERE dataset_key = "
                "(SELECT dataset_key FROM runs WHERE run_key = $run_key)",
    "run_models": "SELECT * FROM run_models WHERE run_key = $run_key",
    "run_alphas": "SELECT * FROM run_alphas WHERE run_key = $run_key",
    "questions": "SELECT * FROM questions WHERE dataset_key = "
                 "(SELECT dataset_key FROM runs WHERE run_key = $run_key)",
    "models": "SELECT * FROM models WHERE model_key IN "
              "(SELECT model_key FROM run_models WHERE run_key = $run_key)",
    "run_samples": "SELECT * FROM run_samples WHERE run_key = $run_key",
    "generations": "SELECT * FROM generations WHERE generation_key IN (SELECT generation_key "
                   "FROM run_generations)",
    "grades": "SELECT * FROM grades WHERE generation_key IN (SELECT generation_key "
              "FROM run_generations)",
    "scores": "SELECT * FROM scores WHERE generation_key IN "
              "(SELECT generation_key FROM run_samples WHERE run_key = $run_key) "
              "AND score_key = (SELECT score_key FROM runs WHERE run_key = $run_key) "
              "AND t_cut IN (SELECT t_cut FROM run_alphas WHERE run_key = $run_key)",
    "run_controls": "SELECT * FROM run_controls WHERE run_key = $run_key",
    "metrics": "SELECT * FROM metrics WHERE run_key = $run_key",
    "faithfulness": "SELECT * FROM faithfulness WHERE run_key = $run_key",
    "token_views": "SELECT * FROM token_views WHERE run_key = $run_key",
    "stage_timings": "SELECT * FROM stage_timings WHERE run_key = $run_key",
}
# A run's answers, found by content wherever they were first generated, and whatever its samples
# point at.
_RUN_GENERATIONS = """run_generations AS (
    SELECT g.generation_key FROM generations g JOIN runs r ON r.run_key = $run_key
    WHERE g.generation_key IN (SELECT generation_key FROM run_samples WHERE run_key = $run_key)
    OR (g.gen_key = r.gen_key
        AND g.model_key IN (SELECT model_key FROM run_models WHERE run_key = $run_key)
        AND g.question_key IN (SELECT question_key FROM questions WHERE dataset_key = r.dataset_key)))"""


class ExportFormatError(CacheError):
    """An exported folder is damaged, incomplete or not an export; nothing was imported."""


class ExportVersionError(ExportFormatError):
    """An export written by another cache schema version; nothing was imported."""


class ExportTargetError(CacheError):
    """An export cannot be written where asked; nothing was written."""


class _RunShape(NamedTuple):
    """Row counts of an export's tables loaded so far, and the sizes its run and dataset state."""

    models: int
    alphas: int
    questions: int
    samples: int
    answers: int
    n_selected: int
    n_questions: int


# More models or alphas than any run circuitdiff computes (a series' checkpoints are tens); and more
# rows per (model, alpha) cell than settings variants of metrics or faithfulness, token views per
# question, or resumed runs per stage timing.
_MOST_PER_RUN = 1000
# The most rows of each table a run's export can hold, and why, from the tables loaded before it
# (_RUN_ROWS order). An answer is one per model, question and generation settings; a score one per
# sample, T_cut (one per alpha) and scoring model (its own or, cross-scoring, another of the run's).
_ROW_BOUNDS: dict[str, Callable[[_RunShape], tuple[int, str]]] = {
    "runs": lambda s: (1, "the exported run"),
    "datasets": lambda s: (1, "the run's dataset"),
    "run_models": lambda s: (_MOST_PER_RUN, "models of a run"),
    "run_alphas": lambda s: (_MOST_PER_RUN, "alphas of a run"),
    "questions": lambda s: (s.n_questions, "the dataset's n_questions"),
    "models": lambda s: (s.models, "one per model of the run"),
    "run_samples": lambda s: (s.models * s.n_selected,
                              f"{s.models} models x {s.n_selected} selected questions"),
    "generations": lambda s: (s.models * s.questions + s.samples,
                              f"{s.models} models x {s.questions} questions + {s.samples} samples"),
    "grades": lambda s: (s.answers, "one per answer"),
    "scores": lambda s: (s.samples * s.alphas * s.models,
                         f"{s.samples} samples x {s.alphas} alphas x {s.models} scoring models"),
    "run_controls": lambda s: (s.models * len(CONTROLS),
                               f"{s.models} models x {len(CONTROLS)} controls"),
    "metrics": lambda s: (s.models * s.alphas * _MOST_PER_RUN,
                          f"{s.models} models x {s.alphas} alphas x {_MOST_PER_RUN} settings"),
    "faithfulness": lambda s: (s.models * s.alphas * _MOST_PER_RUN,
                               f"{s.models} models x {s.alphas} alphas x {_MOST_PER_RUN} settings"),
    "token_views": lambda s: (s.alphas * s.n_selected * _MOST_PER_RUN,
                              f"{s.alphas} alphas x {s.n_selected} selected questions x "
                              f"{_MOST_PER_RUN} settings"),
    "stage_timings": lambda s: (len(STAGES) * _MOST_PER_RUN,
                                f"{len(STAGES)} stages x {_MOST_PER_RUN} resumed runs"),
}


# --- export ------------------------------------------------------------------------------------

def export_run(store: Store, run_key: str, folder: str | os.PathLike) -> dict[str, int]:
    """Write the run's rows to `folder` (which must not exist, or be an empty folder) as
    <table>.parquet, vectors_<n_edges>.parquet and manifest.json; returns rows written per file.

    The files are written into a temporary sibling folder renamed to `folder` at the end, so a
    failed export leaves nothing behind."""
    folder = Path(folder)
    with store.read() as con, _Staging() as staging:
        if fetch_one(con, "SELECT count(*) FROM runs WHERE run_key = ?", [run_key])[0] == 0:
            raise CacheError(f"no run {run_key!r} in the cache {store.path}; `python -m core ls` "
                             f"lists the cached runs")
        if folder.is_symlink() or folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ExportTargetError(f"{folder} already exists and is not an empty folder; export "
                                    f"into a new folder (or empty this one)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        partial.mkdir()
        try:
            files = []
            for table, sql in _RUN_ROWS.items():
                rows = con.sql(f"WITH {_RUN_GENERATIONS} {sql}",
                               params={"run_key": run_key}).to_arrow_table()
                files.append(staging.write(partial, f"{table}.parquet", table, rows))
                if table == "scores":
                    files += _write_vectors(con, staging, partial, rows)
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                        "code_version": code_version(), "run_key": run_key, "files": files}
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
            # Renaming onto an empty folder replaces it (POSIX rename).
            os.replace(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return {Path(f["path"]).stem: f["rows"] for f in files}


def _write_vectors(con: duckdb.DuckDBPyConnection, staging: "_Staging", folder: Path,
                   scores) -> list[dict]:
    """The edge vectors the score rows point to (totals and position parts), one file per vector
    length."""
    n_edges = scores.column("n_edges").to_pylist()
    vector_ids = scores.column("vector_id").to_pylist()
    part_ids = scores.column("part_vector_ids").to_pylist()
    files = []
    for n in sorted(set(n_edges)):
        ids = [i for v, parts, length in zip(vector_ids, part_ids, n_edges) if length == n
               for i in [v, *(parts or [])]]
        vectors = con.sql(f"SELECT vector_id, edge_scores FROM {vector_table(n)} "
                          f"WHERE vector_id IN (SELECT unnest($ids)) ORDER BY vector_id",
                          params={"ids": ids}).to_arrow_table()
        files.append(staging.write(folder, f"vectors_{n}.parquet", VECTORS, vectors, n_edges=n))
    return files


# --- import ------------------------------------------------------------------------------------

def import_run(store: Store, folder: str | os.PathLike) -> dict[str, int]:
    """Add an exported run to the cache after checking all of it; one transaction, rows already
    present are kept. Returns rows read per file. Raises ExportFormatError (ExportVersionError for
    another schema version) and writes nothing when any check fails."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFormatError(f"{folder} is not a folder; pass the folder written by "
                                f"`python -m core export`")
    manifest = check_manifest(folder)
    entries = manifest["files"]
    with _Staging() as staging:
        incoming = staging.load_run(folder, manifest)
        columns = {table: staging.columns(table) for table in _RUN_ROWS}
    vectors = {e["n_edges"]: incoming[e["path"]] for e in entries if e["table"] == VECTORS}
    with store.write() as con:
        for entry in entries:
            table, rows = entry["table"], incoming[entry["path"]]
            if table == "scores":
                _insert_scores(con, rows, vectors)
            elif table != VECTORS:
                # Identifiers from the project's schema only; the file's rows come in as data.
                names = ", ".join(columns[table])
                con.register("_incoming", rows)
                try:
                    con.execute(f"INSERT OR IGNORE INTO {table} ({names}) SELECT {names} FROM _incoming")
                finally:
                    con.unregister("_incoming")
    return {Path(e["path"]).stem: e["rows"] for e in entries}


def _insert_scores(con: duckdb.DuckDBPyConnection, scores, vectors: dict[int, Any]) -> None:
    """Score rows with their vectors, through the store (which gives them this cache's ids)."""
    import numpy as np

    records = scores.to_pylist()
    for n_edges, table in sorted(vectors.items()):
        row_of = {v: i for i, v in enumerate(table.column("vector_id").to_pylist())}
        column = table.column("edge_scores").combine_chunks()
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_edges)
        # Rows with and without position parts (and parts of one count) go in separate calls.
        groups: dict[int, list[dict]] = {}
        for r in records:
            if r["n_edges"] == n_edges:
                groups.setdefault(len(r["part_vector_ids"] or ()), []).append(r)
        for n_parts, group in sorted(groups.items()):
            parts = (matrix[np.array([[row_of[i] for i in r["part_vector_ids"]] for r in group],
                                     dtype=np.int64)] if n_parts else None)
            insert_scores(con, [{k: v for k, v in r.items()
                                 if k not in ("vector_id", "n_edges", "part_vector_ids")}
                                for r in group],
                          matrix[np.array([row_of[r["vector_id"]] for r in group], dtype=np.int64)],
                          parts)


# The vector ids that the score rows of $n edges name: totals and position parts.
_NAMED_VECTORS = ("SELECT vector_id FROM scores WHERE n_edges = $n "
                  "UNION ALL SELECT unnest(part_vector_ids) FROM scores WHERE n_edges = $n")
# The fields of a manifest's file entry and their JSON types.
_ENTRY_FIELDS = {"path": str, "table": str, "columns": list, "rows": int, "sha256": str}


def check_manifest(folder: Path) -> dict:
    """The parsed manifest of an export folder, once it is of this code's format and schema
    version, names its run and lists one file per table of a run (and per vector length), each
    inside the folder with its declared row count and matching its checksum. Anything else is one
    ExportFormatError (ExportVersionError) line naming the file."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ExportVersionError(
            f"{folder} has no {MANIFEST}: an export written before exports carried one (cache "
            f"schema version 1), or not an export; this code imports schema version "
            f"{SCHEMA_VERSION}: export the run again with this version of circuitdiff")
    _inside(folder, MANIFEST)
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise ExportFormatError(f"{path} is not valid JSON ({_short(error)}); export the run "
                                f"again") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise ExportFormatError(f"{path} is not a circuitdiff run export manifest (format "
                                f"{_short(found)}, expected {FORMAT!r}); export the run with "
                                f"`python -m core export`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ExportVersionError(
            f"{path}: the export has cache schema version {_short(manifest.get('schema_version'))}, "
            f"this code imports version {SCHEMA_VERSION!r}; export the run again with this version "
            f"of circuitdiff, or import it with the version that wrote it "
            f"({_short(manifest.get('code_version'))})")
    if not isinstance(manifest.get("run_key"), str) or not manifest["run_key"]:
        raise ExportFormatError(f"{path}: 'run_key' is missing or not a run key; export the run "
                                f"again")
    entries = manifest.get("files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ExportFormatError(f"{path}: 'files' is not a list of file entries; export the run again")
    for entry in entries:
        _check_entry(folder, entry)
    listed = [e["table"] if e["table"] != VECTORS else (VECTORS, e["n_edges"]) for e in entries]
    missing = [table for table in _RUN_ROWS if table not in listed]
    repeated = sorted({str(name) for name in listed if listed.count(name) > 1})
    if missing or repeated:
        raise ExportFormatError(f"{path} must list one file per table of a run and per vector "
                                f"length (missing: {', '.join(missing) or 'none'}; listed twice: "
                                f"{', '.join(repeated) or 'none'}); export the run again")
    return manifest


def _check_entry(folder: Path, entry: dict) -> None:
    where = f"{folder / MANIFEST}, entry {_short(entry.get('path'))}"
    for field, kind in _ENTRY_FIELDS.items():
        value = entry.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ExportFormatError(f"{where}: field {field!r} is missing or not a "
                                    f"{kind.__name__}; export the run again")
    if entry["rows"] < 0:
        raise ExportFormatError(f"{where}: 'rows' is negative; export the run again")
    if entry["table"] not in _RUN_ROWS and entry["table"] != VECTORS:
        raise ExportFormatError(f"{where}: unknown table {_short(entry['table'])}; a run's export "
                                f"holds {', '.join(_RUN_ROWS)} and {VECTORS}")
    n_edges = entry.get("n_edges")
    if entry["table"] == VECTORS and (not isinstance(n_edges, int) or isinstance(n_edges, bool)
                                      or n_edges <= 0):
        raise ExportFormatError(f"{where}: edge vectors need a positive integer 'n_edges'; "
                                f"export the run again")
    if not all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)
               for c in entry["columns"]):
        raise ExportFormatError(f"{where}: 'columns' is not a list of [name, type] pairs; export "
                                f"the run again")
    file = _inside(folder, entry["path"])
    if _sha256(file) != entry["sha256"]:
        raise ExportFormatError(f"{file}: checksum differs from the manifest's (the file was "
                                f"damaged or changed after export); export the run again")


def _inside(folder: Path, name: str) -> Path:
    """The regular file `name` of `folder`; refused when the name or a link leads outside."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise ExportFormatError(f"{folder / MANIFEST}: file {_short(name)} is not a path inside "
                                f"the export folder; exports are read only from inside their folder")
    file = folder / relative
    if not file.resolve().is_relative_to(folder.resolve()):
        raise ExportFormatError(f"{file} links outside the export folder {folder}; exports are read "
                                f"only from inside their folder: replace the link with the file")
    if not file.is_file():
        raise ExportFormatError(f"{file} is not a file in the export folder; copy the whole "
                                f"exported folder again")
    return file


class _Staging:
    """An in-memory database with this code's schema. Export describes its files' columns here in
    the cache's types; import loads each file into its table here first, so wrong columns or types,
    repeated or missing keys and scores without vectors are all found before the cache is opened."""

    def __enter__(self) -> "_Staging":
        self.con = duckdb.connect(":memory:")
        for table in _RUN_ROWS:
            self.con.execute(f"CREATE TABLE {table} ({TABLES[table]})")
        return self

    def __exit__(self, *exc_info) -> None:
        self.con.close()

    def write(self, folder: Path, name: str, table: str, rows, **extra: Any) -> dict:
        """Write rows to folder/name; returns the file's manifest entry."""
        import pyarrow.parquet as pq

        pq.write_table(rows, folder / name)
        return {"path": name, "table": table, **extra, "columns": self._arrow_columns(rows),
                "rows": rows.num_rows, "sha256": _sha256(folder / name)}

    def columns(self, table: str) -> list[str]:
        return [name for name, _ in self._described(table)]

    def load_run(self, folder: Path, manifest: dict) -> dict[str, Any]:
        """Every file's rows as an Arrow table by its path, once all of them fit the schema, the
        manifest, the bounds of a run and each other: the tables in _RUN_ROWS order, then the
        edge vectors their scores name."""
        entries = manifest["files"]
        by_table = {e["table"]: e for e in entries if e["table"] != VECTORS}
        incoming = {}
        for table in _RUN_ROWS:
            entry = by_table[table]
            incoming[entry["path"]] = self.load(folder, entry, *_ROW_BOUNDS[table](self._shape()))
        self.check_run(folder, manifest["run_key"], by_table)
        for entry in entries:
            if entry["table"] == VECTORS:
                named = fetch_one(self.con, f"SELECT count(*) FROM ({_NAMED_VECTORS})",
                                  {"n": entry["n_edges"]})[0]
                incoming[entry["path"]] = self.load(
                    folder, entry, named, f"the vectors its score rows of {entry['n_edges']} "
                                          f"edges name")
        self.check_vectors(entries)
        return incoming

    def load(self, folder: Path, entry: dict, most: int, why: str):
        """The file's rows as an Arrow table, once they fit the schema and the manifest, and the
        manifest declares no more than `most` rows (`why`: what bounds them). Reads no row past
        the declared count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        file, table = folder / entry["path"], entry["table"]
        where = f"{file} (table {table})"
        if entry["rows"] > most:
            raise ExportFormatError(f"{folder / MANIFEST}: {entry['path']} (table {table}) declares "
                                    f"{entry['rows']} rows, more than its run can have (at most "
                                    f"{most}: {why}); the export was changed after it was written: "
                                    f"export the run again")
        if table == VECTORS:
            table = vector_table(entry["n_edges"])
            try:
                self.con.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                                 f"({_vector_columns(entry['n_edges'])})")
            except duckdb.Error as error:
                raise ExportFormatError(f"{folder / MANIFEST}: {entry['path']} has vectors of "
                                        f"{entry['n_edges']} edges, which the cache cannot hold "
                                        f"({_short(error)}); export the run again") from None
        expected = self._described(table)
        listed = [tuple(column) for column in entry["columns"]]
        if listed != expected:
            raise ExportFormatError(f"{folder / MANIFEST}: the columns listed for {entry['path']} "
                                    f"differ from this code's schema ({_difference(listed, expected)}"
                                    f"); export the run again with this version of circuitdiff")
        try:
            held, rows = _read_at_most(file, entry["rows"])
            found = None if rows is None else self._arrow_columns(rows)
        except (pa.ArrowException, OSError, duckdb.Error) as error:
            raise ExportFormatError(f"{file} is not a readable Parquet file of this code's types "
                                    f"({_short(error)}); copy the exported folder again") from None
        if rows is None:
            raise ExportFormatError(f"{where} holds {held} rows, the manifest says {entry['rows']}; "
                                    f"copy the exported folder again")
        if found != expected:
            raise ExportFormatError(f"{file}: columns differ from this code's schema "
                                    f"({_difference(found, expected)}); export the run again with "
                                    f"this version of circuitdiff")
        self.con.register("_incoming", rows)
        try:
            self.con.execute(f"INSERT INTO {table} SELECT * FROM _incoming")
        except duckdb.Error as error:
            raise ExportFormatError(f"{file}: its rows do not fit the cache ({_short(error)}); "
                                    f"export the run again") from None
        finally:
            self.con.unregister("_incoming")
        self._check_finite(where, table)
        return rows

    def _shape(self) -> _RunShape:
        return _RunShape(*fetch_one(self.con, """
            SELECT (SELECT count(*) FROM run_models), (SELECT count(*) FROM run_alphas),
                   (SELECT count(*) FROM questions), (SELECT count(*) FROM run_samples),
                   (SELECT count(*) FROM generations),
                   (SELECT coalesce(max(n_selected), 0) FROM runs),
                   (SELECT coalesce(max(n_questions), 0) FROM datasets)"""))

    def _check_finite(self, where: str, table: str) -> None:
        """Every value of the table's floating-point columns (and vectors) is finite or NULL."""
        tests = {name: (f"list_bool_or(list_transform({name}::DOUBLE[], lambda x: NOT isfinite(x)))"
                        if kind.endswith("]") else f"NOT isfinite({name})")
                 for name, kind in self._described(table)
                 if kind.split("[")[0] in ("FLOAT", "DOUBLE")}
        if not tests:
            return
        counts = fetch_one(self.con, "SELECT " + ", ".join(
            f"count(*) FILTER (WHERE {test})" for test in tests.values()) + f" FROM {table}")
        if any(counts):
            columns = [name for name, count in zip(tests, counts) if count]
            rows = fetch_one(self.con, f"SELECT count(*) FROM {table} WHERE "
                                       + " OR ".join(f"coalesce({tests[c]}, false)" for c in columns))[0]
            raise ExportFormatError(f"{where}: {rows} rows with values that are not finite (NaN or "
                                    f"infinity) in {', '.join(columns)}; circuitdiff never stores them: "
                                    f"export the run again")

    def check_run(self, folder: Path, run_key: str, by_table: dict[str, dict]) -> None:
        """Every row of every table belongs to the manifest's run: it is one the export of that
        run would write (_RUN_ROWS over the loaded tables)."""
        for table, sql in _RUN_ROWS.items():
            total, kept = fetch_one(self.con, f"WITH {_RUN_GENERATIONS} SELECT "
                                              f"(SELECT count(*) FROM {table}), "
                                              f"(SELECT count(*) FROM ({sql}))", {"run_key": run_key})
            if kept != total:
                raise ExportFormatError(
                    f"{folder / by_table[table]['path']} (table {table}): {total - kept} of its "
                    f"{total} rows do not belong to the exported run {_short(run_key)} (not what "
                    f"its export would hold); export the run again")

    def check_vectors(self, entries: list[dict]) -> None:
        """Every score row has exactly one vector of its length, with no missing value."""
        files = {e["n_edges"]: e["path"] for e in entries if e["table"] == VECTORS}
        lengths = {row[0] for row in self.con.execute("SELECT DISTINCT n_edges FROM scores").fetchall()}
        if lengths - set(files):
            raise ExportFormatError(f"scores.parquet has scores of {sorted(lengths - set(files))} "
                                    f"edges with no vector file; copy the exported folder again")
        for n_edges, path in files.items():
            table = vector_table(n_edges)
            found = fetch_one(self.con, f"""
                SELECT (SELECT count(*) FROM ({_NAMED_VECTORS}) s ANTI JOIN {table} v USING (vector_id)),
                       (SELECT count(*) - count(DISTINCT vector_id) FROM {table}),
                       (SELECT count(*) FROM {table}
                        WHERE edge_scores IS NULL OR list_count(edge_scores::FLOAT[]) < $n)""",
                              {"n": n_edges})
            if any(found):
                raise ExportFormatError(f"{path}: {found[0]} scores without a vector (total or "
                                        f"position part), "
                                        f"{found[1]} repeated vector ids, {found[2]} vectors with "
                                        f"missing values; copy the exported folder again")

    def _arrow_columns(self, rows) -> list[tuple[str, str]]:
        """(name, DuckDB type) of each column of an Arrow table, as the cache would store it."""
        self.con.register("_described", rows.schema.empty_table())
        try:
            return [(name, kind) for name, kind, *_ in
                    self.con.execute("DESCRIBE SELECT * FROM _described").fetchall()]
        finally:
            self.con.unregister("_described")

    def _described(self, table: str) -> list[tuple[str, str]]:
        return [(name, kind) for name, kind, *_ in self.con.execute(f"DESCRIBE {table}").fetchall()]


def _read_at_most(file: Path, declared: int) -> tuple[int, Any]:
    """The Parquet file's row count and, when it is `declared`, its rows as an Arrow table (else
    None). The footer's count comes first, so rows past the declared ones are never read; should
    the footer understate them, reading stops at the first batch past the declared count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(file) as parquet:
        held = parquet.metadata.num_rows
        if held != declared:
            return held, None
        batches, held = [], 0
        for batch in parquet.iter_batches():
            batches.append(batch)
            held += batch.num_rows
            if held > declared:
                return held, None
        if held != declared:
            return held, None
        return held, pa.Table.from_batches(batches, schema=parquet.schema_arrow)


def _vector_columns(n_edges: int) -> str:
    # The layout store.insert_scores gives edge_vectors_<n_edges>.
    return f"vector_id BIGINT, edge_scores FLOAT[{int(n_edges)}]"


def _difference(found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    """What separates a file's columns from the schema's, on one line."""
    found_types, expected_types = dict(found), dict(expected)
    missing = [name for name in expected_types if name not in found_types]
    extra = [_short(name) for name in found_types if name not in expected_types]
    retyped = [f"{name} is {_short(found_types[name])}, expected {kind}"
               for name, kind in expected_types.items()
               if name in found_types and found_types[name] != kind]
    parts = [f"missing {', '.join(missing)}" if missing else "",
             f"extra {', '.join(extra)}" if extra else "",
             f"retyped: {'; '.join(retyped)}" if retyped else ""]
    return "; ".join(part for part in parts if part) or "the same columns in another order"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(value: Any, limit: int = 80) -> str:
    """A value from an untrusted file, on one line and bounded in length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
