"""Bad inputs of `python -m core import` and faults of the jobs (issue 29, items 8, 11 and 12; to be
merged into tests/test_bad_inputs.py): an import refuses values that are not finite, rows that do
not belong to the exported run and more rows than the manifest declares or the run could have,
with one `error:` line, before reading the surplus, and leaves the cache's bytes as they were; the
manifest parser gives entries or one line on arbitrary input; SIGTERM or SIGINT to a run job is a
cancel; each cache file has its own jobs.

The job tests run the real `python -m core run --request FILE --job-id ID` path in a detached
process with the pipeline replaced by a stand-in (this file run as a module) that commits one row
under the writer lock and then waits.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import jobs
from core.config import RunRequest
from core.errors import CircuitdiffError
from core.__main__ import main
from core.exchange import MANIFEST, check_manifest, export_run
from core.store import Store
from core.synthetic import build_fixture_cache
from test_bad_inputs import cache_with_a_run, cli, refused, sha256
from test_exchange import copy_export, entry_of, read_manifest, replace_file, write_manifest

TESTS = Path(__file__).resolve().parent


# --- import: values, keys, row bounds (item 8) -----------------------------------------------------

@pytest.fixture(scope="module")
def pair_export(tmp_path_factory) -> Path:
    """The fixture cache's pair run (a dataset, two models, two alphas, position parts), exported."""
    root = tmp_path_factory.mktemp("exchange")
    pair, _ = build_fixture_cache(root / "source.duckdb")
    export_run(Store(root / "source.duckdb"), pair, root / "export")
    return root / "export"


@pytest.fixture
def target(tmp_path) -> Path:
    """A cache holding a run already: a refused import must leave its bytes as they were."""
    return cache_with_a_run(tmp_path / "target.duckdb", n_samples=2, n_edges=5)


def import_refused(what: str, folder: Path, cache: Path, first_line: str) -> str:
    """`python -m core import` exits 2 with one `error:` line; the cache's bytes are unchanged and
    nothing was written beside it."""
    before = sha256(cache)
    line = refused(what, ["import", str(folder), "--cache", str(cache)], first_line)
    assert sha256(cache) == before
    assert not Path(f"{cache}.wal").exists()
    return line


def _vectors_file(folder: Path) -> str:
    return next(p.name for p in sorted(folder.glob("vectors_*.parquet")))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_edge_vector_that_is_not_finite_is_refused(pair_export, target, tmp_path, value):
    folder = copy_export(pair_export, tmp_path / "export")
    name = _vectors_file(folder)
    vectors = pq.read_table(folder / name)
    column = vectors.column("edge_scores").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).copy()
    values[column.type.list_size + 3] = value  # the second vector
    replace_file(folder, name, vectors.set_column(1, "edge_scores", pa.FixedSizeListArray.from_arrays(
        pa.array(values, pa.float32()), column.type.list_size)))
    import_refused(f"`import` of an export with an edge score of {value}", folder, target,
                   rf".*{name} \(table edge_vectors\): 1 rows? with values that are not finite "
                   rf"\(NaN or infinity\) in edge_scores; .*export the run again")


@pytest.mark.parametrize("file, column", [("scores.parquet", "loss"),
                                          ("scores.parquet", "residual_norm"),
                                          ("runs.parquet", "t_bar"),
                                          ("run_alphas.parquet", "alpha")])
def test_a_score_or_run_value_that_is_not_finite_is_refused(pair_export, target, tmp_path, file,
                                                            column):
    folder = copy_export(pair_export, tmp_path / "export")
    rows = pq.read_table(folder / file)
    values = rows.column(column).to_pylist()
    values[0] = float("nan")
    index = rows.schema.get_field_index(column)
    replace_file(folder, file,
                 rows.set_column(index, column, pa.array(values, rows.schema.field(index).type)))
    table = file.removesuffix(".parquet")
    import_refused(f"`import` of an export with {column} NaN in {file}", folder, target,
                   rf".*{file} \(table {table}\): 1 rows? with values that are not finite \(NaN or "
                   rf"infinity\) in {column}; .*export the run again")


