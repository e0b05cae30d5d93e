"""The TypeScript/JavaScript SDK (sdk/js, ESM on ``jose``): node's test runner runs its tests against a real
``custody serve``; the events it delivered verify exactly like the Python SDK's (``custody verify``); ``npm pack``
makes a package a Node gateway can install. ``npm ci`` brings ``jose`` from the npm registry when it is missing."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from custody.cli import main
from tests.conftest import ADMIN_TOKEN, REPO, ServerProcess, read_lake
from tests.test_sdk_spool import kill_rounds

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
    def command(url: str, spool: Path, key_file: Path, returned: Path, count: int) -> list[str]:
        return [
            "node",
            "--input-type=module",
            "-e",
            EMITTING,
            url,
            str(spool),
            str(key_file),
            str(returned),
            str(count),
        ]

    kill_rounds(tmp_path, "gw-js-kill", command, cwd=JS, rounds=4, seed=11, at_least=100)
