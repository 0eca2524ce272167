// The client's behaviour over a fake socket and fake timers: what it sends, what it holds,
// when it reconnects and when it stops. (Against a real node: test/live/node.live.mjs.)
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";

import { cacheKey, serialize } from "../build/cache.js";
import { RelayClient } from "../build/client.js";
import { AsyncMemoryStorage, FakeSocket, MemoryStorage, quiet, Switch } from "./fakes.mjs";

const URL_ = "ws://relay.test/v1/stream";

beforeEach(() => {
  FakeSocket.reset();
  mock.timers.enable({ apis: ["setTimeout", "Date"] });
});
afterEach(() => mock.timers.reset());

function client(extra = {}) {
  return new RelayClient({ url: URL_, key: "k1", WebSocket: FakeSocket, storage: null,
                           logger: quiet, network: null, ...extra });
}

const tick = () => new Promise((r) => setImmediate(r));

test("connects with subprotocol relay.v1 and authenticates in its first frame", () => {
  const c = client();
  const ws = FakeSocket.last();
  assert.equal(ws.protocols, "relay.v1");
  assert.equal(ws.binaryType, "arraybuffer");
  ws.open();
  assert.deepEqual(ws.sent, [{ t: "auth", key: "k1" }]);
  assert.equal(c.status, "connecting");
  c.close();
});

test("a snapshot makes it ready; deltas change flags and fire change events", async () => {
  const c = client();
  const statuses = [];
  const changes = [];
  c.on("status", (s) => statuses.push(s));
  const off = c.on("change", (e) => changes.push(e));
  const ready = c.ready(1000);
  const ws = FakeSocket.last();
  ws.open();
  ws.hello(3);
  ws.snap(3, { a: true, b: "x" });
  await ready;
  assert.equal(c.status, "ready");
  assert.equal(c.version, 3);
  assert.equal(c.get("a", false), true);
  assert.equal(c.get("missing", 42), 42);
  assert.equal(c.node, "n1");
  ws.delta(3, 4, { a: false }, ["b"]);
  assert.deepEqual(c.all(), { a: false });
  assert.deepEqual(changes.map((e) => [e.v, e.changed, e.snapshot]), [[3, ["a", "b"], true], [4, ["a", "b"], false]]);
  off();
  ws.delta(4, 5, { c: 1 });
  assert.equal(changes.length, 2, "off() stops the listener");
  assert.deepEqual(statuses, ["ready"]);
  c.close();
  assert.equal(c.status, "closed");
  assert.deepEqual(ws.closedWith, { code: 1000, reason: "client closed" });
});

test("a gap is never applied: it reconnects at once with since", () => {
  const c = client();
  let ws = FakeSocket.last();
  ws.open();
  ws.snap(3, { a: 1 });
  ws.delta(5, 6, { a: 2 });
  assert.equal(c.get("a", 0), 1);
  assert.equal(ws.closedWith.code, 4000);
  assert.equal(c.status, "reconnecting");
  mock.timers.tick(0);
  ws = FakeSocket.last();
  assert.equal(FakeSocket.all.length, 2);
  ws.open();
  assert.deepEqual(ws.sent, [{ t: "auth", key: "k1", since: 3 }]);
  ws.delta(3, 6, { a: 2 });
  assert.equal(c.get("a", 0), 2);
  assert.equal(c.status, "ready");
  c.close();
});

test("4001: closed for good, ready() rejects, no reconnect", async () => {
  const c = client();
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const ready = c.ready(5000);
  const ws = FakeSocket.last();
  ws.open();
  ws.serverClose(4001, "unknown SDK key");
  await assert.rejects(ready, /refused the SDK key \(4001 unknown SDK key\)/);
  await assert.rejects(c.ready(10), /refused/);
  assert.equal(c.status, "closed");
  assert.equal(errors.length, 1);
  mock.timers.tick(120_000);
  assert.equal(FakeSocket.all.length, 1);
});

test("goaway's retry_ms is waited for, then it resumes with since", () => {
  const c = client();
  let ws = FakeSocket.last();
  ws.open();
  ws.snap(8, { a: 1 });
  ws.frame({ t: "goaway", reason: "drain", retry_ms: 700 });
  ws.serverClose(1012, "node draining");
  assert.equal(c.status, "reconnecting");
  mock.timers.tick(699);
  assert.equal(FakeSocket.all.length, 1);
  mock.timers.tick(1);
  assert.equal(FakeSocket.all.length, 2);
  ws = FakeSocket.last();
  ws.open();
  assert.equal(ws.sent[0].since, 8);
  c.close();
});

