"""The cache file under concurrency, crashes and corruption (core/store.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.query import ResultCache
from core.store import (CacheCorruptError, Store, WriterBusyError, fetch_one, fetch_vectors,
                        insert_scores)

REPO = Path(__file__).resolve().parent.parent


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# Writes `n` transactions; each inserts 5 questions of one dataset key, so a half-seen transaction
# would show a dataset with fewer than 5 rows.
WRITER = """
import sys, time
from core.store import Store
store = Store(sys.argv[1])
with store.writer_lock():
    for i in range(int(sys.argv[2])):
        with store.write() as con:
            for j in range(5):
                Store.insert_rows(con, "questions", [{"dataset_key": f"d{i}", "question_id": str(j),
                    "position": j, "question": "q", "reference": "r"}])
                time.sleep(0.002)
        time.sleep(0.01)
"""


def test_reader_sees_only_whole_transactions_while_a_writer_runs(tmp_path):
    path = tmp_path / "cache.duckdb"
    with Store(path).write():
        pass  # create the schema
    writer = python(WRITER, str(path), "60")
    reader = Store(path)
    seen_counts = set()
    try:
        while writer.poll() is None:
            with reader.read() as con:
                groups = con.execute("SELECT dataset_key, count(*) FROM questions "
                                     "GROUP BY dataset_key").fetchall()
            assert all(n == 5 for _, n in groups), f"a partial transaction was visible: {groups}"
            seen_counts.add(len(groups))
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()
    # The reader ran while the writer was writing: it saw intermediate states, not only the end.
    assert len(seen_counts) > 2, seen_counts
    with reader.read() as con:
        assert fetch_one(con, "SELECT count(*) FROM questions")[0] == 300


KILLED = """
import sys, time
from core.store import Store
store = Store(sys.argv[1])
with store.write() as con:
    Store.insert_rows(con, "datasets", [{"dataset_key": "committed", "name": "c"}])
with store.write() as con:
    Store.insert_rows(con, "datasets", [{"dataset_key": "in-flight", "name": "x"}])
    print("ready", flush=True)
    time.sleep(60)
"""


def test_kill_9_inside_a_transaction_loses_only_that_transaction(tmp_path):
    path = tmp_path / "cache.duckdb"
    writer = python(KILLED, str(path))
    assert writer.stdout.readline().strip() == "ready"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    store = Store(path)
    with store.read() as con:
        assert [r[0] for r in con.execute("SELECT dataset_key FROM datasets").fetchall()] == ["committed"]
    # The killed process's writer lock is gone with it; writing works again.
    with store.writer_lock(wait=False), store.write() as con:
        Store.insert_rows(con, "datasets", [{"dataset_key": "after", "name": "a"}])
    with store.read() as con:
        assert fetch_one(con, "SELECT count(*) FROM datasets")[0] == 2


HOLD_LOCK = """
import sys, time
from core.store import Store
with Store(sys.argv[1]).writer_lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_writer_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "cache.duckdb"
    holder = python(HOLD_LOCK, str(path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = Store(path)
        assert store.writer_active()
        with pytest.raises(WriterBusyError, match="another process is writing"):
            with store.writer_lock(wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert not Store(path).writer_active()


def test_corrupt_cache_file_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "cache.duckdb"
    garbage = b"this is not a database" * 500
    path.write_bytes(garbage)
    with pytest.raises(CacheCorruptError, match=str(path)) as error:
        ResultCache.open(path).runs()
    assert "move it aside" in str(error.value)
    with pytest.raises(CacheCorruptError):
        with Store(path).write():
            pass
    assert path.read_bytes() == garbage


def test_foreign_duckdb_file_is_not_taken_over(tmp_path):
    import duckdb

    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE mine (x INTEGER)")
    con.close()
    with pytest.raises(CacheCorruptError, match="not a circuitdiff cache"):
        with Store(path).write():
            pass


def test_missing_file_is_an_empty_cache_and_is_not_created(tmp_path):
    path = tmp_path / "absent.duckdb"
    cache = ResultCache.open(path)
    assert cache.is_empty()
    assert cache.runs().empty
    assert not path.exists()


def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITDIFF_CACHE", str(tmp_path / "env.duckdb"))
    assert ResultCache.open().path == tmp_path / "env.duckdb"


def test_score_vectors_round_trip_in_order_and_existing_keys_are_kept(tmp_path):
    store = Store(tmp_path / "cache.duckdb")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4, 23)).astype(np.float32)
    rows = [{"generation_key": f"g{i}", "t_cut": 3, "score_key": "s", "model_key": "m", "loss": 1.0}
            for i in range(4)]
    with store.write() as con:
        insert_scores(con, rows[:3], vectors[:3])
    with store.write() as con:  # g0..g2 exist: only g3 is added, g0 keeps its first vector
        insert_scores(con, rows, -vectors)
    with store.read() as con:
        found = dict(con.execute("SELECT generation_key, vector_id FROM scores").fetchall())
        back = fetch_vectors(con, 23, [found["g3"], found["g0"], found["g2"]])
    np.testing.assert_array_equal(back, np.stack([-vectors[3], vectors[0], vectors[2]]))


def downgrade_to_v1(path):
    """Rewrite a cache as schema version 1 would have written it: answers keyed by (model, dataset,
    question id, settings) and no question keys. Adds a copy of every answer under a second
    dataset holding the same questions, generated later (a v1 prefix run did exactly that)."""
    import duckdb

    from core import keys

    con = duckdb.connect(str(path))
    rows = con.execute("SELECT generation_key, model_key, dataset_key, question_id, gen_key "
                       "FROM generations").fetchall()
    con.execute("CREATE TEMP TABLE v1_keys (new_key VARCHAR, v1_key VARCHAR)")
    con.executemany("INSERT INTO v1_keys VALUES (?, ?)",
                    [[key, keys.v1_generation_key(m, d, q, g)] for key, m, d, q, g in rows])
    for table in ("grades", "run_samples", "scores", "generations"):
        con.execute(f"CREATE TABLE {table}_v1 AS SELECT t.* EXCLUDE (question_key) REPLACE "
                    f"(k.v1_key AS generation_key) FROM {table} t JOIN v1_keys k "
                    f"ON k.new_key = t.generation_key" if table == "generations" else
                    f"CREATE TABLE {table}_v1 AS SELECT t.* REPLACE (k.v1_key AS generation_key) "
                    f"FROM {table} t JOIN v1_keys k ON k.new_key = t.generation_key")
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}_v1 RENAME TO {table}")
    con.execute("ALTER TABLE questions DROP COLUMN question_key")
    con.execute("INSERT INTO questions SELECT 'prefix', question_id, position, question, reference "
                "FROM questions")
    copies = con.execute("SELECT * FROM generations").fetch_df()
    copies["dataset_key"] = "prefix"
    copies["created_at"] = copies["created_at"] + np.timedelta64(1, "h")
    copies["generation_key"] = [keys.v1_generation_key(m, "prefix", q, g) for m, q, g in
                                zip(copies["model_key"], copies["question_id"], copies["gen_key"])]
    con.execute("INSERT INTO generations SELECT * FROM copies")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("questions", "generations", "grades", "run_samples", "scores", "metrics")}
    con.close()
    return counts


