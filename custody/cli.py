"""The ``custody`` command. Each subcommand parses its flags, calls one library function and prints the result.

Only ``CustodyError`` is caught, here in ``main``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from custody import __version__
from store.errors import CustodyError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result: int = args.run(args)
    except CustodyError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        for detail in exc.details:
            print(f"  {detail}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custody", description="Delegation-chain audit log for AI agents.")
    parser.add_argument("--version", action="version", version=f"custody {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the ingest API on a data dir",
        description="Run the ingest API. The admin token comes from CUSTODY_ADMIN_TOKEN (required).",
    )
    serve.add_argument("--data-dir", type=Path, required=True, help="where the WAL, the lake and the state live")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8700, help="port to bind (default 8700)")
    serve.add_argument("--max-events", type=int, default=1000, help="events per request (default 1000)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="bytes per request (8 MiB)")
    serve.add_argument("--flush-interval", type=float, default=1.0, help="seconds between lake flushes (default 1)")
    serve.add_argument(
        "--verify-workers",
        type=int,
        default=_default_verify_workers(),
        help="processes verifying signatures in parallel; 0 verifies in the server process"
        " (default: the number of usable cores, 0 on one core)",
    )
    serve.set_defaults(run=_serve)

    verify = commands.add_parser(
        "verify",
        help="check that the lake is what the emitters signed: hashes, signatures, columns, chains",
        description="Verify every event in DATA_DIR's lake. Prints FAIL lines with the emitter, seq, event,"
        " check, expected and found values; exits 1 if anything failed.",
    )
    verify.add_argument("--data-dir", type=Path, required=True)
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(run=_verify)

    demo = commands.add_parser(
        "demo",
        help="start a server on a data dir and post the sample events through the SDK",
        description="Start the ingest API on DATA_DIR and post sample events to it with the emitter SDK.",
    )
    demo.add_argument("--data-dir", type=Path, default=Path("demo-data"), help="data dir (default ./demo-data)")
    demo.add_argument("--port", type=int, default=8700, help="port (default 8700)")
    demo.add_argument("--events", type=int, default=2000, help="how many sample events to post (default 2000)")
    demo.add_argument("--reset", action="store_true", help="delete the data dir first")
    demo.add_argument("--exit", action="store_true", help="stop after posting instead of serving until Ctrl-C")
    demo.set_defaults(run=_demo)
    return parser


def _default_verify_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 else 0


def _serve(args: argparse.Namespace) -> int:
    token = os.environ.get("CUSTODY_ADMIN_TOKEN")
    if not token:
        raise CustodyError("CUSTODY_ADMIN_TOKEN is not set: the server has no default admin token and will not start")
    from ingest.runner import serve
    from ingest.service import Limits

    limits = Limits(max_events=args.max_events, max_body_bytes=args.max_body_bytes)
    serve(
        args.data_dir,
        token,
        host=args.host,
        port=args.port,
        limits=limits,
        flush_interval=args.flush_interval,
        verify_workers=args.verify_workers,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from query.integrity import verify_lake

    with tqdm(desc="verifying", unit="event", disable=args.no_progress, file=sys.stderr) as bar:
        report = verify_lake(args.data_dir, progress=lambda done: bar.update(done - bar.n))
    for problem in report.problems:
        print(f"FAIL: {problem.describe()}")
    if report.ok:
        print(f"OK: {report.events} events from {len(report.emitters)} emitters: hashes, signatures, columns, chains")
        return 0
    print(f"FAIL: {len(report.problems)} problems in {report.events} events")
    return 1


def _demo(args: argparse.Namespace) -> int:
    from sample_data.demo import run_demo

    return run_demo(args.data_dir, port=args.port, events=args.events, reset=args.reset, stay=not args.exit)


if __name__ == "__main__":
    raise SystemExit(main())
