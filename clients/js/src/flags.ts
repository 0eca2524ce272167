/**
 * An environment's flags as the client holds them, and the rules of `snap` and `delta`
 * (docs/protocol.md): a snap replaces everything, a delta applies only on top of the version
 * it names as its `base`. Plain data, no sockets: unit-tested on its own.
 */

/** One flag as the server sends it: the version it last changed at, and its value. */
export interface FlagEntry {
  v: number;
  value: unknown;
}

export interface SnapFrame {
  t: "snap";
  v: number;
  flags: Record<string, FlagEntry>;
}

export interface DeltaFrame {
  t: "delta";
  base: number;
  v: number;
  put: Record<string, FlagEntry>;
  del: Record<string, number>;
}

/** What applying a delta did: `applied` (with the keys it put or deleted), or `gap` (its
 * base is not the version held: it is not applied, and the client reconnects with `since`). */
export type DeltaResult =
  | { kind: "applied"; changed: string[] }
  | { kind: "gap" };

export class FlagSet {
  /** The environment version held, or null before a snapshot (or a cache). */
  version: number | null = null;
  private flags = new Map<string, FlagEntry>();

  get size(): number {
    return this.flags.size;
  }

  get(key: string): FlagEntry | undefined {
    return this.flags.get(key);
  }

  has(key: string): boolean {
    return this.flags.has(key);
  }

  /** Every flag's value, as a fresh object. */
  values(): Record<string, unknown> {
    // (fromEntries defines own properties: a key "__proto__" stays a key)
    return Object.fromEntries(Array.from(this.flags, ([key, entry]) => [key, entry.value]));
  }

  entries(): Record<string, FlagEntry> {
    return Object.fromEntries(this.flags);
  }

  /** Forget everything (the flags held belong to another environment). */
  clear(): void {
    this.flags = new Map();
    this.version = null;
  }

  /** Replace everything with a snapshot; the keys whose value changed, appeared or went. */
  applySnap(frame: Pick<SnapFrame, "v" | "flags">): string[] {
    const changed: string[] = [];
    const next = new Map<string, FlagEntry>();
    for (const [key, entry] of Object.entries(frame.flags)) {
      next.set(key, entry);
      const old = this.flags.get(key);
      if (old === undefined || old.v !== entry.v || !sameValue(old.value, entry.value)) {
        changed.push(key);
      }
    }
    for (const key of this.flags.keys()) if (!next.has(key)) changed.push(key);
    this.flags = next;
    this.version = frame.v;
    return changed;
  }

  /** Apply a delta if it continues the version held. */
  applyDelta(frame: Pick<DeltaFrame, "base" | "v" | "put" | "del">): DeltaResult {
    if (this.version === null || frame.base !== this.version) return { kind: "gap" };
    const changed: string[] = [];
    for (const [key, entry] of Object.entries(frame.put)) {
      this.flags.set(key, entry);
      changed.push(key);
    }
    for (const key of Object.keys(frame.del)) {
      if (this.flags.delete(key)) changed.push(key);
    }
    this.version = frame.v;
    return { kind: "applied", changed };
  }
}

/** Structural equality for values that came from JSON (or msgpack of JSON). */
export function sameValue(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) {
    return Number.isNaN(a) && Number.isNaN(b);
  }
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  if (Array.isArray(a)) {
    const bb = b as unknown[];
    return a.length === bb.length && a.every((x, i) => sameValue(x, bb[i]));
  }
  const ka = Object.keys(a as object);
  const kb = Object.keys(b as object);
  return ka.length === kb.length && ka.every(
    (k) => Object.prototype.hasOwnProperty.call(b, k)
      && sameValue((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}
