const STUB = new URL("./sdk.mjs", import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  if (specifier === "openclaw" || specifier.startsWith("openclaw/plugin-sdk/")) {
    return { url: STUB, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
