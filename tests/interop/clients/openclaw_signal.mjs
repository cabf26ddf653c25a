// OpenClaw's Signal channel (npm @openclaw/signal) talking to signal-cli through
// a Carapace agent: the package's own HTTP client -- the signalCheck,
// signalRpcRequest and streamSignalEvents that its probe, send and monitor code
// call -- driven against BASE_URL. One JSON line per observation on stdout.
//
//   node --import ./openclaw-sdk/register.mjs openclaw_signal.mjs BASE_URL ACCOUNT EVENTS
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const [baseUrl, account, eventsArg = "5"] = process.argv.slice(2);
const wanted = Number(eventsArg);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");

// The package bundles its modules into hashed chunks with minified export names;
// find the client adapter by what it is and its functions by their own names.
const require = createRequire(import.meta.url);
const pkgJson = require.resolve("@openclaw/signal/package.json");
const pkg = JSON.parse(readFileSync(pkgJson, "utf8"));
const chunks = join(dirname(pkgJson), "dist", ".setup");
const adapter = readdirSync(chunks).find(
  (f) => f.startsWith("client-adapter") && f.endsWith(".mjs"),
);
if (!adapter) throw new Error(`no client-adapter chunk in ${chunks}`);
const mod = await import(pathToFileURL(join(chunks, adapter)).href);
const fns = Object.fromEntries(
  Object.values(mod).filter((v) => typeof v === "function").map((f) => [f.name, f]),
);
const { signalCheck, signalRpcRequest, streamSignalEvents } = fns;
if (!signalCheck || !signalRpcRequest || !streamSignalEvents) {
  throw new Error(`unexpected exports in ${adapter}: ${Object.keys(fns)}`);
}
out({ type: "version", package: pkg.name, version: pkg.version, chunk: adapter, node: process.version });

const transport = { transportKind: "external-native" };
const rpc = async (method, params) => {
  try {
    const result = await signalRpcRequest(method, params, { baseUrl, timeoutMs: 10000, ...transport });
    out({ type: "rpc", method, result: result ?? null });
  } catch (err) {
    out({ type: "rpc_error", method, message: String(err?.message ?? err) });
  }
};

// 1. The health probe the channel runs before it starts.
out({ type: "check", ...(await signalCheck(baseUrl, 5000, transport)) });
// 2. JSON-RPC calls as the probe and the send path make them.
await rpc("version", undefined);
await rpc("send", { account, recipient: ["+15550100"], message: "hello from OpenClaw" });
await rpc("send", { account, recipient: ["+15550100", "+447700900123"], message: "smuggled" });
await rpc("listAccounts", undefined);

// 3. The monitor's event stream, read twice (the monitor reconnects after a
//    stream ends or fails); each time stop after `wanted` events.
for (let round = 1; round <= 2; round++) {
  const controller = new AbortController();
  let n = 0;
  try {
    await streamSignalEvents({
      baseUrl,
      account,
      abortSignal: controller.signal,
      timeoutMs: 10000,
      ...transport,
      onStreamOpen: () => out({ type: "open", round }),
      onEvent: async (event) => {
        out({ type: "message", round, id: event.id ?? null, event: event.event ?? null, data: event.data ?? null });
        if (++n >= wanted) controller.abort();
      },
    });
    out({ type: "stream_end", round });
  } catch (err) {
    out({ type: err?.name === "AbortError" ? "aborted" : "stream_error", round, message: String(err?.message ?? err) });
  }
}
out({ type: "done" });
