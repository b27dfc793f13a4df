"""The Ray executor on a local Ray cluster started here (2 CPUs, no dashboard), on the tiny pair of
test_pipeline.py: whatever happens to its workers or its driver, the cache it fills equals the one
the in-process executor fills, table by table.

Deselect with `-m "not ray"`; skipped where Ray is not installed (requirements-ray.txt).
"""

import shutil
import signal
import subprocess
import sys
import tempfile
import time

import duckdb
import numpy as np
import pytest
import torch

from core import pipeline
from core.store import TABLES, Store, fetch_one
from test_pipeline import ALPHAS, REPO, SELECTION, quiet, request, world  # noqa: F401

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -r requirements-ray.txt")
pytestmark = pytest.mark.ray

# Columns that say when or how fast something ran, or at which commit of this repository (other
# work can be committed between two runs); and the meta row holding the file's birth time.
TIMING_COLUMNS = {"created_at", "updated_at", "seconds", "git_commit", "code_version"}
# Where a score's vector sits in its edge-vector table follows commit order: vectors are compared
# by their score's key instead.
ORDER_COLUMNS = {"vector_id", "part_vector_ids"}


@pytest.fixture(scope="module")
def cluster():
    # A short folder: Ray's socket paths must fit in 107 bytes.
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(world):
    """The in-process executor's cache, and its summary, computed with one thread as each Ray actor
    is (one CPU each): a float sum's order, and so its last bits, depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipeline.run(request(world, "local.duckdb"), log=quiet)
    finally:
        torch.set_num_threads(threads)


def cache_tables(path) -> dict[str, list[tuple]]:
    """Every table's rows, sorted, without timing and commit-order columns, and every score's edge
    vector under the score's key. Not stage_timings: it records what each call did and how long
    it took (a resumed run is two calls)."""
    tables = {}
    with Store(path).read() as con:
        for table in set(TABLES) - {"stage_timings"}:
            columns = [c for c, in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position", [table]).fetchall()
                if c not in TIMING_COLUMNS | ORDER_COLUMNS]
            rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL").fetchall()
            if table == "meta":
                rows = [row for row in rows if row[0] != "created_at"]
            tables[table] = rows
        for (n_edges,) in con.execute("SELECT DISTINCT n_edges FROM scores").fetchall():
            # The total's vector and its position parts' vectors, each under its score's key.
            tables[f"edge_vectors_{n_edges}"] = con.execute(
                f"SELECT s.generation_key, s.t_cut, s.score_key, s.model_key, part.position, "
                f"v.edge_scores FROM scores s, "
                f"unnest(list_prepend(s.vector_id, coalesce(s.part_vector_ids, []))) "
                f"WITH ORDINALITY AS part(id, position) "
                f"JOIN edge_vectors_{n_edges} v ON v.vector_id = part.id "
                f"WHERE s.n_edges = ? ORDER BY 1, 2, 3, 4, 5", [n_edges]).fetchall()
    return tables


def assert_same_cache(path, expected_path) -> None:
    found, expected = cache_tables(path), cache_tables(expected_path)
    assert found.keys() == expected.keys()
    for table in expected:
        assert found[table] == expected[table], table
    assert all(found[t] for t in ("generations", "scores", "metrics")), "the run left tables empty"


def score_count(path) -> int:
    with Store(path).read() as con:
        return fetch_one(con, "SELECT count(*) FROM scores")[0]


def test_ray_executor_fills_the_same_cache_as_the_local_one(world, cluster, reference):
    messages = []
    summary = pipeline.run(request(world, "ray.duckdb", executor="ray"), log=messages.append)
    assert summary.done == reference.done and summary.run_key == reference.run_key
    assert any(m.startswith("ray: 2 actors, 1 CPU each") for m in messages), messages
    # Both actors loaded each model for each stage (4 loads in-process).
    assert summary.models_loaded == 2 * reference.models_loaded == 8
    assert_same_cache(world / "ray.duckdb", world / "local.duckdb")
    assert ray.util.list_named_actors() == []  # the run killed its actors


def test_a_worker_killed_during_scoring_is_replaced_and_the_cache_is_the_same(world, cluster,
                                                                              reference):
    seen = []

    def kill_a_worker(stage, done, total):
        if stage.startswith("score") and done == 2 and not seen:
            actor = ray.get_actor(sorted(ray.util.list_named_actors())[0])
            before = ray.get(actor.describe.remote())
            ray.kill(actor, no_restart=False)
            # The kill is asynchronous: a call sent right after it can still reach the old process.
            deadline = time.monotonic() + 60
            after = ray.get(actor.describe.remote())
            while after["pid"] == before["pid"] and time.monotonic() < deadline:
                time.sleep(0.2)
                after = ray.get(actor.describe.remote())
            seen.append((before, after))
    summary = pipeline.run(request(world, "worker-killed.duckdb", executor="ray"),
                           progress=kill_a_worker, log=quiet)
    [(before, after)] = seen
    assert after["restarted"] and not before["restarted"] and after["pid"] != before["pid"]
    assert summary.done == reference.done
    assert_same_cache(world / "worker-killed.duckdb", world / "local.duckdb")


def test_a_driver_killed_after_a_commit_resumes_to_the_same_cache(world, cluster, reference):
    cache = world / "driver-killed.duckdb"
    command = [sys.executable, "-m", "core", "run", "--executor", "ray", "--ray-address", cluster,
               "--pair", "tiny", "--dataset", "tiny", "--alpha", *map(str, ALPHAS),
               "--n", str(SELECTION.n), "--beta", str(SELECTION.beta), "--gamma", str(SELECTION.gamma),
               "--delta", str(SELECTION.delta), "--config", str(world / "pairs.toml"),
               "--cache", str(cache)]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 240
    committed = 0
    while not committed:
        assert driver.poll() is None, f"the driver ended before committing a score: {driver.stderr.read()}"
        assert time.monotonic() < deadline, "the driver committed no score in 240 s"
        if cache.exists():
            try:
                # Held open while the driver is killed: it cannot commit more meanwhile.
                with Store(cache).read() as con:
                    committed = fetch_one(con, "SELECT count(*) FROM scores")[0]
                    if committed:
                        driver.send_signal(signal.SIGKILL)
                        driver.wait(timeout=30)
            except duckdb.CatalogException:
                pass  # the schema is not written yet
        time.sleep(0.02)
    driver.stderr.close()
    assert driver.returncode == -signal.SIGKILL
    total = reference.done["score"]
    assert 0 < score_count(cache) < total
    resumed = pipeline.run(request(world, "driver-killed.duckdb", executor="ray",
                                   ray_address=cluster), log=quiet)
    assert resumed.done["generate"] == resumed.done["grade"] == 0
    assert resumed.done["score"] == total - committed
    assert_same_cache(cache, world / "local.duckdb")


def test_an_unreachable_address_is_one_clear_line(world, tmp_path):
    # A port nothing listens on (bound, never accepting).
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        done = subprocess.run([sys.executable, "-m", "core", "run", "--executor", "ray",
                               "--ray-address", address, "--pair", "tiny", "--dataset", "tiny",
                               "--config", str(world / "pairs.toml"),
                               "--cache", str(tmp_path / "unreachable.duckdb")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the Ray cluster at {address}") and "ray start" in last


def test_executor_flags_are_checked_where_they_are_given(world):
    with pytest.raises(ValueError, match="applies to the ray executor only"):
        request(world, "x.duckdb", ray_address="auto")
    with pytest.raises(ValueError, match="is not auto, HOST:PORT"):
        request(world, "x.duckdb", executor="ray", ray_address="somewhere")
    from core.settings import ScoreSettings

    with pytest.raises(ValueError, match="use --device auto"):
        request(world, "x.duckdb", executor="ray", score=ScoreSettings(device="cuda:1"))
    ray_request = request(world, "x.duckdb", executor="ray", ray_address="10.0.0.1:6379", ray_actors=3)
    assert type(ray_request).from_dict(ray_request.as_dict()) == ray_request
