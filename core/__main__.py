"""`python -m core <command>`: the CLI over the same API the dashboard uses."""

from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import EXPECTED_ERRORS, one_line

# Each module defines register(subparsers), which adds its sub-command and sets `handler`.
COMMAND_MODULES = (
    "core.commands.score",
    "core.commands.metrics",
    "core.commands.run",
    "core.commands.faithfulness",
    "core.commands.report",
    "core.commands.tokens",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EXPECTED_ERRORS as error:
        # Anything else is a bug, and its traceback is what a bug report needs.
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
