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
    rows = [{"generation_key": f"g{i}", "t_cut": 3, "score_key": "s", "loss": 1.0} for i in range(4)]
    with store.write() as con:
        insert_scores(con, rows[:3], vectors[:3])
    with store.write() as con:  # g0..g2 exist: only g3 is added, g0 keeps its first vector
        insert_scores(con, rows, -vectors)
    with store.read() as con:
        found = dict(con.execute("SELECT generation_key, vector_id FROM scores").fetchall())
        back = fetch_vectors(con, 23, [found["g3"], found["g0"], found["g2"]])
    np.testing.assert_array_equal(back, np.stack([-vectors[3], vectors[0], vectors[2]]))
