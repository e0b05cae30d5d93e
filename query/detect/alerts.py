"""Alerts where analysts already work: a generic webhook (JSON, HMAC-signed) and syslog (RFC 5424 over TCP or TLS)
for SIEM collectors, configured per channel with the tenants and the lowest severity it takes.

An alert is written to the findings store's outbox in the same transaction as the finding it reports; a sender
thread per channel delivers it, retrying with backoff (1 s doubling to 30 s) for as long as ``max_age_hours``
allows (24 by default), then moves it to ``state/alerts-dead-letter.jsonl``. Nothing here runs on the ingest
path: a receiver that is down delays its alerts, never an acknowledgement, and loses none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from query.detect.records import FindingStore, Merged

__all__ = ["AlertChannels", "ChannelConfig", "Dispatcher", "alert_body", "load_channels", "syslog_message"]

log = logging.getLogger("custody.alerts")
_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}
_SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}  # crit, err, warning, notice
_FACILITY = 10  # security/authorization (authpriv)
SIGNATURE_HEADER = "X-Custody-Signature"
TIMESTAMP_HEADER = "X-Custody-Timestamp"


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    type: Literal["webhook", "syslog"]
    tenants: list[str] | None = None  # every tenant when left out
    min_severity: Literal["critical", "high", "medium", "low"] = "high"
    max_age_hours: float = Field(24.0, gt=0, le=24 * 30)
    # webhook
    url: str | None = None
    secret_file: Path | None = None  # the HMAC key, bytes of the file (strip of trailing newlines)
    # syslog
    address: str | None = None  # host:port
    tls: bool = False
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> ChannelConfig:
        if self.type == "webhook" and (self.url is None or self.secret_file is None):
            raise ValueError("a webhook channel needs url and secret_file")
        if self.type == "syslog" and self.address is None:
            raise ValueError("a syslog channel needs address (host:port)")
        return self

    def takes(self, tenant: str, severity: str) -> bool:
        return (self.tenants is None or tenant in self.tenants) and _RANK[severity] <= _RANK[self.min_severity]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dashboard_url: str = "http://127.0.0.1:8501"
    channel: list[ChannelConfig] = []


@dataclass(frozen=True)
class AlertChannels:
    dashboard_url: str
    channels: tuple[ChannelConfig, ...]

    def route(self, item: Merged) -> list[tuple[str, dict[str, Any]]]:
        """The alerts a change raises: a finding opened (not a suppressed one), to every channel that takes it.
        Evidence added to an open finding updates it without a new alert."""
        record = item.record
        if not item.opened or item.quiet:
            return []
        body = alert_body(item, self.dashboard_url)
        return [(channel.name, body) for channel in self.channels if channel.takes(record.tenant, record.severity)]


def load_channels(path: Path) -> AlertChannels:
    try:
        document = tomllib.loads(path.read_text())
        parsed = _File.model_validate(document)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path}: {problems}") from exc
    names = [channel.name for channel in parsed.channel]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: channel names must be unique")
    base = path.parent
    channels = tuple(
        channel.model_copy(
            update={
                "secret_file": None if channel.secret_file is None else base / channel.secret_file,
                "ca_file": None if channel.ca_file is None else base / channel.ca_file,
            }
        )
        for channel in parsed.channel
    )
    for channel in channels:
        if channel.secret_file is not None and not channel.secret_file.is_file():
            raise ValueError(f"{path}: channel {channel.name}: secret_file {channel.secret_file} is not a file")
    return AlertChannels(parsed.dashboard_url.rstrip("/"), channels)


def alert_body(item: Merged, dashboard_url: str) -> dict[str, Any]:
    record = item.record
    shown = item.added[:100]
    return {
        "alert": "finding.opened",
        "finding_id": record.id,
        "tenant": record.tenant,
        "kind": record.kind,
        "severity": record.severity,
        "subject": record.subject,
        "title": record.title,
        "owasp": record.owasp,
        "status": record.status,
        "first_seen": record.first_seen,
        "last_seen": record.last_seen,
        "evidence": shown,
        "evidence_total": len(item.added),
        "links": {
            "finding": f"{dashboard_url}/findings?finding={record.id}&tenant={quote(record.tenant)}",
            "evidence": [f"{dashboard_url}/path?event={event_id}" for event_id in shown[:10]],
        },
        "detected_at": record.opened_at,
    }


class Dispatcher:
    """One sender thread per channel, delivering the outbox."""

    def __init__(self, store: FindingStore, channels: AlertChannels, dead_letter: Path) -> None:
        self.store, self.channels, self.dead_letter = store, channels, dead_letter
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._dead_lock = threading.Lock()

    def start(self) -> None:
        for channel in self.channels.channels:
            sender = _Webhook(channel) if channel.type == "webhook" else _Syslog(channel)
            thread = threading.Thread(target=self._run, args=(channel, sender), name=f"custody-alerts-{channel.name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self, channel: ChannelConfig, sender: _Webhook | _Syslog) -> None:
        try:
            self._deliver(channel, sender)
        finally:
            sender.close()

    def _deliver(self, channel: ChannelConfig, sender: _Webhook | _Syslog) -> None:
        while not self._stop.is_set():
            try:
                due = self.store.due(channel.name)
            except Exception:  # the store is closing or the disk failed: try again
                log.exception("alerts: cannot read the outbox")
                self._stop.wait(1.0)
                continue
            if not due:
                self._stop.wait(0.2)
                continue
            for alert_id, body, attempts, created_at in due:
                if self._stop.is_set():
                    break
                try:
                    sender.send(body)
                except Exception as exc:  # any failure of the receiver: retry later, never drop
                    error = f"{type(exc).__name__}: {exc}"
                    if time.time() - created_at > channel.max_age_hours * 3600:
                        self._bury(channel, alert_id, body, attempts + 1, error)
                    else:
                        delay = min(30.0, 2.0**attempts)
                        log.warning(
                            "alert %d to %s failed (%s); retrying in %.0f s", alert_id, channel.name, error, delay
                        )
                        self.store.retry_later(alert_id, delay, error)
                    continue
                self.store.delivered(alert_id)

    def _bury(self, channel: ChannelConfig, alert_id: int, body: str, attempts: int, error: str) -> None:
        record = {"channel": channel.name, "alert_id": alert_id, "attempts": attempts, "last_error": error,
                  "buried_at": datetime.now(UTC).isoformat(), "body": json.loads(body)}  # fmt: skip
        with self._dead_lock:
            self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
            with self.dead_letter.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        log.error("alert %d to %s given up after %d attempts (%s): in %s", alert_id, channel.name, attempts, error,
                  self.dead_letter)  # fmt: skip
        self.store.delivered(alert_id)


class _Webhook:
    def __init__(self, channel: ChannelConfig) -> None:
        assert channel.url is not None
        assert channel.secret_file is not None
        self.url = channel.url
        self.secret = channel.secret_file.read_bytes().rstrip(b"\r\n")
        self.client = httpx.Client(timeout=10.0)

    def send(self, body: str) -> None:
        payload = body.encode()
        timestamp = str(int(time.time()))
        digest = hmac.new(self.secret, timestamp.encode() + b"." + payload, hashlib.sha256).hexdigest()
        response = self.client.post(
            self.url,
            content=payload,
            headers={
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: f"sha256={digest}",
                "User-Agent": "custody-alerts/1",
            },
        )
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"HTTP {response.status_code}")

    def close(self) -> None:
        self.client.close()


class _Syslog:
    def __init__(self, channel: ChannelConfig) -> None:
        assert channel.address is not None
        host, _, port = channel.address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.context: ssl.SSLContext | None = None
        if channel.tls:
            self.context = ssl.create_default_context(cafile=str(channel.ca_file) if channel.ca_file else None)
        self.sock: socket.socket | None = None

    def send(self, body: str) -> None:
        message = syslog_message(json.loads(body))
        frame = f"{len(message)} ".encode() + message  # RFC 6587 octet counting
        for attempt in (1, 2):  # a kept connection the collector closed: reconnect once
            try:
                if self.sock is None:
                    raw = socket.create_connection((self.host, self.port), timeout=10)
                    self.sock = self.context.wrap_socket(raw, server_hostname=self.host) if self.context else raw
                self.sock.sendall(frame)
                return
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if attempt == 2:
                    raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def syslog_message(body: dict[str, Any]) -> bytes:
    """One RFC 5424 message: the finding in structured data (SD-ID custody@32473) and the whole alert as JSON."""
    priority = _FACILITY * 8 + _SYSLOG_SEVERITY.get(str(body.get("severity")), 5)
    stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = _header_field(socket.gethostname())
    params = " ".join(
        f'{name}="{_sd_value(body.get(name))}"' for name in ("finding_id", "tenant", "kind", "severity", "subject")
    )
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    header = f"<{priority}>1 {stamp} {host} custody {os.getpid()} finding [custody@32473 {params}] "
    return (
        header.encode("utf-8")
        + b"\xef\xbb\xbf"
        + text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
    )


def _sd_value(value: object) -> str:
    """A PARAM-VALUE: '"', '\\' and ']' escaped (RFC 5424 section 6.3.3); no lone surrogates."""
    text = "" if value is None else str(value)
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str) -> str:
    """A header field: printable US-ASCII without spaces, at most 255 characters, or '-'."""
    cleaned = "".join(char for char in value if 33 <= ord(char) <= 126)[:255]
    return cleaned or "-"
