"""Export and import of a run (core/exchange.py): a round trip changes nothing the dashboard reads,
and an export folder from someone else can never run code, write outside the cache, or leave the
cache half-written."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.exchange import (MANIFEST, ExportFormatError, ExportTargetError, ExportVersionError,
                           export_run, import_run)
from core.query import ResultCache
from core.store import SCHEMA_VERSION, CacheError, Store
from core.synthetic import build_fixture_cache


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[str]]:
    """The fixture cache (a pair and a series) and its run keys."""
    path = tmp_path_factory.mktemp("source") / "cache.duckdb"
    return path, build_fixture_cache(path)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    """The fixture's pair run, exported."""
    path, (pair, _) = source
    folder = tmp_path_factory.mktemp("exports") / "pair"
    export_run(Store(path), pair, folder)
    return folder


@pytest.fixture(scope="module")
def series_only(source, tmp_path_factory) -> Path:
    path, (_, series) = source
    folder = tmp_path_factory.mktemp("series")
    export_run(Store(path), series, folder / "export")
    import_run(Store(folder / "cache.duckdb"), folder / "export")
    return folder / "cache.duckdb"


@pytest.fixture
def target(series_only, tmp_path) -> Path:
    """A cache holding the fixture's series run only: imports land beside existing work."""
    return Path(shutil.copy(series_only, tmp_path / "target.duckdb"))


def file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def copy_export(exported: Path, folder: Path) -> Path:
    shutil.copytree(exported, folder)
    return folder


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest))


def entry_of(manifest: dict, path: str) -> dict:
    return next(e for e in manifest["files"] if e["path"] == path)


