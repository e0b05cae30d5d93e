"""Witnessing (c2sp.org/tlog-witness): a minimal witness any third party can run, and the log's side that asks
witnesses to cosign each new checkpoint.

The witness (``custody witness``) knows the logs it watches by their verifier keys. ``POST /add-checkpoint`` takes
``old <size>``, the consistency proof lines, a blank line and a signed checkpoint; it checks the log's signature,
that ``old`` is the size it last cosigned for that origin and that the proof shows the new tree extends that one,
records the new checkpoint (atomically, durably, under a lock) and answers with its cosignature/v1 line. Errors are
the specification's: 400 (malformed, old > size), 403 (no valid signature by a known key), 404 (unknown origin),
409 with ``text/x.tlog.size`` (old size is not the last cosigned one), 422 (proof does not verify).

The log (``Witnessing``) submits each new checkpoint to every configured witness from the publisher thread, never
from a request: on 409 it retries once from the size the witness names. Cosignatures that verify with the
witness's key are added to ``log/checkpoint`` (the history keeps what the log itself signed). A checkpoint that
fewer than ``quorum`` witnesses cosigned is still published and logged as under quorum.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from store.ground.tlog import (
    COSIGNATURE_V1,
    Checkpoint,
    LogError,
    NoteKey,
    cosign,
    open_checkpoint,
    split_note,
    verify_consistency,
)

__all__ = ["Witness", "WitnessEndpoint", "Witnessing", "create_witness_app", "load_witness_key"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 16
TEXT = "text/plain; charset=utf-8"


class WitnessRefusal(Exception):
    def __init__(self, status: int, message: str, *, media_type: str = TEXT) -> None:
        super().__init__(message)
        self.status, self.media_type = status, media_type


def load_witness_key(path: Path) -> Ed25519PrivateKey:
    """The witness's Ed25519 key from a PEM file, created (0600) when missing."""
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return loaded
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        os.fsync(handle.fileno())
    return key


class Witness:
    """The witness's state: per origin, the size and root it last cosigned, in a JSON file."""

    def __init__(self, name: str, key: Ed25519PrivateKey, logs: Sequence[NoteKey], state: Path) -> None:
        self.name, self._key = name, key
        self.public = NoteKey.of(name, key, COSIGNATURE_V1)
        self.logs = {log_key.name: log_key for log_key in logs}
        self.state_path = state
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, object]] = orjson.loads(state.read_bytes()) if state.exists() else {}

    def add_checkpoint(self, body: bytes) -> str:
        """Check and cosign one add-checkpoint request; return the cosignature line or raise WitnessRefusal."""
        old_size, proof, note = _parse_request(body)
        try:
            text, _ = split_note(note)
        except LogError as exc:
            raise WitnessRefusal(400, f"checkpoint: {exc}") from exc
        origin = text.split("\n", 1)[0]
        log_key = self.logs.get(origin)
        if log_key is None:
            raise WitnessRefusal(404, f"unknown log {origin!r}")
        try:
            checkpoint = open_checkpoint(note, log_key)
        except LogError as exc:
            raise WitnessRefusal(403, f"checkpoint: {exc}") from exc
        if old_size > checkpoint.size:
            raise WitnessRefusal(400, f"old size {old_size} is larger than the checkpoint's {checkpoint.size}")
        with self._lock:  # the check and the update are one step: no two requests roll each other back
            known = self._state.get(origin, {"size": 0, "root": None})
            if old_size != known["size"]:
                raise WitnessRefusal(409, f"{known['size']}\n", media_type="text/x.tlog.size")
            self._check_consistency(known, checkpoint, proof)
            self._save(origin, checkpoint)
        return cosign(checkpoint.text, self.name, self._key, int(time.time()))

    def _check_consistency(self, known: dict[str, object], checkpoint: Checkpoint, proof: list[bytes]) -> None:
        old_size = int(str(known["size"]))
        if old_size == 0:
            if proof:
                raise WitnessRefusal(422, "old size 0 takes no consistency proof")
            return
        old_root = base64.b64decode(str(known["root"]))
        try:
            verify_consistency(old_size, checkpoint.size, proof, old_root, checkpoint.root)
        except LogError as exc:
            raise WitnessRefusal(422, str(exc)) from exc

    def _save(self, origin: str, checkpoint: Checkpoint) -> None:
        self._state[origin] = {"size": checkpoint.size, "root": base64.b64encode(checkpoint.root).decode()}
        temporary = self.state_path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(self._state))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.state_path)


