// The client on Node against a real relay node, which the Python test that runs this file
// (tests/system/test_js_client.py) has started: RELAY_WS_URL, RELAY_ADMIN_URL and
// RELAY_ADMIN_TOKEN say where. The `ws` package is the WebSocket; an in-memory async storage
// stands in for React Native's AsyncStorage.
import assert from "node:assert/strict";
import { test } from "node:test";

import { OpenFeature, ProviderEvents } from "@openfeature/web-sdk";
import WebSocket from "ws";

import { RelayClient, RelayWebProvider } from "../../dist/relay.js";
import { AsyncMemoryStorage } from "../fakes.mjs";

const WS_URL = process.env.RELAY_WS_URL;
const ADMIN = process.env.RELAY_ADMIN_URL;
const TOKEN = process.env.RELAY_ADMIN_TOKEN;
assert.ok(WS_URL && ADMIN && TOKEN, "run by tests/system/test_js_client.py");

async function admin(method, path, body) {
  const resp = await fetch(`${ADMIN}${path}`, {
    method, headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json();
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${JSON.stringify(data)}`);
  return data;
}

const publish = (env, put, del = []) => admin("PATCH", `/admin/v1/envs/${env}/flags`, { put, del });

function until(predicate, what, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      if (predicate()) return resolve();
      if (Date.now() - started > timeoutMs) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(poll, 10);
    };
    poll();
  });
}

const quiet = { warn() {} };

test("live: snapshot, 300 changes in order, the exact final state", async () => {
  await admin("PUT", "/admin/v1/envs/js-live", { keys: ["js-live-key"] });
  await publish("js-live", { greeting: "hi", n: 0 });
  const client = new RelayClient({ url: WS_URL, key: "js-live-key", WebSocket, storage: null, logger: quiet });
  const events = [];
  client.on("change", (e) => events.push(e));
  await client.ready(10_000);
  assert.equal(client.status, "ready");
  assert.equal(client.get("greeting", ""), "hi");
  assert.equal(client.env, "js-live");
  let last = 0;
  for (let i = 1; i <= 300; i++) last = (await publish("js-live", { n: i, [`k${i % 7}`]: i }, i % 50 === 0 ? ["greeting"] : [])).v;
  await until(() => client.version === last, `v${last}`);
  const versions = events.map((e) => e.v);
  assert.deepEqual(versions, [...versions].sort((a, b) => a - b), "in order");
  assert.equal(new Set(versions).size, versions.length, "no version twice");
  const server = await admin("GET", "/admin/v1/envs/js-live/flags");
  assert.equal(server.v, last);
  const want = Object.fromEntries(Object.entries(server.flags).map(([k, e]) => [k, e.value]));
  assert.deepEqual(client.all(), want);
  assert.equal(client.get("greeting", "gone"), "gone");
  client.close();
  assert.equal(client.status, "closed");
});

test("live: an async storage serves the flags at once and the restart joins with a delta", async () => {
  await admin("PUT", "/admin/v1/envs/js-cache", { keys: ["js-cache-key"] });
  await publish("js-cache", { color: "blue" });
  const storage = new AsyncMemoryStorage();
  const first = new RelayClient({ url: WS_URL, key: "js-cache-key", WebSocket, storage, logger: quiet });
  await first.ready(10_000);
  const v1 = first.version;
  first.close();  // saves
  const { v: v2 } = await publish("js-cache", { color: "green" });
  const second = new RelayClient({ url: WS_URL, key: "js-cache-key", WebSocket, storage, logger: quiet });
  const events = [];
  second.on("change", (e) => events.push(e));
  await second.ready(10_000);
  assert.equal(second.get("color", ""), "blue", "the cache, before the server answers");
  assert.equal(second.version, v1);
  assert.equal(second.status, "connecting");
  await until(() => second.version === v2, "the delta join");
  assert.equal(second.get("color", ""), "green");
  assert.deepEqual(events.map((e) => e.snapshot), [true, false], "cache, then a delta (not a snapshot)");
  second.close();
});

test("live: a revoked key closes the client for good", async () => {
  await admin("PUT", "/admin/v1/envs/js-revoke", { keys: ["js-revoke-key"] });
  const client = new RelayClient({ url: WS_URL, key: "js-revoke-key", WebSocket, storage: null, logger: quiet });
  await client.ready(10_000);
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  await admin("PUT", "/admin/v1/envs/js-revoke", { keys: ["another-key"] });
  await until(() => client.status === "closed", "closed");
  assert.match(client.error.message, /refused the SDK key \(4001/);
  assert.deepEqual(statuses, ["closed"]);
  const unknown = new RelayClient({ url: WS_URL, key: "no-such-key", WebSocket, storage: null, logger: quiet });
  await assert.rejects(unknown.ready(10_000), /refused the SDK key/);
  assert.equal(unknown.status, "closed");
});

test("live: the OpenFeature web provider", async () => {
  await admin("PUT", "/admin/v1/envs/js-of", { keys: ["js-of-key"] });
  await publish("js-of", { "new-checkout": true, banner: "hello", limit: 3, theme: { dark: true } });
  const provider = new RelayWebProvider({ url: WS_URL, key: "js-of-key", WebSocket, storage: null, logger: quiet });
  await OpenFeature.setProviderAndWait(provider);
  const of = OpenFeature.getClient();
  assert.equal(of.getBooleanValue("new-checkout", false), true);
  assert.equal(of.getStringValue("banner", ""), "hello");
  assert.equal(of.getNumberValue("limit", 0), 3);
  assert.deepEqual(of.getObjectValue("theme", {}), { dark: true });
  const mismatch = of.getBooleanDetails("banner", false);
  assert.equal(mismatch.value, false);
  assert.equal(mismatch.errorCode, "TYPE_MISMATCH");
  const missing = of.getStringDetails("nope", "dflt");
  assert.equal(missing.value, "dflt");
  assert.equal(missing.errorCode, "FLAG_NOT_FOUND");
  const changed = new Promise((resolve) => of.addHandler(ProviderEvents.ConfigurationChanged, resolve));
  await publish("js-of", { banner: "bye" });
  const details = await changed;
  assert.deepEqual(details.flagsChanged, ["banner"]);
  assert.equal(of.getStringValue("banner", ""), "bye");
  await OpenFeature.close();
  assert.equal(provider.client.status, "closed");
});

test("live: a refused key leaves the OpenFeature provider FATAL, defaults served", async () => {
  const provider = new RelayWebProvider({ url: WS_URL, key: "not-a-key", WebSocket, storage: null,
                                          logger: quiet, readyTimeoutMs: 10_000 });
  await assert.rejects(OpenFeature.setProviderAndWait("refused", provider), /refused the SDK key/);
  const of = OpenFeature.getClient("refused");
  assert.equal(of.providerStatus, "FATAL");
  const details = of.getBooleanDetails("anything", true);
  assert.equal(details.value, true);
  assert.equal(details.errorCode, "PROVIDER_FATAL");
  await OpenFeature.close();
});
