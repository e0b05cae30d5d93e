export { canonicalize, eventHash } from "./canonical.js";
export { Emitter, generateKey, publicJwk } from "./emitter.js";
export { Spool, SpoolFull } from "./spool.js";
