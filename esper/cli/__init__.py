"""The ``esper`` command line. Each command lives in its own module that exposes
``register(subparsers)``; ``main`` only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under esper.cli that each register one or more subcommands.
COMMAND_MODULES = ("ir",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"esper.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)
