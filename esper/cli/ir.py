"""``esper check`` and ``esper hash``: validate a blueprint file and show its
inferred schemas, or print its canonical hash."""

from __future__ import annotations

import argparse
import sys

from esper.errors import IRValidationError
from esper.ir import BlueprintIR, bundled_names, bundled_path, fmt_shape

EXIT_INVALID = 2


def _load(command: str, source: str, is_bundled: bool) -> BlueprintIR | None:
    """The blueprint, or None after printing why not (to stderr)."""
    try:
        path = bundled_path(source) if is_bundled else source
        with open(path, "rb") as fh:
            data = fh.read()
        return BlueprintIR.from_json(data)
    except KeyError as exc:
        print(f"esper {command}: {exc.args[0]}", file=sys.stderr)
    except OSError as exc:
        print(f"esper {command}: {source}: cannot read: {exc.strerror or exc}", file=sys.stderr)
    except IRValidationError as exc:
        print(f"esper {command}: {source}: invalid blueprint: {exc}", file=sys.stderr)
    return None


def _sources(args: argparse.Namespace) -> list[tuple[str, bool]]:
    names = args.bundled or []
    if "all" in names:
        names = bundled_names()
    return [(f, False) for f in args.files] + [(n, True) for n in names]


def _report(b: BlueprintIR) -> list[str]:
    schemas = b.infer_shapes()
    params = b.param_shapes()
    rows = [(i.name, "input", str(schemas[i.name]), "") for i in b.inputs]
    for node in b.topological_order():
        p = params.get(node.id)
        note = ", ".join(f"{k} {fmt_shape(v)}" for k, v in p.items()) if p else ""
        rows.append((node.id, node.op.value, str(schemas[node.id]), note))
    w_id = max(len(r[0]) for r in rows)
    w_op = max(len(r[1]) for r in rows)
    w_schema = max(len(r[2]) for r in rows)
    lines = [f"{b.name}: valid ({len(b.nodes)} nodes, hash {b.canonical_hash()[:16]}…)"]
    for rid, op, schema, note in rows:
        line = f"  {rid:<{w_id}}  {op:<{w_op}}  {schema:<{w_schema}}"
        lines.append((line + (f"  params: {note}" if note else "")).rstrip())
    for name, out in zip(b.outputs, b.output_schemas(), strict=True):
        lines.append(f"  output {name}: {out}")
    return lines


def _check(args: argparse.Namespace) -> int:
    sources = _sources(args)
    if not sources:
        print("esper check: give a FILE or --bundled NAME", file=sys.stderr)
        return EXIT_INVALID
    status = 0
    for source, is_bundled in sources:
        b = _load("check", source, is_bundled)
        if b is None:
            status = EXIT_INVALID
            continue
        print("\n".join(_report(b)))
    return status


def _hash(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.bundled is None):
        print("esper hash: give exactly one of FILE or --bundled NAME", file=sys.stderr)
        return EXIT_INVALID
    b = _load("hash", args.file or args.bundled, args.file is None)
    if b is None:
        return EXIT_INVALID
    print(b.canonical_hash())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check",
        help="validate blueprints; print every tensor's inferred schema (exit 2 if invalid)",
    )
    check.add_argument("files", nargs="*", metavar="FILE", help="blueprint JSON files")
    check.add_argument(
        "--bundled", action="append", metavar="NAME",
        help="a bundled example blueprint (repeatable; 'all' for every one)",
    )
    check.set_defaults(func=_check)

    hash_ = subparsers.add_parser(
        "hash", help="print a blueprint's canonical hash (64 hex chars); exit 2 if invalid"
    )
    hash_.add_argument("file", nargs="?", metavar="FILE", help="a blueprint JSON file")
    hash_.add_argument("--bundled", metavar="NAME", help="a bundled example blueprint")
    hash_.set_defaults(func=_hash)
