"""Ingest benchmark: a real `custody serve` and a load generator posting pre-signed batches from many emitters.

Prints, from one run: the in-process ceiling (raw cryptography verify + orjson parse + JCS hash + one fsync per
batch, one process, one core), the server's accepted (durable) events/s on one core and on both (each the median
of --rounds runs, taken in turn with the ceiling, because this VM's speed drifts), ack latency p50/p99 at half of
the measured maximum, and the server's RSS. The maxima are bursts of a few seconds, in which the lake writer (which
yields every core to acknowledgements) writes nothing; ``--sustain 90`` adds a 90 s full load, in which the lake
must keep up, and latency at half of that rate.

    .venv/bin/python bench/ingest.py [--emitters 16] [--events 3000] [--batch 500] [--rounds 3] [--sustain 90]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, machine
from ingest.sdk import generate_key, public_jwk, rfc3339
from store.ground.canonical import ZERO_HASH, canonicalize, event_hash
from store.ground.jws import sign_compact

TOKEN = "bench-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def presign(emitters: int, events: int) -> dict[str, tuple[Ed25519PrivateKey, list[str]]]:
    from datetime import UTC, datetime

    stamp = rfc3339(datetime.now(UTC))
    chains = {}
    for index in range(emitters):
        name = f"bench-gw-{index:03d}"
        key = generate_key()
        assert isinstance(key, Ed25519PrivateKey)
        previous = ZERO_HASH
        tokens = []
        for seq in range(1, events + 1):
            payload = {
                "v": 1,
                "event_id": f"{index:08x}-0000-4000-8000-{seq:012x}",
                "type": "tool.invocation",
                "occurred_at": stamp,
                "emitter": name,
                "tenant": f"t{index % 3}",
                "seq": seq,
                "prev_hash": previous,
                "delegation": {"sub": f"user{seq % 50}@example.com", "act": {"sub": f"agent-{seq % 7}"}},
                "credential": {
                    "id": f"tok-{seq % 11}",
                    "kind": "agent_token",
                    "client_id": f"agent-{seq % 7}",
                    "scopes": ["tickets:read", "tickets:write"],
                },
                "tool": {"name": "read_ticket", "server": "helpdesk-mcp"},
                "resource": {"type": "ticket", "id": f"T-{seq}", "tenant": f"t{index % 3}"},
                "decision": {"result": "allow", "required_scope": "tickets:read", "policy": "default"},
                "outcome": "success",
                "trace_id": f"trace-{seq // 10}",
            }
            canonical = canonicalize(payload)
            previous = event_hash(canonical)
            tokens.append(sign_compact(canonical, key, f"{name}-k1"))
        chains[name] = (key, tokens)
    return chains


def ceiling(
    chains: dict[str, tuple[Ed25519PrivateKey, list[str]]], batch: int, directory: Path, *, libsodium: bool = False
) -> float:
    """One process, one thread: verify (the raw cryptography call, or libsodium's as the server does), parse,
    hash, append + fsync per batch."""
    public: dict[str, Any] = {name: key.public_key() for name, (key, _) in chains.items()}
    if libsodium:
        raw = {name: key.public_bytes_raw() for name, key in public.items()}
        public = {name: _Sodium(key) for name, key in raw.items()}
    batches = [
        (name, tokens[i : i + batch]) for name, (_, tokens) in chains.items() for i in range(0, len(tokens), batch)
    ]
    fd = os.open(directory / "ceiling.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    count = 0
    started = time.perf_counter()
    for name, tokens in batches:
        out = []
        for token in tokens:
            header, body, signature = token.split(".")
            public[name].verify(base64.urlsafe_b64decode(signature + "=="), f"{header}.{body}".encode())
            payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            digest = hashlib.sha256(canonicalize(payload)).hexdigest()
            out.append(orjson.dumps([digest, token]))
        os.write(fd, b"\n".join(out))
        os.fsync(fd)
        count += len(tokens)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return count / elapsed


class _Sodium:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def verify(self, signature: bytes, message: bytes) -> None:
        crypto_sign_open(signature + message, self.raw)


def register(url: str, chains: dict[str, tuple[Ed25519PrivateKey, list[str]]]) -> None:
    for index, (name, (key, _)) in enumerate(chains.items()):
        httpx.put(
            f"{url}/v1/emitters/{name}",
            headers=ADMIN,
            timeout=30,
            json={"tenant": f"t{index % 3}", "kind": "gateway", "keys": [public_jwk(key, f"{name}-k1")]},
        ).raise_for_status()


def post_all(
    url: str,
    chains: dict[str, tuple[Ed25519PrivateKey, list[str]]],
    batch: int,
    clients: int,
    rate: float | None = None,
) -> tuple[float, list[float]]:
    """Post every chain in batches from ``clients`` threads; optionally at ``rate`` events/s in total."""
    port = int(url.rsplit(":", 1)[1])
    names = list(chains)
    work = [names[i::clients] for i in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    accepted = [0]
    interval = None if rate is None else batch * clients / rate  # seconds between requests of one client

    def bodies_of(mine: list[str]) -> list[bytes]:
        return [
            orjson.dumps({"events": chains[name][1][i : i + batch]})
            for name in mine
            for i in range(0, len(chains[name][1]), batch)
        ]

    # Every body is serialized before the first request: a client still building its bodies would hold the load
    # generator's GIL while the others time their requests, and those would measure it.
    prepared = [bodies_of(mine) for mine in work]

    def client(bodies: list[bytes], offset: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        next_at = time.perf_counter() + offset
        for body in bodies:
            if interval is not None:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            sent = time.perf_counter()
            connection.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = orjson.loads(response.read())
            elapsed = time.perf_counter() - sent
            ok = sum(1 for r in data["results"] if r["status"] == "accepted")
            assert ok == len(data["results"]), data["results"][:2]
            with lock:
                latencies.append(elapsed)
                accepted[0] += ok
        connection.close()

    threads = [
        threading.Thread(target=client, args=(bodies, (interval or 0) * i / clients))
        for i, bodies in enumerate(prepared)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return accepted[0] / (time.perf_counter() - started), latencies


def catch_up(url: str, timeout: float = 300.0) -> tuple[int, float]:
    """Acknowledged events not yet in the lake now, and the seconds until the lake has them all (the lake writer
    yields the CPU to acknowledgements, so at full load it falls behind)."""
    started = time.perf_counter()
    waiting = unflushed = int(httpx.get(f"{url}/healthz", timeout=10).json()["unflushed_events"])
    while unflushed and time.perf_counter() - started < timeout:
        time.sleep(0.1)
        unflushed = int(httpx.get(f"{url}/healthz", timeout=10).json()["unflushed_events"])
    if unflushed:
        raise RuntimeError(f"{unflushed} events still not in the lake {timeout:.0f} s after the load")
    return waiting, time.perf_counter() - started


def sustained(root: Path, emitters: int, seconds: float, expected_rate: float, batch: int, clients: int) -> float:
    """A 2-core load at full speed for about ``seconds``, long enough that the lake writer must keep up (from 30 s
    of lag a writer at normal priority catches up while the verifiers leave it a core). Prints the lake's backlog
    every 5 s; returns the events/s accepted over the whole run."""
    per_emitter = int(expected_rate * seconds / emitters) + 1
    print(f"sustained load: pre-signing {emitters} x {per_emitter:,} events ...", flush=True)
    chains = presign(emitters, per_emitter)
    server = Server(root / "data-sustained", TOKEN)
    register(server.url, chains)
    lags: list[float] = []  # the flush lag, once a second
    done = threading.Event()

    def sample() -> None:
        started = time.perf_counter()
        while not done.wait(1.0):
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            values = {
                line.split()[0]: float(line.split()[1])
                for line in text.splitlines()
                if line.startswith(("custody_flush_lag_seconds ", "custody_unflushed_events "))
            }
            elapsed = time.perf_counter() - started
            lags.append(values["custody_flush_lag_seconds"])
            if len(lags) % 5 == 0:
                print(
                    f"  {elapsed:5.0f} s: {values['custody_unflushed_events']:9,.0f} acknowledged events not yet in"
                    f" the lake, flush lag {values['custody_flush_lag_seconds']:5.1f} s",
                    flush=True,
                )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rate, _ = post_all(server.url, chains, batch, clients)
    done.set()
    sampler.join()
    waiting, caught_up = catch_up(server.url)
    server.stop()
    if not lags:  # a run shorter than a second has no sample
        lags.append(0.0)
    print(
        f"sustained load: {rate:,.0f} events/s accepted over {emitters * per_emitter / rate:.0f} s (batches of {batch},"
        f" {clients} connections); flush lag at most {max(lags):.1f} s, {lags[-1]:.1f} s at the end;"
        f" {waiting:,} events not yet in the lake at the end, all in it {caught_up:.1f} s later",
        flush=True,
    )
    return rate


def latency_rounds(
    root: Path,
    label: str,
    chains: dict[str, tuple[Ed25519PrivateKey, list[str]]],
    rate: float,
    batch: int,
    clients: int,
    rounds: int,
) -> None:
    """``rounds`` runs at ``rate`` events/s of ``batch``-event requests; prints each and the median p99."""
    p99s = []
    for round_number in range(1, rounds + 1):
        server = Server(root / f"data-latency-{label}-{round_number}", TOKEN)
        register(server.url, chains)
        achieved, latencies = post_all(server.url, chains, batch, clients, rate=rate)
        rss, peak, with_helpers = server.rss_mib()
        server.stop()
        p99s.append(percentile(latencies, 99) * 1000)
        print(
            f"at half {label} (round {round_number}; {rate:,.0f} events/s offered, {achieved:,.0f} achieved,"
            f" batches of {batch}): ack latency p50 {percentile(latencies, 50) * 1000:.1f} ms,"
            f" p99 {p99s[-1]:.1f} ms; RSS {rss:.0f} MiB (peak {peak:.0f} MiB,"
            f" {with_helpers:.0f} MiB with helper processes)",
            flush=True,
        )
    print(
        f"at half {label}, p99 of {rounds} rounds: median {statistics.median(p99s):.1f} ms"
        f" (from {min(p99s):.1f} to {max(p99s):.1f})"
    )


def checkpoint_latency(root: Path, chains: dict[str, tuple[Ed25519PrivateKey, list[str]]], probes: int) -> None:
    """How long after an ack the newest checkpoint covers the acknowledged events (one request of 20 at a time,
    polled every 5 ms). A server without the transparency log is reported as such."""
    server = Server(root / "data-checkpoint", TOKEN)
    register(server.url, chains)
    _, tokens = next(iter(chains.values()))
    delays: list[float] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for probe in range(probes):
            body = client.post("/v1/events", json={"events": tokens[probe * 20 : probe * 20 + 20]}).json()
            acked = time.perf_counter()
            last = body["results"][-1].get("log_index")
            if last is None:
                print("checkpoint after an ack: this server has no transparency log")
                server.stop()
                return
            while True:
                response = client.get("/checkpoint")
                if response.status_code == 200 and int(response.text.split("\n")[1]) > last:
                    break
                time.sleep(0.005)
            delays.append(time.perf_counter() - acked)
            time.sleep(0.1)
    server.stop()
    print(
        f"checkpoint covering an ack, after the ack: p50 {percentile(delays, 50) * 1000:.0f} ms,"
        f" p99 {percentile(delays, 99) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms ({probes} requests of 20)"
    )


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emitters", type=int, default=16)
    parser.add_argument("--events", type=int, default=3000, help="events per emitter")
    parser.add_argument("--batch", type=int, default=500, help="events per request at full load")
    parser.add_argument("--latency-batch", type=int, default=20, help="events per request in the latency run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each maximum (the median is used)")
    parser.add_argument(
        "--latency-rounds", type=int, default=3, help="runs at half the 2-core maximum (p99 varies run to run)"
    )
    parser.add_argument(
        "--sustain",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also a full 2-core load for this long (90 s: about 700,000 events, 1.5 GB pre-signed), the lake keeping"
        " up, and latency at half of that rate",
    )
    parser.add_argument("--checkpoint-probes", type=int, default=30, help="acks timed until a checkpoint covers them")
    parser.add_argument(
        "--small-batches", type=int, nargs="*", default=[20, 5], help="request sizes measured at half their own maximum"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"pre-signing {args.emitters} x {args.events} events ...", flush=True)
    chains = presign(args.emitters, args.events)
    total = args.emitters * args.events
    with tempfile.TemporaryDirectory(prefix="custody-bench-") as tmp:
        root = Path(tmp)
        # This VM's speed drifts by 10-20% within minutes: the ceilings and maxima are medians of --rounds runs,
        # taken in turn, so that the ratios compare like with like.
        runs: dict[str, list[float]] = {"ceiling": [], "libsodium": [], "1 core": [], "2 cores": []}
        for round_number in range(1, args.rounds + 1):
            runs["ceiling"].append(ceiling(chains, args.batch, root))
            runs["libsodium"].append(ceiling(chains, args.batch, root, libsodium=True))
            print(
                f"in-process ceiling (1 process, 1 core, fsync per {args.batch}; round {round_number}):"
                f" {runs['ceiling'][-1]:,.0f} events/s; with libsodium's Ed25519 verify (as the server verifies):"
                f" {runs['libsodium'][-1]:,.0f} events/s",
                flush=True,
            )
            for label, cpus, extra in (("1 core", "0", ("--verify-workers", "0")), ("2 cores", None, ())):
                server = Server(root / f"data-{label[0]}-{round_number}", TOKEN, cpus=cpus, extra=extra)
                register(server.url, chains)
                rate, latencies = post_all(server.url, chains, args.batch, args.clients)
                rss, peak, with_helpers = server.rss_mib()
                waiting, caught_up = catch_up(server.url)
                server.stop()
                runs[label].append(rate)
                print(
                    f"server on {label} (round {round_number}): {rate:,.0f} events/s accepted ({total:,} events,"
                    f" batches of {args.batch}, {args.clients} connections); request p50"
                    f" {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms;"
                    f" RSS {rss:.0f} MiB (peak {peak:.0f} MiB, {with_helpers:.0f} MiB with helper processes);"
                    f" {waiting:,} acknowledged events not yet in the lake at the end, all in it"
                    f" {caught_up:.1f} s later",
                    flush=True,
                )
        results = {label: statistics.median(rates) for label, rates in runs.items()}
        scaling = results["2 cores"] / results["1 core"]
        print(
            f"medians of {args.rounds} rounds: ceiling {results['ceiling']:,.0f}"
            f" (libsodium {results['libsodium']:,.0f}),"
            f" 1 core {results['1 core']:,.0f}, 2 cores {results['2 cores']:,.0f} events/s;"
            f" 1 core / ceiling: {results['1 core'] / results['ceiling']:.0%} (against the libsodium ceiling:"
            f" {results['1 core'] / results['libsodium']:.0%});  2 cores / 1 core: {scaling:.2f}x"
        )
        latency_rounds(
            root,
            "the 2-core maximum",
            chains,
            results["2 cores"] / 2,
            args.latency_batch,
            args.clients,
            args.latency_rounds,
        )
        checkpoint_latency(root, chains, args.checkpoint_probes)
        if args.sustain:
            rate = sustained(root, args.emitters, args.sustain, results["2 cores"], args.batch, args.clients)
            latency_rounds(
                root, "the sustained maximum", chains, rate / 2, args.latency_batch, args.clients, args.latency_rounds
            )
        # Small requests cost more per event (HTTP, the thread hop, the fsync): their maximum is lower, so "half of
        # max load" is also measured against the maximum of that request size.
        for batch in args.small_batches:
            server = Server(root / f"data-max-{batch}", TOKEN)
            register(server.url, chains)
            top, _ = post_all(server.url, chains, batch, args.clients)
            server.stop()
            server = Server(root / f"data-half-{batch}", TOKEN)
            register(server.url, chains)
            rate, latencies = post_all(server.url, chains, batch, args.clients, rate=top / 2)
            server.stop()
            print(
                f"requests of {batch} events: maximum {top:,.0f} events/s; at half of it ({top / 2:,.0f} offered,"
                f" {rate:,.0f} achieved): ack latency p50 {percentile(latencies, 50) * 1000:.1f} ms,"
                f" p99 {percentile(latencies, 99) * 1000:.1f} ms"
            )


if __name__ == "__main__":
    main()
