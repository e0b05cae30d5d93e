"""The TypeScript/JavaScript SDK (sdk/js, ESM on ``jose``): node's test runner runs its tests against a real
``custody serve``; the events it delivered verify exactly like the Python SDK's (``custody verify``); ``npm pack``
makes a package a Node gateway can install. ``npm ci`` brings ``jose`` from the npm registry when it is missing."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest

from custody.cli import main
from tests.conftest import ADMIN, ADMIN_TOKEN, REPO, ServerProcess, read_lake

pytestmark = pytest.mark.slow

JS = REPO / "sdk" / "js"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed: .ci/setup-system installs them")
    if not (JS / "node_modules" / "jose").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600, capture_output=True)
    return JS / "node_modules"


def test_the_js_sdk_delivers_events_that_verify_like_the_python_sdks(tmp_path: Path, node_modules: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    env = {**os.environ, "CUSTODY_URL": server.url, "CUSTODY_ADMIN_TOKEN": ADMIN_TOKEN}
    ran = subprocess.run(["node", "--test", "test/"], cwd=JS, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert "# pass 3" in ran.stdout
    assert "# fail 0" in ran.stdout
    assert server.stop() == 0
    rows = read_lake(server.data_dir, "emitter, seq, kid")
    for emitter in ("gw-js-eddsa", "gw-js-es256"):
        assert [row[1] for row in rows if row[0] == emitter] == list(range(1, 22))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["verify", "--data-dir", str(server.data_dir), "--no-progress"]) == 0, out.getvalue()
    assert "OK: " in out.getvalue()


def test_npm_pack_makes_an_installable_package(tmp_path: Path, node_modules: Path) -> None:
    packed = subprocess.run(
        ["npm", "pack", "--pack-destination", str(tmp_path)], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert packed.returncode == 0, packed.stderr
    [tarball] = tmp_path.glob("custody-sdk-*.tgz")
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {"package/package.json", "package/src/index.js", "package/src/index.d.ts", "package/src/spool.js"} <= names
    assert not any("test/" in name or "node_modules" in name for name in names)
    consumer = tmp_path / "gateway"
    consumer.mkdir()
    (consumer / "package.json").write_text('{"name": "gateway", "version": "1.0.0", "type": "module"}')
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", str(tarball)],
        cwd=consumer,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    probe = (
        'import { Emitter, canonicalize } from "@custody/sdk";'
        " console.log(typeof Emitter, canonicalize({b: 1, a: [2]}).toString());"
    )
    used = subprocess.run(["node", "--input-type=module", "-e", probe], cwd=consumer, capture_output=True, text=True)
    assert used.stdout.strip() == 'function {"a":[2],"b":1}', used.stderr


EMITTING = """
import fs from "node:fs";
import { createPrivateKey } from "node:crypto";
import { Emitter } from "@custody/sdk";
const [url, spool, keyFile, returned, count] = process.argv.slice(1);
const privateKey = createPrivateKey(fs.readFileSync(keyFile));
const emitter = new Emitter({ url, emitterId: "gw-js-kill", tenant: "acme", privateKey, kid: "gw-js-kill-k1",
                              spool, batchSize: 50, maxBackoffMs: 500 });
const log = fs.openSync(returned, "a");
for (let n = 0; n < Number(count); n += 1) {
  const signed = await emitter.emit({ type: "tool.invocation", delegation: { sub: "u@acme.example", act: { sub: "a" } },
    credential: { id: "tok-1", kind: "agent_token", client_id: "a", scopes: ["s"] }, tool: { name: "t", server: "m" },
    decision: { result: "allow", required_scope: "s" }, outcome: "success" });
  fs.writeSync(log, signed.eventId + "\\n");  // emit resolved: the event must reach the lake
  fs.fsyncSync(log);
  await new Promise((resolve) => setTimeout(resolve, 2));
}
await emitter.flush(120000);
await emitter.close();
console.log("drained");
"""


def test_kill_9_of_the_node_emitter_and_the_server_loses_nothing_emit_resolved(
    tmp_path: Path, node_modules: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from custody_sdk import generate_key, public_jwk

    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    key = generate_key()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    httpx.put(
        f"{server.url}/v1/emitters/gw-js-kill",
        json={"tenant": "acme", "kind": "gateway", "keys": [public_jwk(key, "gw-js-kill-k1")]},
        headers=ADMIN,
    ).raise_for_status()
    spool, returned = tmp_path / "spool", tmp_path / "returned.txt"
    rng = random.Random(11)

    def start(count: int) -> subprocess.Popen[str]:
        command = ["node", "--input-type=module", "-e", EMITTING, server.url, str(spool), str(key_file), str(returned)]
        return subprocess.Popen(
            [*command, str(count)], cwd=JS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    for _ in range(4):
        emitting = start(100_000)
        time.sleep(rng.uniform(0.8, 1.6))
        victims = rng.choice(["emitter", "server", "both"])
        if victims in ("server", "both"):
            server.kill()
        time.sleep(rng.uniform(0.0, 0.4))
        emitting.send_signal(signal.SIGKILL)
        emitting.wait(timeout=30)
        assert emitting.stdout is not None
        emitting.stdout.close()
        if server.process is not None and server.process.poll() is not None:
            server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    drain = start(0)
    output, _ = drain.communicate(timeout=180)
    assert "drained" in output, output[-2000:]
    assert server.stop() == 0
    promised = returned.read_text().split()
    rows = [row for row in read_lake(tmp_path / "data", "emitter, seq, event_id") if row[0] == "gw-js-kill"]
    stored = [row[2] for row in rows]
    assert len(promised) > 100
    assert len(stored) == len(set(stored)), "an event is in the lake twice"
    assert set(promised) <= set(stored), f"{len(set(promised) - set(stored))} events emit resolved for are missing"
    assert [row[1] for row in rows] == list(range(1, len(rows) + 1)), "the chain has a gap"
