"""``custody recert``: write a signed access-recertification report; ``custody recert verify FILE``: check one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from store.ground.errors import InvalidInput

__all__ = ["add_recert"]


def add_recert(
    commands: argparse._SubParsersAction[Any], data_dir_argument: Callable[[argparse.ArgumentParser], None]
) -> None:
    recert = commands.add_parser(
        "recert",
        help="access-recertification report per agent (csv, json, html, pdf), signed: write one, or verify one",
        description="'custody recert write' reports every agent of TENANT over the window: credentials, scopes"
        " granted vs used, findings, delegations, users, and a keep / reduce / revoke recommendation, signed by the"
        " server key. 'custody recert verify FILE' checks a report offline and names every edit.",
    )
    actions = recert.add_subparsers(required=True, metavar="ACTION")
    write = actions.add_parser("write", help="write a signed access review of one tenant's agents")
    data_dir_argument(write)
    write.add_argument("--tenant", required=True, help="the tenant whose agents are reviewed")
    write.add_argument("--window", default="90d", help="review window in days, like 90d")
    write.add_argument("--format", choices=["csv", "json", "html", "pdf"], default="pdf", help="report format")
    write.add_argument("--output", type=Path, help="file to write (default: recert-TENANT-DATE.FORMAT)")
    write.set_defaults(run=_recert, reads_data_dir=True)
    verify = actions.add_parser("verify", help="check a report offline; names every edit, exit 1 if any")
    verify.add_argument("file", type=Path, help="the report to verify")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument("--data-dir", type=Path, help="pin the server key of this data dir")
    keys.add_argument("--public-key", type=Path, help="pin this server public key (PEM)")
    verify.set_defaults(run=_verify)


def _recert(args: argparse.Namespace) -> int:
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
        f"OK: wrote {output} ({counts['agents']} agents: investigate {counts['investigate']}, revoke"
        f" {counts['revoke']}, reduce {counts['reduce']}, keep {counts['keep']}; log position {review.events} events,"
        f" {len(review.heads)} emitters)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from query.recert.reports import verify_report

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
