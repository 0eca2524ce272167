import assert from "node:assert/strict";
import { test } from "node:test";

import { cacheKey, parseSaved, serialize } from "../build/cache.js";

test("saved flags round-trip, per url and key, without the key in the name", () => {
  const saved = { v: 7, env: "prod", flags: { a: { v: 7, value: { x: [1, null] } }, b: { v: 2, value: false } } };
  assert.deepEqual(parseSaved(serialize(saved)), saved);
  const k = cacheKey("ws://h/v1/stream", "sdk-secret");
  assert.ok(!k.includes("sdk-secret"));
  assert.notEqual(k, cacheKey("ws://h/v1/stream", "sdk-other"));
  assert.notEqual(k, cacheKey("ws://g/v1/stream", "sdk-secret"));
  assert.equal(k, cacheKey("ws://h/v1/stream", "sdk-secret"));
});

test("anything unreadable is no cache", () => {
  assert.deepEqual(parseSaved('{"f":2,"v":1,"flags":{}}'), { v: 1, env: null, flags: {} }, "env unknown");
  for (const bad of [null, "", "{", "[]", '{"f":2}', '{"f":1,"v":1,"flags":{}}', '{"f":2,"v":-1,"flags":{}}',
                     '{"f":2,"v":1.5,"flags":{}}', '{"f":2,"v":1,"flags":{"a":3}}', '{"f":2,"v":1,"flags":{"a":{"v":1}}}']) {
    assert.equal(parseSaved(bad), null, String(bad));
  }
});
