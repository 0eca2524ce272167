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
  private readonly handlers = new Map<string, Set<Handler>>();

  emit(event: string, context?: Record<string, unknown>): void {
    for (const handler of [...(this.handlers.get(event) ?? [])]) {
      try {
        const done = handler(context);
        if (done instanceof Promise) done.catch(() => undefined);
      } catch {
        /* a handler's failure is the app's, not the provider's */
      }
    }
  }

  addHandler(event: string, handler: Handler): void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
  }

  removeHandler(event: string, handler: Handler): void {
    this.handlers.get(event)?.delete(handler);
  }

  removeAllHandlers(event?: string): void {
    if (event === undefined) this.handlers.clear();
    else this.handlers.delete(event);
  }

  getHandlers(event: string): Handler[] {
    return [...(this.handlers.get(event) ?? [])];
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
  private readonly readyTimeoutMs: number;
  private readonly offs: (() => void)[] = [];
  private initialized = false;

  /** Give it a client's options (it then owns the client), or a client of your own. */
  constructor(clientOrOptions: RelayClient | RelayWebProviderOptions) {
    if (clientOrOptions instanceof RelayClient) {
      this.client = clientOrOptions;
      this.readyTimeoutMs = 10_000;
    } else {
      this.client = new RelayClient(clientOrOptions);
      this.readyTimeoutMs = clientOrOptions.readyTimeoutMs ?? 10_000;
    }
  }

  async initialize(_context?: EvaluationContext): Promise<void> {
    await this.client.ready(this.readyTimeoutMs);
    if (this.initialized) return;
    this.initialized = true;
    const events = this.events as unknown as Events;
    let stale = this.client.status !== "ready";
    this.offs.push(this.client.on("status", (status: Status) => {
      if (status === "ready" && stale) {
        stale = false;
        events.emit("PROVIDER_READY", { message: "relay: connected" });
      } else if (status === "reconnecting" && !stale) {
        stale = true;
        events.emit("PROVIDER_STALE", { message: "relay: disconnected, flags may be out of date" });
      }
    }));
    this.offs.push(this.client.on("change", (e: ChangeEvent) => {
      if (e.changed.length > 0) {
        events.emit("PROVIDER_CONFIGURATION_CHANGED", {
          flagsChanged: e.changed, metadata: { version: e.v } });
      }
    }));
    this.offs.push(this.client.on("error", (err: Error) => {
      events.emit("PROVIDER_ERROR", { message: err.message, errorCode: "PROVIDER_FATAL" });
    }));
  }

  async onClose(): Promise<void> {
    for (const off of this.offs.splice(0)) off();
    this.client.close();
  }

  resolveBooleanEvaluation(flagKey: string, defaultValue: boolean): ResolutionDetails<boolean> {
    return this.resolve(flagKey, defaultValue, "boolean");
  }

  resolveStringEvaluation(flagKey: string, defaultValue: string): ResolutionDetails<string> {
    return this.resolve(flagKey, defaultValue, "string");
  }

  resolveNumberEvaluation(flagKey: string, defaultValue: number): ResolutionDetails<number> {
    return this.resolve(flagKey, defaultValue, "number");
  }

  resolveObjectEvaluation<T extends JsonValue>(flagKey: string, defaultValue: T): ResolutionDetails<T> {
    return this.resolve(flagKey, defaultValue, "object");
  }

  private resolve<T>(flagKey: string, defaultValue: T, kind: Kind): ResolutionDetails<T> {
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
