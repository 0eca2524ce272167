import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, decideClose, MAX_RETRY_MS, retryFromReason } from "../build/policy.js";

test("backoff: full jitter under a doubling ceiling, capped, reset", () => {
  const top = new Backoff(500, 30_000, () => 0.999999);
  const ceilings = Array.from({ length: 9 }, () => top.next());
  assert.deepEqual(ceilings, [499, 999, 1999, 3999, 7999, 15999, 29999, 29999, 29999]);
  top.reset();
  assert.equal(top.next(), 499);
  const bottom = new Backoff(500, 30_000, () => 0);
  assert.equal(bottom.next(), 0, "full jitter: a wait may be zero");
  const real = new Backoff();
  for (let i = 0; i < 200; i++) {
    const d = real.next();
    assert.ok(d >= 0 && d < 30_000, `${d}`);
  }
});

test("close codes: what stops, what waits for retry_ms, what backs off", () => {
  const b = () => new Backoff(500, 30_000, () => 0.5);
  const refused = decideClose(4001, "SDK key revoked", null, b());
  assert.equal(refused.action, "stop");
  assert.match(refused.error.message, /refused the SDK key.*4001 SDK key revoked/);
  assert.equal(refused.error.code, 4001);
  for (const code of [1000, 4002, 1002, 1007, 1009]) assert.equal(decideClose(code, "", null, b()).action, "stop");
  assert.deepEqual(decideClose(1012, "node draining", 730, b()), { action: "retry", delayMs: 730, why: "1012 node draining" });
  assert.equal(decideClose(1000, "", 900, b()).delayMs, 900, "a goaway said come back: even after 1000");
  assert.equal(decideClose(1001, "", null, b()).delayMs, 250, "no goaway: backoff, soon at first");
  const again = b();
  assert.deepEqual([1, 2, 3].map(() => decideClose(1001, "", null, again).delayMs), [250, 500, 1000],
                   "a proxy that keeps answering 1001 is backed off from");
  assert.equal(decideClose(4100, "slow consumer", 2400, b()).delayMs, 2400);
  assert.equal(decideClose(4100, "slow consumer", null, b()).delayMs, 250, "no goaway: backoff");
  assert.equal(decideClose(4101, "too many connections from this address; retry_ms=1340", null, b()).delayMs, 1340);
  assert.equal(decideClose(4101, "limit", 900, b()).delayMs, 900);
  assert.equal(decideClose(4101, "busy", null, b()).delayMs, 250, "4101 without retry_ms backs off");
  assert.equal(decideClose(4100, "", 10 ** 12, b()).delayMs, MAX_RETRY_MS, "clamped");
  const bo = b();
  assert.equal(decideClose(1006, "", null, bo).delayMs, 250);
  assert.equal(decideClose(1006, "", null, bo).delayMs, 500, "each failure doubles the ceiling");
  assert.equal(decideClose(1011, "", null, bo).delayMs, 1000);
  assert.equal(retryFromReason("x; retry_ms=12"), 12);
  assert.equal(retryFromReason("retry_ms=abc"), null);
});