def _foreign(rows: pa.Table, column: str, value) -> pa.Table:
    """The rows with the first one's `column` set to `value` (as many rows as before, so no row
    bound tells it)."""
    index = rows.schema.get_field_index(column)
    values = rows.column(column).to_pylist()
    values[0] = value
    return rows.set_column(index, column, pa.array(values, rows.schema.field(index).type))


@pytest.mark.parametrize("file, column, value", [
    ("questions.parquet", "dataset_key", "another-dataset"),
    ("run_models.parquet", "run_key", "another-run"),
    ("models.parquet", "model_key", "a-model-of-no-run"),
    ("grades.parquet", "generation_key", "an-answer-not-exported"),
    ("metrics.parquet", "run_key", "another-run"),
])
def test_rows_that_do_not_belong_to_the_exported_run_are_refused(pair_export, target, tmp_path, file,
                                                                 column, value):
    folder = copy_export(pair_export, tmp_path / "export")
    replace_file(folder, file, _foreign(pq.read_table(folder / file), column, value))
    table = file.removesuffix(".parquet")
    import_refused(f"`import` of an export with a row of {table} from elsewhere", folder, target,
                   rf".*{file} \(table {table}\): 1 of its \d+ rows do not belong to the exported "
                   rf"run '[0-9a-f]+'.*export the run again")


def _padded_stage_timings(folder: Path, rows: int) -> pa.Table:
    """The export's stage timings and `rows` more of its run, each at its own time (as a rerun
    would add them)."""
    timings = pq.read_table(folder / "stage_timings.parquet")
    run_key = read_manifest(folder)["run_key"]
    times = np.datetime64("2020-01-01T00:00:00", "us") + np.arange(rows).astype("timedelta64[us]")
    junk = pa.table({"run_key": pa.array(np.full(rows, run_key, dtype=object)),
                     "stage": pa.array(np.full(rows, "score", dtype=object)),
                     "items": pa.array(np.ones(rows, np.int32)),
                     "seconds": pa.array(np.ones(rows)),
                     "code_version": pa.array(np.full(rows, "junk", dtype=object)),
                     "git_commit": pa.array(np.full(rows, "junk", dtype=object)),
                     "created_at": pa.array(times)}).cast(timings.schema)
    return pa.concat_tables([timings, junk])


def test_more_rows_than_the_manifest_declares_are_refused(pair_export, target, tmp_path):
    folder = copy_export(pair_export, tmp_path / "export")
    declared = entry_of(read_manifest(folder), "stage_timings.parquet")["rows"]
    pq.write_table(_padded_stage_timings(folder, 10), folder / "stage_timings.parquet")
    manifest = read_manifest(folder)
    entry_of(manifest, "stage_timings.parquet")["sha256"] = sha256(folder / "stage_timings.parquet")
    write_manifest(folder, manifest)  # the checksum fits, the declared count does not
    import_refused("`import` of a table holding more rows than its manifest declares", folder, target,
                   rf".*stage_timings\.parquet \(table stage_timings\) holds {declared + 10} rows, "
                   rf"the manifest says {declared}; copy the exported folder again")


def test_more_rows_than_the_run_could_have_are_refused_though_declared(pair_export, target, tmp_path):
    folder = copy_export(pair_export, tmp_path / "export")
    replace_file(folder, "stage_timings.parquet", _padded_stage_timings(folder, 6000))
    import_refused("`import` of an export padded with rows its run could not have", folder, target,
                   r".*manifest\.json: stage_timings\.parquet \(table stage_timings\) declares \d+ "
                   r"rows, more than its run can have \(at most \d+: .*\); .*export the run again")


TABLES_AND_VECTORS = ["runs", "datasets", "run_models", "run_alphas", "questions", "models",
                      "run_samples", "generations", "grades", "scores", "run_controls", "metrics",
                      "faithfulness", "token_views", "stage_timings", "vectors"]


