"""The only way the dashboard starts and cancels recomputation: `python -m core run --request FILE`
in a detached process (its own session, so it outlives a page reload or the dashboard itself), and
the only way it estimates one: `python -m core plan --request FILE --json` in a child process, so the
dashboard's own process never imports transformers.

Each job has, in its cache file's own jobs folder `<cache>.jobs/` (beside `<cache>.writer.lock`, so
caches in one folder never see each other's jobs), its request `<job_id>.request.json`, a JSON
status file `<job_id>.json` replaced atomically (write, then rename) by the run as it progresses, and
a log `<job_id>.log` with its output. The cache's writer lock makes a second writer impossible;
`start` refuses early, with a clear message, when one is running. A job's process takes SIGTERM (what
`cancel` sends) and SIGINT as a cancel: it unwinds (open transactions roll back, the writer lock is
released), records "cancelled" and exits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

# Re-exported: the Compute page builds requests and lists what is configured through this module.
from core.config import ConfigError, RunRequest, configured  # noqa: F401
from core.errors import CircuitdiffError
from core.settings import stable_hash
from core.store import REPO_ROOT, Store
from core.vocab import ACTIVE_JOB_STATES, JobState
# Re-exported: the Compute page offers a run's controls through this module.
from core.vocab import CONTROLS  # noqa: F401

ACTIVE = ACTIVE_JOB_STATES
REQUEST_SUFFIX = ".request.json"
# The module whose `run --request FILE --job-id ID` a run job is (tests put a cheap stand-in here).
RUN_MODULE = "core"
# Popen objects of jobs started by this process: polling one reaps it when it has finished (a
# zombie child would otherwise still look alive).
_children: dict[str, subprocess.Popen] = {}


class JobConflictError(CircuitdiffError):
    """A run is already writing to the cache."""


class JobCancelled(SystemExit):
    """Raised in a job's process by SIGTERM or SIGINT. A SystemExit, so no `except Exception` (as
    grading's guard around math-verify) swallows it, and the process ends without a traceback, with
    status 128 + the signal's number."""


# What a cancelled job's status says, after "cancelled".
KEPT = "completed work is kept and a rerun resumes from it"


@dataclasses.dataclass(frozen=True)
class JobStatus:
    job_id: str
    request: RunRequest
    state: JobState
    stage: str
    done: int
    total: int
    eta_seconds: float | None
    message: str
    started_at: float
    pid: int | None = None
    # The process's creation time, to tell it from a later process that reuses its pid.
    pid_created: float | None = None
    updated_at: float | None = None
    log_path: str | None = None


def jobs_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache file's jobs folder, `<cache>.jobs` (the same however the cache's path is spelled)."""
    return Path(f"{Store(cache).path.resolve()}.jobs")


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
    """What `python -m core run --job-id` uses to report progress into the status file at `path`."""

    def __init__(self, path: Path):
        self.path = path
        self.stage = ""
        self.stage_began = self.last_write = time.time()
        # The name of the signal that cancelled the job; whether finish() has begun.
        self.stopped_by: str | None = None
        self.finishing = False

    def running(self) -> None:
        """Report the job running; from now on SIGTERM and SIGINT cancel it."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        write_status(self.path, state="running", pid=os.getpid(), message="")

    def _stop(self, signum: int, frame) -> None:
        # Only the first signal raises, and none once the result is being recorded: a second one
        # would interrupt the unwinding that rolls back, releases the lock and writes the status.
        if self.stopped_by is None and not self.finishing:
            self.stopped_by = signal.Signals(signum).name
            raise JobCancelled(128 + signum)

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

    def finish(self, state: JobState, message: str = "") -> None:
        """Record the job's result; a job a signal stopped is cancelled, whatever it was doing."""
        self.finishing = True
        if self.stopped_by is not None:
            state, message = "cancelled", f"cancelled ({self.stopped_by}); {KEPT}"
        write_status(self.path, state=state, message=message, eta_seconds=0 if state == "done" else None)


def _alive(job_id: str, pid: int | None, pid_created: float | None = None) -> bool:
    """Whether the job's process still runs: not finished, not a zombie, and (when its creation
    time was recorded) not another process that took its pid after it ended."""
    child = _children.get(job_id)
    if child is not None:
        return child.poll() is None  # poll() reaps a finished child
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if pid_created is not None and abs(process.create_time() - pid_created) > 0.5:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _checked_state(data: dict) -> tuple[JobState, str]:
    """A status file's state and message; an active job whose process is gone has failed."""
    state = data.get("state", "failed")
    message = data.get("message", "")
    if state in ACTIVE and not _alive(data["job_id"], data.get("pid"), data.get("pid_created")):
        state = "failed"
        message = message or (f"the job's process ended without reporting a result; see its log "
                              f"{data.get('log_path')}")
    return state, message


