// The durable spool: every signed event is on disk (fdatasync) before emit resolves, until Custody acknowledges
// it. The same layout as the Python SDK's: numbered segment files of frames <u32 LE length><u32 LE crc32(body)>
// <body>, body = JSON [seq, event_id, event_hash, jws], and cursor.json naming the first unacknowledged record.
// Opening cuts a torn last record and reloads the unacknowledged records and the chain head. maxBytes bounds the
// events Custody has not acknowledged; on disk a spool takes at most that plus one segment of acknowledged events.
import fs from "node:fs";
import path from "node:path";
import { crc32 } from "node:zlib";

const SUFFIX = ".seg";

export class SpoolFull extends Error {}

export class Spool {
  constructor(directory, { maxBytes = 1 << 30, segmentBytes } = {}) {
    this.directory = directory;
    this.maxBytes = maxBytes;
    this.segmentBytes = segmentBytes ?? Math.min(16 << 20, Math.max(64 << 10, Math.floor(maxBytes / 8)));
    fs.mkdirSync(directory, { recursive: true, mode: 0o700 });
    this.unsent = []; // {event, segment, offset, size}
    this.head = null; // [seq, eventHash]
    this.held = 0; // bytes of segment files on disk
    this.owed = 0; // bytes of the events Custody has not acknowledged: what maxBytes bounds
    this.#recover();
  }

  #segments() {
    return fs
      .readdirSync(this.directory)
      .filter((name) => name.endsWith(SUFFIX) && /^\d+$/.test(name.slice(0, -SUFFIX.length)))
      .map((name) => Number(name.slice(0, -SUFFIX.length)))
      .sort((a, b) => a - b);
  }

  #path(number) {
    return path.join(this.directory, `${String(number).padStart(12, "0")}${SUFFIX}`);
  }

  #recover() {
    let cursor = [0, 0];
    try {
      const saved = JSON.parse(fs.readFileSync(path.join(this.directory, "cursor.json"), "utf8"));
      cursor = [saved.segment, saved.offset];
    } catch (error) {
      if (error.code !== "ENOENT") throw error;
    }
    const segments = this.#segments();
    for (const number of segments) {
      const data = fs.readFileSync(this.#path(number));
      let offset = 0;
      while (offset + 8 <= data.length) {
        const length = data.readUInt32LE(offset);
        const crc = data.readUInt32LE(offset + 4);
        const body = data.subarray(offset + 8, offset + 8 + length);
        if (body.length < length || crc32(body) !== crc) break;
        const [seq, eventId, eventHash, jws] = JSON.parse(body.toString("utf8"));
        offset += 8 + length;
        this.head = [seq, eventHash];
        if (number > cursor[0] || (number === cursor[0] && offset > cursor[1])) {
          this.unsent.push({ event: { seq, eventId, eventHash, jws }, segment: number, offset, size: 8 + length });
          this.owed += 8 + length;
        }
      }
      if (offset < data.length) {
        if (number !== segments.at(-1)) throw new Error(`spool segment ${this.#path(number)} is damaged`);
        const fd = fs.openSync(this.#path(number), "r+");
        fs.ftruncateSync(fd, offset); // a torn append: emit never resolved for it
        fs.fsyncSync(fd);
        fs.closeSync(fd);
      }
      this.held += Math.min(offset, data.length);
    }
    this.active = segments.at(-1) ?? 1;
    this.fd = fs.openSync(this.#path(this.active), "a", 0o600);
    this.size = fs.fstatSync(this.fd).size;
  }

  append(event) {
    const body = Buffer.from(JSON.stringify([event.seq, event.eventId, event.eventHash, event.jws]), "utf8");
    const frame = Buffer.alloc(8 + body.length);
    frame.writeUInt32LE(body.length, 0);
    frame.writeUInt32LE(crc32(body), 4);
    body.copy(frame, 8);
    if (this.owed + frame.length > this.maxBytes) {
      throw new SpoolFull(`the spool ${this.directory} holds ${this.owed} bytes Custody has not acknowledged`);
    }
    if (this.size + frame.length > this.segmentBytes && this.size > 0) {
      fs.fdatasyncSync(this.fd);
      fs.closeSync(this.fd);
      this.active += 1;
      this.fd = fs.openSync(this.#path(this.active), "a", 0o600);
      this.size = 0;
    }
    fs.writeSync(this.fd, frame);
    fs.fdatasyncSync(this.fd);
    this.size += frame.length;
    this.held += frame.length;
    this.owed += frame.length;
    this.unsent.push({ event, segment: this.active, offset: this.size, size: frame.length });
    this.head = [event.seq, event.eventHash];
  }

  markSent(count) {
    if (count <= 0) return;
    const acknowledged = this.unsent.splice(0, count);
    for (const record of acknowledged) this.owed -= record.size;
    const last = acknowledged.at(-1);
    const temporary = path.join(this.directory, "cursor.tmp");
    const fd = fs.openSync(temporary, "w", 0o600);
    fs.writeSync(fd, JSON.stringify({ segment: last.segment, offset: last.offset }));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(temporary, path.join(this.directory, "cursor.json"));
    for (const number of this.#segments()) {
      if (number < last.segment) {
        this.held -= fs.statSync(this.#path(number)).size;
        fs.unlinkSync(this.#path(number));
      }
    }
  }

  close() {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }
}
