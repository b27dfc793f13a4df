"""`python -m core <command>`: the CLI over the same API the dashboard uses."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines register(subparsers), which adds its sub-command and sets `handler`.
COMMAND_MODULES = (
    "core.commands.score",
    "core.commands.metrics",
    "core.commands.run",
    "core.commands.faithfulness",
    "core.commands.report",
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
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        # Expected failures (bad input, unknown model, non-additive model ...) print one clear line.
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
