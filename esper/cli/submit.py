"""`esper submit FILE... [--wait] [--timeout S]`: validate locally, publish,
print each blueprint's hash; with --wait follow them to ready or rejected.

Exit codes: 0 all ready (or submitted, without --wait); 1 a blueprint was
rejected or not ready in time; 2 invalid input (nothing is published)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from esper.errors import EsperError, IRValidationError


def _load(paths: list[str]) -> list[dict[str, Any]]:
    from esper.ir import BlueprintIR

    loaded = []
    for name in paths:
        try:
            text = Path(name).read_text()
        except OSError as exc:
            raise IRValidationError(f"{name}: cannot read: {exc.strerror}") from exc
        try:
            BlueprintIR.from_json(text)
        except IRValidationError as exc:
            raise IRValidationError(f"{name}: {exc}") from exc
        loaded.append(json.loads(text))
    return loaded


def _describe_rejection(rows: list[Any]) -> list[str]:
    lines = []
    for row in rows:
        if row.event not in ("rejected", "failed"):
            continue
        reasons = row.detail.get("reasons") or [{"message": row.detail.get("error", "no reason")}]
        for r in reasons:
            check = f"[{r['check']}] " if r.get("check") else ""
            lines.append(f"  {row.target}/{row.dtype}: {check}{r.get('message', '')}")
    return lines or ["  (no reason recorded)"]


async def _submit(args: argparse.Namespace, blueprints: list[dict[str, Any]]) -> int:
    from esper.client import EsperClient

    async with await EsperClient.connect() as client:
        subs = await client.submit(blueprints, dtypes=tuple(args.dtype or ["float32"]))
        names = {s.blueprint_hash: s.name for s in subs}
        for s in subs:
            print(s.blueprint_hash, flush=True)
        if not args.wait:
            return 0

        def show(row: Any) -> None:
            print(
                f"{names[row.blueprint_hash]:<24} {row.blueprint_hash[:12]} "
                f"{row.target:<11} {row.dtype:<9} {row.event}",
                file=sys.stderr,
                flush=True,
            )

        hashes = list(dict.fromkeys(s.blueprint_hash for s in subs))
        outcome = await client.wait(
            hashes, timeout=args.timeout, on_event=show, submissions=subs
        )
    for h, rows in outcome.rejected.items():
        print(f"rejected: {names[h]} ({h[:12]})", file=sys.stderr)
        print("\n".join(_describe_rejection(rows)), file=sys.stderr)
    for h in outcome.pending:
        print(f"not ready after {args.timeout:g}s: {names[h]} ({h[:12]})", file=sys.stderr)
    return 0 if outcome.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        blueprints = _load(args.files)
    except IRValidationError as exc:
        print(f"esper submit: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_submit(args, blueprints))
    except EsperError as exc:
        print(f"esper submit: {exc}", file=sys.stderr)
        return 1


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="validate and publish blueprints")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--wait", action="store_true", help="follow until ready or rejected")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    p.add_argument(
        "--dtype", action="append", choices=["float32", "float16", "bfloat16"],
        help="compile for this dtype (repeatable; default float32)",
    )
    p.set_defaults(func=cmd_submit)
