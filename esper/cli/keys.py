"""``esper keys``: make and show the Ed25519 artifact-signing key pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esper.artifacts import signing
from esper.errors import ConfigError
from esper.settings import get_settings


def _default_private_path() -> Path:
    settings = get_settings()
    return settings.signing_key or signing.default_private_key_path(settings.home)


def _generate(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_private_path()
    try:
        private_path, public_path = signing.save_keypair(out.expanduser())
    except ConfigError as exc:
        print(f"esper keys generate: {exc}", file=sys.stderr)
        return 1
    fp = signing.fingerprint(signing.load_public_key(public_path))
    print(f"private key: {private_path}")
    print(f"public key:  {public_path}")
    print(f"fingerprint: {fp}")
    return 0


def _show_public(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.path:
        path = Path(args.path).expanduser()
    else:
        path = settings.public_key or _default_private_path()
    try:
        key = signing.load_public_key(path)
    except ConfigError as exc:
        print(f"esper keys show-public: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(signing.public_pem(key).decode("ascii"))
    print(f"fingerprint: {signing.fingerprint(key)}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="artifact-signing keys (Ed25519)")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    gen = sub.add_parser(
        "generate",
        help="write a new key pair (private PEM, mode 0600, and its .pub); never overwrites",
    )
    gen.add_argument(
        "--out",
        metavar="PATH",
        help="private key path (default: $ESPER_SIGNING_KEY or $ESPER_HOME/keys/signing.pem)",
    )
    gen.set_defaults(func=_generate)

    show = sub.add_parser("show-public", help="print the public key PEM (for trainers)")
    show.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="a public or private key file (default: $ESPER_PUBLIC_KEY, else the signing key)",
    )
    show.set_defaults(func=_show_public)