@pytest.mark.parametrize("table", TABLES_AND_VECTORS)
def test_every_tables_declared_rows_are_bounded_before_its_file_is_read(pair_export, target, tmp_path,
                                                                        monkeypatch, table):
    folder = copy_export(pair_export, tmp_path / "export")
    manifest = read_manifest(folder)
    name = _vectors_file(folder) if table == "vectors" else f"{table}.parquet"
    entry_of(manifest, name)["rows"] = 10**9
    write_manifest(folder, manifest)
    opened = []
    real = pq.ParquetFile.__init__

    def watched(self, source, *args, **kwargs):
        opened.append(Path(source).name)
        return real(self, source, *args, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "__init__", watched)
    listed = "edge_vectors" if table == "vectors" else table
    import_refused(f"`import` of an export whose manifest declares 10^9 rows of {listed}", folder,
                   target, rf".*manifest\.json: {name} \(table {listed}\) declares 1000000000 rows, "
                   rf"more than its run can have \(at most \d+")
    assert name not in opened


def _peak_rss_mb_of_import(folder: Path, cache: Path) -> tuple[int, float]:
    """Exit status and peak resident memory (MB) of `python -m core import` in a child process:
    its VmHWM, which starts afresh at exec (ru_maxrss would count this process's memory at fork)."""
    code = ("import re\nfrom pathlib import Path\nfrom core.__main__ import main\n"
            f"status = main(['import', {str(folder)!r}, '--cache', {str(cache)!r}])\n"
            "peak_kb = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1]\n"
            "print(status, int(peak_kb) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    status, peak = done.stdout.split()[-2:]
    return int(status), float(peak)


@pytest.mark.parametrize("declared", [True, False])
def test_junk_rows_cost_no_memory(pair_export, tmp_path, declared):
    """Peak memory of a refused import does not grow with the junk rows (issue 29: 5 million of them
    took 2.8 GB; before this check, these 2 million took 160 MB more than the clean import when not
    declared, 550 MB when declared): the refusal comes from the manifest and the file's footer,
    before its rows."""
    clean = copy_export(pair_export, tmp_path / "clean")
    junk = copy_export(pair_export, tmp_path / "junk")
    padded = _padded_stage_timings(junk, 2_000_000)
    if declared:
        replace_file(junk, "stage_timings.parquet", padded)
    else:
        pq.write_table(padded, junk / "stage_timings.parquet")
        manifest = read_manifest(junk)
        entry_of(manifest, "stage_timings.parquet")["sha256"] = sha256(junk / "stage_timings.parquet")
        write_manifest(junk, manifest)
    cache = cache_with_a_run(tmp_path / "cache.duckdb", n_samples=2, n_edges=5)
    before = sha256(cache)
    junk_status, junk_peak = _peak_rss_mb_of_import(junk, cache)
    assert junk_status == 2 and sha256(cache) == before
    clean_status, clean_peak = _peak_rss_mb_of_import(clean, tmp_path / "clean.duckdb")
    assert clean_status == 0
    assert junk_peak < clean_peak + 32, (junk_peak, clean_peak)


def test_a_clean_export_still_imports_and_round_trips_its_row_counts(pair_export, tmp_path):
    cache = tmp_path / "cache.duckdb"
    assert main(["import", str(pair_export), "--cache", str(cache)]) == 0
    with Store(cache).read() as con:
        for entry in read_manifest(pair_export)["files"]:
            if entry["table"] != "edge_vectors":
                found = con.execute(f"SELECT count(*) FROM {entry['table']}").fetchone()[0]
                assert found == entry["rows"], entry["path"]


# --- the manifest parser on arbitrary input --------------------------------------------------------

def _manifest_outcome(folder: Path, content: bytes) -> None:
    """check_manifest gives a manifest of well-formed entries, or one CircuitdiffError line
    naming a file of the folder; never another exception."""
    (folder / MANIFEST).write_bytes(content)
    try:
        manifest = check_manifest(folder)
    except CircuitdiffError as error:
        message = str(error)
        assert "\n" not in message and str(folder) in message, message
        assert len(message) < 2000, message
    else:
        assert isinstance(manifest["run_key"], str) and manifest["run_key"]
        for entry in manifest["files"]:
            assert isinstance(entry["path"], str) and (folder / entry["path"]).is_file()
            assert isinstance(entry["rows"], int) and entry["rows"] >= 0


PARSER = settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def parser_folder(pair_export, tmp_path_factory) -> Path:
    return copy_export(pair_export, tmp_path_factory.mktemp("parser") / "export")


@PARSER
@given(content=st.binary(max_size=3000))
def test_arbitrary_bytes_as_the_manifest_give_one_line(parser_folder, content):
    _manifest_outcome(parser_folder, content)


@PARSER
@given(document=JSON)
def test_arbitrary_json_as_the_manifest_gives_one_line(parser_folder, document):
    _manifest_outcome(parser_folder, json.dumps(document).encode())


@PARSER
@given(change=st.sampled_from(["drop", "set", "set in an entry", "drop from an entry"]),
       top=st.sampled_from(["format", "schema_version", "run_key", "files", "code_version"]),
       field=st.sampled_from(["path", "table", "columns", "rows", "sha256", "n_edges"]),
       value=JSON, index=st.integers(min_value=0))
def test_one_field_of_a_valid_manifest_changed_gives_entries_or_one_line(pair_export, parser_folder,
                                                                        change, top, field, value,
                                                                        index):
    manifest = read_manifest(pair_export)
    entry = manifest["files"][index % len(manifest["files"])]
    if change == "drop":
        manifest.pop(top)
    elif change == "set":
        manifest[top] = value
    elif change == "set in an entry":
        entry[field] = value
    else:
        entry.pop(field, None)
    _manifest_outcome(parser_folder, json.dumps(manifest).encode())


@pytest.mark.parametrize("case, content", [
    ("a format nested 5,000 deep", b'{"format": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("a format nested 900 deep", b'{"format": ' + b"[" * 900 + b"]" * 900 + b"}"),
    ("a schema version of 10,000 digits", b'{"format": "circuitdiff-run-export", "schema_version": '
                                          + b"9" * 10_000 + b"}"),
    ("a format of a megabyte", json.dumps({"format": "x" * 1_000_000}).encode()),
    ("NaN rows", None),
    ("negative rows", None),
])
def test_hostile_manifests_through_the_cli(pair_export, target, tmp_path, case, content):
    folder = copy_export(pair_export, tmp_path / "export")
    if content is None:
        manifest = read_manifest(folder)
        entry_of(manifest, "runs.parquet")["rows"] = float("nan") if case == "NaN rows" else -1
        content = json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(content)
    before = sha256(target)
    code, line = cli(f"`import` of a manifest with {case}",
                     ["import", str(folder), "--cache", str(target)])
    assert code == 2 and str(folder) in line and len(line) < 1000, line
    assert sha256(target) == before


# --- jobs: SIGTERM and SIGINT are a cancel (item 11), one jobs folder per cache (item 12) ------------

# The stand-in pipeline waits for this file before it returns, so the job stays active meanwhile.
RELEASE_ENV = "CIRCUITDIFF_TEST_RUN_RELEASE"


def _stand_in_pipeline_run(request, progress=None, log=print):
    """Under the writer lock, as the pipeline: commit one row (a stage timing of run "committed"),
    report it, then wait for the release file (60 s at most)."""
    store = Store(request.cache)
    with store.writer_lock(wait=False):
        with store.write() as con:
            Store.insert_rows(con, "stage_timings", [{
                "run_key": "committed", "stage": "generate", "items": 1, "seconds": 1.0,
                "code_version": "test", "git_commit": "test", "created_at": dt.datetime.now()}])
        progress("generate", 1, 2)
        release = Path(os.environ[RELEASE_ENV])
        deadline = time.monotonic() + 60
        while not release.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test never wrote {release}")
            time.sleep(0.05)
    return types.SimpleNamespace(run_key=f"key-{request.pair}", done={}, seconds=0.0, t_cuts={},
                                 selection={"n_selected": 0}, control_runs={})


def _wait_for(predicate, what: str, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.1)


@pytest.fixture
def stand_in_runs(monkeypatch, tmp_path) -> Path:
    """Run jobs start this file as their module; returns the release file."""
    monkeypatch.setattr(jobs, "RUN_MODULE", Path(__file__).stem)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(RELEASE_ENV, str(tmp_path / "release"))
    return tmp_path / "release"


def _start_and_wait(cache: Path) -> jobs.JobStatus:
    job_id = jobs.start(RunRequest(pair="tiny", dataset="tiny", cache=str(cache)))
    _wait_for(lambda: jobs.status(job_id, cache).done == 1, "the job's committed progress")
    return jobs.status(job_id, cache)


def _committed(cache: Path) -> list[tuple]:
    with Store(cache).read() as con:
        return con.execute("SELECT run_key FROM stage_timings").fetchall()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_run_job_is_a_cancel(stand_in_runs, tmp_path, signum):
    cache = tmp_path / "cache.duckdb"
    job = _start_and_wait(cache)
    assert job.state == "running"
    os.kill(job.pid, signum)
    jobs._children[job.job_id].wait(timeout=60)
    job = jobs.status(job.job_id, cache)
    log = Path(job.log_path).read_text()
    assert job.state == "cancelled", (job.message, log)
    assert signal.Signals(signum).name in job.message and "rerun resumes" in job.message
    assert "Traceback" not in log, log
    raw = json.loads(jobs._status_path(job.job_id, cache).read_text())
    assert raw["state"] == "cancelled"  # recorded by the job, not inferred from its absence
    assert _committed(cache) == [("committed",)]
    assert not Store(cache).writer_active()
    assert jobs.active_jobs(cache) == []


def test_cancel_still_stops_a_run_job(stand_in_runs, tmp_path):
    cache = tmp_path / "cache.duckdb"
    job = _start_and_wait(cache)
    cancelled = jobs.cancel(job.job_id, cache)
    assert cancelled.state == "cancelled" and "rerun resumes" in cancelled.message
    assert _committed(cache) == [("committed",)]
    assert not Store(cache).writer_active()


def test_caches_in_one_folder_have_their_own_jobs(stand_in_runs, tmp_path):
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    try:
        job_a = _start_and_wait(a)
        assert [j.job_id for j in jobs.active_jobs(b)] == []  # b's banner
        job_b = _start_and_wait(b)  # not refused by a's job
        assert [j.job_id for j in jobs.active_jobs(a)] == [job_a.job_id]
        assert [j.job_id for j in jobs.active_jobs(b)] == [job_b.job_id]
        assert [j.job_id for j in jobs.list_jobs(b)] == [job_b.job_id]
        with pytest.raises(jobs.JobConflictError, match=f"job {job_a.job_id}"):
            jobs.start(RunRequest(pair="other", dataset="tiny", cache=str(a)))
    finally:
        stand_in_runs.touch()
    for cache in (a, b):
        _wait_for(lambda: jobs.active_jobs(cache) == [], f"the job of {cache.name} to end")
        assert [j.state for j in jobs.list_jobs(cache)] == ["done"], Path(
            jobs.list_jobs(cache)[0].log_path).read_text()


def test_the_same_cache_by_another_path_shares_its_jobs(tmp_path):
    (tmp_path / "sub").mkdir()
    assert jobs.jobs_dir(tmp_path / "sub" / ".." / "a.duckdb") == jobs.jobs_dir(tmp_path / "a.duckdb")


if __name__ == "__main__":  # the stand-in for `python -m core` that jobs.start runs in the job tests
    from core import pipeline
    from core.__main__ import main

    pipeline.run = _stand_in_pipeline_run
    sys.exit(main(sys.argv[1:]))
