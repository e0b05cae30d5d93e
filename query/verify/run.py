"""One verification run, as the CLI, the read API and the dashboard all ask for it: the lake's events (in one of
three modes) and then the lake against the transparency log, in one report."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from query.lake import LakeReader
from query.verify.checkpoint import record_run, verify_since_checkpoint
from query.verify.integrity import verify_lake
from query.verify.log import LogCheck, verify_log
from query.verify.report import IntegrityReport
from store.ground.tlog import NoteKey

__all__ = ["Mode", "Verification", "run_verification"]

Mode = Literal["full", "incremental", "hash-chain-only"]

_WORTH_PROCESSES = 16 << 20  # bytes of lake files below which verification stays in this process


@dataclass(frozen=True)
class Verification:
    report: IntegrityReport
    checks: str  # what was checked, in words, for the OK line

    @property
    def ok(self) -> bool:
        return self.report.ok


def run_verification(
    data_dir: Path,
    mode: Mode = "full",
    *,
    log_key: NoteKey | None = None,
    trusted: str | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    log_progress: Callable[[int], None] | None = None,
) -> Verification:
    """Verify the lake in ``mode`` and against the log (``log_key`` and a ``trusted`` checkpoint when the data
    dir's own are not to be relied on); a full run is recorded for the dashboard."""
    server_key = None if log_key is None else Ed25519PublicKey.from_public_bytes(log_key.public)
    if sum(path.stat().st_size for path in LakeReader(data_dir).files()) < _WORTH_PROCESSES:
        workers = 1  # starting worker processes costs more than they save on a lake this small
    with ExitStack() as stack:
        background = None
        if workers > 1:  # the log's tree is rebuilt in a process of its own, beside the lake's checks
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
            background = pool.submit(verify_log, data_dir, log_key=log_key, trusted=trusted)
        report, checks = _lake(data_dir, mode, server_key, workers, progress)
        if background is None:
            logged = verify_log(data_dir, log_key=log_key, trusted=trusted, progress=log_progress)
        else:
            logged = background.result()
            if log_progress is not None:
                log_progress(logged.tree_size)
    report.problems += logged.problems
    report.log = logged.as_json()
    checks += _log_summary(logged)
    if mode == "full":
        record_run(data_dir, report, "full verification")
    return Verification(report, checks)


def _lake(
    data_dir: Path,
    mode: Mode,
    server_key: Ed25519PublicKey | None,
    workers: int,
    progress: Callable[[int], None] | None,
) -> tuple[IntegrityReport, str]:
    if mode == "hash-chain-only":
        from query.verify.chains import verify_chains

        report = verify_chains(data_dir, progress=progress)
        checks = "hashes, chains"
    elif mode == "incremental":
        report, how = verify_since_checkpoint(data_dir, progress=progress, server_key=server_key)
        checks = f"hashes, signatures, columns, chains; {how}"
    else:
        report = verify_lake(data_dir, progress=progress, server_key=server_key, workers=workers)
        checks = "hashes, signatures, columns, chains"
    return report, checks


def _log_summary(logged: LogCheck) -> str:
    checkpoint = logged.checkpoint
    anchor = "no checkpoint" if checkpoint is None else f"checkpoint {checkpoint.size}"
    return f"; transparency log: {logged.tree_size} leaves rebuilt, {anchor}, {logged.history} in the history"
