/**
 * The flags saved between runs, per (url, key): a reload serves `get()` from them at once and
 * connects with `since` = their version, so it receives a delta rather than a snapshot.
 * Storage is anything `localStorage`-like, synchronous (browsers) or asynchronous (React
 * Native's AsyncStorage).
 */

import type { FlagEntry } from "./flags.js";

export interface StorageLike {
  getItem(key: string): string | null | Promise<string | null>;
  setItem(key: string, value: string): void | Promise<void>;
  removeItem?(key: string): void | Promise<void>;
}

export interface Saved {
  v: number;
  /** The environment the flags came from (the server's `hello`), null if not known. */
  env: string | null;
  flags: Record<string, FlagEntry>;
}

const FORMAT = 2;

/** The storage key of (url, key): the SDK key is hashed, so it is not a name in storage. */
export function cacheKey(url: string, key: string): string {
  return `relay.flags.${fnv1a(`${url}\n${key}`)}`;
}

/** Read a saved state; null when absent, unreadable or of another format. */
export function parseSaved(text: string | null): Saved | null {
  if (!text) return null;
  try {
    const data = JSON.parse(text) as { f?: number; v?: unknown; env?: unknown; flags?: unknown };
    if (data.f !== FORMAT || typeof data.v !== "number" || !Number.isSafeInteger(data.v)
        || data.v < 0 || typeof data.flags !== "object" || data.flags === null) {
      return null;
    }
    for (const entry of Object.values(data.flags as Record<string, unknown>)) {
      if (typeof entry !== "object" || entry === null || typeof (entry as FlagEntry).v !== "number"
          || !("value" in entry)) {
        return null;
      }
    }
    const env = typeof data.env === "string" ? data.env : null;
    return { v: data.v, env, flags: data.flags as Record<string, FlagEntry> };
  } catch {
    return null;
  }
}

export function serialize(saved: Saved): string {
  return JSON.stringify({ f: FORMAT, v: saved.v, env: saved.env, flags: saved.flags });
}

/** 32-bit FNV-1a, hex: short, stable, and enough to keep names apart. */
function fnv1a(text: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0).toString(16).padStart(8, "0");
}
