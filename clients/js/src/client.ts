/**
 * RelayClient: live feature flags from a relay node over one WebSocket (protocol relay.v1).
 *
 * It authenticates with its first frame (browsers cannot set headers on a WebSocket), applies
 * `snap` and `delta` frames by the rules of docs/protocol.md, and reconnects with `since` =
 * the version it holds, so a reconnect costs a delta rather than a snapshot. The rules it
 * follows (close codes, backoff, gaps, the cache) live in small pure modules beside it.
 */

import { decode, encode } from "@msgpack/msgpack";

import { cacheKey, parseSaved, serialize, type StorageLike } from "./cache.js";
import { type DeltaFrame, FlagSet, type SnapFrame } from "./flags.js";
import { Backoff, CLOSE, decideClose, RelayRefusedError } from "./policy.js";

export type Status = "connecting" | "ready" | "reconnecting" | "closed";

export interface ChangeEvent {
  /** The environment version now held. */
  v: number;
  /** The keys put or deleted (for a snapshot: those whose value differs from before). */
  changed: string[];
  /** True when a snapshot replaced the flags held (a first connect, or history ran out). */
  snapshot: boolean;
}

export interface Logger {
  debug?(message: string): void;
  info?(message: string): void;
  warn?(message: string): void;
  error?(message: string): void;
}

/** The parts of the WebSocket API the client uses (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  readonly protocol: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Where the page's (or app's) visibility comes from: `document` in browsers; for React
 * Native, wrap AppState (README). */
export interface VisibilitySource {
  hidden(): boolean;
  /** Call `listener` on every change; returns a function that stops it. */
  subscribe(listener: () => void): () => void;
}

/** Where connectivity comes from: the browser's `online`/`offline` events by default. */
export interface NetworkSource {
  online(): boolean;
  subscribe(listener: () => void): () => void;
}

export interface RelayClientOptions {
  /** ws:// or wss:// URL of a node's stream, e.g. "wss://flags.example.com/v1/stream". */
  url: string;
  /** The environment's SDK key. */
  key: string;
  /** A WebSocket implementation (Node < 22: the `ws` package); the global one by default. */
  WebSocket?: WebSocketConstructor;
  /** Where to keep the flags between runs; `localStorage` in browsers by default, `null`: none. */
  storage?: StorageLike | null;
  /** Close the socket once the page has been hidden this many seconds, and resume (with
   * `since`) when it is visible again. Default: keep the socket. */
  pauseWhenHidden?: number;
  logger?: Logger;
  /** Backoff of failed connections: first ceiling and cap, in ms (500 and 30,000). */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** A connection that has held this long resets the backoff (ms, 10,000). */
  stableAfterMs?: number;
  /** A connection that has not received its first flags in this long is dropped (ms, 15,000). */
  connectTimeoutMs?: number;
  visibility?: VisibilitySource | null;
  network?: NetworkSource | null;
}

type Listener<T> = (value: T) => void;
interface EventMap {
  change: ChangeEvent;
  status: Status;
  error: Error;
}

const SAVE_EVERY_MS = 250;

export class RelayClient {
  /** Where the connection is: "connecting" (never held a live connection, or still loading),
   * "ready" (a live connection holds the flags), "reconnecting", "closed" (for good). */
  status: Status = "connecting";
  /** The node that served the current connection (its `hello`), or null. */
  node: string | null = null;
  /** The environment the key names (from `hello`), or null. */
  env: string | null = null;
  /** Why the client stopped, when it stopped on its own (a refused key). */
  error: Error | null = null;

  private readonly opts: Required<Pick<RelayClientOptions, "url" | "key">> & RelayClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly storage: StorageLike | null;
  private readonly log: Logger;
  private readonly flags = new FlagSet();
  private readonly backoff: Backoff;
  private readonly listeners: { [K in keyof EventMap]: Set<Listener<EventMap[K]>> } = {
    change: new Set(), status: new Set(), error: new Set(),
  };
  private readonly readyWaiters = new Set<{ resolve(): void; reject(e: Error): void }>();
  private readonly unsubscribe: (() => void)[] = [];

