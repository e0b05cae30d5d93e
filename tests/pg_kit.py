"""A real PostgreSQL server for the tests: Debian's binaries (``.ci/setup-system`` installs them), a cluster of its
own in a temporary directory, on a free port of 127.0.0.1, stopped at the end of the session. Each test that asks
gets a database of its own (``PostgresServer.database``)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "postgres_binaries"]


def postgres_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """``initdb`` + ``postgres`` as the ``postgres`` account when run as root (PostgreSQL refuses root)."""

    def __init__(self, port: int, settings: dict[str, str] | None = None) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed: run .ci/setup-system (apt-get install postgresql)")
        self.bin = binaries
        # Its own directory in /tmp, not pytest's (which is private to root, and postgres must reach its files)
        self.root = Path(tempfile.mkdtemp(prefix="custody-pg-"))
        self.port = port
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = settings or {}

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.root.chmod(0o700)
        subprocess.run(
            self._as_owner(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", "custody", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        return self.run()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server (fast shutdown: every session ends), wait ``down_for`` seconds, start it again."""
        self.stop(remove=False)
        time.sleep(down_for)
        self.run()

    def run(self) -> PostgresServer:
        settings = [
            "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
            "-c", "max_connections=300", "-c", "shared_buffers=128MB",
        ]  # fmt: skip
        for name, value in self.settings.items():
            settings += ["-c", f"{name}={value}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self._as_owner([str(self.bin / "postgres"), "-D", str(self.data), *settings]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            try:
                with psycopg.connect(self.uri("postgres"), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")

    def uri(self, database: str) -> str:
        return f"postgresql://custody@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its connection string."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.uri("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self, *, remove: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            # fast shutdown (every session ends, the cluster stays consistent), sent to the postmaster itself: the
            # process started here may be runuser in front of it
            pid_file = self.data / "postmaster.pid"
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else self.process.pid
            os.kill(pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