test("failures back off with a growing, capped ceiling; a stable connection resets it", () => {
  const random = mock.method(Math, "random", () => 0.999);
  try {
    const c = client();
    const waits = [];
    for (let i = 0; i < 8; i++) {
      const before = FakeSocket.all.length;
      FakeSocket.last().serverClose(1006, "");
      let waited = 0;
      while (FakeSocket.all.length === before) {
        mock.timers.tick(1);
        waited += 1;
      }
      waits.push(waited);
    }
    assert.deepEqual(waits, [499, 999, 1998, 3996, 7992, 15984, 29970, 29970]);
    assert.equal(c.status, "connecting", "never connected yet");
    const ws = FakeSocket.last();
    ws.open();
    ws.snap(1, {});
    mock.timers.tick(10_000);  // stable
    ws.serverClose(1006, "");
    let waited = 0;
    while (FakeSocket.all.length === 9) {
      mock.timers.tick(1);
      waited += 1;
    }
    assert.equal(waited, 499, "reset after a stable connection");
    c.close();
  } finally {
    random.mock.restore();
  }
});

test("a connection that brings no flags in time is dropped and retried", () => {
  const c = client({ connectTimeoutMs: 3000 });
  FakeSocket.last().open();
  mock.timers.tick(3000);
  assert.equal(FakeSocket.all[0].closedWith.code, 4000);
  c.close();
});

test("the cache: get() at once, since = saved version, status connecting until the server answers", async () => {
  const storage = new MemoryStorage();
  storage.setItem(cacheKey(URL_, "k1"), serialize({ v: 41, env: "prod", flags: { a: { v: 40, value: "cached" } } }));
  const c = client({ storage });
  const events = [];
  c.on("change", (e) => events.push(e));  // added after the constructor: still hears the cache
  assert.equal(c.get("a", "none"), "cached");
  assert.equal(c.version, 41);
  assert.equal(c.status, "connecting");
  await Promise.resolve();
  assert.deepEqual(events, [{ v: 41, changed: ["a"], snapshot: true }]);
  const ws = FakeSocket.last();
  ws.open();
  assert.deepEqual(ws.sent, [{ t: "auth", key: "k1", since: 41 }]);
  ws.delta(41, 42, { a: "live" });
  assert.equal(c.status, "ready");
  mock.timers.tick(250);
  assert.match(storage.getItem(cacheKey(URL_, "k1")), /"v":42/);
  c.close();
});

test("an async storage (React Native): ready() resolves from it before the socket", async () => {
  const storage = new AsyncMemoryStorage();
  await storage.setItem(cacheKey(URL_, "k1"), serialize({ v: 5, env: "prod", flags: { a: { v: 5, value: 1 } } }));
  const c = client({ storage });
  assert.equal(FakeSocket.all.length, 0, "the socket waits for the cache's version");
  await c.ready(100);
  assert.equal(c.get("a", 0), 1);
  assert.equal(c.status, "connecting");
  await tick();
  assert.equal(FakeSocket.all.length, 1);
  FakeSocket.last().open();
  assert.equal(FakeSocket.last().sent[0].since, 5);
  c.close();
});

test("a broken cache is ignored", () => {
  const storage = new MemoryStorage();
  storage.setItem(cacheKey(URL_, "k1"), "{not json");
  const c = client({ storage });
  assert.equal(c.version, null);
  FakeSocket.last().open();
  assert.deepEqual(FakeSocket.last().sent[0], { t: "auth", key: "k1" });
  c.close();
});

test("pauseWhenHidden closes after that long hidden and resumes with since when visible", () => {
  const visibility = new Switch(false);
  const vis = { hidden: () => visibility.on, subscribe: (l) => visibility.subscribe(l) };
  const c = client({ pauseWhenHidden: 30, visibility: vis });
  let ws = FakeSocket.last();
  ws.open();
  ws.snap(2, { a: 1 });
  visibility.set(true);
  mock.timers.tick(29_000);
  visibility.set(false);  // back in time: nothing happens
  visibility.set(true);
  mock.timers.tick(29_999);
  assert.equal(ws.closedWith, null);
  mock.timers.tick(1);
  assert.equal(ws.closedWith.code, 1000);
  assert.equal(c.status, "reconnecting");
  mock.timers.tick(600_000);
  assert.equal(FakeSocket.all.length, 1, "no reconnect while hidden");
  visibility.set(false);
  assert.equal(FakeSocket.all.length, 2);
  ws = FakeSocket.last();
  ws.open();
  assert.equal(ws.sent[0].since, 2);
  c.close();
});

test("offline stops trying; online reconnects at once", () => {
  const network = new Switch(true);
  const net = { online: () => network.on, subscribe: (l) => network.subscribe(l) };
  const c = client({ network: net });
  const ws = FakeSocket.last();
  ws.open();
  ws.snap(9, {});
  network.set(false);
  assert.equal(ws.closedWith.code, 1000);
  assert.equal(c.status, "reconnecting");
  mock.timers.tick(120_000);
  assert.equal(FakeSocket.all.length, 1);
  network.set(true);
  assert.equal(FakeSocket.all.length, 2);
  FakeSocket.last().open();
  assert.equal(FakeSocket.last().sent[0].since, 9);
  c.close();
});

