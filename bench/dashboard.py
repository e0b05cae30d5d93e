"""Dashboard benchmark: how long each page takes to render on a large lake, cold (cache cleared) and warm.

    .venv/bin/python bench/dashboard.py --data-dir DIR [--events 10000000]

DIR is a lake from ``bench/forensics.py --keep DIR`` (generated here with the same generator if missing). Each page
runs through Streamlit's AppTest, the same script run a browser triggers, signed in as an unbound analyst; the
time is the server-side render (the queries and the page script), not the browser's drawing. The benchmark lake's
events run from 2026-10-01 to 2026-10-31, so the dashboard's clock is set to 2026-10-31 00:00: each page is timed
in its default view (last 24 h) and, for the windowed pages, with ``window=all`` (the whole lake, the heaviest).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq

from bench.common import machine
from bench.forensics import build_lake
from query.index.aggregates import LakeAggregates
from query.tokens import TokenStore
from store.ground.server_key import ServerKey

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PROBE = f"{7:08x}-0000-4{0x123 >> 4 & 0xFFF:03x}-8{0x123 & 0xF:03x}-{0x123:012x}"  # an event of bench/forensics.py
PAGES: dict[
    str, list[tuple[str, dict[str, str]]]
] = {  # page -> (label, URL params); the first of each page is its default view
    "overview": [("default (24 h)", {}), ("window=all", {"window": "all"})],
    "investigate": [("default (24 h)", {}), ("agent-3, window=all", {"window": "all", "agent": "agent-3"})],
    "path": [("one event", {"event": PROBE})],
    "blast": [("credential, last day", {"kind": "credential", "subject": "tok-agent-3-1"})],
    "findings": [("default (24 h)", {}), ("window=all", {"window": "all"})],
    "integrity": [("default", {})],
    "recert": [("tenant t0, 90 days", {"tenant": "t0"})],
}
LAKE_NOW = datetime(2026, 10, 31, 0, 0, tzinfo=UTC)  # the end of the benchmark lake's month


def render(page: str, params: dict[str, str], token: str) -> float:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["token"] = token
    for name, value in params.items():
        at.query_params[name] = value
    at.switch_page(f"views/{page}.py")
    started = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - started
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    return elapsed


def keep(what: str, aggregates: LakeAggregates) -> None:
    """Bring one kind of per-file aggregates up to date (waiting for the background refresh the dashboard's first
    use started) and report what it costs: kept as the lake grows, one per new file, in the background."""
    started = time.perf_counter()
    aggregates.refresh()
    built = time.perf_counter() - started
    kept = list(aggregates.copies.directory.glob("*.parquet"))
    rows = sum(pq.read_metadata(path).num_rows for path in kept)
    kept_mib = sum(path.stat().st_size for path in kept) / 2**20
    print(
        f"{what}: {len(kept)} files, {rows:,} rows, {kept_mib:.1f} MiB, built in {built:.1f} s"
        f" ({built / max(len(kept), 1):.2f} s per lake file)"
    )


def detect(data_dir: Path) -> None:
    """What ``custody serve`` keeps with continuous detection: the findings store the whole-log findings are read
    from. A store that is missing is built as a server does on a lake detection has not seen (the whole-lake query
    once, every evidence id recorded), and timed; later events cost a detector batch each (bench/detection.py)."""
    from query.detect.loop import DetectionLoop, findings_store_path
    from query.detect.records import recorded_findings

    path = findings_store_path(data_dir)
    if path.exists():
        print(f"findings store: present ({path.stat().st_size / 2**20:.1f} MiB), as continuous detection keeps it")
        return
    loop = DetectionLoop(data_dir)
    try:
        started = time.perf_counter()
        loop.catch_up()
        loop.run_periodic(force=True)
        built = time.perf_counter() - started
    finally:
        loop.store.close()
    recorded = recorded_findings(path, None)
    assert recorded is not None
    records, evidence = len(recorded[1]), sum(item.finding.evidence_total for item in recorded[1])
    print(
        f"findings store: {records:,} findings, {evidence:,} evidence ids, {path.stat().st_size / 2**20:.1f} MiB,"
        f" built in {built:.1f} s (once, on a lake detection had not seen)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--events", type=int, default=10_000_000, help="size, if the lake must be generated")
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--pages", nargs="*", default=list(PAGES))
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="delete the derived data the views read (aggregates, review facts, findings store) first, to time"
        " keeping it: what a data dir without it costs once",
    )
    args = parser.parse_args()
    if args.rebuild:
        for name in ("aggregates", "review-facts"):
            shutil.rmtree(args.data_dir / "index" / name, ignore_errors=True)
        for suffix in ("", "-wal", "-shm"):
            (args.data_dir / "state" / f"findings.sqlite{suffix}").unlink(missing_ok=True)
    print(f"machine: {machine()}")
    build_lake(args.data_dir, args.events, 200, 3)
    (args.data_dir / "state").mkdir(exist_ok=True)
    ServerKey.load_or_create(args.data_dir / "state" / "server_key.pem")  # the recert page signs with it
    tokens = args.data_dir / "bench-tokens.json"
    tokens.unlink(missing_ok=True)
    token = TokenStore(tokens).issue("bench", "admin", None)
    os.environ["CUSTODY_DATA_DIR"] = str(args.data_dir)
    os.environ["CUSTODY_TOKEN_FILE"] = str(tokens)
    files = list((args.data_dir / "lake" / "events").glob("**/*.parquet"))
    size = sum(path.stat().st_size for path in files) / 2**30
    print(f"lake: {len(files):,} files, {size:.2f} GiB; target: each page <= 1.5 s cold and warm")
    import streamlit as st
    from streamlit.components.v2 import component_manager

    import dashboard.context

    # AppTest scans every installed package for v2 components on each run (~0.8 s here); a real server does it
    # once at start. The pages use none, so the benchmark skips the scan to time the page, not the harness.
    for kind in list(vars(component_manager).values()):
        if isinstance(kind, type) and hasattr(kind, "discover_and_register_components"):
            kind.discover_and_register_components = lambda self, **_: None

    dashboard.context.now = lambda: LAKE_NOW  # replay the lake's last day as "now": defaults select real data
    import streamlit.logger

    streamlit.logger.set_log_level("error")  # AppTest runs in bare mode and says so on every run
    # A running server has imported everything its pages use once; so does the benchmark, on a small view of each
    # page (the data caches are cleared before every timed run, so no result carries over).
    from dashboard.data import tree_index

    started = time.perf_counter()
    tree_index(str(args.data_dir)).refresh()  # what a dashboard process builds once, in the background
    print(f"task-tree index built in {time.perf_counter() - started:.1f} s (once per dashboard process)")
    from dashboard.data import lake_aggregates, review_facts

    keep("hourly aggregates", lake_aggregates(str(args.data_dir)))
    keep("daily review facts", review_facts(str(args.data_dir)))
    detect(args.data_dir)
    for page in args.pages:
        render(page, {"window": "1h"} if page in ("overview", "investigate", "findings") else {}, token)
    for page in args.pages:
        for label, params in PAGES[page]:
            st.cache_data.clear()
            cold = render(page, params, token)
            warm = statistics.median([render(page, params, token) for _ in range(args.warm_runs)])
            verdict = "ok" if max(cold, warm) <= 1.5 else "over 1.5 s"
            print(f"  {page:12s} {label:28s} cold {cold:6.2f} s   warm {warm:5.2f} s   {verdict}", flush=True)
    tokens.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
