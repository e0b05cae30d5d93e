"""The ``custody`` command. Each subcommand parses its flags, calls one library function and prints the result.

Only ``CustodyError`` is caught, here in ``main``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import orjson

from custody import __version__
from custody.recert_cli import add_recert
from store.ground.errors import CustodyError, InvalidInput

if TYPE_CHECKING:
    from custody.serving import HttpLimits

__all__ = ["main"]


class _Terminal(io.TextIOBase):
    """Standard output that shows control characters from the log as escapes (``\\x1b``, ``\\u202e``): an agent
    named with an ANSI sequence or a bidi override must not repaint or reorder an analyst's terminal. Line breaks
    and tabs of Custody's own output pass."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(_CONTROLS.sub(_escape_control, text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def main(argv: Sequence[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _Terminal(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Everything Custody writes (lake, WAL, state, keys, reports) is for this account alone: other local accounts
    # would otherwise read every tenant's events around the tenant-bound tokens.
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from store.orphans import watch_parent

    watch_parent()  # started by another custody process (the demo): stop once it is gone, even after its SIGKILL
    try:
        if getattr(args, "reads_data_dir", False):  # a typo must never read as an empty log
            from store.ground.layout import DataDir

            DataDir.existing(args.data_dir)
        result: int = args.run(args)
    except CustodyError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        for detail in exc.details:
            print(f"  {detail}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return result


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, unless the help already says it (or there is none to say)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Subcommands get the same help formatting as the command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="custody", description="Delegation-chain audit log for AI agents.")
    parser.add_argument("--version", action="version", version=f"custody {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run the ingest API on a data dir",
        description="Run the ingest API. The admin token comes from CUSTODY_ADMIN_TOKEN (required).",
    )
    _data_dir_argument(serve, help_text="where the WAL, the lake and the state live (created if missing)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8700, help="port to bind (default 8700)")
    serve.add_argument("--max-events", type=int, default=1000, help="events per request (default 1000)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="bytes per request (default 8 MiB)")
    serve.add_argument("--flush-interval", type=float, default=1.0, help="seconds between lake flushes (default 1)")
    serve.add_argument(
        "--max-event-age",
        type=_seconds,
        default=None,
        help="refuse (clock_skew) events whose occurred_at is more than this many seconds before the server's"
        " clock; off by default, so that backfills and the demo's 30 days of history load",
    )
    _http_arguments(serve)
    serve.add_argument(
        "--verify-workers",
        type=int,
        default=_default_verify_workers(),
        help="processes verifying signatures in parallel; 0 verifies in the server process"
        " (default: the number of usable cores, 0 on one core)",
    )
    serve.add_argument(
        "--witness",
        action="append",
        default=[],
        type=_witness_endpoint,
        metavar="URL=VKEY",
        help="a witness (c2sp.org/tlog-witness) to cosign each checkpoint: its URL and cosignature key; repeat",
    )
    serve.add_argument(
        "--witness-quorum",
        type=int,
        default=0,
        help="cosignatures a checkpoint should get; fewer is logged as an error",
    )
    serve.add_argument(
        "--alerts",
        type=Path,
        metavar="FILE",
        help="alert channels (webhook, syslog) for the findings detection opens: a TOML file (docs/detection.md)",
    )
    serve.add_argument(
        "--rules",
        type=Path,
        metavar="FILE",
        help="the finding rules' parameters per tenant for continuous detection (TOML; `custody rules` checks it)",
    )
    serve.add_argument(
        "--iceberg",
        action="store_true",
        help="keep the lake also as an Apache Iceberg table in DATA_DIR/iceberg (a snapshot per flush; docs/scale.md)",
    )
    serve.add_argument(
        "--state",
        metavar="postgresql://...",
        help="run as one node of several: the shared state (event ids, chains, the registry, the log's order) and"
        " each event's durable copy in this PostgreSQL database; DATA_DIR is then the lake and log every node"
        " shares (docs/scale.md). Without it: SQLite and a write-ahead log in DATA_DIR",
    )
    serve.add_argument(
        "--lake",
        metavar="s3://bucket/prefix",
        help="keep the lake on S3-compatible object storage (same Hive layout; credentials and endpoint from the"
        " standard AWS environment and config); recorded in DATA_DIR/lake.json, whose lake/ is then a copy every"
        " reader refreshes (docs/scale.md)",
    )
    serve.add_argument(
        "--no-detect",
        action="store_true",
        help="turn continuous detection off (findings are then computed only when asked for)",
    )
    serve.set_defaults(run=_serve)

    witness = commands.add_parser(
        "witness",
        help="run a transparency-log witness (c2sp.org/tlog-witness) for one or more Custody logs",
        description="A witness cosigns a log's checkpoints only if each extends the last one it cosigned, so a log"
        " cannot show two histories. Run it on another machine, by another party; it prints its cosignature key.",
    )
    witness.add_argument("--name", required=True, help="the witness's key name, like witness.example.com/w1")
    witness.add_argument("--key-file", type=Path, required=True, help="its Ed25519 key (PEM), created if missing")
    witness.add_argument("--state", type=Path, required=True, help="the file of the last checkpoint cosigned per log")
    witness.add_argument("--log", action="append", required=True, metavar="VKEY", help="a log's verifier key; repeat")
    witness.add_argument("--host", default="127.0.0.1", help="address to bind")
    witness.add_argument("--port", type=int, default=8780, help="port to bind")
    witness.set_defaults(run=_witness)

    gateway = commands.add_parser(
        "gateway",
        help="run the enforcing MCP gateway: default-deny policy per tool call, every call recorded in Custody",
        description="Serve agents over MCP streamable HTTP in front of upstream MCP servers: authenticate each"
        " agent's JWT, allow a tools/call only if the policy grants it, forward it, and record one signed event per"
        " call through a durable spool. docs/gateway.md describes the two files.",
    )
    gateway.add_argument("--config", type=Path, required=True, help="the gateway's TOML configuration")
    gateway.add_argument(
        "--print-registration",
        action="store_true",
        help="create the emitter key the config names if missing, print the PUT /v1/emitters/{id} body, and exit",
    )
    gateway.set_defaults(run=_gateway)

    verify = commands.add_parser(
        "verify",
        help="check that the lake is what the emitters signed: hashes, signatures, columns, chains",
        description="Verify every event in DATA_DIR's lake. Prints FAIL lines with the emitter, seq, event,"
        " check, expected and found values; exits 1 if anything failed.",
    )
    _data_dir_argument(verify)
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.add_argument(
        "--tenant", help="only the problems and counts of this tenant's emitters (the whole lake is still read)"
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON (the read API's shape)")
    verify.add_argument(
        "--workers",
        type=int,
        default=_default_verify_workers() or 1,
        help="processes checking signatures and columns in the full verification (default: the usable cores)",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="a checkpoint you trust (saved earlier from GET /checkpoint, or cosigned by a witness): the lake must"
        " hold the tree it names; without it, the data dir's own newest checkpoint",
    )
    verify.add_argument(
        "--log-key",
        metavar="VKEY",
        help="the log's verifier key (name+keyid+key, as `custody log key` prints it): checks the checkpoints and"
        " the server's stream without state/; without it, the key in DATA_DIR/state",
    )
    modes = verify.add_mutually_exclusive_group()
    modes.add_argument(
        "--incremental",
        action="store_true",
        help="re-check signatures and columns only for files new or changed since the last clean run (a"
        " checkpoint signed by the server key); hashes and chains are always checked for the whole lake",
    )
    modes.add_argument(
        "--hash-chain-only",
        action="store_true",
        help="only hashes and chains, computed inside DuckDB (fast; no signatures, no column checks)",
    )
    verify.set_defaults(run=_verify, reads_data_dir=True)

    _forensics_commands(commands)
    add_recert(commands, _data_dir_argument)

    compact = commands.add_parser(
        "compact",
        help="merge each partition's Parquet files into one (for lakes built elsewhere; a running server already"
        " compacts in tiers as it flushes; this refuses to run while a server holds the data dir)",
    )
    _data_dir_argument(compact)
    compact.add_argument("--min-files", type=int, default=8, help="only partitions with at least this many files")
    compact.set_defaults(run=_compact, reads_data_dir=True)

    transparency = commands.add_parser(
        "log",
        help="the transparency log: its verifier key, to pin in emitters and auditors' tools",
        description="Every acknowledged event is a leaf of one Merkle tree with signed checkpoints"
        " (docs/transparency.md).",
    )
    log_commands = transparency.add_subparsers(required=True, metavar="ACTION")
    log_key = log_commands.add_parser("key", help="print the log's verifier key (name+keyid+key, c2sp.org/signed-note)")
    _data_dir_argument(log_key)
    log_key.set_defaults(run=_log_key, reads_data_dir=True)

    bundle = commands.add_parser(
        "bundle",
        help="evidence bundles: one file proving a set of events to anyone who holds the log's key",
        description="'custody bundle write' puts the selected events, the keys that signed them and their inclusion"
        " proofs to one checkpoint in one file signed by the log; 'custody bundle verify FILE --log-key VKEY'"
        " checks it offline (docs/transparency.md).",
    )
    bundle_commands = bundle.add_subparsers(required=True, metavar="ACTION")
    write = bundle_commands.add_parser("write", help="write the evidence bundle of a selection of events")
    _data_dir_argument(write)
    write.add_argument("--tenant", help="only this tenant's events (the selection must lie in it)")
    chosen = write.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--event", action="append", metavar="EVENT_ID", help="an event id (repeat for more)")
    chosen.add_argument("--path", metavar="EVENT_ID", help="the events of this event's delegation path")
    chosen.add_argument(
        "--finding", metavar="KIND:SUBJECT", help="the evidence of a finding, as custody findings lists it"
    )
    chosen.add_argument("--taint-agent", metavar="AGENT", help="the events a forward taint from this agent reaches")
    write.add_argument("--since", type=_timestamp, help="with --taint-agent: when the compromise began (RFC 3339)")
    write.add_argument("--output", type=Path, required=True, help="the bundle file to write")
    write.set_defaults(run=_bundle_write, reads_data_dir=True)
    check = bundle_commands.add_parser(
        "verify", help="check a bundle offline with the log's key; exit 1 if anything fails"
    )
    check.add_argument("file", type=Path, help="the bundle")
    check.add_argument("--log-key", required=True, metavar="VKEY", help="the log's verifier key (custody log key)")
    check.add_argument("--witness", action="append", default=[], metavar="VKEY", help="a witness's cosignature key")
    check.add_argument("--quorum", type=int, default=0, help="how many of the --witness keys must have cosigned")
    check.set_defaults(run=_bundle_verify)

    export = commands.add_parser(
        "export",
        help="write the events and findings for a SIEM: OCSF (API Activity, Detection Finding) as JSON lines",
        description="Write every event (of --tenant, between --since and --until) as an OCSF 1.5.0 API Activity"
        " (class 6003), then every finding as a Detection Finding (class 2004): the records of continuous detection"
        " when it ran, else findings computed now. One JSON object per line. docs/ocsf.md has the mapping.",
    )
    _data_dir_argument(export)
    export.add_argument("--format", choices=["ocsf"], required=True, help="the output format")
    export.add_argument("--tenant", help="one tenant only")
    export.add_argument("--since", type=_timestamp, help="events from this RFC 3339 time on")
    export.add_argument("--until", type=_timestamp, help="events before this RFC 3339 time")
    export.add_argument("--output", type=Path, help="the file to write (default: standard output)")
    export.add_argument("--no-findings", action="store_true", help="events only")
    export.set_defaults(run=_export, reads_data_dir=True)

    iceberg = commands.add_parser(
        "iceberg",
        help="the lake as an Apache Iceberg table: sync it, compact it, expire old snapshots",
        description="Keep DATA_DIR's lake also as the Iceberg table custody.events (pyiceberg, a SQL catalog), which"
        " any Iceberg engine reads. docs/scale.md has the engine setup.",
    )
    iceberg_commands = iceberg.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)
    sync = iceberg_commands.add_parser("sync", help="append the lake's new events (one snapshot per batch)")
    expire = iceberg_commands.add_parser("expire", help="drop snapshots older than --days (never the current one)")
    expire.add_argument("--days", type=float, required=True, help="keep the snapshots of the last DAYS days")
    compact = iceberg_commands.add_parser(
        "compact", help="rewrite each partition of at least --min-files data files as one file (one snapshot each)"
    )
    compact.add_argument("--min-files", type=int, default=8, help="partitions with fewer files are left (default 8)")
    for command in (sync, expire, compact):
        _data_dir_argument(command)
        command.add_argument(
            "--catalog-uri", help="the SQL catalog (SQLAlchemy URI; default: SQLite in DATA_DIR/iceberg)"
        )
        command.add_argument(
            "--warehouse", help="where table files go (a directory URI or s3://; default: DATA_DIR/iceberg)"
        )
    sync.set_defaults(run=_iceberg_sync, reads_data_dir=True)
    expire.set_defaults(run=_iceberg_expire, reads_data_dir=True)
    compact.set_defaults(run=_iceberg_compact, reads_data_dir=True)

    quarantine = commands.add_parser(
        "quarantine",
        help="acknowledged events the lake could not store: list them, or write them to the lake again",
        description="An acknowledged event the lake cannot store is kept whole in DATA_DIR/quarantine with the"
        " reason, and every other event goes on to the lake (docs/operations.md).",
    )
    quarantine_commands = quarantine.add_subparsers(required=True, metavar="ACTION")
    quarantined = quarantine_commands.add_parser("list", help="every quarantined event with its reason")
    _data_dir_argument(quarantined)
    quarantined.add_argument("--tenant", help="only the events whose payload names this tenant")
    quarantined.add_argument("--json", action="store_true", help="JSON lines, with each event's JWS")
    quarantined.set_defaults(run=_quarantine_list, reads_data_dir=True)
    reingest = quarantine_commands.add_parser(
        "reingest",
        help="write every quarantined event to the lake (with no server running, after an upgrade that stores"
        " them); those still refused stay quarantined with the new reason",
    )
    _data_dir_argument(reingest)
    reingest.set_defaults(run=_quarantine_reingest, reads_data_dir=True)

    api = commands.add_parser(
        "serve-query",
        help="run the read API (events, paths, blast radius, taint, findings, verify) over a data dir",
        description="Run the read API. Tokens come from --tokens FILE or CUSTODY_READ_TOKENS (see custody token).",
    )
    _reader_arguments(api, port=8701)
    _http_arguments(api)
    api.set_defaults(run=_serve_query, reads_data_dir=True)

    dashboard = commands.add_parser(
        "dashboard",
        help="run the incident-response dashboard (Streamlit) over a data dir",
        description="Run the dashboard. Sign-in uses the read-API tokens of --tokens FILE or CUSTODY_READ_TOKENS.",
    )
    _reader_arguments(dashboard, port=8501)
    dashboard.set_defaults(run=_dashboard, reads_data_dir=True)

    token = commands.add_parser("token", help="issue, list and revoke read-API tokens (stored hashed)")
    token_commands = token.add_subparsers(required=True, metavar="ACTION")
    issue = token_commands.add_parser("issue", help="create a token and print it once")
    issue.add_argument("--file", type=Path, required=True, help="the token file (JSON, 0600); created if missing")
    issue.add_argument("--name", required=True, help="who or what the token is for; unique in the file")
    issue.add_argument("--role", required=True, choices=["admin", "analyst", "auditor"], help="what it may ask")
    issue.add_argument("--tenant", help="bind the token to one tenant")
    issue.set_defaults(run=_token_issue)
    listing = token_commands.add_parser("list", help="names, roles and tenants (never the tokens)")
    listing.add_argument("--file", type=Path, required=True, help="the token file")
    listing.set_defaults(run=_token_list)
    revoke = token_commands.add_parser("revoke", help="remove a token; it stops working at once")
    revoke.add_argument("--file", type=Path, required=True, help="the token file")
    revoke.add_argument("--name", required=True, help="the token's name")
    revoke.set_defaults(run=_token_revoke)

    demo = commands.add_parser(
        "demo",
        help="the whole service on the demo organisation: ingest API, read API and dashboard, until Ctrl-C",
        description="Start the ingest API, the read API and the dashboard on DATA_DIR, generate the demo"
        " organisation (3 tenants, 30 days, planted incidents) and post it through the SDK; start the MCP gateway in"
        " front of the demo's MCP servers and drive a live agent session through it; print the URLs, sign-in tokens"
        " and a tour. A data dir that already holds the organisation is reused.",
    )
    demo.add_argument("--data-dir", type=Path, default=Path("demo-data"), help="data dir (default ./demo-data)")
    demo.add_argument("--port", type=int, default=8700, help="ingest API port (default 8700)")
    demo.add_argument("--query-port", type=int, default=8701, help="read API port (default 8701)")
    demo.add_argument("--dashboard-port", type=int, default=8501, help="dashboard port (default 8501)")
    demo.add_argument("--gateway-port", type=int, default=8702, help="MCP gateway port (default 8702)")
    demo.add_argument(
        "--alerts", type=Path, metavar="FILE", help="alert channels for the ingest server (docs/detection.md)"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the organisation's activity (default 7)")
    demo.add_argument("--days", type=int, default=30, help="days of activity (default 30)")
    demo.add_argument(
        "--tasks-per-day", type=int, default=1850, help="weekday tasks, about 6 events each (default 1850: ~250k)"
    )
    demo.add_argument("--reset", action="store_true", help="delete the data dir first")
    demo.add_argument("--exit", action="store_true", help="stop once everything is up instead of serving")
    demo.set_defaults(run=_demo)
    return parser


DATA_DIR_ENV = "CUSTODY_DATA_DIR"


def _data_dir_argument(parser: argparse.ArgumentParser, *, help_text: str = "the data dir of a custody serve") -> None:
    """``--data-dir``, the same on every command: from the environment when ``CUSTODY_DATA_DIR`` is set."""
    default = os.environ.get(DATA_DIR_ENV)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(default) if default else None,
        required=not default,
        help=f"{help_text} (default: ${DATA_DIR_ENV}" + (f", now {default})" if default else ", unset)"),
    )


def _reader_arguments(parser: argparse.ArgumentParser, *, port: int) -> None:
    """The flags of the two read-side servers (read API, dashboard)."""
    _data_dir_argument(parser)
    parser.add_argument("--tokens", type=Path, help="token file written by custody token issue")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port})")


def _http_arguments(parser: argparse.ArgumentParser) -> None:
    """Deadlines and the in-work limit of an HTTP server facing a network (custody.serving)."""
    parser.add_argument(
        "--header-timeout",
        type=_deadline_seconds,
        default=10.0,
        help="seconds a connection has to send a request's headers, from connecting or from its last response"
        " (default 10); a late one gets 408 and is closed",
    )
    parser.add_argument(
        "--body-timeout",
        type=_deadline_seconds,
        default=30.0,
        help="seconds a request has to send its body once its headers are in (default 30)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=256,
        help="requests processed at once, counted from a whole body to the response (default 256); more get 503",
    )


def _http_limits(args: argparse.Namespace) -> HttpLimits:
    from custody import serving

    return serving.HttpLimits(
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_requests=max(1, args.max_requests)
    )


def _seconds(text: str, *, at_most: float = math.inf) -> float:
    """A number of seconds, more than 0 and at most ``at_most``."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from exc
    if not 0 < value <= at_most:
        bound = "a positive number of seconds" if at_most == math.inf else f"seconds between 0 and {at_most:g}"
        raise argparse.ArgumentTypeError(f"{text!r}: give {bound}")
    return value


def _deadline_seconds(text: str) -> float:
    return _seconds(text, at_most=3600)


_EVENT_FILTERS = {
    "user": "the user the chain starts from",
    "agent": "an agent anywhere in the delegation chain",
    "credential": "a credential id",
    "tool": "a tool name",
    "resource": "a resource id",
    "decision": "the decision",
    "outcome": "the outcome",
    "emitter": "an emitter id",
    "type": "the event type",
    "trace": "a trace id",
}


_EVENT_CHOICES = {
    "decision": ["allow", "deny"],
    "outcome": ["success", "error"],
    "type": ["tool.invocation", "agent.delegation", "task.approval", "credential.issued", "credential.revoked"],
}


def _forensics_commands(commands: argparse._SubParsersAction[Any]) -> None:
    def lake_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
        _data_dir_argument(command)
        command.add_argument("--tenant", help="only this tenant's events")
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
        return command

    events = lake_command("events", "search the timeline, newest first")
    for name in ("user", "agent", "credential", "tool", "resource", "decision", "outcome", "emitter", "type", "trace"):
        events.add_argument(f"--{name}", help=_EVENT_FILTERS[name], choices=_EVENT_CHOICES.get(name))
    events.add_argument("--since", type=_timestamp, help="RFC 3339 time")
    events.add_argument("--until", type=_timestamp, help="RFC 3339 time")
    events.add_argument("--limit", type=int, default=50, help="events per page (1-1000)")
    events.add_argument("--cursor", help="next_cursor of the previous page")
    events.set_defaults(run=_events, reads_data_dir=True)

    path = lake_command("path", "the delegation path and task tree of one event")
    path.add_argument("event_id", help="the event's event_id (a UUID)")
    path.set_defaults(run=_path, reads_data_dir=True)

    blast = lake_command("blast-radius", "what an agent or credential could reach and what it touched")
    who = blast.add_mutually_exclusive_group(required=True)
    who.add_argument("--agent", help="the agent's name")
    who.add_argument("--credential", help="the credential's id")
    blast.add_argument("--since", type=_timestamp, help="only events from this RFC 3339 time on")
    blast.add_argument("--until", type=_timestamp, help="only events before this RFC 3339 time")
    blast.add_argument(
        "--resources", type=int, default=1000, metavar="N", help="resources to list, most used first (0: all)"
    )
    blast.set_defaults(run=_blast, reads_data_dir=True)

    taint = lake_command("taint", "everything a compromised agent, credential, user session or trace reached after T")
    start = taint.add_mutually_exclusive_group(required=True)
    for name in ("agent", "credential", "user", "trace"):
        start.add_argument(f"--{name}", help=f"start from this {name}")
    taint.add_argument("--since", type=_timestamp, required=True, help="when the compromise began (RFC 3339)")
    taint.add_argument("--csv", type=Path, help="write the evidence events as CSV here")
    taint.add_argument("--evidence-json", type=Path, help="write summary and events as JSON here")
    taint.set_defaults(run=_taint, reads_data_dir=True)

    found = lake_command("findings", "borrowed sessions, shared credentials, unregistered tools, ...")
    found.add_argument(
        "--max-delegation-depth", type=int, default=3, help="deep_delegation: chains of more agents than this"
    )
    found.add_argument("--unused-days", type=int, default=30, help="over_privileged: scopes unused for this many days")
    found.add_argument(
        "--rules", type=Path, metavar="FILE", help="the rules' parameters per tenant (TOML; overrides the two above)"
    )
    found.set_defaults(run=_findings, reads_data_dir=True)

    rules = commands.add_parser(
        "rules",
        help="the finding rules with their severity, parameters and state, as a rules file sets them",
        description="List every finding kind with its severity, its parameters (thresholds, windows) and whether"
        " it is on: the built-in defaults, or as --rules FILE sets them for --tenant. Checks the file.",
    )
    rules.add_argument("--rules", type=Path, metavar="FILE", help="a rules file (docs/detection.md)")
    rules.add_argument("--tenant", help="as they apply to this tenant")
    rules.add_argument("--json", action="store_true", help="print JSON")
    rules.set_defaults(run=_rules)


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _print_json(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATETIME, default=str).decode())


def _events(args: argparse.Namespace) -> int:
    from query.lake import LakeReader
    from query.search import EventFilter, search

    names = (
        "tenant",
        "user",
        "agent",
        "credential",
        "tool",
        "resource",
        "decision",
        "outcome",
        "emitter",
        "type",
        "trace",
        "since",
        "until",
    )
    where = EventFilter(**{name: getattr(args, name) for name in names})
    page = search(LakeReader(args.data_dir), where, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json(page.as_json())
        return 0
    for event in page.events:
        chain = " > ".join(event["delegation_chain"] or [])
        target = f"{event['tool_name'] or event['type']} {event['resource_id'] or ''}".strip()
        print(
            f"{event['occurred_at']} (received {event['received_at']})  {event['event_id']}  {event['tenant']}"
            f"  [{chain}]  {target}"
            f"  {event['decision_result'] or ''}"
        )
    print(
        f"{len(page.events)} of {page.total} events"
        + (f"; next: --cursor {page.next_cursor}" if page.next_cursor else "")
    )
    return 0


def _path(args: argparse.Namespace) -> int:
    from query.lake import LakeReader
    from query.paths import delegation_path

    path = delegation_path(LakeReader(args.data_dir), args.event_id, tenant=args.tenant)
    if args.json:
        _print_json(path.as_json())
    else:
        print(path.text())
    return 0


def _blast(args: argparse.Namespace) -> int:

    from query.blast import identity_blast_radius
    from query.index.reach_copies import ReachCopies
    from query.lake import LakeReader

    if args.resources < 0:
        raise CustodyError(f"--resources must be 0 (all) or more, got {args.resources}")
    kind: Literal["agent", "credential"] = "agent" if args.agent else "credential"
    reader = LakeReader(args.data_dir)
    reach = identity_blast_radius(
        reader,
        kind,
        args.agent or args.credential,
        since=args.since,
        until=args.until,
        tenant=args.tenant,
        copies=ReachCopies(reader),  # the copies a server or dashboard wrote, if any; none are written here
        resource_limit=args.resources or None,
    )
    if args.json:
        _print_json(reach.as_json())
        return 0
    print(reach.headline)
    print(f"scopes granted: {', '.join(reach.scopes_granted) or '-'}")
    print(f"scopes used:    {', '.join(f'{s} ({n})' for s, n in reach.scopes_used.items()) or '-'}")
    print(f"scopes unused:  {', '.join(reach.scopes_unused) or '-'}")
    print(f"tools reachable: {', '.join(reach.tools_reachable) or '-'}")
    print(f"tools used:      {', '.join(f'{t} ({n})' for t, n in reach.tools_used.items()) or '-'}")
    print(f"tenants: {', '.join(reach.tenants) or '-'}; users: {', '.join(reach.users) or '-'}")
    listed = f" ({len(reach.resources)} most used listed in --json)" if reach.resources_truncated else ""
    print(f"resources: {reach.resources_total}{listed}")
    print(f"delegated to: {', '.join(d['agent'] for d in reach.delegates) or '-'}")
    return 0


def _taint(args: argparse.Namespace) -> int:
    from query.blast import forward_taint
    from query.lake import LakeReader

    kinds: tuple[Literal["agent", "credential", "user", "trace"], ...] = ("agent", "credential", "user", "trace")
    kind = next(name for name in kinds if getattr(args, name))
    taint = forward_taint(LakeReader(args.data_dir), kind, getattr(args, kind), args.since, tenant=args.tenant)
    if args.csv:
        args.csv.write_text(taint.as_csv(), encoding="utf-8")
    if args.evidence_json:
        args.evidence_json.write_bytes(taint.as_json())
    if args.json:
        print(taint.as_json().decode())
        return 0
    print(f"{kind} {taint.subject} since {taint.since}: {len(taint.events)} events")
    for dimension, groups in taint.summary.items():
        print(
            f"  by {dimension}: "
            + ", ".join(f"{g[dimension]} ({g['events']})" for g in groups[:10])
            + (f", ... {len(groups) - 10} more" if len(groups) > 10 else "")
        )
    return 0


def _rule_book(path: Path) -> Any:
    from query.rules import load_rules

    try:
        return load_rules(path)
    except ValueError as exc:
        raise InvalidInput(f"--rules: {exc}") from exc


def _rules(args: argparse.Namespace) -> int:
    from query.findings import RuleBook
    from query.rules import rules_table

    book = _rule_book(args.rules) if args.rules is not None else RuleBook()
    table = rules_table(book, args.tenant)
    if args.json:
        _print_json(table)
        return 0
    for rule in table:
        parameters = ", ".join(f"{name}={value}" for name, value in rule["parameters"].items())
        state = "on " if rule["enabled"] else "off"
        print(f"{state} {rule['severity']:8} {rule['kind']:24} {parameters}")
    return 0


def _findings(args: argparse.Namespace) -> int:
    from query.findings import FindingSettings, RuleBook, findings
    from query.lake import LakeReader

    settings: FindingSettings | RuleBook = FindingSettings(
        max_delegation_depth=args.max_delegation_depth, unused_scope_days=args.unused_days
    )
    if args.rules is not None:
        settings = _rule_book(args.rules)
    found = findings(LakeReader(args.data_dir), tenant=args.tenant, settings=settings)
    if args.json:
        _print_json([finding.as_json() for finding in found])
        return 0
    for finding in found:
        print(
            f"{finding.severity.upper():8} {finding.kind:24} {finding.title} [{', '.join(finding.owasp)}]"
            f" {finding.evidence_total} events, first {finding.first_seen}"
        )
    print(f"{len(found)} findings")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from store.engine import lock_data_dir
    from store.ground import layout
    from store.lake import Lake

    lock = lock_data_dir(args.data_dir)  # a running server compacts the same partitions itself
    try:
        removed = Lake(layout.DataDir(args.data_dir).lake).compact(min_files=args.min_files, progress=print)
    finally:
        os.close(lock)
    print(f"OK: {removed} files merged")
    return 0


def _bundle_write(args: argparse.Namespace) -> int:
    from query import bundle
    from query.lake import LakeReader

    reader = LakeReader(args.data_dir)
    if args.event:
        ids, selection = args.event, {"kind": "events", "events": args.event}
    elif args.path:
        ids, selection = bundle.path_ids(reader, args.path, tenant=args.tenant), {"kind": "path", "event": args.path}
    elif args.finding:
        kind, _, subject = args.finding.partition(":")
        if not subject:
            raise InvalidInput("--finding takes KIND:SUBJECT, like use_after_revocation:tok-1")
        ids = bundle.finding_ids(reader, kind, subject, tenant=args.tenant)
        selection = {"kind": "finding", "finding": kind, "subject": subject}
    else:
        if args.since is None:
            raise InvalidInput("--taint-agent needs --since")
        ids = bundle.taint_ids(reader, args.taint_agent, args.since, tenant=args.tenant)
        selection = {"kind": "taint", "agent": args.taint_agent, "since": args.since.isoformat()}
    if args.tenant is not None:
        selection["tenant"] = args.tenant
    data = bundle.write_bundle(args.data_dir, ids, selection, tenant=args.tenant)
    args.output.write_bytes(data)
    print(f"OK: wrote {args.output}: {len(set(ids))} events ({len(data)} bytes)")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from store.ground.tlog import LogError, NoteKey, verify_bundle

    try:
        key = NoteKey.from_vkey(args.log_key)
        witnesses = [NoteKey.from_vkey(vkey) for vkey in args.witness]
    except LogError as exc:
        raise InvalidInput(str(exc)) from exc
    data = _read_bytes(args.file)
    try:
        verified = verify_bundle(data, key, witnesses, args.quorum)
    except LogError as exc:
        print(f"FAIL: {args.file}: {exc}")
        return 1
    for event in verified.events:
        print(
            f"OK: event {event.event_id} ({event.emitter} seq {event.seq}) signed by {event.kid},"
            f" log index {event.log_index}"
        )
    checkpoint = verified.checkpoint
    cosigned = f", cosigned by {', '.join(sorted(checkpoint.cosigned))}" if checkpoint.cosigned else ""
    print(f"OK: {len(verified.events)} events included in {checkpoint.origin} at tree size {checkpoint.size}{cosigned}")
    return 0


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc


def _log_key(args: argparse.Namespace) -> int:
    from query.verify.log import log_key_of

    print(log_key_of(args.data_dir).vkey)
    return 0


def _quarantine_list(args: argparse.Namespace) -> int:
    from store.ground import layout
    from store.quarantine import Quarantine

    events = Quarantine(layout.DataDir(args.data_dir).quarantine).events()
    if args.tenant is not None:
        events = [event for event in events if event.tenant == args.tenant]
    for event in events:
        if args.json:
            print(orjson.dumps(event.as_json()).decode())
        else:
            record = event.record
            print(
                f"segment {event.segment}: event {record.event_id} ({record.emitter} seq {record.seq}): {event.reason}"
            )
    if not args.json:
        print(f"{len(events)} quarantined events")
    return 0


def _quarantine_reingest(args: argparse.Namespace) -> int:
    from store.engine import reingest_quarantined

    result = reingest_quarantined(args.data_dir)
    for event_id, reason in result.refused:
        print(f"FAIL: event {event_id} is still refused and stays quarantined: {reason}")
    print(f"{'FAIL' if result.refused else 'OK'}: {result.written} events written to the lake")
    return 1 if result.refused else 0


def _serve_query(args: argparse.Namespace) -> int:
    from custody.serving import serve_query
    from query.api import create_query_app
    from query.tokens import TokenStore

    _require_tokens(args.tokens)
    app = create_query_app(args.data_dir, TokenStore(args.tokens))
    serve_query(app, host=args.host, port=args.port, http=_http_limits(args))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import dashboard

    _require_tokens(args.tokens)
    environment = {**os.environ, "CUSTODY_DATA_DIR": str(args.data_dir.resolve())}
    if args.tokens is not None:
        environment["CUSTODY_TOKEN_FILE"] = str(args.tokens.resolve())
    app = Path(dashboard.__file__).parent / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal", "--server.runOnSave", "false",
    ]  # fmt: skip
    print(f"Dashboard: http://{args.host}:{args.port}  (data dir {args.data_dir})", flush=True)
    return _run_child(command, environment)


def _run_child(command: list[str], environment: dict[str, str]) -> int:
    """Run a program that is not a custody command (Streamlit) as this process's child, until it ends or this
    process is told to stop (SIGTERM, SIGINT, SIGHUP, or its own parent gone): then stop it, and exit 0. The kernel
    stops it if this process is killed (``die_with_parent``)."""
    from store.orphans import die_with_parent, stop_on_signals

    stop_on_signals()
    child = subprocess.Popen(command, env=environment, preexec_fn=die_with_parent)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return 0


def _require_tokens(tokens: Path | None) -> None:
    if tokens is not None and not tokens.exists():
        raise CustodyError(f"token file {tokens} does not exist; create one with custody token issue")
    if tokens is None and not os.environ.get("CUSTODY_READ_TOKENS"):
        raise CustodyError("no tokens: pass --tokens FILE or set CUSTODY_READ_TOKENS; there is no open mode")


def _token_issue(args: argparse.Namespace) -> int:
    from query.tokens import TokenStore

    secret = TokenStore(args.file).issue(args.name, args.role, args.tenant)
    scope = f"tenant {args.tenant}" if args.tenant else "all tenants"
    print(f"OK: token {args.name!r} ({args.role}, {scope}); it is shown only now:")
    print(secret)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from query.tokens import TokenStore

    for entry in TokenStore(args.file).listing():
        print(f"{entry['name']}\t{entry['role']}\t{entry.get('tenant') or '*'}\tissued {entry.get('issued_at')}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from query.tokens import TokenStore

    TokenStore(args.file).revoke(args.name)
    print(f"OK: token {args.name!r} revoked")
    return 0


def _default_verify_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 else 0


def _serve(args: argparse.Namespace) -> int:
    token = os.environ.get("CUSTODY_ADMIN_TOKEN")
    if not token:
        raise CustodyError("CUSTODY_ADMIN_TOKEN is not set: the server has no default admin token and will not start")
    from custody.serving import serve_ingest
    from ingest.service import Limits

    if args.lake is not None:
        from store.object_lake import configure

        configure(args.data_dir, args.lake)

    limits = Limits(
        max_events=args.max_events,
        max_body_bytes=args.max_body_bytes,
        max_event_age=None if args.max_event_age is None else timedelta(seconds=args.max_event_age),
    )
    serve_ingest(
        args.data_dir,
        token,
        host=args.host,
        port=args.port,
        limits=limits,
        http=_http_limits(args),
        flush_interval=args.flush_interval,
        verify_workers=args.verify_workers,
        witnesses=args.witness,
        witness_quorum=args.witness_quorum,
        detect=not args.no_detect,
        alerts=args.alerts,
        rules=None if args.rules is None else _rule_book(args.rules),
        iceberg=args.iceberg,
        state=_state_uri(args.state),
    )
    return 0


def _state_uri(value: str | None) -> str | None:
    from store.cluster import is_postgres_uri

    if value is not None and not is_postgres_uri(value):
        raise CustodyError(f"--state must be a postgresql:// connection string, got {value.split(':', 1)[0]}:...")
    return value


def _witness_endpoint(text: str) -> Any:
    from ingest.witness import WitnessEndpoint
    from store.ground.tlog import LogError

    try:
        return WitnessEndpoint.parse(text)
    except (LogError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _witness(args: argparse.Namespace) -> int:
    from custody.serving import serve_query
    from ingest.witness import Witness, create_witness_app, load_witness_key
    from store.ground.tlog import LogError, NoteKey

    try:
        logs = [NoteKey.from_vkey(vkey) for vkey in args.log]
        witness = Witness(args.name, load_witness_key(args.key_file), logs, args.state)
    except (LogError, ValueError, OSError) as exc:
        raise InvalidInput(str(exc)) from exc
    print(f"witness key: {witness.public.vkey}", flush=True)
    serve_query(create_witness_app(witness), host=args.host, port=args.port)
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from custody.gateway import ConfigError, load_config, serve_gateway, write_key

    try:
        if args.print_registration:
            config = load_config(args.config)
            jwk = write_key(config.custody.key_file, config.custody.kid)
            _print_json({"tenant": config.custody.tenant, "kind": "gateway", "keys": [jwk]})
            return 0
        serve_gateway(args.config)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from exc
    return 0


def _export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from query.detect.loop import findings_store_path
    from query.detect.records import FindingStore
    from query.findings import findings
    from query.lake import LakeReader
    from query.ocsf import event_to_ocsf, finding_to_ocsf, latest_anchor, ocsf_events

    reader = LakeReader(args.data_dir)
    anchor = latest_anchor(args.data_dir)
    output = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    written = {"events": 0, "findings": 0}
    try:
        with tqdm(desc="exporting events", unit="event", file=sys.stderr, disable=args.output is None) as bar:
            for row in ocsf_events(reader, tenant=args.tenant, since=args.since, until=args.until):
                output.write(orjson.dumps(event_to_ocsf(row, anchor)).decode() + "\n")
                written["events"] += 1
                bar.update()
        if not args.no_findings:
            store_path = findings_store_path(args.data_dir)
            if store_path.exists():
                records = FindingStore(store_path)
                try:
                    every = ("open", "acknowledged", "resolved", "suppressed")
                    for record in records.queue(tenant=args.tenant, statuses=every, limit=1_000_000):
                        ocsf = finding_to_ocsf(record, records.evidence(record.id), anchor)
                        output.write(orjson.dumps(ocsf).decode() + "\n")
                        written["findings"] += 1
                finally:
                    records.close()
            else:
                for found in findings(reader, tenant=args.tenant, since=args.since, until=args.until):
                    output.write(orjson.dumps(finding_to_ocsf(found, found.evidence, anchor)).decode() + "\n")
                    written["findings"] += 1
    finally:
        if args.output:
            output.close()
    where = "" if args.output is None else f" to {args.output}"
    print(f"wrote {written['events']:,} events and {written['findings']:,} findings as OCSF{where}", file=sys.stderr)
    return 0


def _iceberg_sync(args: argparse.Namespace) -> int:
    from query.iceberg import IcebergMirror

    synced = IcebergMirror(args.data_dir, catalog_uri=args.catalog_uri, warehouse=args.warehouse).sync()
    print(f"appended {synced.appended:,} events in {synced.snapshots} snapshots; the table holds log indexes up to"
          f" {synced.log_index_max}")  # fmt: skip
    return 0


def _iceberg_expire(args: argparse.Namespace) -> int:
    from query.iceberg import IcebergMirror

    mirror = IcebergMirror(args.data_dir, catalog_uri=args.catalog_uri, warehouse=args.warehouse)
    dropped = mirror.expire(datetime.now(UTC) - timedelta(days=args.days))
    print(f"expired {dropped} snapshots")
    return 0


def _iceberg_compact(args: argparse.Namespace) -> int:
    from query.iceberg import IcebergMirror

    mirror = IcebergMirror(args.data_dir, catalog_uri=args.catalog_uri, warehouse=args.warehouse)
    compacted = mirror.compact(min_files=args.min_files)
    print(f"rewrote {compacted.partitions} partitions of {compacted.files} data files as one file each")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from query.verify.run import Mode, run_verification
    from store.ground.tlog import LogError, NoteKey

    try:
        log_key = None if args.log_key is None else NoteKey.from_vkey(args.log_key)
    except LogError as exc:
        raise InvalidInput(f"--log-key: {exc}") from exc
    trusted = None if args.checkpoint is None else _read_text(args.checkpoint, "--checkpoint")
    mode: Mode = "hash-chain-only" if args.hash_chain_only else "incremental" if args.incremental else "full"
    bars = {"disable": args.no_progress, "file": sys.stderr, "unit": "event"}
    with tqdm(desc="verifying", **bars) as bar, tqdm(desc="rebuilding the log", **bars) as log_bar:
        verification = run_verification(
            args.data_dir,
            mode,
            log_key=log_key,
            trusted=trusted,
            workers=max(1, args.workers),
            progress=lambda done: bar.update(done - bar.n),
            log_progress=lambda done: log_bar.update(done - log_bar.n),
        )
    report, checks = verification.report.for_tenant(args.tenant), verification.checks
    if args.json:
        print(orjson.dumps({**report.as_json(), "checks": checks}, option=orjson.OPT_INDENT_2).decode())
        return 0 if report.ok else 1
    for problem in report.problems:
        print(f"FAIL: {problem.describe()}")
    if report.ok:
        print(f"OK: {report.events} events from {len(report.emitters)} emitters: {checks}")
        return 0
    print(f"FAIL: {len(report.problems)} problems in {report.events} events")
    return 1


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{flag}: cannot read {path}: {exc}") from exc


def _demo(args: argparse.Namespace) -> int:
    from sample_data.demo import DemoSettings, run_demo

    settings = DemoSettings(
        args.data_dir,
        port=args.port,
        query_port=args.query_port,
        dashboard_port=args.dashboard_port,
        gateway_port=args.gateway_port,
        alerts=args.alerts,
        seed=args.seed,
        days=args.days,
        tasks_per_day=args.tasks_per_day,
        reset=args.reset,
        stay=not args.exit,
    )
    return run_demo(settings)


if __name__ == "__main__":
    raise SystemExit(main())
