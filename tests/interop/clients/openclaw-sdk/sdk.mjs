// Stand-ins for the few OpenClaw SDK helpers that @openclaw/signal's HTTP client
// imports. They are generic utilities (timeouts, error text, a UUID, fetch); the
// Signal client's own logic -- its HTTP requests, its JSON-RPC handling and its
// line-based SSE parser -- is the package's real code, loaded unchanged.
import { randomUUID } from "node:crypto";

const MAX_TIMER_MS = 2 ** 31 - 1;

export function resolveTimerTimeoutMs(value, fallback) {
  const n = typeof value === "number" && Number.isFinite(value) && value > 0 ? value : fallback;
  return Math.min(Math.max(1, Math.floor(n)), MAX_TIMER_MS);
}
export const resolvePositiveTimerTimeoutMs = resolveTimerTimeoutMs;

export function parseStrictNonNegativeInteger(value) {
  const s = String(value ?? "").trim();
  return /^\d+$/.test(s) ? Number(s) : undefined;
}

export function isRecord(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

export function formatErrorMessage(err) {
  if (err instanceof Error) return err.message || err.name;
  return typeof err === "string" ? err : JSON.stringify(err) ?? String(err);
}
export const coerceErrorMessage = formatErrorMessage;

export function toErrorObject(err, fallbackMessage) {
  if (err instanceof Error) return err;
  return new Error(typeof err === "string" ? err : fallbackMessage);
}

export function resolveFetch() {
  return globalThis.fetch;
}

export function generateSecureUuid() {
  return randomUUID();
}

export function parseMediaContentLength(value) {
  return parseStrictNonNegativeInteger(value);
}

function notHere(name) {
  return () => {
    throw new Error(`${name} is not part of the Carapace interop stand-in SDK`);
  };
}
// Used only by attachment and container (signal-cli-rest-api) paths, not driven here.
export const detectMime = notHere("detectMime");
export const extractOriginalFilename = notHere("extractOriginalFilename");
export const readRegularFile = notHere("readRegularFile");
export const readResponseTextPrefix = notHere("readResponseTextPrefix");
export const readResponseWithLimit = notHere("readResponseWithLimit");
