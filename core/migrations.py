"""Schema migrations: `migrate` upgrades a cache of an older schema version to SCHEMA_VERSION, after
keeping a copy of it (`python -m core migrate`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from core.store import OPEN_TIMEOUT_S, SCHEMA_VERSION, TABLES, CacheError, Store, fetch_one


def migrate(store: Store, log=print) -> Path | None:
    """Upgrade the cache to SCHEMA_VERSION: first copy it to `<cache>.v<found>.bak`, then rewrite it
    in one transaction (a failure leaves it as it was). Returns the copy's path, or None when the
    cache is current (or absent)."""
    with store.writer_lock(wait=False):
        found = store.schema_version()
        if found == "2" and _is_draft_v2(store):
            found = DRAFT_V2
        if found is None or found == SCHEMA_VERSION:
            return None
        if found not in MIGRATIONS:
            raise CacheError(f"the cache {store.path} has schema version {found}, which this code "
                             f"cannot migrate to {SCHEMA_VERSION}; use a new cache file")
        backup = Path(f"{store.path}.v{found}.bak")
        shutil.copy2(store.path, backup)
        wal = Path(f"{store.path}.wal")
        if wal.exists():
            shutil.copy2(wal, Path(f"{backup}.wal"))
        log(f"migrating {store.path} from schema version {found} to {SCHEMA_VERSION} "
            f"(copy kept as {backup})")
        con = store._connect(read_only=False, timeout=OPEN_TIMEOUT_S)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                version = found
                while version != SCHEMA_VERSION:
                    step, version = MIGRATIONS[version]
                    step(con)
                for name, columns in TABLES.items():  # tables the older version did not have
                    con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [SCHEMA_VERSION])
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            store._bump_version()
        finally:
            con.close()
        store._schema_checked = False
        return backup


def _migrate_v1(con: duckdb.DuckDBPyConnection) -> None:
    """v1 keyed an answer by (model, dataset, question id, settings); v2 by (model, question content,
    settings). Questions and generations gain question_key; every generation key is recomputed and
    rewritten wherever it appears (generations, grades, run_samples, scores)."""
    import pandas as pd

    from core import keys

    question_keys = pd.DataFrame(
        con.execute("SELECT dataset_key, question_id, question, reference FROM questions").fetchall(),
        columns=["dataset_key", "question_id", "question", "reference"])
    question_keys["question_key"] = [keys.question_key(q, r) for q, r in
                                     zip(question_keys["question"], question_keys["reference"])]
    key_of_question = {(d, i): k for d, i, k in question_keys[
        ["dataset_key", "question_id", "question_key"]].itertuples(index=False)}
    # Oldest first: where v1 holds the same answer under two datasets, the first generated one
    # takes the content key and later copies keep keys of their own (see legacy_generation_key).
    taken: set[str] = set()
    mapping = []
    for old, model, dataset, question_id, gen_key in con.execute(
            "SELECT generation_key, model_key, dataset_key, question_id, gen_key FROM generations "
            "ORDER BY created_at, generation_key").fetchall():
        question = key_of_question.get((dataset, question_id))
        new = keys.generation_key(model, question, gen_key) if question else None
        if new is None or new in taken:
            new = keys.legacy_generation_key(old)
        taken.add(new)
        mapping.append((old, new, question))
    key_map = pd.DataFrame(mapping, columns=["old_key", "new_key", "question_key"], dtype=object)
    con.register("_question_keys", question_keys[["dataset_key", "question_id", "question_key"]])
    con.register("_key_map", key_map)
    try:
        _rebuild(con, "questions", "SELECT q.*, k.question_key FROM questions q "
                                   "LEFT JOIN _question_keys k USING (dataset_key, question_id)")
        _rebuild(con, "generations", "SELECT t.* REPLACE (m.new_key AS generation_key), m.question_key "
                                     "FROM generations t JOIN _key_map m ON m.old_key = t.generation_key")
        for table in ("grades", "run_samples", "scores"):
            _rebuild(con, table, f"SELECT t.* REPLACE (coalesce(m.new_key, t.generation_key) AS "
                                 f"generation_key) FROM {table} t "
                                 f"LEFT JOIN _key_map m ON m.old_key = t.generation_key")
    finally:
        con.unregister("_question_keys")
        con.unregister("_key_map")


def _migrate_draft_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Version 2 as written before controls (never released, but demo caches hold it): scores gain
    the scorer in their key, position parts and norms (NULL: not computed for these rows)."""
    _rebuild(con, "scores", "SELECT * FROM scores")


def _is_draft_v2(store: Store) -> bool:
    """Whether a version-2 cache predates controls (its scores have no part_vector_ids)."""
    con = store._connect(read_only=True, timeout=OPEN_TIMEOUT_S)
    try:
        return fetch_one(con, "SELECT count(*) FROM information_schema.columns WHERE table_schema = "
                              "'main' AND table_name = 'scores' AND column_name = 'part_vector_ids'"
                         )[0] == 0
    finally:
        con.close()


def _rebuild(con: duckdb.DuckDBPyConnection, table: str, select_sql: str) -> None:
    """Replace `table` by the rows of `select_sql` under the current schema, refusing to lose any."""
    before = fetch_one(con, f"SELECT count(*) FROM {table}")[0]
    con.execute(f"CREATE TABLE _{table}_next ({TABLES[table]})")
    con.execute(f"INSERT INTO _{table}_next BY NAME {select_sql}")
    after = fetch_one(con, f"SELECT count(*) FROM _{table}_next")[0]
    if after != before:
        raise CacheError(f"migrating the table {table} would keep {after} of its {before} rows; the "
                         f"cache was left unchanged")
    con.execute(f"DROP TABLE {table}")
    con.execute(f"ALTER TABLE _{table}_next RENAME TO {table}")


# The name `migrate` gives a version-2 cache written before controls (its copy: <cache>.v2-draft.bak).
DRAFT_V2 = "2-draft"


def _migrate_v2(con: duckdb.DuckDBPyConnection) -> None:
    """v3 adds a series' training steps to run_models (NULL for runs made before them) and new
    tables (faithfulness, token views, user pairs and datasets), which migrate() creates."""
    con.execute("ALTER TABLE run_models ADD COLUMN IF NOT EXISTS step INTEGER")


# Schema version found -> (the function that rewrites it inside the migration's transaction, the
# version it gives); migrate() follows them up to SCHEMA_VERSION.
MIGRATIONS = {"1": (_migrate_v1, "2"), DRAFT_V2: (_migrate_draft_v2, "2"), "2": (_migrate_v2, "3")}
