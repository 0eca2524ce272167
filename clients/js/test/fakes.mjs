// Test doubles for the unit tests: a WebSocket the test drives by hand, and storages.
import { decode, encode } from "@msgpack/msgpack";

export class FakeSocket {
  static all = [];
  binaryType = "blob";
  readyState = 0;
  protocol = "";
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  static reset() {
    FakeSocket.all = [];
  }

  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }

  send(data) {
    this.sent.push(decode(data));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
    const wasConnecting = this.readyState === 0;
    this.readyState = 3;
    if (wasConnecting) {
      // As the `ws` package does: an error event, which must have a listener (an
      // EventEmitter's unheard 'error' throws, and ends a Node process).
      if (typeof this.onerror !== "function") throw new Error("unheard error event");
      this.onerror({ message: "WebSocket was closed before the connection was established" });
    }
  }

  // --- what the server does ---
  open() {
    this.readyState = 1;
    this.protocol = "relay.v1";
    this.onopen?.({});
  }

  frame(obj) {
    const bytes = encode(obj);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }

  hello(v, env = "prod", node = "n1") {
    this.frame({ t: "hello", proto: 1, env, node, v });
  }

  snap(v, values) {
    const flags = {};
    for (const [k, value] of Object.entries(values)) flags[k] = { v, value };
    this.frame({ t: "snap", v, flags });
  }

  delta(base, v, put = {}, del = []) {
    const p = {};
    for (const [k, value] of Object.entries(put)) p[k] = { v, value };
    const d = {};
    for (const k of del) d[k] = v;
    this.frame({ t: "delta", base, v, put: p, del: d });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
}

/** As React Native's AsyncStorage: every call is a promise. */
export class AsyncMemoryStorage extends MemoryStorage {
  async getItem(k) {
    return super.getItem(k);
  }
  async setItem(k, v) {
    super.setItem(k, v);
  }
}

/** A page's visibility or a device's network, switched by the test. */
export class Switch {
  constructor(on) {
    this.on = on;
    this.listeners = new Set();
  }
  set(on) {
    this.on = on;
    for (const l of this.listeners) l();
  }
  subscribe(l) {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
}

export const quiet = { warn() {}, debug() {} };
