// The emitter: sign, chain and spool each event before emit resolves; a sender loop delivers the spool in batches
// with backoff, always as the same JWS, and moves the spool's cursor only past acknowledged events. The same
// guarantees as the Python SDK (docs/sdk.md).
import { generateKeyPairSync, randomUUID } from "node:crypto";
import { CompactSign, SignJWT, exportJWK } from "jose";
import { canonicalize, eventHash } from "./canonical.js";
import { Spool } from "./spool.js";

const ZERO_HASH = "0".repeat(64);
const RETRY = new Set([408, 425, 429, 500, 502, 503, 504]);

export function generateKey(alg = "EdDSA") {
  if (alg === "EdDSA") return generateKeyPairSync("ed25519").privateKey;
  if (alg === "ES256") return generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  throw new Error(`alg must be EdDSA or ES256, not ${alg}`);
}

function algOf(key) {
  return key.asymmetricKeyType === "ed25519" ? "EdDSA" : "ES256";
}

export async function publicJwk(key, kid) {
  const { d, ...jwk } = await exportJWK(key);
  return { ...jwk, kid, alg: algOf(key) };
}

export class Emitter {
  #queue = Promise.resolve();
  #stopped = false;
  #wake = null;
  #loop = null;

  constructor({ url, emitterId, tenant, privateKey, kid, spool, batchSize = 500, maxSpoolBytes, maxBackoffMs = 30000, send = true }) {
    Object.assign(this, { url: url.replace(/\/$/, ""), emitterId, tenant, privateKey, kid, batchSize, maxBackoffMs });
    this.spool = new Spool(spool, maxSpoolBytes ? { maxBytes: maxSpoolBytes } : {});
    this.head = this.spool.head;
    this.delivery = { acknowledged: 0, lastError: null, blocked: null, receipts: [] };
    if (send) this.#loop = this.#sendLoop();
  }

  // Sign the event after the chain's head and append it to the spool; resolves once it is on disk.
  emit(fields) {
    const result = this.#queue.then(() => this.#emitOne(fields));
    this.#queue = result.catch(() => {});
    return result;
  }

  async #emitOne(fields) {
    const [seq, previous] = this.head ?? (this.head = await this.#serverHead());
    const payload = {
      v: 1,
      event_id: randomUUID(),
      occurred_at: new Date().toISOString(),
      ...fields,
      emitter: this.emitterId,
      tenant: this.tenant,
      seq: seq + 1,
      prev_hash: previous,
    };
    const canonical = canonicalize(payload);
    const hash = eventHash(canonical);
    const jws = await new CompactSign(canonical).setProtectedHeader({ alg: algOf(this.privateKey), kid: this.kid }).sign(this.privateKey);
    const event = { seq: seq + 1, eventId: payload.event_id, eventHash: hash, jws };
    this.spool.append(event);
    this.head = [seq + 1, hash];
    if (this.#wake) this.#wake();
    return event;
  }

  async #serverHead() {
    const now = Math.floor(Date.now() / 1000);
    const proof = await new SignJWT({ sub: this.emitterId, aud: "custody:head", iat: now, exp: now + 120 })
      .setProtectedHeader({ alg: algOf(this.privateKey), kid: this.kid, typ: "JWT" })
      .sign(this.privateKey);
    const response = await fetch(`${this.url}/v1/emitters/${encodeURIComponent(this.emitterId)}/head`, {
      headers: { Authorization: `Bearer ${proof}` },
    });
    if (response.status === 404) return [0, ZERO_HASH];
    if (!response.ok) throw new Error(`cannot read the chain head: HTTP ${response.status} ${await response.text()}`);
    const head = await response.json();
    return [head.seq, head.hash];
  }

  async #sendLoop() {
    let backoff = 100;
    while (!this.#stopped) {
      if (this.spool.unsent.length === 0 || this.delivery.blocked) {
        await new Promise((resolve) => {
          this.#wake = resolve;
          setTimeout(resolve, this.delivery.blocked ? this.maxBackoffMs : 500);
        });
        continue;
      }
      if (await this.sendOnce()) {
        backoff = 100;
      } else {
        await new Promise((resolve) => setTimeout(resolve, backoff));
        backoff = Math.min(backoff * 2, this.maxBackoffMs);
      }
    }
  }

  // Post one batch of the spool; true when it was answered (acknowledged or rejected), false to retry.
  async sendOnce() {
    const batch = this.spool.unsent.slice(0, this.batchSize).map((entry) => entry.event);
    if (batch.length === 0) return true;
    let response;
    try {
      response = await fetch(`${this.url}/v1/events`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ events: batch.map((event) => event.jws) }),
      });
    } catch (error) {
      this.delivery.lastError = String(error.cause ?? error);
      return false;
    }
    if (RETRY.has(response.status) || response.status >= 500) {
      this.delivery.lastError = `HTTP ${response.status}: ${(await response.text()).slice(0, 200)}`;
      return false;
    }
    if (response.status !== 200) {
      this.delivery.blocked = `HTTP ${response.status}: ${(await response.text()).slice(0, 500)}`;
      return true;
    }
    const body = await response.json();
    let done = 0;
    for (const result of body.results) {
      if (result.status !== "accepted" && result.status !== "duplicate") {
        this.delivery.blocked = `event ${result.event_id} was rejected: ${result.error}: ${result.detail}; the spool keeps it and every event after it`;
        break;
      }
      done += 1;
    }
    this.spool.markSent(done);
    this.delivery.acknowledged += done;
    this.delivery.lastError = null;
    if (body.receipt) this.delivery.receipts.push(body.receipt);
    return true;
  }

  // Wait until Custody has acknowledged everything spooled (the events stay spooled on a timeout).
  async flush(timeoutMs = 60000) {
    const deadline = Date.now() + timeoutMs;
    while (this.spool.unsent.length > 0 && !this.delivery.blocked) {
      if (this.#loop === null) {
        if (!(await this.sendOnce())) throw new Error(`Custody is not reachable: ${this.delivery.lastError}`);
        continue;
      }
      if (Date.now() > deadline) {
        throw new Error(`${this.spool.unsent.length} events not acknowledged after ${timeoutMs} ms (${this.delivery.lastError}); they stay in the spool`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    if (this.delivery.blocked) throw new Error(this.delivery.blocked);
  }

  async close() {
    this.#stopped = true;
    if (this.#wake) this.#wake();
    await this.#loop;
    this.spool.close();
  }
}
