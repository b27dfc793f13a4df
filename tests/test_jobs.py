"""Job liveness (core/jobs.py): a finished job is never taken for a running one."""

import subprocess
import sys
import time

import psutil

from core import jobs


def test_a_zombie_a_reaped_child_and_a_reused_pid_are_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # finished, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not jobs._alive("unknown-job", child.pid)
    jobs._children["own-job"] = child  # a child of this process is reaped by the check
    try:
        assert not jobs._alive("own-job", child.pid)
        assert child.returncode == 0
    finally:
        jobs._children.pop("own-job")
    assert not jobs._alive("unknown-job", child.pid)  # reaped: no such process

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        assert jobs._alive("unknown-job", sleeper.pid, created)
        # The status file recorded another process's creation time: its pid was reused.
        assert not jobs._alive("unknown-job", sleeper.pid, created - 60)
    finally:
        sleeper.kill()
        sleeper.wait()
