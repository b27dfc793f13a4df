"""The expected failures: what `python -m core` prints as one `error:` line (exit code 2) instead of a
traceback. A traceback means a bug.

Every error a user can cause or fix (a bad file, flag, config entry or model; a cache that cannot be
used) is a `CircuitdiffError`, whose message says what is wrong, where, and what to do.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


class CircuitdiffError(Exception):
    """An expected failure; the message is the whole story (one line)."""


class InputError(CircuitdiffError, ValueError):
    """Something the user gave is wrong: a file, a flag, a config entry, a model, a dataset."""


class NotFoundError(CircuitdiffError, KeyError):
    """A name the user gave (a run, a model of a run, an alpha, a job) is not there."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


class OutputPathError(InputError):
    """A file or folder cannot be written where asked; found before any work."""


# What the CLI reports as one line. Besides CircuitdiffError: OSError, a file-system failure the
# checks before the work could not foresee, and ValueError, which core's older input checks still
# raise (each should become an InputError; then ValueError leaves this tuple).
EXPECTED_ERRORS = (CircuitdiffError, OSError, ValueError)


def one_line(error: BaseException) -> str:
    """What the CLI prints after `error: `: the message on one line; for an OSError, its reason
    and the file it concerns."""
    if isinstance(error, OSError) and not isinstance(error, CircuitdiffError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        if error.filename2:
            text += f" -> {error.filename2}"
    else:
        text = str(error)
    return " ".join(text.split())


def check_output_file(path: Path, what: str, advice: str = "choose a writable place") -> None:
    """Raise OutputPathError unless a file can be written at `path`, creating its folder: called
    before the work, so a bad path costs nothing."""
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as error:
        raise OutputPathError(f"{what} {path} cannot be written ({one_line(error)}); "
                              f"{advice}") from None