def _parse_request(body: bytes) -> tuple[int, list[bytes], str]:
    if len(body) > MAX_REQUEST_BYTES:
        raise WitnessRefusal(400, f"request over {MAX_REQUEST_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WitnessRefusal(400, "request is not UTF-8") from exc
    head, separator, note = text.partition("\n\n")
    lines = head.split("\n")
    if not separator or not lines[0].startswith("old "):
        raise WitnessRefusal(400, "request is not 'old N', proof lines, a blank line and a checkpoint")
    size_text = lines[0][4:]
    if (
        not size_text.isdigit()
        or not size_text.isascii()
        or len(size_text) > 19
        or (size_text != "0" and size_text.startswith("0"))
    ):
        raise WitnessRefusal(400, f"old size {size_text[:20]!r} is not a decimal without leading zeroes")
    if len(lines) - 1 > 63:
        raise WitnessRefusal(400, "more than 63 consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            item = base64.b64decode(line, validate=True)
        except ValueError as exc:
            raise WitnessRefusal(400, "a consistency proof line is not base64") from exc
        if len(item) != 32:
            raise WitnessRefusal(400, "a consistency proof line is not a SHA-256 hash")
        proof.append(item)
    return int(size_text), proof, note


def create_witness_app(witness: Witness) -> FastAPI:
    app = FastAPI(title="Custody witness", version="1", description="c2sp.org/tlog-witness")

    @app.post("/add-checkpoint")
    async def add_checkpoint(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                return PlainTextResponse(f"request over {MAX_REQUEST_BYTES} bytes\n", status_code=400)
        try:
            line = witness.add_checkpoint(bytes(body))
        except WitnessRefusal as refusal:
            text = str(refusal) if str(refusal).endswith("\n") else f"{refusal}\n"
            return Response(text, status_code=refusal.status, media_type=refusal.media_type)
        return PlainTextResponse(line)

    @app.get("/")
    async def about() -> PlainTextResponse:
        return PlainTextResponse(witness.public.vkey + "\n")

    return app


@dataclass(frozen=True)
class WitnessEndpoint:
    """A witness the log submits to: its submission URL prefix and its cosignature key (a type 0x04 vkey)."""

    url: str
    key: NoteKey

    @classmethod
    def parse(cls, text: str) -> WitnessEndpoint:
        """``URL=VKEY``, as ``custody serve --witness`` takes it."""
        url, separator, vkey = text.partition("=")
        if not separator or not url.startswith(("http://", "https://")):
            raise ValueError(f"--witness takes URL=VKEY, got {text!r}")
        key = NoteKey.from_vkey(vkey)
        if key.kind != COSIGNATURE_V1:
            raise ValueError(f"witness key {key.name} is not a cosignature/v1 key (type 0x04)")
        return cls(url.rstrip("/"), key)


class Witnessing:
    """The log's side: submit checkpoints, keep the cosignatures that verify, count them against a quorum."""

    def __init__(
        self,
        witnesses: Sequence[WitnessEndpoint],
        quorum: int,
        log_key: NoteKey,
        consistency: Callable[[int, int], list[bytes]],
    ) -> None:
        if quorum > len(witnesses):
            raise ValueError(f"--witness-quorum {quorum} is more than the {len(witnesses)} witnesses configured")
        self.witnesses, self.quorum, self.log_key = list(witnesses), quorum, log_key
        self._prove = consistency  # (old size, size) -> proof hashes
        self._sizes: dict[str, tuple[int, bytes]] = {}  # witness url -> the size and root it last cosigned
        self._client = httpx.Client(timeout=5.0)

    def cosign(self, checkpoint: Checkpoint) -> list[str]:
        """Cosignature lines of the witnesses that cosigned ``checkpoint`` (each one checked)."""
        lines = []
        for witness in self.witnesses:
            try:
                line = self._submit(witness, checkpoint)
            except (httpx.HTTPError, LogError, ValueError) as exc:
                log.warning("witness %s did not cosign checkpoint %d: %s", witness.url, checkpoint.size, exc)
                continue
            lines.append(line)
        if len(lines) < self.quorum:
            log.error(
                "checkpoint %d: %d of %d witnesses cosigned, under the quorum of %d",
                checkpoint.size,
                len(lines),
                len(self.witnesses),
                self.quorum,
            )
        return lines

    def _submit(self, witness: WitnessEndpoint, checkpoint: Checkpoint) -> str:
        old_size = self._sizes.get(witness.url, (0, b""))[0]
        for _ in range(2):
            proof = [] if old_size in (0, checkpoint.size) else self._prove(old_size, checkpoint.size)
            lines = "".join(base64.b64encode(h).decode() + "\n" for h in proof)
            body = f"old {old_size}\n{lines}\n{checkpoint.note}"
            response = self._client.post(f"{witness.url}/add-checkpoint", content=body.encode())
            if response.status_code == 409 and response.text.strip().isdigit():
                old_size = int(response.text.strip())  # the witness knows a size this process has not seen
                continue
            if response.status_code != 200:
                raise ValueError(f"{response.status_code}: {response.text.strip()[:200]}")
            line = response.text if response.text.endswith("\n") else response.text + "\n"
            cosigned = open_checkpoint(checkpoint.note + line, self.log_key, [witness.key])
            if witness.key.name not in cosigned.cosigned:
                raise ValueError("its answer holds no cosignature by its key")
            self._sizes[witness.url] = (checkpoint.size, checkpoint.root)
            return line
        raise ValueError("it names a size that is not the one it names next")

    def close(self) -> None:
        self._client.close()
