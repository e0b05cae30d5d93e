// RFC 8785 (JCS) canonical JSON for Custody events, and the event hash. Events carry integers only: a number that
// is not a safe integer is refused, as the server refuses it. JCS is defined by ECMAScript's JSON.stringify, so
// strings are written by it, and object keys are sorted by UTF-16 code units, which is what Array#sort does.
import { createHash } from "node:crypto";

const MAX_SAFE = 2 ** 53;

export function canonicalize(value) {
  return Buffer.from(text(value, "$"), "utf8");
}

export function eventHash(canonicalBytes) {
  return createHash("sha256").update(canonicalBytes).digest("hex");
}

function text(value, path) {
  if (value === null || typeof value === "boolean") return JSON.stringify(value);
  if (typeof value === "string") {
    if (!value.isWellFormed()) throw new Error(`${path}: string holds a lone surrogate`);
    return JSON.stringify(value);
  }
  if (typeof value === "number") {
    if (!Number.isInteger(value) || Math.abs(value) > MAX_SAFE || Object.is(value, -0)) {
      throw new Error(`${path}: numbers must be integers within +/-2**53, got ${value}`);
    }
    return String(value);
  }
  if (Array.isArray(value)) return `[${value.map((item, i) => text(item, `${path}[${i}]`)).join(",")}]`;
  if (typeof value === "object") {
    const keys = Object.keys(value).filter((key) => value[key] !== undefined).sort();
    return `{${keys.map((key) => `${text(key, path)}:${text(value[key], `${path}.${key}`)}`).join(",")}}`;
  }
  throw new Error(`${path}: ${typeof value} is not a JSON value`);
}
