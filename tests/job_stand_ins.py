"""What the job tests share: their stand-in pipelines wait for the test's release file (so the job
stays active while the test looks at it), and the tests wait for a job to reach a state."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


def wait_for_release(env: str, seconds: float = 60.0) -> None:
    """Wait until the file that environment variable `env` names exists (at most `seconds`)."""
    release = Path(os.environ[env])
    deadline = time.monotonic() + seconds
    while not release.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test never wrote {release}")
        time.sleep(0.05)


def wait_for(predicate, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.1)