  private ws: WebSocketLike | null = null;
  private goawayRetryMs: number | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private stableTimer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private hideTimer: ReturnType<typeof setTimeout> | null = null;
  private saveTimer: ReturnType<typeof setTimeout> | null = null;
  private paused = false;  // closed on purpose while hidden
  private offline = false;
  private loaded = false;  // the cache has been read (or there is none)
  private closed = false;
  private readonly storageKey: string;
  private everLive = false;  // a connection has held flags: later ones are "reconnecting"

  constructor(options: RelayClientOptions) {
    if (typeof options?.url !== "string" || !/^wss?:\/\//i.test(options.url)) {
      throw new TypeError(`RelayClient: url must be a ws:// or wss:// URL, got ${String(options?.url)}`);
    }
    if (typeof options.key !== "string" || options.key === "") {
      throw new TypeError("RelayClient: key (the SDK key) is required");
    }
    this.opts = options;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new TypeError("RelayClient: no WebSocket here; pass one (e.g. the ws package) as `WebSocket`");
    }
    this.WS = WS;
    this.log = options.logger ?? { warn: (m) => console.warn(`relay: ${m}`) };
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.storageKey = cacheKey(options.url, options.key);
    this.backoff = new Backoff(options.backoffBaseMs ?? 500, options.backoffMaxMs ?? 30_000);
    this.watchEnvironment();
    this.start();
  }

  /** The environment version held (from the server or the cache), or null. */
  get version(): number | null {
    return this.flags.version;
  }

  /** A flag's value, or `fallback` when the flag is absent. */
  get<T = unknown>(key: string, fallback: T): T {
    const entry = this.flags.get(key);
    return entry === undefined ? fallback : (entry.value as T);
  }

  /** Every flag's value, `{ key: value }`. */
  all(): Record<string, unknown> {
    return this.flags.values();
  }

  /** Resolves once the client holds flags (from the server or the cache). Rejects after
   * `timeoutMs`, when the key is refused, or when the client is closed first. */
  ready(timeoutMs = 10_000): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.flags.version !== null) return Promise.resolve();
    if (this.closed) return Promise.reject(new Error("RelayClient: closed"));
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        resolve: () => { clearTimeout(timer); this.readyWaiters.delete(waiter); resolve(); },
        reject: (e: Error) => { clearTimeout(timer); this.readyWaiters.delete(waiter); reject(e); },
      };
      const timer = setTimeout(() => waiter.reject(new Error(
        `RelayClient: no flags within ${timeoutMs} ms (status ${this.status})`)), timeoutMs);
      this.readyWaiters.add(waiter);
    });
  }

  /** Listen to "change" (ChangeEvent), "status" (Status) or "error" (Error); returns `off`. */
  on<K extends keyof EventMap>(event: K, listener: Listener<EventMap[K]>): () => void {
    const set = this.listeners[event] as Set<Listener<EventMap[K]>>;
    if (!set) throw new TypeError(`RelayClient: no event ${String(event)}`);
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Stop for good: the socket is closed and no reconnect follows. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.clearTimers();
    this.saveNow();
    for (const off of this.unsubscribe.splice(0)) off();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try { ws.close(CLOSE.NORMAL, "client closed"); } catch { /* already closing */ }
    }
    this.setStatus("closed");
    for (const w of [...this.readyWaiters]) w.reject(this.error ?? new Error("RelayClient: closed"));
  }

  // --- connecting ---------------------------------------------------------------------------

  private start(): void {
    if (!this.storage) {
      this.loaded = true;
      this.connect();
      return;
    }
    let got: string | null | Promise<string | null>;
    try {
      got = this.storage.getItem(this.storageKey);
    } catch (e) {
      this.log.warn?.(`cannot read the cache: ${errText(e)}`);
      got = null;
    }
    if (got instanceof Promise || (got !== null && typeof (got as { then?: unknown }).then === "function")) {
      Promise.resolve(got).then(
        (text) => this.restore(text),
        (e: unknown) => { this.log.warn?.(`cannot read the cache: ${errText(e)}`); this.restore(null); });
    } else {
      this.restore(got as string | null);
    }
  }

  private restore(text: string | null): void {
    if (this.closed) return;
    const saved = parseSaved(text);
    if (saved && this.flags.version === null) {
      this.flags.applySnap({ v: saved.v, flags: saved.flags });
      this.log.debug?.(`flags from the cache at v${saved.v}`);
      // get() serves them now; the event waits a microtask, for listeners added just after
      // the constructor (a synchronous storage restores inside it).
      const event = { v: saved.v, changed: Object.keys(saved.flags), snapshot: true };
      queueMicrotask(() => this.emit("change", event));
      this.resolveReady();
    }
    this.loaded = true;
    this.connect();
  }

  private connect(): void {
    this.retryTimer = null;
    if (this.closed || this.ws || this.paused || this.offline || !this.loaded) return;
    this.goawayRetryMs = null;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(this.opts.url, "relay.v1");
    } catch (e) {
      this.log.warn?.(`cannot open ${this.opts.url}: ${errText(e)}`);
      this.scheduleRetry(this.backoff.next(), "the socket could not be opened");
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => this.onOpen(ws);
    ws.onmessage = (ev) => this.onMessage(ws, ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
    ws.onerror = () => { /* the close event follows, with its code */ };
    this.connectTimer = setTimeout(() => {
      if (this.ws === ws) {
        this.log.warn?.("no flags from the server in time; reconnecting");
        this.drop(ws, 4000, "connect timeout");
      }
    }, this.opts.connectTimeoutMs ?? 15_000);
  }

  private onOpen(ws: WebSocketLike): void {
    if (this.ws !== ws) return;
    const auth: { t: string; key: string; since?: number } = { t: "auth", key: this.opts.key };
    if (this.flags.version !== null) auth.since = this.flags.version;
    ws.send(encode(auth));
  }

  private onMessage(ws: WebSocketLike, data: unknown): void {
    if (this.ws !== ws) return;
    let frame: Record<string, unknown>;
    try {
      if (!(data instanceof ArrayBuffer) && !ArrayBuffer.isView(data)) throw new Error("a text frame");
      const bytes = data instanceof ArrayBuffer
        ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      frame = decode(bytes, { useBigInt64: false }) as Record<string, unknown>;
      if (typeof frame !== "object" || frame === null || typeof frame.t !== "string") {
        throw new Error("a frame without `t`");
      }
    } catch (e) {
      this.log.warn?.(`bad frame from the server (${errText(e)}); reconnecting`);
      this.drop(ws, 4000, "bad frame");
      return;
    }
    switch (frame.t) {
      case "hello":
        this.node = typeof frame.node === "string" ? frame.node : null;
        this.env = typeof frame.env === "string" ? frame.env : null;
        return;
      case "snap":
        this.onSnap(frame as unknown as SnapFrame);
        return;
      case "delta":
        this.onDelta(ws, frame as unknown as DeltaFrame);
        return;
      case "goaway":
        this.goawayRetryMs = typeof frame.retry_ms === "number" ? frame.retry_ms : 0;
        this.log.debug?.(`goaway ${String(frame.reason)} retry_ms=${this.goawayRetryMs}`);
        return;
      default:
        return;  // a frame type of a later protocol: ignored
    }
  }

  private onSnap(frame: SnapFrame): void {
    const changed = this.flags.applySnap(frame);
    this.live();
    this.emit("change", { v: frame.v, changed, snapshot: true });
    this.scheduleSave();
  }

  private onDelta(ws: WebSocketLike, frame: DeltaFrame): void {
    const result = this.flags.applyDelta(frame);
    if (result.kind === "gap") {
      this.log.warn?.(`gap: a delta from v${frame.base}, holding v${String(this.flags.version)}; reconnecting`);
      this.drop(ws, 4000, "gap", 0);
      return;
    }
    this.live();
    if (result.kind === "applied") {
      if (result.changed.length > 0 || frame.v !== frame.base) {
        this.emit("change", { v: frame.v, changed: result.changed, snapshot: false });
      }
      this.scheduleSave();
    }
  }

  /** The first frame holding flags on this connection: the client is live. */
  private live(): void {
    if (this.connectTimer !== null) {
      clearTimeout(this.connectTimer);
      this.connectTimer = null;
      this.stableTimer = setTimeout(() => {
        this.stableTimer = null;
        this.backoff.reset();
      }, this.opts.stableAfterMs ?? 10_000);
    }
    this.everLive = true;
    this.setStatus("ready");
    this.resolveReady();
  }

  private onClose(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return;
    this.ws = null;
    detach(ws);
    this.clearConnectionTimers();
    if (this.closed) return;
    if (this.paused || this.offline) {
      this.setStatus("reconnecting");
      return;  // resumed by visibility or by the network
    }
    const decision = decideClose(code, reason ?? "", this.goawayRetryMs, this.backoff);
    if (decision.action === "stop") {
      this.log.warn?.(decision.error.message);
      this.error = decision.error;
      this.emit("error", decision.error);
      this.close();
      return;
    }
    this.scheduleRetry(decision.delayMs, decision.why);
  }

  /** Close this connection from our side and reconnect after `delayMs` (default: backoff). */
  private drop(ws: WebSocketLike, code: number, reason: string, delayMs?: number): void {
    if (this.ws !== ws) return;
    this.ws = null;
    detach(ws);
    this.clearConnectionTimers();
    try { ws.close(code, reason); } catch { /* not open yet */ }
    if (!this.closed && !this.paused && !this.offline) {
      this.scheduleRetry(delayMs ?? this.backoff.next(), reason);
    }
  }

  private scheduleRetry(delayMs: number, why: string): void {
    this.setStatus(this.everLive ? "reconnecting" : "connecting");
    this.log.debug?.(`connection ended (${why}); next in ${delayMs} ms`);
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), Math.max(0, delayMs));
  }

  // --- visibility and network ---------------------------------------------------------------

  private watchEnvironment(): void {
    const seconds = this.opts.pauseWhenHidden;
    if (seconds !== undefined && seconds !== null && seconds >= 0) {
      const vis = this.opts.visibility === undefined ? documentVisibility() : this.opts.visibility;
      if (vis) {
        this.unsubscribe.push(vis.subscribe(() => this.onVisibility(vis.hidden(), seconds)));
        if (vis.hidden()) this.onVisibility(true, seconds);
      }
    }
    const g = globalThis as { addEventListener?: Function; removeEventListener?: Function };
    if (this.storage && typeof g.addEventListener === "function") {
      const flush = () => this.saveNow();  // a reload or a closed tab keeps the latest flags
      g.addEventListener("pagehide", flush);
      this.unsubscribe.push(() => g.removeEventListener?.("pagehide", flush));
    }
    const net = this.opts.network === undefined ? browserNetwork() : this.opts.network;
    if (net) {
      this.offline = !net.online();
      this.unsubscribe.push(net.subscribe(() => this.onNetwork(net.online())));
    }
  }

  private onVisibility(hidden: boolean, seconds: number): void {
    if (this.closed) return;
    if (hidden) {
      if (this.hideTimer === null && !this.paused) {
        this.hideTimer = setTimeout(() => {
          this.hideTimer = null;
          this.pause();
        }, seconds * 1000);
      }
      return;
    }
    if (this.hideTimer !== null) {
      clearTimeout(this.hideTimer);
      this.hideTimer = null;
    }
    if (this.paused) {
      this.paused = false;
      this.log.debug?.("visible again: resuming");
      this.resumeNow();
    }
  }

  private pause(): void {
    this.log.debug?.("hidden: closing the socket until visible");
    this.paused = true;
    this.saveNow();
    this.closeSocketForNow("page hidden");
  }

  private onNetwork(online: boolean): void {
    if (this.closed) return;
    if (!online) {
      if (!this.offline) {
        this.offline = true;
        this.log.debug?.("offline: waiting for the network");
        this.closeSocketForNow("offline");
      }
      return;
    }
    if (this.offline) {
      this.offline = false;
      this.log.debug?.("online: reconnecting");
      this.backoff.reset();
      this.resumeNow();
    }
  }

  private closeSocketForNow(reason: string): void {
    if (this.retryTimer !== null) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
    }
    const ws = this.ws;
    if (ws) {
      this.ws = null;
      detach(ws);
      this.clearConnectionTimers();
      try { ws.close(CLOSE.NORMAL, reason); } catch { /* not open yet */ }
    }
    if (this.status === "ready") this.setStatus("reconnecting");
  }

  private resumeNow(): void {
    if (this.retryTimer !== null) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
    }
    if (!this.ws) this.connect();
  }

  // --- cache --------------------------------------------------------------------------------

  private scheduleSave(): void {
    if (!this.storage || this.saveTimer !== null) return;
    this.saveTimer = setTimeout(() => this.saveNow(), SAVE_EVERY_MS);
  }

  private saveNow(): void {
    if (this.saveTimer !== null) {
      clearTimeout(this.saveTimer);
      this.saveTimer = null;
    }
    const v = this.flags.version;
    if (!this.storage || v === null) return;
    try {
      const done = this.storage.setItem(this.storageKey, serialize({ v, flags: this.flags.entries() }));
      if (done instanceof Promise) {
        done.catch((e: unknown) => this.log.warn?.(`cannot save the cache: ${errText(e)}`));
      }
    } catch (e) {
      this.log.warn?.(`cannot save the cache: ${errText(e)}`);
    }
  }

  // --- plumbing -----------------------------------------------------------------------------

  private setStatus(status: Status): void {
    if (this.status === status) return;
    this.status = status;
    this.emit("status", status);
  }

  private resolveReady(): void {
    for (const w of [...this.readyWaiters]) w.resolve();
  }

  private emit<K extends keyof EventMap>(event: K, value: EventMap[K]): void {
    for (const listener of [...this.listeners[event]] as Listener<EventMap[K]>[]) {
      try {
        listener(value);
      } catch (e) {
        this.log.error?.(`a ${event} listener threw: ${errText(e)}`);
      }
    }
  }

  private clearConnectionTimers(): void {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    if (this.stableTimer !== null) clearTimeout(this.stableTimer);
    this.connectTimer = this.stableTimer = null;
  }

  private clearTimers(): void {
    this.clearConnectionTimers();
    for (const t of [this.retryTimer, this.hideTimer]) if (t !== null) clearTimeout(t);
    this.retryTimer = this.hideTimer = null;
  }
}

