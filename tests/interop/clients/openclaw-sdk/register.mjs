// node --import ./openclaw-sdk/register.mjs ...: resolve `openclaw/plugin-sdk/*`
// (the OpenClaw host's SDK, an optional peer dependency of @openclaw/signal that
// only the full OpenClaw application provides) to the small stand-in in sdk.mjs.
import { register } from "node:module";

register("./hooks.mjs", import.meta.url);