def _to_status(data: dict) -> JobStatus:
    state, message = _checked_state(data)
    return JobStatus(job_id=data["job_id"], request=RunRequest.from_dict(data["request"]), state=state,
                     stage=data.get("stage", ""), done=int(data.get("done", 0)),
                     total=int(data.get("total", 0)), eta_seconds=data.get("eta_seconds"),
                     message=message, started_at=data.get("started_at", 0.0), pid=data.get("pid"),
                     pid_created=data.get("pid_created"),
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
    found = [_read_json(p) for p in folder.glob("*.json") if not p.name.endswith(REQUEST_SUFFIX)]
    return sorted((_to_status(d) for d in found if d and "job_id" in d),
                  key=lambda s: s.started_at, reverse=True)


def start(request: RunRequest) -> str:
    """Start `request` in a detached process; returns its job id."""
    _refuse_while_busy(request.cache, "a run", request)
    job_id = _new_job_id()
    path = _status_path(job_id, request.cache)
    log_path = path.with_suffix(".log")
    write_status(path, job_id=job_id, request=request.as_dict(), state="queued", stage="starting",
                 done=0, total=0, eta_seconds=None, message="", started_at=time.time(),
                 log_path=str(log_path))
    request_path = request.to_file(path.with_name(job_id + REQUEST_SUFFIX))
    _spawn(job_id, path, ["run", "--request", str(request_path), "--job-id", job_id],
           module=RUN_MODULE)
    return job_id


def _new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _refuse_while_busy(cache, starting: str, request: RunRequest | None = None) -> Store:
    """Raises JobConflictError while a run or demo job of the cache is active, or another process
    holds its writer lock; returns the cache's store. `starting`: what the caller starts."""
    for job in list_jobs(cache):
        if job.state in ACTIVE:
            same = ("the same run" if job.request == request
                    else f"run {job.request.pair}/{job.request.dataset}")
            raise JobConflictError(f"job {job.job_id} ({same}) is still {job.state}; wait for it to "
                                   f"finish or cancel it before starting {starting}")
    for job in demo_jobs(cache):
        if job.state in ACTIVE:
            raise JobConflictError(f"the demo job {job.job_id} is still {job.state} (stage "
                                   f"{job.stage or 'starting'}); wait for it to finish before "
                                   f"starting {starting}")
    return _refuse_while_writing(cache, starting)


def _refuse_while_writing(cache, starting: str) -> Store:
    """Raises JobConflictError while another process holds the cache's writer lock; returns the
    cache's store."""
    store = Store(cache)
    if store.writer_active():
        raise JobConflictError(f"another process is writing to the cache {store.path} (its writer "
                               f"lock is held); wait for it to finish before starting {starting}")
    return store


def _spawn(job_id: str, path: Path, arguments: list[str], module: str = "core") -> None:
    """`python -m <module> <arguments>` detached (its own session), its output into the job's log,
    its pid into the job's status file at `path`."""
    with open(path.with_suffix(".log"), "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT,
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    _children[job_id] = child
    try:
        created = psutil.Process(child.pid).create_time()
    except psutil.NoSuchProcess:
        created = None  # it ended already: the status file or the reaped child tells the rest
    write_status(path, pid=child.pid, pid_created=created)


def cancel(job_id: str, cache=None, wait_s: float = 10.0) -> JobStatus:
    """Stop a job (its whole process group): SIGTERM, then SIGKILL after `wait_s`. Work committed
    so far stays in the cache; a later run resumes from it."""
    job = status(job_id, cache)
    _stop(job_id, job.state, job.pid, job.pid_created, _status_path(job_id, cache), wait_s)
    return status(job_id, cache)


def _stop(job_id: str, state: JobState, pid: int | None, pid_created: float | None, path: Path,
          wait_s: float) -> None:
    if state in ACTIVE and pid:
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            while _alive(job_id, pid, pid_created) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(job_id, pid, pid_created):
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child = _children.pop(job_id, None)
        if child is not None:
            child.wait(timeout=wait_s)
    if state in ACTIVE:
        write_status(path, state="cancelled", message=f"cancelled; {KEPT}")


# --- the demo's runs (core/demo/run.py) as one background job, and what the pages' banner shows --

# The module whose `run --cache FILE --job-id ID` computes the demo (tests put a cheap stand-in here).
DEMO_MODULE = "core.demo"


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """A demo job, or a run job as the pages' banner shows it."""

    job_id: str
    label: str
    state: JobState
    stage: str
    done: int
    total: int
    eta_seconds: float | None
    message: str
    started_at: float
    log_path: str | None = None
    demo: bool = False


def demo_status_path(job_id: str, cache=None) -> Path:
    """Demo jobs keep their status files apart from runs' (`list_jobs` lists runs only)."""
    return jobs_dir(cache) / "demo" / f"{job_id}.json"


def demo_jobs(cache=None) -> list[JobProgress]:
    """Every demo job of the cache, newest first."""
    found = [_read_json(p) for p in (jobs_dir(cache) / "demo").glob("*.json")]
    demos = []
    for data in found:
        if data and "job_id" in data:
            state, message = _checked_state(data)
            part = data.get("part", "pairs")
            demos.append(JobProgress(
                job_id=data["job_id"], label="demo" if part == "pairs" else f"demo {part}",
                state=state, stage=data.get("stage", ""), done=int(data.get("done", 0)),
                total=int(data.get("total", 0)), eta_seconds=data.get("eta_seconds"), message=message,
                started_at=data.get("started_at", 0.0), log_path=data.get("log_path"), demo=True))
    return sorted(demos, key=lambda job: job.started_at, reverse=True)


def active_jobs(cache=None) -> list[JobProgress]:
    """The demo and run jobs still queued or running, newest first."""
    runs = [JobProgress(job_id=j.job_id, label=f"run {j.request.pair}/{j.request.dataset}",
                        state=j.state, stage=j.stage, done=j.done, total=j.total,
                        eta_seconds=j.eta_seconds, message=j.message, started_at=j.started_at,
                        log_path=j.log_path)
            for j in list_jobs(cache)]
    return sorted((j for j in runs + demo_jobs(cache) if j.state in ACTIVE),
                  key=lambda job: job.started_at, reverse=True)


def start_demo(cache=None, part: str = "pairs") -> str:
    """Start one part of the demo's runs (`python -m core.demo run --part PART`, core/demo/run.py)
    in a detached process; returns its job id. Refused (JobConflictError) while a demo or run job is
    active or the cache's writer lock is held."""
    store = _refuse_while_busy(cache, "the demo")
    job_id = _new_job_id()
    path = demo_status_path(job_id, cache)
    write_status(path, job_id=job_id, state="queued", stage="starting", done=0, total=0,
                 eta_seconds=None, message="", started_at=time.time(),
                 log_path=str(path.with_suffix(".log")), pid=None, pid_created=None, part=part)
    _spawn(job_id, path, ["run", "--part", part, "--cache", str(store.path), "--job-id", job_id],
           module=DEMO_MODULE)
    return job_id


def cancel_demo(job_id: str, cache=None, wait_s: float = 10.0) -> None:
    """Stop a demo job as `cancel` stops a run job; the runs it completed stay in the cache and the
    next start of the same part resumes."""
    path = demo_status_path(job_id, cache)
    data = _read_json(path)
    if data is None:
        raise KeyError(f"no demo job {job_id!r} under {path.parent}")
    state, _ = _checked_state(data)
    _stop(job_id, state, data.get("pid"), data.get("pid_created"), path, wait_s)


def cancel_progress(job: JobProgress, cache=None) -> None:
    """Stop the demo or run job that the banner shows as `job`."""
    if job.demo:
        cancel_demo(job.job_id, cache)
    else:
        cancel(job.job_id, cache)


def demo_extras_offer(cache=None) -> dict | None:
    """The demo's second part (core/demo/run.py, "extras") as the Compute page offers it: {"missing":
    work items, "seconds": estimate} from `estimate` (child processes), or None where it does not
    apply: a demo adapter is missing, or a run of the first part (a pair or the seed null) is not
    complete in the cache, or the estimate fails."""
    from core.demo import run as demo
    from core.query import ResultCache

    try:
        demo.require_adapters()
    except FileNotFoundError:
        return None
    reader = ResultCache.open(cache)
    if reader.is_empty():
        return None
    complete = {row.pair for row in reader.runs().itertuples()
                if all(done == row.n_selected for done in row.n_complete)}
    seed_null = any(name.startswith(f"{demo.SEED_NULL_PAIR}:seed:") for name in complete)
    if not (seed_null and set(demo.DEMO_PAIRS) <= complete):
        return None
    try:
        plans = [estimate(request) for request in demo.part_requests("extras", str(Store(cache).path))]
    except ValueError:
        return None
    return {"missing": sum(sum(plan["missing"].values()) for plan in plans),
            "seconds": sum(plan["seconds"] for plan in plans)}


def format_duration(seconds: float | None) -> str:
    """An ETA as H:MM:SS, or "unknown"."""
    if seconds is None or seconds != seconds:
        return "unknown"
    return str(dt.timedelta(seconds=int(seconds)))


# --- token views (core/tokens.py): one question's per-token contributions, on demand ------------

# Edges a token view shows by default, the most changed first (the page and `python -m core tokens`).
TOKEN_VIEW_EDGES = 8


@dataclasses.dataclass(frozen=True)
class TokenViewJob:
    """A token-view job: what it computes, and its progress as its status file has it."""

    job_id: str
    run_key: str
    alpha: float
    question_id: str
    post_label: str
    k: int
    state: JobState
    stage: str
    done: int
    total: int
    message: str
    started_at: float
    log_path: str | None = None


def token_view_status_path(job_id: str, cache=None) -> Path:
    """Token-view jobs keep their status files apart from runs' (`list_jobs` lists runs only)."""
    return jobs_dir(cache) / "token_views" / f"{job_id}.json"


def _token_view_job_id(run_key: str, alpha: float, question_id: str, post_label: str) -> str:
    # One job per question and model pair: its id finds it again, and a second start is a duplicate.
    return "tokens-" + stable_hash([run_key, float(alpha), question_id, post_label], length=12)


def token_view_job(cache, run_key: str, alpha: float, question_id: str,
                   post_label: str) -> TokenViewJob | None:
    """The latest token-view job of this question and post model, or None if none was started."""
    job_id = _token_view_job_id(run_key, alpha, question_id, post_label)
    data = _read_json(token_view_status_path(job_id, cache))
    if data is None:
        return None
    state, message = _checked_state(data)
    return TokenViewJob(job_id=job_id, run_key=data["run_key"], alpha=data["alpha"],
                        question_id=data["question_id"], post_label=data["post_label"], k=data["k"],
                        state=state, stage=data.get("stage", ""), done=int(data.get("done", 0)),
                        total=int(data.get("total", 0)), message=message,
                        started_at=data.get("started_at", 0.0), log_path=data.get("log_path"))


def start_token_view(cache, run_key: str, alpha: float, question_id: str, post_label: str,
                     k: int) -> str:
    """Start `python -m core tokens` for one question of a run in a detached process; returns its
    job id. Refused (JobConflictError) while the same view is being computed, or while another
    process holds the cache's writer lock (the job holds it too, to be sure it can write)."""
    job_id = _token_view_job_id(run_key, alpha, question_id, post_label)
    running = token_view_job(cache, run_key, alpha, question_id, post_label)
    if running is not None and running.state in ACTIVE:
        raise JobConflictError(f"the token view of question {question_id} ({post_label}, alpha "
                               f"{alpha:g}) is being computed already (job {job_id}, "
                               f"{running.state}); wait for it to finish")
    store = _refuse_while_writing(cache, "the token view")
    path = token_view_status_path(job_id, cache)
    write_status(path, job_id=job_id, run_key=run_key, alpha=float(alpha), question_id=question_id,
                 post_label=post_label, k=int(k), state="queued", stage="starting", done=0, total=0,
                 message="", started_at=time.time(), log_path=str(path.with_suffix(".log")),
                 pid=None, pid_created=None)
    _spawn(job_id, path, ["tokens", "--cache", str(store.path), "--run", run_key, "--alpha",
                          repr(float(alpha)), "--question", question_id, "--post", post_label,
                          "--k", str(int(k)), "--job-id", job_id])
    return job_id


def estimate(request: RunRequest, timeout_s: float = 600.0) -> dict[str, Any]:
    """Work missing per stage and rough seconds (`core.pipeline.plan`), computed in a child process:
    it reads the models' tokenizers (transformers), which the caller's process never imports.
    Raises ValueError with the child's one-line error."""
    with tempfile.TemporaryDirectory(prefix="circuitdiff-plan-") as folder:
        request_path = request.to_file(Path(folder) / ("estimate" + REQUEST_SUFFIX))
        try:
            done = subprocess.run([sys.executable, "-m", "core", "plan", "--request", str(request_path),
                                   "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ValueError(f"the estimate took longer than {timeout_s:.0f} s; check that the "
                             f"models' tokenizers are reachable") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise ValueError(lines[-1].removeprefix("error: ") if lines
                         else f"the estimate exited with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])