test("bad options are refused with a message", () => {
  assert.throws(() => new RelayClient({ url: "http://x/v1/stream", key: "k", WebSocket: FakeSocket }), /ws:\/\/ or wss:\/\//);
  assert.throws(() => new RelayClient({ url: URL_, key: "", WebSocket: FakeSocket }), /key/);
});

test("a frame that is not msgpack drops the connection and retries", () => {
  const c = client();
  const ws = FakeSocket.last();
  ws.open();
  ws.onmessage({ data: "text" });
  assert.equal(ws.closedWith.code, 4000);
  c.close();
});

test("closing a socket still connecting is safe with the ws package's error event", () => {
  const c = client({ connectTimeoutMs: 1000 });
  mock.timers.tick(1000);  // the connect timeout closes a socket that never opened
  assert.equal(FakeSocket.all[0].closedWith.code, 4000);
  mock.timers.tick(60_000);
  c.close();  // and so does close() on the retry's socket, still connecting
  assert.ok(FakeSocket.all.length >= 2);
});

test("a delta older than the version held is not applied either: reconnect with since", () => {
  const c = client();
  const ws = FakeSocket.last();
  ws.open();
  ws.snap(5, { a: 1 });
  ws.delta(3, 4, { a: 0 });
  assert.equal(c.get("a", -1), 1);
  assert.equal(ws.closedWith.code, 4000);
  mock.timers.tick(0);
  FakeSocket.last().open();
  assert.equal(FakeSocket.last().sent[0].since, 5);
  c.close();
});

test("a key that now reads another environment reloads: no since, a snapshot", () => {
  const storage = new MemoryStorage();
  storage.setItem(cacheKey(URL_, "k1"), serialize({ v: 9, env: "staging", flags: { a: { v: 9, value: "old" } } }));
  const c = client({ storage });
  let ws = FakeSocket.last();
  ws.open();
  assert.equal(ws.sent[0].since, 9);
  ws.hello(12, "prod");
  assert.equal(ws.closedWith.code, 4000);
  mock.timers.tick(0);
  ws = FakeSocket.last();
  ws.open();
  assert.deepEqual(ws.sent[0], { t: "auth", key: "k1" });
  ws.hello(12, "prod");
  ws.snap(12, { b: 2 });
  assert.deepEqual(c.all(), { b: 2 });
  mock.timers.tick(250);
  assert.match(storage.getItem(cacheKey(URL_, "k1")), /"env":"prod"/);
  c.close();
});

test("a frame that cannot be decoded: an error event, then a snapshot is asked for", () => {
  const c = client();
  const errors = [];
  c.on("error", (e) => errors.push(e));
  let ws = FakeSocket.last();
  ws.open();
  ws.snap(3, { a: 1 });
  // msgpack of {"t": "delta", "__proto__": 1}: @msgpack/msgpack refuses the key
  const bytes = Uint8Array.from([0x82, 0xa1, 0x74, 0xa5, ...Buffer.from("delta"), 0xa9, ...Buffer.from("__proto__"), 0x01]);
  ws.onmessage({ data: bytes.buffer });
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /could not be decoded/);
  assert.equal(c.status, "reconnecting");
  mock.timers.tick(60_000);
  ws = FakeSocket.last();
  ws.open();
  assert.deepEqual(ws.sent[0], { t: "auth", key: "k1" }, "no since: a snapshot");
  c.close();
});

test("online during a goaway's wait still waits for its retry_ms", () => {
  const network = new Switch(true);
  const net = { online: () => network.on, subscribe: (l) => network.subscribe(l) };
  const c = client({ network: net });
  const ws = FakeSocket.last();
  ws.open();
  ws.snap(1, {});
  ws.frame({ t: "goaway", reason: "limit", retry_ms: 5000 });
  ws.serverClose(4101, "limit");
  mock.timers.tick(1000);
  network.set(false);
  network.set(true);
  assert.equal(FakeSocket.all.length, 1, "not at once: the server said 5 s");
  mock.timers.tick(3999);
  assert.equal(FakeSocket.all.length, 1);
  mock.timers.tick(1);
  assert.equal(FakeSocket.all.length, 2);
  c.close();
});

test("a listener that closes the client leaves no timer behind", () => {
  const c = client({ storage: new MemoryStorage() });
  c.on("change", () => c.close());
  const ws = FakeSocket.last();
  ws.open();
  ws.snap(1, { a: 1 });
  assert.equal(c.status, "closed");
  mock.timers.tick(120_000);
  assert.equal(FakeSocket.all.length, 1);
});