def replace_file(folder: Path, name: str, content: bytes | pa.Table) -> None:
    """Replace a file and fix its checksum and row count in the manifest, as a forger would; the
    columns the manifest lists stay the schema's."""
    if isinstance(content, pa.Table):
        pq.write_table(content, folder / name)
    else:
        (folder / name).write_bytes(content)
    manifest = read_manifest(folder)
    entry = entry_of(manifest, name)
    entry["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    if isinstance(content, pa.Table):
        entry["rows"] = content.num_rows
    write_manifest(folder, manifest)


def assert_refused(cache: Path, folder: Path, error: type, *fragments: str) -> str:
    """The import fails with `error`, one line naming what is wrong; the cache file's bytes are
    what they were (or it still does not exist)."""
    before = file_hash(cache)
    with pytest.raises(error) as refused:
        import_run(Store(cache), folder)
    message = str(refused.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert file_hash(cache) == before
    assert not Path(str(cache) + ".wal").exists()
    return message


# --- round trip ----------------------------------------------------------------------------------

def test_round_trip_gives_the_same_matrices_and_metrics(source, exported, target):
    path, (pair, series) = source
    counts = import_run(Store(target), exported)
    assert counts["runs"] == 1 and counts["scores"] > 0
    original, imported = ResultCache.open(path), ResultCache.open(target)
    assert sorted(imported.runs()["run_key"].unique()) == sorted([pair, series])
    for run in original.runs().itertuples():
        for alpha in run.alphas:
            want = original.view(run.run_key, alpha, post_label=run.post_label)
            got = imported.view(run.run_key, alpha, post_label=run.post_label)
            assert got.question_ids == want.question_ids
            np.testing.assert_array_equal(got.base, want.base)
            np.testing.assert_array_equal(got.post, want.post)
            assert (imported.comparison(run.run_key, alpha, post_label=run.post_label).to_dict()
                    == original.comparison(run.run_key, alpha, post_label=run.post_label).to_dict())
    columns = ["run_key", "post_label", "alpha", "metric", "base", "post", "change_pct"]
    assert imported.metric_table()[columns].equals(original.metric_table()[columns])


def test_importing_twice_keeps_the_rows_already_present(exported, target):
    import_run(Store(target), exported)
    with Store(target).read() as con:
        before = con.execute("SELECT count(*) FROM scores").fetchone()
    import_run(Store(target), exported)
    with Store(target).read() as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone() == before


def test_an_answer_is_exported_by_question_content_wherever_it_was_generated(source, tmp_path):
    path, (pair, _) = source
    cache = Path(shutil.copy(path, tmp_path / "cache.duckdb"))
    with Store(cache).read() as con:
        model_key, gen_key, question_key = con.execute(
            "SELECT m.model_key, r.gen_key, q.question_key FROM runs r "
            "JOIN run_models m ON m.run_key = r.run_key AND m.role = 'base' "
            "JOIN questions q ON q.dataset_key = r.dataset_key WHERE r.run_key = ? "
            "ORDER BY q.position LIMIT 1", [pair]).fetchone()
    answer = {"model_key": model_key, "question_key": question_key, "dataset_key": "elsewhere",
              "question_id": "elsewhere-7", "answer_text": "42"}
    with Store(cache).write() as con:
        Store.insert_rows(con, "generations", [
            {**answer, "generation_key": "same-question-other-dataset", "gen_key": gen_key},
            {**answer, "generation_key": "other-settings", "gen_key": "other"}])
    export_run(Store(cache), pair, tmp_path / "out")
    exported = pq.read_table(tmp_path / "out" / "generations.parquet").column("generation_key")
    assert "same-question-other-dataset" in exported.to_pylist()
    assert "other-settings" not in exported.to_pylist()


def test_the_manifest_records_versions_columns_rows_and_checksums(exported):
    manifest = read_manifest(exported)
    assert manifest["schema_version"] == SCHEMA_VERSION
    scores = entry_of(manifest, "scores.parquet")
    assert ["loss", "DOUBLE"] in scores["columns"]
    assert scores["rows"] == pq.read_table(exported / "scores.parquet").num_rows
    assert scores["sha256"] == hashlib.sha256((exported / "scores.parquet").read_bytes()).hexdigest()
    assert {e["table"] for e in manifest["files"]} >= {"generations", "questions", "edge_vectors"}


# --- export --------------------------------------------------------------------------------------

def test_export_of_an_unknown_run_leaves_no_folder(source, tmp_path):
    with pytest.raises(CacheError, match="no run 'nope'"):
        export_run(Store(source[0]), "nope", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["file", "folder with a file"])
def test_export_refuses_a_target_that_is_not_an_empty_folder(source, tmp_path, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportTargetError, match="not an empty folder"):
        export_run(Store(source[0]), source[1][0], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_fills_an_empty_folder(source, tmp_path):
    (tmp_path / "out").mkdir()
    export_run(Store(source[0]), source[1][0], tmp_path / "out")
    assert (tmp_path / "out" / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_export_leaves_nothing(source, tmp_path, monkeypatch):
    import core.exchange

    def fail():
        raise OSError("disk full")
    monkeypatch.setattr(core.exchange, "code_version", fail)
    with pytest.raises(OSError, match="disk full"):
        export_run(Store(source[0]), source[1][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- import refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("manifest_lists_payload", [False, True])
def test_a_crafted_column_name_is_refused_and_writes_no_file(exported, target, tmp_path,
                                                             manifest_lists_payload):
    # Pasted into `INSERT INTO runs (<columns>) SELECT <columns> FROM ...` as the old import did,
    # this column name ends the insert and runs a COPY that writes `written`.
    written = tmp_path / "pwned.csv"
    payload = f"run_key) SELECT 'x' WHERE false; COPY (SELECT 'pwned') TO '{written}' (FORMAT csv); --"
    folder = copy_export(exported, tmp_path / "crafted")
    replace_file(folder, "runs.parquet", pa.table({payload: pa.array(["x"])}))
    if manifest_lists_payload:
        manifest = read_manifest(folder)
        entry_of(manifest, "runs.parquet")["columns"] = [[payload, "VARCHAR"]]
        write_manifest(folder, manifest)
    assert_refused(target, folder, ExportFormatError, "runs.parquet", "extra", "export the run again")
    assert not written.exists()


def test_an_export_of_schema_version_1_is_refused_naming_the_version(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "old")
    manifest = read_manifest(folder)
    manifest["schema_version"] = "1"
    write_manifest(folder, manifest)
    assert_refused(target, folder, ExportVersionError, "schema version '1'",
                   f"imports version {SCHEMA_VERSION!r}")


def test_an_export_without_a_manifest_is_refused_naming_the_version(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "old")
    (folder / MANIFEST).unlink()
    assert_refused(target, folder, ExportVersionError, "no manifest.json", "schema version 1",
                   f"imports schema version {SCHEMA_VERSION}")


def test_a_refused_import_does_not_create_the_cache(exported, tmp_path):
    folder = copy_export(exported, tmp_path / "old")
    (folder / MANIFEST).unlink()
    assert_refused(tmp_path / "new.duckdb", folder, ExportVersionError)
    assert not (tmp_path / "new.duckdb").exists()


def _without_loss(table: pa.Table) -> pa.Table:
    return table.drop_columns(["loss"])


def _with_extra(table: pa.Table) -> pa.Table:
    return table.append_column("temperature", pa.array([0.7] * table.num_rows))


def _retyped(table: pa.Table) -> pa.Table:
    return table.set_column(table.schema.get_field_index("t_cut"), "t_cut",
                            pa.array([str(t) for t in table.column("t_cut").to_pylist()]))


@pytest.mark.parametrize("change, fragment", [
    (_without_loss, "missing loss"),
    (_with_extra, "extra 'temperature'"),
    (_retyped, "t_cut is 'VARCHAR', expected INTEGER"),
])
def test_scores_of_another_schema_are_refused(exported, target, tmp_path, change, fragment):
    folder = copy_export(exported, tmp_path / "changed")
    replace_file(folder, "scores.parquet", change(pq.read_table(folder / "scores.parquet")))
    assert_refused(target, folder, ExportFormatError, "scores.parquet", fragment)


def test_a_column_list_of_another_schema_in_the_manifest_is_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "changed")
    manifest = read_manifest(folder)
    entry = entry_of(manifest, "scores.parquet")
    entry["columns"] = [c for c in entry["columns"] if c[0] != "loss"]
    write_manifest(folder, manifest)
    assert_refused(target, folder, ExportFormatError, "columns listed for scores.parquet",
                   "missing loss")


def test_a_changed_file_fails_its_checksum(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "changed")
    data = bytearray((folder / "grades.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "grades.parquet").write_bytes(bytes(data))
    assert_refused(target, folder, ExportFormatError, "grades.parquet", "checksum")


def test_a_truncated_parquet_file_is_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "cut")
    data = (folder / "scores.parquet").read_bytes()
    replace_file(folder, "scores.parquet", data[:len(data) // 2])
    assert_refused(target, folder, ExportFormatError, "scores.parquet", "not a readable Parquet file")


@pytest.mark.parametrize("change, fragment", [
    (-1, "holds 12 rows, the manifest says 11"),
    # More questions than the dataset has: refused from the manifest, before the file is read.
    (+1, "declares 13 rows, more than its run can have (at most 12: the dataset's n_questions)"),
])
def test_a_row_count_other_than_the_manifests_is_refused(exported, target, tmp_path, change,
                                                         fragment):
    folder = copy_export(exported, tmp_path / "rows")
    manifest = read_manifest(folder)
    assert entry_of(manifest, "questions.parquet")["rows"] == 12
    entry_of(manifest, "questions.parquet")["rows"] += change
    write_manifest(folder, manifest)
    assert_refused(target, folder, ExportFormatError, "questions.parquet (table questions)", fragment)


def test_repeated_keys_are_refused(exported, target, tmp_path):
    # Models of the run (a run's export may hold up to a thousand), each listed twice.
    folder = copy_export(exported, tmp_path / "twice")
    models = pq.read_table(folder / "run_models.parquet")
    replace_file(folder, "run_models.parquet", pa.concat_tables([models, models]))
    assert_refused(target, folder, ExportFormatError, "run_models.parquet", "do not fit the cache")


def test_scores_without_their_vectors_are_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "vectors")
    name = next(p.name for p in folder.glob("vectors_*.parquet"))
    vectors = pq.read_table(folder / name)
    replace_file(folder, name, vectors.slice(1))
    assert_refused(target, folder, ExportFormatError, name, "1 scores without a vector")


def test_vectors_with_missing_values_are_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "holes")
    name = next(p.name for p in folder.glob("vectors_*.parquet"))
    vectors = pq.read_table(folder / name)
    column = vectors.column("edge_scores").combine_chunks()
    values = column.flatten().to_pylist()
    values[0] = None
    holed = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), column.type.list_size)
    replace_file(folder, name, vectors.set_column(1, "edge_scores", holed))
    assert_refused(target, folder, ExportFormatError, name, "1 vectors with missing values")


@pytest.mark.parametrize("listed", ["../runs.parquet", "/etc/passwd", "sub/../../runs.parquet", ""])
def test_a_file_path_leaving_the_folder_is_refused(exported, target, tmp_path, listed):
    folder = copy_export(exported, tmp_path / "escape")
    shutil.copy(folder / "runs.parquet", tmp_path / "runs.parquet")
    manifest = read_manifest(folder)
    entry_of(manifest, "runs.parquet")["path"] = listed
    write_manifest(folder, manifest)
    assert_refused(target, folder, ExportFormatError, "not a path inside the export folder")


def test_a_link_leaving_the_folder_is_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "link")
    shutil.move(folder / "runs.parquet", tmp_path / "runs.parquet")
    (folder / "runs.parquet").symlink_to(tmp_path / "runs.parquet")
    assert_refused(target, folder, ExportFormatError, "links outside the export folder")


def test_a_missing_table_is_refused(exported, target, tmp_path):
    folder = copy_export(exported, tmp_path / "partial")
    manifest = read_manifest(folder)
    manifest["files"] = [e for e in manifest["files"] if e["table"] != "grades"]
    write_manifest(folder, manifest)
    assert_refused(target, folder, ExportFormatError, "missing: grades")


# --- arbitrary bytes -----------------------------------------------------------------------------

FUZZ = settings(max_examples=20, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _import_leaves_cache_unchanged(cache: Path, folder: Path) -> None:
    """Either a clear refusal (one line) or a valid import; never another exception."""
    before = file_hash(cache)
    try:
        import_run(Store(cache), folder)
    except CacheError as error:
        assert "\n" not in str(error)
        assert file_hash(cache) == before


@FUZZ
@given(content=st.binary(max_size=2000))
def test_arbitrary_bytes_as_the_manifest_are_refused_clearly(exported, target, tmp_path, content):
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    copy_export(exported, folder)
    (folder / MANIFEST).write_bytes(content)
    _import_leaves_cache_unchanged(target, folder)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@FUZZ
@given(field=st.sampled_from(["path", "table", "columns", "rows", "sha256", "n_edges"]),
       value=JSON, index=st.integers(min_value=0))
def test_arbitrary_values_in_a_manifest_entry_are_refused_clearly(exported, target, tmp_path, field,
                                                                  value, index):
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    copy_export(exported, folder)
    manifest = read_manifest(folder)
    manifest["files"][index % len(manifest["files"])][field] = value
    write_manifest(folder, manifest)
    _import_leaves_cache_unchanged(target, folder)


@FUZZ
@given(name=st.sampled_from(["runs.parquet", "scores.parquet", "generations.parquet"]),
       content=st.binary(max_size=2000) | st.binary(min_size=8, max_size=2000).map(
           lambda b: b"PAR1" + b + b"PAR1"))
def test_arbitrary_bytes_as_a_parquet_file_are_refused_clearly(exported, target, tmp_path, name,
                                                               content):
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    copy_export(exported, folder)
    replace_file(folder, name, content)
    _import_leaves_cache_unchanged(target, folder)


def test_a_runs_faithfulness_and_token_views_travel_with_it(source, tmp_path):
    import datetime

    path, (pair, _) = source
    copy = tmp_path / "source.duckdb"
    shutil.copy(path, copy)
    now = datetime.datetime(2026, 12, 2)
    with Store(copy).write() as con:
        Store.insert_rows(con, "faithfulness", [{"run_key": pair, "alpha": 0.5, "label": "base",
                                                 "settings_key": "s", "settings": "{}",
                                                 "report": '{"edges": []}', "created_at": now}])
        Store.insert_rows(con, "token_views", [{"run_key": pair, "alpha": 0.5,
                                                "question_id": "q0", "settings_key": "s",
                                                "view": "{}", "created_at": now}])
    export_run(Store(copy), pair, tmp_path / "export")
    import_run(Store(tmp_path / "imported.duckdb"), tmp_path / "export")
    with Store(tmp_path / "imported.duckdb").read() as con:
        assert con.execute("SELECT run_key, label, report FROM faithfulness").fetchall() == [
            (pair, "base", '{"edges": []}')]
        assert con.execute("SELECT question_id FROM token_views").fetchall() == [("q0",)]
