/**
 * What the client does when a connection ends (docs/protocol.md, "Close codes"), and how long
 * it waits before the next one. Pure: the client feeds it what it saw and gets a decision.
 */

export const CLOSE = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  SERVICE_RESTART: 1012,
  BAD_CREDENTIALS: 4001,
  PROTOCOL_ERROR: 4002,
  AUTH_TIMEOUT: 4008,
  EVICTED: 4100,
  TOO_MANY: 4101,
} as const;

/** Exponential backoff with full jitter (a uniform wait in [0, min(cap, base * 2^n)]), as
 * the AWS architecture blog's "Exponential Backoff And Jitter" describes: reconnecting clients
 * of a node that went away spread out instead of arriving together. */
export class Backoff {
  private attempt = 0;

  constructor(
    readonly baseMs = 500,
    readonly capMs = 30_000,
    private readonly random: () => number = Math.random,
  ) {}

  /** The next wait, and one more failure counted. */
  next(): number {
    const ceiling = Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return Math.floor(this.random() * ceiling);
  }

  /** After a connection that held long enough: the next failure waits little again. */
  reset(): void {
    this.attempt = 0;
  }

  get failures(): number {
    return this.attempt;
  }
}

export type CloseDecision =
  | { action: "retry"; delayMs: number; why: string }
  | { action: "stop"; error: Error };

/** The longest wait a server may ask for (10 minutes): a bigger `retry_ms` is clamped. */
export const MAX_RETRY_MS = 600_000;

/** `...; retry_ms=1340` at the end of a 4101's close reason (before a `hello`, no goaway). */
export function retryFromReason(reason: string): number | null {
  const m = /retry_ms=(\d+)\s*$/.exec(reason);
  return m ? Number(m[1]) : null;
}

/** What to do after a close with `code` and `reason`; `goawayRetryMs` is the `retry_ms` of a
 * `goaway` received on that connection, if any. */
export function decideClose(
  code: number,
  reason: string,
  goawayRetryMs: number | null,
  backoff: Backoff,
): CloseDecision {
  const said = reason ? `${code} ${reason}` : `${code}`;
  const told = goawayRetryMs ?? (code === CLOSE.TOO_MANY ? retryFromReason(reason) : null);
  if (told !== null) {
    // The server said when to come back (goaway, or a 4101's reason): that, whatever the code.
    if (code === CLOSE.TOO_MANY) backoff.next();  // a refusal still counts as a failure
    return { action: "retry", why: said, delayMs: Math.min(told, MAX_RETRY_MS) };
  }
  switch (code) {
    case CLOSE.BAD_CREDENTIALS:
      return { action: "stop", error: new RelayRefusedError(
        `relay refused the SDK key (${said}): check the key, or ask for a new one`, code) };
    case CLOSE.NORMAL:
      return { action: "stop", error: new RelayRefusedError(
        `relay ended the stream (${said}): the server asked this client to stop`, code) };
    case CLOSE.PROTOCOL_ERROR:
    case CLOSE.PROTOCOL:
    case CLOSE.INVALID_DATA:
    case CLOSE.TOO_BIG:
      return { action: "stop", error: new RelayRefusedError(
        `relay closed the connection for a protocol error (${said}): this client is broken`,
        code) };
    default:
      // 1001 and 1012 without a goaway, 1006 (no close frame: the network, a killed node),
      // 1011, 4008, 4100 or 4101 without retry_ms, anything unknown: backoff. Its first wait
      // is under half a second, so a stop or a drain is followed soon.
      return { action: "retry", why: said, delayMs: backoff.next() };
  }
}

/** An end the client will not retry: a bad or revoked key (4001), a protocol error, or a
 * normal close (1000) from the server, which the protocol says means "stop". */
export class RelayRefusedError extends Error {
  constructor(message: string, readonly code: number) {
    super(message);
    this.name = "RelayRefusedError";
  }
}
