// The npm `eventsource` package (a WHATWG EventSource for Node) reading URL until
// it has seen the event with id LAST_ID. One JSON line per observation on stdout:
// {"type": "version"|"open"|"message"|"error"|"done"|"timeout", ...}.
//
//   node eventsource_client.mjs URL LAST_ID [TIMEOUT_S]
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { EventSource } from "eventsource";

const [url, lastId, timeoutS = "30"] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const require = createRequire(import.meta.url);
const pkg = JSON.parse(readFileSync(require.resolve("eventsource/package.json"), "utf8"));
out({ type: "version", eventsource: pkg.version, node: process.version });

const timer = setTimeout(() => {
  out({ type: "timeout" });
  process.exit(1);
}, Number(timeoutS) * 1000);

const es = new EventSource(url);
es.onopen = () => out({ type: "open" });
es.onerror = (e) => out({ type: "error", message: e.message ?? null, code: e.code ?? null });
es.onmessage = (e) => {
  out({ type: "message", id: e.lastEventId, data: e.data });
  if (e.lastEventId === lastId) {
    es.close();
    clearTimeout(timer);
    out({ type: "done" });
  }
};
