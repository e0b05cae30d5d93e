"""An S3-compatible server for the tests: moto's server mode in a process of its own on 127.0.0.1 (dev
dependency ``moto[server]``), with the standard AWS environment pointing at it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pyarrow.fs as pafs

__all__ = ["S3Server"]


class S3Server:
    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        # What pyarrow's S3 filesystem (the AWS SDK's credential chain) reads, in this process and in the
        # `custody` processes the tests start.
        self.environment = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "custody-test",
            "AWS_SECRET_ACCESS_KEY": "custody-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto exited: {self.log.read_text()[-2000:]}")
            try:
                httpx.get(self.endpoint, timeout=1)
                os.environ.update(self.environment)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("moto did not start")

    def bucket(self) -> str:
        """A new, empty bucket; the s3:// URI of a prefix in it."""
        name = f"custody-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}/lake"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
