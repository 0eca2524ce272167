/**
 * An OpenFeature provider for `@openfeature/web-sdk` over a RelayClient, so that an app that
 * already evaluates flags through OpenFeature switches to relay with one line:
 *
 *     await OpenFeature.setProviderAndWait(new RelayWebProvider({ url, key }));
 *
 * It imports only the SDK's types: the bundle carries none of the SDK, and the provider talks
 * to it through the Provider interface (its `events` emitter is this module's own).
 */

import type {
  EvaluationContext,
  JsonValue,
  Provider,
  ProviderEventEmitter,
  ResolutionDetails,
} from "@openfeature/web-sdk";

import { type ChangeEvent, RelayClient, type RelayClientOptions, type Status } from "./client.js";

export interface RelayWebProviderOptions extends RelayClientOptions {
  /** How long `initialize` waits for flags (ms, 10,000); past it the provider is in error. */
  readyTimeoutMs?: number;
}

type Handler = (details?: unknown) => void | Promise<void>;

/** The ProviderEventEmitter the SDK attaches its handlers to. */
class Events {
  private readonly handlers_ = new Map<string, Set<Handler>>();

  emit(event: string, context?: Record<string, unknown>): void {
    for (const handler of [...(this.handlers_.get(event) ?? [])]) {
      try {
        const done = handler(context);
        if (done instanceof Promise) done.catch(() => undefined);
      } catch {
        /* a handler's failure is the app's, not the provider's */
      }
    }
  }

  addHandler(event: string, handler: Handler): void {
    let set = this.handlers_.get(event);
    if (!set) this.handlers_.set(event, (set = new Set()));
    set.add(handler);
  }

  removeHandler(event: string, handler: Handler): void {
    this.handlers_.get(event)?.delete(handler);
  }

  removeAllHandlers(event?: string): void {
    if (event === undefined) this.handlers_.clear();
    else this.handlers_.delete(event);
  }

  getHandlers(event: string): Handler[] {
    return [...(this.handlers_.get(event) ?? [])];
  }

  setLogger(): this {
    return this;
  }
}

type Kind = "boolean" | "string" | "number" | "object";

export class RelayWebProvider implements Provider {
  readonly metadata = { name: "relay" } as const;
  readonly runsOn = "client" as const;
  readonly events = new Events() as unknown as ProviderEventEmitter<never>;
  /** The client underneath (its `status`, `version`, events). */
  readonly client: RelayClient;
  private readonly readyTimeoutMs_: number;
  private readonly offs_: (() => void)[] = [];
  // "starting" until initialize returns; "ready" while connected; "stale" while not (the
  // flags held are served, from the last connection or the cache).
  private state_: "starting" | "ready" | "stale" = "starting";
  private initFailed_ = false;

  /** Give it a client's options, or a `RelayClient` of your own; either way the provider
   * closes the client when OpenFeature closes the provider. */
  constructor(clientOrOptions: RelayClient | RelayWebProviderOptions) {
    if (clientOrOptions instanceof RelayClient) {
      this.client = clientOrOptions;
      this.readyTimeoutMs_ = 10_000;
    } else {
      this.client = new RelayClient(clientOrOptions);
      this.readyTimeoutMs_ = clientOrOptions.readyTimeoutMs ?? 10_000;
    }
    // Heard from the start: flags that come after a timed-out initialize still make the
    // provider ready.
    const events = this.events as unknown as Events;
    this.offs_.push(this.client.on("status", (status: Status) => {
      if (status === "ready" && this.state_ !== "ready") {
        // Back from stale, or flags at last after an initialize that timed out.
        const tell = this.state_ === "stale" || this.initFailed_;
        this.state_ = "ready";
        if (tell) events.emit("PROVIDER_READY", { message: "relay: connected" });
      } else if (status === "reconnecting" && this.state_ === "ready") {
        this.state_ = "stale";
        events.emit("PROVIDER_STALE", { message: "relay: disconnected, flags may be out of date" });
      }
    }));
    this.offs_.push(this.client.on("change", (e: ChangeEvent) => {
      if (e.changed.length > 0 && this.state_ !== "starting") {
        events.emit("PROVIDER_CONFIGURATION_CHANGED", {
          flagsChanged: e.changed, metadata: { version: e.v } });
      }
    }));
    this.offs_.push(this.client.on("error", (err: Error) => {
      if (this.client.status === "closed") {
        events.emit("PROVIDER_ERROR", { message: err.message, errorCode: "PROVIDER_FATAL" });
      }
    }));
  }

  async initialize(_context?: EvaluationContext): Promise<void> {
    try {
      await this.client.ready(this.readyTimeoutMs_);
    } catch (err) {
      this.initFailed_ = true;
      if (this.client.status === "closed") {
        // A refused key: the SDK's FATAL status, not a retryable ERROR.
        throw Object.assign(new Error((err as Error).message), { code: "PROVIDER_FATAL" });
      }
      throw err;
    }
    if (this.state_ !== "starting") return;
    if (this.client.status === "ready") {
      this.state_ = "ready";
      return;
    }
    // Ready from the cache, not yet connected: stale, once the SDK has taken the READY of
    // this initialize (it does so after the promise resolves).
    this.state_ = "stale";
    setTimeout(() => {
      if (this.state_ === "stale") {
        (this.events as unknown as Events).emit("PROVIDER_STALE", {
          message: "relay: flags from the cache, not connected yet" });
      }
    }, 0);
  }

  async onClose(): Promise<void> {
    for (const off of this.offs_.splice(0)) off();
    this.client.close();
  }

  resolveBooleanEvaluation(flagKey: string, defaultValue: boolean): ResolutionDetails<boolean> {
    return this.resolve_(flagKey, defaultValue, "boolean");
  }

  resolveStringEvaluation(flagKey: string, defaultValue: string): ResolutionDetails<string> {
    return this.resolve_(flagKey, defaultValue, "string");
  }

  resolveNumberEvaluation(flagKey: string, defaultValue: number): ResolutionDetails<number> {
    return this.resolve_(flagKey, defaultValue, "number");
  }

  resolveObjectEvaluation<T extends JsonValue>(flagKey: string, defaultValue: T): ResolutionDetails<T> {
    return this.resolve_(flagKey, defaultValue, "object");
  }

  private resolve_<T>(flagKey: string, defaultValue: T, kind: Kind): ResolutionDetails<T> {
    const client = this.client;
    const version = client.version;
    const flagMetadata: Record<string, number> = version === null ? {} : { version };
    const missing = Symbol("missing");
    const value = client.get<unknown>(flagKey, missing);
    if (value === missing) {
      return { value: defaultValue, reason: "ERROR", errorCode: "FLAG_NOT_FOUND" as never,
               errorMessage: `no flag ${flagKey} in this environment`, flagMetadata };
    }
    if (!hasKind(value, kind)) {
      return { value: defaultValue, reason: "ERROR", errorCode: "TYPE_MISMATCH" as never,
               errorMessage: `flag ${flagKey} is ${describe(value)}, not ${kind}`, flagMetadata };
    }
    // Live while connected; what was last received (or cached) otherwise.
    return { value: value as T, reason: client.status === "ready" ? "STATIC" : "CACHED",
             flagMetadata };
  }
}

function hasKind(value: unknown, kind: Kind): boolean {
  if (kind === "object") return typeof value === "object" && value !== null;
  if (kind === "number") return typeof value === "number" && Number.isFinite(value);
  return typeof value === kind;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return `a ${typeof value}`;
}
