// node --test: the canonical bytes against the JCS vectors, the spool's recovery, and, when CUSTODY_URL and
// CUSTODY_ADMIN_TOKEN name a running custody serve (tests/test_sdk_js.py starts one), delivery through the spool
// with the chain resumed by a second emitter on the same spool.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { Emitter, Spool, SpoolFull, canonicalize, eventHash, generateKey, publicJwk } from "../src/index.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const vectors = JSON.parse(
  fs.readFileSync(path.join(here, "..", "..", "..", "tests", "vectors", "jcs", "canonicalization_vectors.json"), "utf8"),
);

function hasNonInteger(value) {
  if (typeof value === "number") return !(Number.isInteger(value) && Math.abs(value) <= 2 ** 53) || Object.is(value, -0);
  if (Array.isArray(value)) return value.some(hasNonInteger);
  if (value && typeof value === "object") return Object.values(value).some(hasNonInteger);
  return false;
}

test("canonical bytes equal the RFC 8785 vectors, and fractions are refused", () => {
  let accepted = 0;
  let refused = 0;
  for (const vector of vectors.canonicalization_vectors) {
    const input = vector.name === "number_negative_zero" ? -0 : vector.input;
    if (hasNonInteger(input)) {
      assert.throws(() => canonicalize(input), /integers/);
      refused += 1;
    } else {
      assert.equal(canonicalize(input).toString("utf8"), vector.canonical, vector.name);
      accepted += 1;
    }
  }
  assert.ok(accepted >= 20 && refused >= 8);
  assert.equal(canonicalize({ outer: [{ "\u{1F389}": 1, "\uE000": 2, a: 3 }] }).toString(), '{"outer":[{"a":3,"\u{1F389}":1,"\uE000":2}]}');
  assert.throws(() => canonicalize({ a: "\uD800" }), /lone surrogate/);
});

test("a torn append is cut and the spool resumes its head and its unsent events", () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "custody-js-spool-"));
  const spool = new Spool(directory);
  for (let seq = 1; seq <= 3; seq += 1) spool.append({ seq, eventId: `id-${seq}`, eventHash: "ab".repeat(32), jws: "h.p.s" });
  spool.markSent(1);
  spool.close();
  const [segment] = fs.readdirSync(directory).filter((name) => name.endsWith(".seg"));
  const whole = fs.readFileSync(path.join(directory, segment));
  fs.writeFileSync(path.join(directory, segment), Buffer.concat([whole, whole.subarray(0, 9)]));
  const reopened = new Spool(directory);
  assert.deepEqual(reopened.head, [3, "ab".repeat(32)]);
  assert.deepEqual(reopened.unsent.map((entry) => entry.event.seq), [2, 3]);
  assert.equal(fs.readFileSync(path.join(directory, segment)).length, whole.length);
  const small = new Spool(fs.mkdtempSync(path.join(os.tmpdir(), "custody-js-small-")), { maxBytes: 100 });
  assert.throws(() => {
    for (let seq = 1; seq < 10; seq += 1) small.append({ seq, eventId: "x", eventHash: "ab".repeat(32), jws: "h.p.s" });
  }, SpoolFull);
  // The bound is on what Custody has not acknowledged: once it acknowledges, there is room again.
  small.markSent(small.unsent.length);
  assert.equal(small.owed, 0);
  small.append({ seq: 99, eventId: "x", eventHash: "ab".repeat(32), jws: "h.p.s" });
});

const url = process.env.CUSTODY_URL;
const admin = process.env.CUSTODY_ADMIN_TOKEN;

test("events reach a real custody serve through the spool, and a restart continues the chain", { skip: !url && "no CUSTODY_URL" }, async () => {
  for (const alg of ["EdDSA", "ES256"]) {
    const emitterId = `gw-js-${alg.toLowerCase()}`;
    const key = generateKey(alg);
    const kid = `${emitterId}-k1`;
    const registered = await fetch(`${url}/v1/emitters/${emitterId}`, {
      method: "PUT",
      headers: { Authorization: `Bearer ${admin}`, "Content-Type": "application/json" },
      body: JSON.stringify({ tenant: "acme", kind: "gateway", keys: [await publicJwk(key, kid)] }),
    });
    assert.equal(registered.status, 200, await registered.text());
    const spool = fs.mkdtempSync(path.join(os.tmpdir(), "custody-js-"));
    const fields = {
      type: "tool.invocation",
      delegation: { sub: "alice@acme.example", act: { sub: "node-agent" } },
      credential: { id: "tok-js", kind: "agent_token", client_id: "node-agent", scopes: ["tickets:read"] },
      tool: { name: "read_ticket", server: "helpdesk-mcp" },
      resource: { type: "ticket", id: "T-7", tenant: "acme" },
      decision: { result: "allow", required_scope: "tickets:read", policy: "p1" },
      outcome: "success",
      attrs: { region: "eu", "\u{1F389}": "party", attempt: 2 },
    };
    const first = new Emitter({ url, emitterId, tenant: "acme", privateKey: key, kid, spool, batchSize: 7 });
    const signed = [];
    for (let n = 0; n < 20; n += 1) signed.push(await first.emit({ ...fields, trace_id: `t-${n}` }));
    assert.equal(signed[0].eventHash, eventHash(Buffer.from(Buffer.from(signed[0].jws.split(".")[1], "base64url"))));
    await first.flush(30000);
    await first.close();
    const again = new Emitter({ url, emitterId, tenant: "acme", privateKey: key, kid, spool });
    const next = await again.emit(fields);
    assert.equal(next.seq, 21);
    await again.flush(30000);
    await again.close();
    assert.equal(first.delivery.acknowledged + again.delivery.acknowledged, 21);
    assert.ok(first.delivery.receipts.length >= 3);
    const head = await (await fetch(`${url}/v1/emitters/${emitterId}/head`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.deepEqual(head, { seq: 21, hash: next.eventHash });
  }
});
