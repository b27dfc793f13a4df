"""The only way the dashboard starts and cancels recomputation: `python -m core run ...` in a detached
process (its own session, so it outlives a page reload or the dashboard itself).

Each job has a JSON status file `<cache dir>/jobs/<job_id>.json`, replaced atomically (write, then
rename) by the run as it progresses, and a log `<job_id>.log` with its output. The cache's writer lock
makes a second writer impossible; `start` refuses early, with a clear message, when one is running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from core.pipeline import RunRequest
from core.store import REPO_ROOT, Store

ACTIVE = ("queued", "running")
# Popen objects of jobs started by this process, so finished children are reaped (a zombie would
# still look alive to os.kill(pid, 0)).
_children: dict[str, subprocess.Popen] = {}


class JobConflictError(RuntimeError):
    """A run is already writing to the cache."""


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """state: queued | running | done | failed | cancelled."""

    job_id: str
    request: RunRequest
    state: str
    stage: str
    done: int
    total: int
    eta_seconds: float | None
    message: str
    started_at: float
    pid: int | None = None
    updated_at: float | None = None
    log_path: str | None = None


def jobs_dir(cache: str | os.PathLike | None = None) -> Path:
    return Store(cache).path.parent / "jobs"


def _status_path(job_id: str, cache=None) -> Path:
    return jobs_dir(cache) / f"{job_id}.json"


def write_status(path: Path, **fields: Any) -> None:
    """Merge `fields` into the status file at `path`, atomically: readers see the old or the new
    file, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    current = _read_json(path) or {}
    current.update(fields, updated_at=time.time())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(current))
    os.replace(temporary, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # only possible for a file not written by write_status


class JobReporter:
    """What `python -m core run --job-id` uses to report progress into the status file."""

    def __init__(self, job_id: str, cache=None):
        self.path = _status_path(job_id, cache)
        self.stage = ""
        self.stage_began = self.last_write = time.time()

    def running(self) -> None:
        write_status(self.path, state="running", pid=os.getpid(), message="")

    # Seconds between status-file writes within a stage (grading calls progress per question).
    MIN_INTERVAL_S = 0.5

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        if stage != self.stage:
            self.stage, self.stage_began = stage, now
        elif done < total and now - self.last_write < self.MIN_INTERVAL_S:
            return
        self.last_write = now
        rate = done / (now - self.stage_began) if done and now > self.stage_began else None
        eta = (total - done) / rate if rate else None
        write_status(self.path, stage=stage, done=done, total=total, eta_seconds=eta)

    def finish(self, state: str, message: str = "") -> None:
        write_status(self.path, state=state, message=message, eta_seconds=0 if state == "done" else None)


def _alive(job_id: str, pid: int | None) -> bool:
    child = _children.get(job_id)
    if child is not None:
        return child.poll() is None
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, not reaped by a parent that is not us) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _to_status(data: dict) -> JobStatus:
    state = data.get("state", "failed")
    message = data.get("message", "")
    if state in ACTIVE and not _alive(data["job_id"], data.get("pid")):
        state = "failed"
        message = message or (f"the run process ended without reporting a result; see its log "
                              f"{data.get('log_path')}")
    return JobStatus(job_id=data["job_id"], request=RunRequest.from_dict(data["request"]), state=state,
                     stage=data.get("stage", ""), done=int(data.get("done", 0)),
                     total=int(data.get("total", 0)), eta_seconds=data.get("eta_seconds"),
                     message=message, started_at=data.get("started_at", 0.0), pid=data.get("pid"),
                     updated_at=data.get("updated_at"), log_path=data.get("log_path"))


def status(job_id: str, cache=None) -> JobStatus:
    data = _read_json(_status_path(job_id, cache))
    if data is None:
        raise KeyError(f"no job {job_id!r} under {jobs_dir(cache)}")
    return _to_status(data)


def list_jobs(cache=None) -> list[JobStatus]:
    """Every job of the cache, newest first."""
    folder = jobs_dir(cache)
    if not folder.is_dir():
        return []
    found = [_read_json(p) for p in folder.glob("*.json")]
    return sorted((_to_status(d) for d in found if d and "job_id" in d),
                  key=lambda s: s.started_at, reverse=True)


def start(request: RunRequest) -> str:
    """Start `request` in a detached process; returns its job id."""
    store = Store(request.cache)
    for job in list_jobs(request.cache):
        if job.state in ACTIVE:
            same = ("the same run" if job.request == request
                    else f"run {job.request.pair}/{job.request.dataset}")
            raise JobConflictError(f"job {job.job_id} ({same}) is still {job.state}; wait for it to "
                                   f"finish or cancel it before starting another")
    if store.writer_active():
        raise JobConflictError(f"another process is writing to the cache {store.path} (its writer "
                               f"lock is held); wait for it to finish before starting a run")
    job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    path = _status_path(job_id, request.cache)
    log_path = path.with_suffix(".log")
    write_status(path, job_id=job_id, request=request.as_dict(), state="queued", stage="starting",
                 done=0, total=0, eta_seconds=None, message="", started_at=time.time(),
                 log_path=str(log_path))
    command = [sys.executable, "-m", "core", "run", *request.cli_args(), "--job-id", job_id]
    with open(log_path, "ab") as log:
        child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    _children[job_id] = child
    write_status(path, pid=child.pid)
    return job_id


def cancel(job_id: str, cache=None, wait_s: float = 10.0) -> JobStatus:
    """Stop a job (its whole process group): SIGTERM, then SIGKILL after `wait_s`. Work committed
    so far stays in the cache; a later run resumes from it."""
    job = status(job_id, cache)
    if job.state in ACTIVE and job.pid:
        try:
            os.killpg(job.pid, signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            while _alive(job_id, job.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(job_id, job.pid):
                os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child = _children.pop(job_id, None)
        if child is not None:
            child.wait(timeout=wait_s)
    if job.state in ACTIVE:
        write_status(_status_path(job_id, cache), state="cancelled",
                     message="cancelled; completed work is kept and a rerun resumes from it")
    return status(job_id, cache)


def estimate(request: RunRequest) -> dict[str, Any]:
    """Work missing per stage and rough seconds, from what the cache holds (no model is loaded)."""
    from core.pipeline import plan

    return plan(request)
