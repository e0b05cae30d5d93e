"""custody gateway benchmark: what the gateway adds to a tool call, the upstream's time excluded.

Every part is real and on this machine: a ``custody serve``, the demo's helpdesk-mcp over streamable HTTP, the
gateway in front of it (JWT check, policy, spool reservation, one signed and fdatasync'd event per call), and the
official ``mcp`` client. The same client calls ``read_ticket`` open-loop at ``--rate`` calls/s (each call timed from
the moment it was due, so a stall is not hidden by the calls that waited behind it), first straight at the
upstream, then through the gateway. Reported: both latency distributions, their difference, and the gateway's own
time per call as it measures it (handler time minus the upstream call).

    .venv/bin/python bench/gateway.py [--rate 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.common import REPO, Server, free_port, machine
from sample_data.mcp.live import DEMO_GATEWAY, demo_token, write_demo_gateway

TOKEN = "bench-admin-token-0123456789"


def start(command: list[str], log: Path, url: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{command} did not start: {log.read_text()[-2000:]}")


async def drive(url: str, token: str | None, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of ``read_ticket`` calls due every 1/rate s, each from when it was due."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60, limits=httpx2.Limits(max_connections=200)) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        for _ in range(100):  # warm up: connections, caches, the JIT of nothing
            await client.call_tool("read_ticket", {"ticket_id": "T-1001"})
        latencies: list[float] = []

        async def one(due: float) -> None:
            result = await client.call_tool("read_ticket", {"ticket_id": "T-1001"})
            if result.is_error:
                raise RuntimeError(f"call failed: {result.content}")
            latencies.append(time.perf_counter() - due)

        loop_start = time.perf_counter()
        tasks = []
        for number in range(int(rate * seconds)):
            due = loop_start + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="custody-gateway-bench-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        custody = Server(root / "data", TOKEN)
        children: list[subprocess.Popen[bytes]] = []
        try:
            upstream_port = free_port()
            upstream = f"http://127.0.0.1:{upstream_port}/mcp"
            children.append(
                start(
                    [sys.executable, "-m", "sample_data.mcp.servers", "helpdesk-mcp", "--http", str(upstream_port)],
                    root / "helpdesk.log",
                    upstream,
                )
            )
            billing_port = free_port()
            children.append(
                start(
                    [sys.executable, "-m", "sample_data.mcp.servers", "billing-mcp", "--http", str(billing_port)],
                    root / "billing.log",
                    f"http://127.0.0.1:{billing_port}/mcp",
                )
            )
            gateway_port = free_port()
            urls = {"helpdesk-mcp": upstream, "billing-mcp": f"http://127.0.0.1:{billing_port}/mcp"}
            config, registration = write_demo_gateway(root / "gw", 7, custody.url, gateway_port, upstream_urls=urls)
            answer = httpx.put(
                f"{custody.url}/v1/emitters/{DEMO_GATEWAY}",
                json=registration,
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            answer.raise_for_status()
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            gateway = start(
                [sys.executable, "-m", "custody.cli", "gateway", "--config", str(config)],
                root / "gateway.log",
                f"{gateway_url}/healthz",
            )
            children.append(gateway)
            token = demo_token(7, "dana@acme.example", ["support-agent", "triage-subagent"], ["tickets:read"])

            direct = asyncio.run(drive(upstream, None, args.rate, args.seconds))
            cpu_before = cpu_seconds(gateway.pid)
            started = time.perf_counter()
            through = asyncio.run(drive(f"{gateway_url}/mcp", token, args.rate, args.seconds))
            elapsed = time.perf_counter() - started
            cpu_used = cpu_seconds(gateway.pid) - cpu_before
            deadline = time.monotonic() + 60
            while (health := httpx.get(f"{gateway_url}/healthz").json())["spool"]["pending"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the spool did not drain: {health}")
                time.sleep(0.2)
        finally:
            for child in children:
                child.terminate()
                child.wait(timeout=60)
            custody.stop()

    def row(name: str, values: list[float]) -> str:
        return (
            f"{name:<28} {len(values):>6} {percentile(values, 0.5) * 1e3:>8.2f} {percentile(values, 0.99) * 1e3:>8.2f}"
        )

    print(f"\nread_ticket at {args.rate:.0f} calls/s for {args.seconds:.0f} s, open loop (ms from when each was due)")
    print(f"{'':<28} {'calls':>6} {'p50':>8} {'p99':>8}")
    print(row("straight to the upstream", direct))
    print(row("through custody gateway", through))
    p50 = (percentile(through, 0.5) - percentile(direct, 0.5)) * 1e3
    p99 = (percentile(through, 0.99) - percentile(direct, 0.99)) * 1e3
    print(f"{'difference (the gateway)':<28} {'':>6} {p50:>8.2f} {p99:>8.2f}")
    own: dict[str, Any] = health["overhead_us"]
    print(
        f"the gateway's own time per call, upstream excluded ({own['calls']} calls):"
        f" p50 {own['p50'] / 1e3:.2f} ms, p99 {own['p99'] / 1e3:.2f} ms, max {own['max'] / 1e3:.2f} ms"
    )
    print(f"gateway CPU: {cpu_used:.1f} s over {elapsed:.1f} s ({cpu_used / elapsed:.0%} of one core)")
    print(
        f"events acknowledged by Custody: {health['spool']['acknowledged']:,}, unaudited {health['calls']['unaudited']}"
    )


if __name__ == "__main__":
    main()
