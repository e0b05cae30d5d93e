import type { KeyObject } from "node:crypto";

export function canonicalize(value: unknown): Buffer;
export function eventHash(canonicalBytes: Uint8Array): string;
export function generateKey(alg?: "EdDSA" | "ES256"): KeyObject;
export function publicJwk(key: KeyObject, kid: string): Promise<Record<string, string>>;

export interface SignedEvent {
  seq: number;
  eventId: string;
  eventHash: string;
  jws: string;
}

export interface Delivery {
  acknowledged: number;
  lastError: string | null;
  blocked: string | null;
  receipts: string[];
}

export interface EmitterOptions {
  url: string;
  emitterId: string;
  tenant: string;
  privateKey: KeyObject;
  kid: string;
  spool: string;
  batchSize?: number;
  maxSpoolBytes?: number;
  maxBackoffMs?: number;
  send?: boolean;
}

export class Emitter {
  constructor(options: EmitterOptions);
  readonly delivery: Delivery;
  emit(fields: Record<string, unknown>): Promise<SignedEvent>;
  sendOnce(): Promise<boolean>;
  flush(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

export class SpoolFull extends Error {}

export class Spool {
  constructor(directory: string, options?: { maxBytes?: number; segmentBytes?: number });
  readonly head: [number, string] | null;
  close(): void;
}
