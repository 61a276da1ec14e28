// The Edge Function's job-input validation against the worker's schema: run by scripts/test.sh
// (`deno test --no-config --node-modules-dir=none supabase/functions/`). The same cases
// (testdata/job_inputs.json) go through the worker's own pydantic model in tests/test_edge_schema.py,
// so the two sides are tested against each other.
import assert from "node:assert/strict";
import committed from "../../../schema/job-input.schema.json" with { type: "json" };
import bundled from "./job-input.schema.json" with { type: "json" };
import cases from "./testdata/job_inputs.json" with { type: "json" };
import { jobInputErrors } from "./jobs.ts";
import { assertSupported, validate } from "./schema.ts";

Deno.test("the function's schema is the committed schema/job-input.schema.json", () => {
  assert.deepEqual(bundled, committed, "copy schema/job-input.schema.json into the function's folder");
});

for (const c of cases.cases) {
  Deno.test(`job input: ${c.name}`, () => {
    const errors = jobInputErrors(c.input);
    if (c.schema_valid) {
      assert.deepEqual(errors, [], `expected valid, got: ${errors.join(" | ")}`);
      return;
    }
    assert.ok(errors.length > 0, "expected the schema to reject it");
    const text = errors.join(" | ");
    for (const words of (c as { errors?: string[] }).errors ?? []) assert.ok(text.includes(words), `"${words}" not in: ${text}`);
  });
}

Deno.test("a schema keyword the validator does not implement is refused, not skipped", () => {
  assert.throws(() => assertSupported({ type: "object", properties: { a: { type: "string", format: "uri" } } }),
    /keyword 'format' at #\/properties\/a is not supported/);
  assert.doesNotThrow(() => assertSupported(committed));
});

Deno.test("every problem is reported, each with its field", () => {
  const errors = validate({ a: 0, b: "x", c: 1 }, {
    type: "object", additionalProperties: false,
    properties: { a: { type: "integer", minimum: 1 }, b: { type: "string", minLength: 2 } },
  });
  assert.deepEqual(errors, [
    "`a` must be greater than or equal to 1; got 0",
    "`b` must have at least 2 characters; got 1",
    "unknown key 'c'; valid keys: a, b",
  ]);
});
