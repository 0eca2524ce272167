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

  private readonly opts_: Required<Pick<RelayClientOptions, "url" | "key">> & RelayClientOptions;
  private readonly WS_: WebSocketConstructor;
  private readonly storage_: StorageLike | null;
  private readonly log_: Logger;
  private readonly flags_ = new FlagSet();
  private readonly backoff_: Backoff;
  private readonly listeners_: { [K in keyof EventMap]: Set<Listener<EventMap[K]>> } = {
    change: new Set(), status: new Set(), error: new Set(),
  };
  private readonly readyWaiters_ = new Set<{ resolve(): void; reject(e: Error): void }>();
  private readonly unsubscribe_: (() => void)[] = [];

  private ws_: WebSocketLike | null = null;
  private goawayRetryMs_: number | null = null;
  private retryTimer_: ReturnType<typeof setTimeout> | null = null;
  private stableTimer_: ReturnType<typeof setTimeout> | null = null;
  private connectTimer_: ReturnType<typeof setTimeout> | null = null;
  private hideTimer_: ReturnType<typeof setTimeout> | null = null;
  private saveTimer_: ReturnType<typeof setTimeout> | null = null;
  private paused_ = false;  // closed on purpose while hidden
  private offline_ = false;
  private loaded_ = false;  // the cache has been read (or there is none)
  private closed_ = false;
  private readonly storageKey_: string;
  private everLive_ = false;  // a connection has held flags: later ones are "reconnecting"
  private flagsEnv_: string | null = null;  // the environment the flags held came from
  private wantSnapshot_ = false;  // the next connection asks for a snapshot (no since)
  private notBefore_ = 0;  // Date.now() before which the server asked not to come back

  constructor(options: RelayClientOptions) {
    if (typeof options?.url !== "string" || !/^wss?:\/\//i.test(options.url)) {
      throw new TypeError(`RelayClient: url must be a ws:// or wss:// URL, got ${String(options?.url)}`);
    }
    if (typeof options.key !== "string" || options.key === "") {
      throw new TypeError("RelayClient: key (the SDK key) is required");
    }
    this.opts_ = options;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new TypeError("RelayClient: no WebSocket here; pass one (e.g. the ws package) as `WebSocket`");
    }
    this.WS_ = WS;
    this.log_ = options.logger ?? { warn: (m) => console.warn(`relay: ${m}`) };
    this.storage_ = options.storage === undefined ? defaultStorage() : options.storage;
    this.storageKey_ = cacheKey(options.url, options.key);
    this.backoff_ = new Backoff(options.backoffBaseMs ?? 500, options.backoffMaxMs ?? 30_000);
    this.watchEnvironment_();
    this.start_();
  }

  /** The environment version held (from the server or the cache), or null. */
  get version(): number | null {
    return this.flags_.version;
  }

  /** A flag's value, or `fallback` when the flag is absent. */
  get<T = unknown>(key: string, fallback: T): T {
    const entry = this.flags_.get(key);
    return entry === undefined ? fallback : (entry.value as T);
  }

  /** Every flag's value, `{ key: value }`. */
  all(): Record<string, unknown> {
    return this.flags_.values();
  }

  /** Resolves once the client holds flags (from the server or the cache). Rejects after
   * `timeoutMs`, when the key is refused, or when the client is closed first. */
  ready(timeoutMs = 10_000): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.flags_.version !== null) return Promise.resolve();
    if (this.closed_) return Promise.reject(new Error("RelayClient: closed"));
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        resolve: () => { clearTimeout(timer); this.readyWaiters_.delete(waiter); resolve(); },
        reject: (e: Error) => { clearTimeout(timer); this.readyWaiters_.delete(waiter); reject(e); },
      };
      const timer = setTimeout(() => waiter.reject(new Error(
        `RelayClient: no flags within ${timeoutMs} ms (status ${this.status})`)), timeoutMs);
      this.readyWaiters_.add(waiter);
    });
  }

  /** Listen to "change" (ChangeEvent), "status" (Status) or "error" (Error); returns `off`. */
  on<K extends keyof EventMap>(event: K, listener: Listener<EventMap[K]>): () => void {
    const set = this.listeners_[event] as Set<Listener<EventMap[K]>>;
    if (!set) throw new TypeError(`RelayClient: no event ${String(event)}`);
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Stop for good: the socket is closed and no reconnect follows. */
  close(): void {
    if (this.closed_) return;
    this.closed_ = true;
    this.clearTimers_();
    this.saveNow_();
    for (const off of this.unsubscribe_.splice(0)) off();
    const ws = this.ws_;
    this.ws_ = null;
    if (ws) {
      detach(ws);
      try { ws.close(CLOSE.NORMAL, "client closed"); } catch { /* already closing */ }
    }
    this.setStatus_("closed");
    for (const w of [...this.readyWaiters_]) w.reject(this.error ?? new Error("RelayClient: closed"));
  }

  // --- connecting ---------------------------------------------------------------------------

  private start_(): void {
    if (!this.storage_) {
      this.loaded_ = true;
      this.connect_();
      return;
    }
    let got: string | null | Promise<string | null>;
    try {
      got = this.storage_.getItem(this.storageKey_);
    } catch (e) {
      this.log_.warn?.(`cannot read the cache: ${errText(e)}`);
      got = null;
    }
    if (got instanceof Promise || (got !== null && typeof (got as { then?: unknown }).then === "function")) {
      Promise.resolve(got).then(
        (text) => this.restore_(text),
        (e: unknown) => { this.log_.warn?.(`cannot read the cache: ${errText(e)}`); this.restore_(null); });
    } else {
      this.restore_(got as string | null);
    }
  }

  private restore_(text: string | null): void {
    if (this.closed_) return;
    const saved = parseSaved(text);
    if (saved && this.flags_.version === null) {
      this.flags_.applySnap({ v: saved.v, flags: saved.flags });
      this.flagsEnv_ = saved.env;
      this.log_.debug?.(`flags from the cache at v${saved.v}`);
      // get() serves them now; the event waits a microtask, for listeners added just after
      // the constructor (a synchronous storage restores inside it).
      const event = { v: saved.v, changed: Object.keys(saved.flags), snapshot: true };
      queueMicrotask(() => this.emit_("change", event));
      this.resolveReady_();
    }
    this.loaded_ = true;
    this.connect_();
  }

  private connect_(): void {
    this.retryTimer_ = null;
    if (this.closed_ || this.ws_ || this.paused_ || this.offline_ || !this.loaded_) return;
    this.goawayRetryMs_ = null;
    let ws: WebSocketLike;
    try {
      ws = new this.WS_(this.opts_.url, "relay.v1");
    } catch (e) {
      this.log_.warn?.(`cannot open ${this.opts_.url}: ${errText(e)}`);
      this.scheduleRetry_(this.backoff_.next(), "the socket could not be opened");
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws_ = ws;
    ws.onopen = () => this.onOpen_(ws);
    ws.onmessage = (ev) => this.onMessage_(ws, ev.data);
    ws.onclose = (ev) => this.onClose_(ws, ev.code, ev.reason);
    ws.onerror = () => { /* the close event follows, with its code */ };
    this.connectTimer_ = setTimeout(() => {
      if (this.ws_ === ws) {
        this.log_.warn?.("no flags from the server in time; reconnecting");
        this.drop_(ws, 4000, "connect timeout");
      }
    }, this.opts_.connectTimeoutMs ?? 15_000);
  }

  private onOpen_(ws: WebSocketLike): void {
    if (this.ws_ !== ws) return;
    const auth: { t: string; key: string; since?: number } = { t: "auth", key: this.opts_.key };
    if (this.flags_.version !== null && !this.wantSnapshot_) auth.since = this.flags_.version;
    ws.send(encode(auth));
  }

  private onMessage_(ws: WebSocketLike, data: unknown): void {
    if (this.ws_ !== ws) return;
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
      // E.g. a flag named __proto__, which @msgpack/msgpack refuses to decode. Ask for a
      // snapshot next time: a catch-up delta would carry the same key (even a deletion does).
      const error = new Error(`relay: a frame from the server could not be decoded (${errText(e)}); `
        + "reconnecting for a snapshot");
      this.log_.warn?.(error.message);
      this.emit_("error", error);
      this.wantSnapshot_ = true;
      this.drop_(ws, 4000, "bad frame");
      return;
    }
    switch (frame.t) {
      case "hello":
        this.node = typeof frame.node === "string" ? frame.node : null;
        this.env = typeof frame.env === "string" ? frame.env : null;
        if (this.flagsEnv_ !== null && this.env !== null && this.env !== this.flagsEnv_
            && !this.wantSnapshot_) {
          // The key now names another environment: the version held means nothing there.
          this.log_.warn?.(`the key now reads ${this.env}, not ${this.flagsEnv_}: reloading its flags`);
          this.wantSnapshot_ = true;
          this.drop_(ws, 4000, "another environment", 0);
        }
        return;
      case "snap":
        this.onSnap_(frame as unknown as SnapFrame);
        return;
      case "delta":
        this.onDelta_(ws, frame as unknown as DeltaFrame);
        return;
      case "goaway":
        this.goawayRetryMs_ = typeof frame.retry_ms === "number" ? frame.retry_ms : 0;
        this.log_.debug?.(`goaway ${String(frame.reason)} retry_ms=${this.goawayRetryMs_}`);
        return;
      default:
        return;  // a frame type of a later protocol: ignored
    }
  }

  private onSnap_(frame: SnapFrame): void {
    const changed = this.flags_.applySnap(frame);
    this.flagsEnv_ = this.env;
    this.wantSnapshot_ = false;
    this.live_();
    this.emit_("change", { v: frame.v, changed, snapshot: true });
    this.scheduleSave_();
  }

  private onDelta_(ws: WebSocketLike, frame: DeltaFrame): void {
    const result = this.flags_.applyDelta(frame);
    if (result.kind === "gap") {
      this.log_.warn?.(`a delta from v${frame.base} to v${frame.v}, holding v${String(this.flags_.version)}: `
        + "not applied; reconnecting with since");
      this.drop_(ws, 4000, "gap", 0);
      return;
    }
    this.live_();
    if (result.changed.length > 0 || frame.v !== frame.base) {
      this.emit_("change", { v: frame.v, changed: result.changed, snapshot: false });
    }
    this.scheduleSave_();
  }

  /** The first frame holding flags on this connection: the client is live. */
  private live_(): void {
    if (this.connectTimer_ !== null) {
      clearTimeout(this.connectTimer_);
      this.connectTimer_ = null;
      this.stableTimer_ = setTimeout(() => {
        this.stableTimer_ = null;
        this.backoff_.reset();
      }, this.opts_.stableAfterMs ?? 10_000);
    }
    this.everLive_ = true;
    this.setStatus_("ready");
    this.resolveReady_();
  }

  private onClose_(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws_ !== ws) return;
    this.ws_ = null;
    detach(ws);
    this.clearConnectionTimers_();
    if (this.closed_) return;
    if (this.paused_ || this.offline_) {
      this.setStatus_("reconnecting");
      return;  // resumed by visibility or by the network
    }
    const decision = decideClose(code, reason ?? "", this.goawayRetryMs_, this.backoff_);
    if (decision.action === "stop") {
      this.log_.warn?.(decision.error.message);
      this.error = decision.error;
      this.emit_("error", decision.error);
      this.close();
      return;
    }
    this.scheduleRetry_(decision.delayMs, decision.why);
  }

  /** Close this connection from our side and reconnect after `delayMs` (default: backoff). */
  private drop_(ws: WebSocketLike, code: number, reason: string, delayMs?: number): void {
    if (this.ws_ !== ws) return;
    this.ws_ = null;
    detach(ws);
    this.clearConnectionTimers_();
    try { ws.close(code, reason); } catch { /* not open yet */ }
    if (!this.closed_ && !this.paused_ && !this.offline_) {
      this.scheduleRetry_(delayMs ?? this.backoff_.next(), reason);
    }
  }

  private scheduleRetry_(delayMs: number, why: string): void {
    if (this.closed_) return;
    this.notBefore_ = Date.now() + delayMs;
    this.setStatus_(this.everLive_ ? "reconnecting" : "connecting");
    this.log_.debug?.(`connection ended (${why}); next in ${delayMs} ms`);
    if (this.retryTimer_ !== null) clearTimeout(this.retryTimer_);
    this.retryTimer_ = setTimeout(() => this.connect_(), Math.max(0, delayMs));
  }

  // --- visibility and network ---------------------------------------------------------------

  private watchEnvironment_(): void {
    const seconds = this.opts_.pauseWhenHidden;
    if (seconds !== undefined && seconds !== null && seconds >= 0) {
      const vis = this.opts_.visibility === undefined ? documentVisibility() : this.opts_.visibility;
      if (vis) {
        this.unsubscribe_.push(vis.subscribe(() => this.onVisibility_(vis.hidden(), seconds)));
        if (vis.hidden()) this.onVisibility_(true, seconds);
      }
    }
    const g = globalThis as { addEventListener?: Function; removeEventListener?: Function };
    if (this.storage_ && typeof g.addEventListener === "function") {
      const flush = () => this.saveNow_();  // a reload or a closed tab keeps the latest flags
      g.addEventListener("pagehide", flush);
      this.unsubscribe_.push(() => g.removeEventListener?.("pagehide", flush));
    }
    const net = this.opts_.network === undefined ? browserNetwork() : this.opts_.network;
    if (net) {
      this.offline_ = !net.online();
      this.unsubscribe_.push(net.subscribe(() => this.onNetwork_(net.online())));
    }
  }

  private onVisibility_(hidden: boolean, seconds: number): void {
    if (this.closed_) return;
    if (hidden) {
      if (this.hideTimer_ === null && !this.paused_) {
        this.hideTimer_ = setTimeout(() => {
          this.hideTimer_ = null;
          this.pause_();
        }, seconds * 1000);
      }
      return;
    }
    if (this.hideTimer_ !== null) {
      clearTimeout(this.hideTimer_);
      this.hideTimer_ = null;
    }
    if (this.paused_) {
      this.paused_ = false;
      this.log_.debug?.("visible again: resuming");
      this.resumeNow_();
    }
  }

  private pause_(): void {
    this.log_.debug?.("hidden: closing the socket until visible");
    this.paused_ = true;
    this.saveNow_();
    this.closeSocketForNow_("page hidden");
  }

  private onNetwork_(online: boolean): void {
    if (this.closed_) return;
    if (!online) {
      if (!this.offline_) {
        this.offline_ = true;
        this.log_.debug?.("offline: waiting for the network");
        this.closeSocketForNow_("offline");
      }
      return;
    }
    if (this.offline_) {
      this.offline_ = false;
      this.log_.debug?.("online: reconnecting");
      this.backoff_.reset();
      this.resumeNow_();
    }
  }

  private closeSocketForNow_(reason: string): void {
    if (this.retryTimer_ !== null) {
      clearTimeout(this.retryTimer_);
      this.retryTimer_ = null;
    }
    const ws = this.ws_;
    if (ws) {
      this.ws_ = null;
      detach(ws);
      this.clearConnectionTimers_();
      try { ws.close(CLOSE.NORMAL, reason); } catch { /* not open yet */ }
    }
    if (this.status === "ready") this.setStatus_("reconnecting");
  }

  /** Connect now, or when the server said it may (a goaway's or a 4101's retry_ms). */
  private resumeNow_(): void {
    if (this.retryTimer_ !== null) {
      clearTimeout(this.retryTimer_);
      this.retryTimer_ = null;
    }
    if (this.ws_ || this.closed_) return;
    const wait = this.notBefore_ - Date.now();
    if (wait > 0) this.retryTimer_ = setTimeout(() => this.connect_(), wait);
    else this.connect_();
  }

  // --- cache --------------------------------------------------------------------------------

  private scheduleSave_(): void {
    if (!this.storage_ || this.saveTimer_ !== null || this.closed_) return;
    this.saveTimer_ = setTimeout(() => this.saveNow_(), SAVE_EVERY_MS);
  }

  private saveNow_(): void {
    if (this.saveTimer_ !== null) {
      clearTimeout(this.saveTimer_);
      this.saveTimer_ = null;
    }
    const v = this.flags_.version;
    if (!this.storage_ || v === null) return;
    try {
      const done = this.storage_.setItem(
        this.storageKey_, serialize({ v, env: this.flagsEnv_, flags: this.flags_.entries() }));
      if (done instanceof Promise) {
        done.catch((e: unknown) => this.log_.warn?.(`cannot save the cache: ${errText(e)}`));
      }
    } catch (e) {
      this.log_.warn?.(`cannot save the cache: ${errText(e)}`);
    }
  }

  // --- plumbing -----------------------------------------------------------------------------

  private setStatus_(status: Status): void {
    if (this.status === status) return;
    this.status = status;
    this.emit_("status", status);
  }

  private resolveReady_(): void {
    for (const w of [...this.readyWaiters_]) w.resolve();
  }

  private emit_<K extends keyof EventMap>(event: K, value: EventMap[K]): void {
    for (const listener of [...this.listeners_[event]] as Listener<EventMap[K]>[]) {
      try {
        listener(value);
      } catch (e) {
        this.log_.error?.(`a ${event} listener threw: ${errText(e)}`);
      }
    }
  }

  private clearConnectionTimers_(): void {
    if (this.connectTimer_ !== null) clearTimeout(this.connectTimer_);
    if (this.stableTimer_ !== null) clearTimeout(this.stableTimer_);
    this.connectTimer_ = this.stableTimer_ = null;
  }

  private clearTimers_(): void {
    this.clearConnectionTimers_();
    for (const t of [this.retryTimer_, this.hideTimer_]) if (t !== null) clearTimeout(t);
    this.retryTimer_ = this.hideTimer_ = null;
  }
}

export { RelayRefusedError };

/** The client stops hearing a socket it has given up (the caller closes it). An error
 * handler stays: the `ws` package emits "closed before the connection was established" when
 * a socket still connecting is closed, and an unheard error would end a Node process. */
function detach(ws: WebSocketLike): void {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = ignore;
}

function ignore(): void {}

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
