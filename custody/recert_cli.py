"""``custody recert``: write a signed access-recertification report; ``custody recert verify FILE``: check one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from store.ground.errors import InvalidInput

__all__ = ["add_recert"]


def add_recert(commands: argparse._SubParsersAction[Any]) -> None:
    recert = commands.add_parser(
        "recert",
        help="access-recertification report per agent (csv, json, html, pdf), signed; or verify one",
        description="Write a report of every agent of TENANT over the window: credentials, scopes granted vs used,"
        " findings, delegations, users, and a keep / reduce / revoke recommendation, signed by the server key."
        " 'custody recert verify FILE' checks a report offline and names every edit.",
    )
    recert.add_argument("action", nargs="?", choices=["verify"], help="verify FILE instead of writing a report")
    recert.add_argument("file", nargs="?", type=Path, help="the report to verify")
    recert.add_argument("--data-dir", type=Path, help="data dir (writing: required; verifying: pins its server key)")
    recert.add_argument("--tenant", help="the tenant whose agents are reviewed")
    recert.add_argument("--window", default="90d", help="review window in days, like 90d (default)")
    recert.add_argument("--format", choices=["csv", "json", "html", "pdf"], default="pdf", help="report format")
    recert.add_argument("--output", type=Path, help="file to write (default recert-TENANT-DATE.FORMAT)")
    recert.add_argument("--public-key", type=Path, help="verifying: the server's public key (PEM) to check against")
    recert.set_defaults(run=_recert)


def _recert(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return _verify(args)
    if args.data_dir is None or args.tenant is None:
        raise InvalidInput("writing a report needs --data-dir and --tenant")
    from query.recert.reports import build_report
    from query.recert.review import parse_window

    report = build_report(args.data_dir, args.tenant, window_days=parse_window(args.window), form=args.format)
    review = report.review
    if not review.agents:
        print(f"note: no agent of tenant {args.tenant!r} acted in the window; the report says so", file=sys.stderr)
    output = args.output or Path(report.filename)
    output.write_bytes(report.content)
    counts = review.summary()
    print(
        f"OK: wrote {output} ({counts['agents']} agents: keep {counts['keep']}, reduce {counts['reduce']},"
        f" revoke {counts['revoke']}; log position {review.events} events, {len(review.heads)} emitters)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from query.recert.reports import verify_report

    if args.file is None:
        raise InvalidInput("usage: custody recert verify FILE [--data-dir DIR | --public-key PEM]")
    if not args.file.exists():
        raise InvalidInput(f"{args.file} does not exist")
    result = verify_report(args.file, public_key=_pinned_key(args))
    for difference in result.differences:
        print(f"FAIL: {args.file}: {difference}")
    if result.ok:
        print(f"OK: {args.file} ({result.form}): signature valid (kid {result.kid}, {result.key_source});")
        print("    every part of the file matches the signed report")
        if result.key_source.startswith("the key embedded"):
            print("    pin the key with --data-dir or --public-key to prove the report came from your server")
        return 0
    print(f"FAIL: {args.file} ({result.form}) does not match what the server signed")
    return 1


def _pinned_key(args: argparse.Namespace) -> Ed25519PublicKey | None:
    if args.public_key is not None:
        loaded = serialization.load_pem_public_key(args.public_key.read_bytes())
        if not isinstance(loaded, Ed25519PublicKey):
            raise InvalidInput(f"{args.public_key} is not an Ed25519 public key")
        return loaded
    if args.data_dir is not None:
        from store.ground.layout import DataDir

        return DataDir.existing(args.data_dir).server_key().public_key()  # never created here
    return None