def read_model(path):
    """What the dashboard reads of every run: matrices, ids and the metric table."""
    cache = ResultCache.open(path)
    runs = cache.runs()
    views = {}
    for run in runs.itertuples():
        for alpha in run.alphas:
            for model in ("base", run.post_label):
                views[run.run_key, alpha, model] = cache.sample_edges(run.run_key, alpha, model)
    return runs, views, cache.metric_table()


def test_a_v1_cache_is_refused_until_migrated_then_reads_the_same(tmp_path, capsys):
    import shutil

    from core.__main__ import main
    from core.store import CacheError
    from core.synthetic import build_fixture_cache

    original = tmp_path / "v2.duckdb"
    build_fixture_cache(original)
    runs, views, metrics = read_model(original)
    with Store(original).read() as con:
        content_keys = set(r[0] for r in con.execute("SELECT generation_key FROM generations").fetchall())
    path = tmp_path / "v1.duckdb"
    shutil.copy(original, path)
    counts = downgrade_to_v1(path)

    with pytest.raises(CacheError, match=f"python -m core migrate --cache {path}"):
        ResultCache.open(path).runs()
    assert main(["ls", "--cache", str(path)]) == 2
    assert "python -m core migrate" in capsys.readouterr().err

    assert main(["migrate", "--cache", str(path)]) == 0
    assert Path(f"{path}.v1.bak").exists()
    with pytest.raises(CacheError, match="schema version 1"):  # the copy is the untouched v1 file
        Store(f"{path}.v1.bak").read().__enter__()
    with Store(path).read() as con:
        assert {t: fetch_one(con, f"SELECT count(*) FROM {t}")[0] for t in counts} == counts
        keys_now = dict(con.execute("SELECT dataset_key, list(generation_key) FROM generations "
                                    "GROUP BY dataset_key").fetchall())
        assert fetch_one(con, "SELECT count(*) FROM generations WHERE question_key IS NULL")[0] == 0
    # The first-generated answers take their content keys (those a v2 run computes), the later
    # copies keep keys of their own; nothing points at a v1 key any more.
    assert set(keys_now.pop("prefix")).isdisjoint(content_keys)
    assert set(next(iter(keys_now.values()))) == content_keys
    runs_after, views_after, metrics_after = read_model(path)
    assert runs_after.drop(columns="created_at").equals(runs.drop(columns="created_at"))
    assert views_after.keys() == views.keys()
    for key, (edges, ids) in views.items():
        assert views_after[key][1] == ids
        np.testing.assert_array_equal(views_after[key][0], edges)
    assert metrics_after.equals(metrics)
    assert main(["migrate", "--cache", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_v2_cache_migrates_to_v3_gaining_steps_and_the_new_tables(tmp_path):
    import duckdb

    from core.migrations import migrate
    from core.store import SCHEMA_VERSION, TABLES, CacheError
    from core.synthetic import build_fixture_cache

    path = tmp_path / "v2.duckdb"
    build_fixture_cache(path)
    runs, views, metrics = read_model(path)
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE run_models DROP COLUMN step")
    for table in ("faithfulness", "token_views", "user_pairs", "user_datasets"):
        con.execute(f"DROP TABLE {table}")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(CacheError, match="schema version 2, this code reads version 3"):
        ResultCache.open(path).runs()

    assert migrate(Store(path), log=lambda _: None) == Path(f"{path}.v2.bak")
    assert Store(path).schema_version() == SCHEMA_VERSION == "3"
    with Store(path).read() as con:
        assert fetch_one(con, "SELECT count(*) FROM run_models WHERE step IS NOT NULL")[0] == 0
        tables = {t for t, in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(TABLES) <= tables
    runs_after, views_after, metrics_after = read_model(path)
    assert runs_after.drop(columns="created_at").equals(runs.drop(columns="created_at"))
    for key, (edges, ids) in views.items():
        np.testing.assert_array_equal(views_after[key][0], edges)
    assert metrics_after.equals(metrics)
