"""The ``esper`` command line. Each command lives in its own module that exposes
``register(subparsers)``; ``main`` only dispatches."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Every module in this package registers its own commands, so adding a
    # command never means editing a central list.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)
