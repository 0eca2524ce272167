import assert from "node:assert/strict";
import { test } from "node:test";

import { FlagSet, sameValue } from "../build/flags.js";

const e = (v, value) => ({ v, value });

test("a snapshot replaces everything and names what changed", () => {
  const f = new FlagSet();
  assert.equal(f.version, null);
  assert.deepEqual(f.applySnap({ v: 3, flags: { a: e(1, true), b: e(3, "x") } }).sort(), ["a", "b"]);
  assert.deepEqual(f.values(), { a: true, b: "x" });
  const changed = f.applySnap({ v: 5, flags: { a: e(1, true), c: e(5, 1) } });
  assert.deepEqual(changed.sort(), ["b", "c"]);  // b went, c came, a is the same
  assert.equal(f.version, 5);
  assert.deepEqual(f.values(), { a: true, c: 1 });
});

test("a delta applies only on the version it names as base", () => {
  const f = new FlagSet();
  assert.deepEqual(f.applyDelta({ base: 0, v: 1, put: {}, del: {} }), { kind: "gap" }, "nothing held");
  f.applySnap({ v: 2, flags: { a: e(1, 1), b: e(2, 2) } });
  assert.deepEqual(f.applyDelta({ base: 3, v: 4, put: { a: e(4, 9) }, del: {} }), { kind: "gap" });
  assert.deepEqual(f.values(), { a: 1, b: 2 }, "a gap is never applied");
  assert.deepEqual(f.applyDelta({ base: 1, v: 2, put: { a: e(2, 7) }, del: {} }), { kind: "gap" }, "an old one too");
  assert.deepEqual(f.values(), { a: 1, b: 2 });
  const r = f.applyDelta({ base: 2, v: 4, put: { a: e(4, 5), c: e(3, "c") }, del: { b: 4, zz: 4 } });
  assert.deepEqual(r, { kind: "applied", changed: ["a", "c", "b"] }, "a delete of an absent flag changes nothing");
  assert.equal(f.version, 4);
  assert.deepEqual(f.values(), { a: 5, c: "c" });
  assert.deepEqual(f.applyDelta({ base: 4, v: 4, put: {}, del: {} }), { kind: "applied", changed: [] }, "current");
});

test("values compare by structure", () => {
  assert.ok(sameValue({ a: [1, { b: null }] }, { a: [1, { b: null }] }));
  assert.ok(!sameValue({ a: [1] }, { a: [1, 2] }));
  assert.ok(!sameValue({ a: 1 }, { b: 1 }));
  assert.ok(!sameValue([1], { 0: 1 }));
  assert.ok(!sameValue(1, "1"));
});
