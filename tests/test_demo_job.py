"""`make demo`'s background job (core/jobs.py start_demo): the real `python -m core.demo run` path with
the pipeline replaced by a cheap stand-in (this file run as a module), its status as the pages'
banner shows it, and a second start refused while it runs."""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import psutil
import pytest

from core import jobs
from core.demo.run import DEMO_PAIRS
from job_stand_ins import wait_for, wait_for_release

TESTS = Path(__file__).resolve().parent
# The stand-in pipeline waits for this file before it returns, so the job stays active meanwhile.
RELEASE_ENV = "CIRCUITDIFF_TEST_DEMO_RELEASE"


def _stand_in_pipeline_run(request, progress=None, log=print):
    """Two items of one stage, then wait for the test's release file (60 s at most)."""
    progress("generate base", 0, 2)
    progress("generate base", 2, 2)
    wait_for_release(RELEASE_ENV)
    return types.SimpleNamespace(run_key=f"key-{request.pair}", done={}, seconds=0.0, t_cuts={},
                                 selection={"n_selected": 0})



def test_the_demo_job_reports_each_pairs_stage_and_a_second_start_is_refused(monkeypatch, tmp_path):
    cache = tmp_path / "demo.duckdb"
    release = tmp_path / "release"
    monkeypatch.setattr(jobs, "DEMO_MODULE", Path(__file__).stem)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(RELEASE_ENV, str(release))
    job_id = jobs.start_demo(cache)
    try:
        def reported():
            active = jobs.active_jobs(cache)
            return active and active[0].stage == "demo-grpo: generate base" and active[0].done == 2

        wait_for(reported, "the first pair's progress in the status file")
        (job,) = jobs.active_jobs(cache)
        assert (job.job_id, job.label, job.state, job.total) == (job_id, "demo", "running", 2)
        with pytest.raises(jobs.JobConflictError, match=f"demo job {job_id} is still running"):
            jobs.start_demo(cache)
    finally:
        release.touch()
    wait_for(lambda: jobs.demo_jobs(cache)[0].state != "running", "the job to end")
    (job,) = jobs.demo_jobs(cache)
    log = Path(job.log_path).read_text()
    assert (job.state, job.message) == ("done", "demo pairs complete"), log
    assert all(f"{pair}: run key-{pair}" in log for pair in DEMO_PAIRS), log
    assert jobs.active_jobs(cache) == []


def test_a_running_demo_job_is_cancelled_and_a_new_start_is_taken(monkeypatch, tmp_path):
    cache = tmp_path / "demo.duckdb"
    monkeypatch.setattr(jobs, "DEMO_MODULE", Path(__file__).stem)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    # Never released: only cancelling ends this job.
    monkeypatch.setenv(RELEASE_ENV, str(tmp_path / "never"))
    job_id = jobs.start_demo(cache, "extras")
    wait_for(lambda: jobs.active_jobs(cache) and jobs.active_jobs(cache)[0].done == 2,
              "the job's progress")
    (job,) = jobs.active_jobs(cache)
    assert (job.label, job.demo) == ("demo extras", True)
    pid = jobs._read_json(jobs.demo_status_path(job_id, cache))["pid"]
    jobs.cancel_progress(job, cache)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    (job,) = jobs.demo_jobs(cache)
    assert job.state == "cancelled" and "rerun resumes" in job.message
    assert jobs.active_jobs(cache) == []
    second = jobs.start_demo(cache, "extras")  # no longer refused
    jobs.cancel_demo(second, cache)
    assert jobs.demo_jobs(cache)[0].state == "cancelled"


def _fake_active_demo(cache: Path, **fields) -> Path:
    """A demo job's status file whose process is this one (alive while the test runs)."""
    path = jobs.demo_status_path("20260101-000000-abcdef", cache)
    jobs.write_status(path, job_id=path.stem, state="running", stage="demo-dpo: score 0.1", done=3,
                      total=10, eta_seconds=65.0, message="", started_at=time.time(),
                      log_path=str(path.with_suffix(".log")), pid=os.getpid(),
                      pid_created=psutil.Process().create_time(), **fields)
    return path


def _banners(at) -> list[str]:
    return [box.value for box in at.info if "results appear as each run lands" in box.value.lower()]


@pytest.mark.parametrize("read_only", [False, True])
def test_pages_show_the_banner_while_a_job_is_active_and_not_after(monkeypatch, tmp_path, read_only):
    from test_app import open_app

    cache = tmp_path / "empty.duckdb"
    path = _fake_active_demo(cache)
    at = open_app(monkeypatch, cache, read_only=read_only)
    assert [e.value for e in at.exception] == []
    (banner,) = _banners(at)
    assert "demo-dpo: score 0.1" in banner and "3/10" in banner and "ETA 0:01:05" in banner
    cancel = [b for b in at.button if b.key == f"banner.cancel.{path.stem}"]
    assert len(cancel) == (0 if read_only else 1)  # read-only mode computes nothing, stops nothing
    jobs.write_status(path, state="done", message="demo complete")
    at.run()
    assert _banners(at) == []


if __name__ == "__main__":  # the stand-in for `python -m core.demo` that start_demo runs
    from core import pipeline
    from core.demo import __main__ as demo_cli

    pipeline.run = _stand_in_pipeline_run
    sys.exit(demo_cli.main(sys.argv[1:]))
