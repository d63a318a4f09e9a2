"""`esper demo [--device cpu|cuda] [--home DIR]`: everything, start to finish, on
this machine: embedded servers, every stage, one growing trainer, a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from esper.errors import EsperError


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from esper.demo.run import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("esper demo: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    opts = DemoOptions(device=args.device, home=Path(args.home) if args.home else None,
                       png=Path(args.png), steps=args.steps, keep=args.keep)
    try:
        summary = run_demo(opts)
    except (EsperError, TimeoutError, ConnectionError) as exc:
        print(f"esper demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if not summary.ok:
        print("esper demo: no kernel became ready", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole system on this machine and watch a net grow")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--home", help="data directory (default: a temporary one, removed after)")
    p.add_argument("--png", default="esper-demo.png", help="where to write the loss curve")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    p.set_defaults(func=cmd_demo)