export { RelayRefusedError };

/** The client stops hearing a socket it has given up (the caller closes it). */
function detach(ws: WebSocketLike): void {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function defaultStorage(): StorageLike | null {
  try {
    const s = (globalThis as { localStorage?: StorageLike }).localStorage;
    return s && typeof s.getItem === "function" ? s : null;
  } catch {
    return null;  // e.g. storage disabled for the site
  }
}

function documentVisibility(): VisibilitySource | null {
  const doc = (globalThis as { document?: { hidden: boolean; addEventListener: Function;
    removeEventListener: Function } }).document;
  if (!doc || typeof doc.addEventListener !== "function") return null;
  return {
    hidden: () => doc.hidden,
    subscribe: (listener) => {
      doc.addEventListener("visibilitychange", listener);
      return () => doc.removeEventListener("visibilitychange", listener);
    },
  };
}

function browserNetwork(): NetworkSource | null {
  const g = globalThis as { addEventListener?: Function; removeEventListener?: Function;
    navigator?: { onLine?: boolean }; document?: unknown };
  if (typeof g.addEventListener !== "function" || g.document === undefined
      || typeof g.navigator?.onLine !== "boolean") {
    return null;
  }
  return {
    online: () => g.navigator?.onLine !== false,
    subscribe: (listener) => {
      g.addEventListener!("online", listener);
      g.addEventListener!("offline", listener);
      return () => {
        g.removeEventListener!("online", listener);
        g.removeEventListener!("offline", listener);
      };
    },
  };
}
