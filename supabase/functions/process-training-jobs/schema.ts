// A small JSON Schema validator for the worker's job input: exactly the keywords that
// job-input.schema.json (`python cli.py schema`, a copy of schema/job-input.schema.json) uses, and an
// error for any other, so a schema that grows a keyword this file does not know fails its tests
// instead of passing payloads unchecked. No imports: nothing is fetched at deploy or test time.

export type Schema = Record<string, unknown>;

// Keywords that only describe (they never reject a value).
const ANNOTATIONS = new Set(["title", "description", "default", "examples", "$defs"]);
const CHECKED = new Set([
  "type", "properties", "additionalProperties", "required", "anyOf", "$ref", "enum", "const",
  "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
  "items", "minItems", "maxItems",
]);

/** Throw if `schema` uses a keyword this validator does not implement (checked once, up front). */
export function assertSupported(schema: unknown, path = "#"): void {
  if (Array.isArray(schema)) {
    schema.forEach((item, i) => assertSupported(item, `${path}/${i}`));
    return;
  }
  if (schema === null || typeof schema !== "object") return;
  for (const [key, value] of Object.entries(schema as Schema)) {
    if (!ANNOTATIONS.has(key) && !CHECKED.has(key)) {
      throw new Error(`job schema keyword '${key}' at ${path} is not supported by schema.ts: implement it`);
    }
    if (key === "properties" || key === "$defs") {
      for (const [name, sub] of Object.entries(value as Schema)) assertSupported(sub, `${path}/${key}/${name}`);
    } else if (key === "anyOf" || key === "items" || key === "additionalProperties") {
      assertSupported(value, `${path}/${key}`);
    }
  }
}

function typeOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value; // string, boolean, object
}

function hasType(value: unknown, type: string): boolean {
  const actual = typeOf(value);
  return actual === type || (type === "number" && actual === "integer");
}

const show = (value: unknown): string => {
  const text = JSON.stringify(value);
  return text === undefined ? String(value) : text.length > 60 ? `${text.slice(0, 57)}...` : text;
};

const where = (path: string): string => (path ? `\`${path}\`` : "the input");

/** Every reason `value` does not match `schema`, each naming the field, the value and the rule. */
export function validate(value: unknown, schema: Schema, root: Schema = schema, path = ""): string[] {
  if (typeof schema.$ref === "string") {
    const name = schema.$ref.replace(/^#\/\$defs\//, "");
    const target = (root.$defs as Record<string, Schema> | undefined)?.[name];
    if (!target) throw new Error(`job schema: unresolved $ref ${schema.$ref}`);
    return validate(value, target, root, path);
  }
  if (Array.isArray(schema.anyOf)) {
    const branches = schema.anyOf as Schema[];
    const results = branches.map((branch) => validate(value, branch, root, path));
    if (results.some((errors) => errors.length === 0)) return [];
    // Report the branch of the value's own type (e.g. the string rule for a string), else the types.
    const typed = branches.findIndex((b) => typeof b.type === "string" && hasType(value, b.type) ||
      (b.$ref !== undefined && typeOf(value) === "object"));
    if (typed >= 0) return results[typed];
    const types = branches.map((b) => (b.$ref ? "object" : b.type ?? "value")).join(" or ");
    return [`${where(path)} must be ${types}; got ${show(value)}`];
  }
  if (typeof schema.type === "string" && !hasType(value, schema.type)) {
    const article = /^[aeiou]/.test(schema.type) ? "an" : "a";
    return [`${where(path)} must be ${article} ${schema.type}; got ${show(value)}`];
  }
  const errors: string[] = [];
  if (Array.isArray(schema.enum) && !schema.enum.some((option) => option === value)) {
    errors.push(`${where(path)} must be one of ${schema.enum.map(show).join(", ")}; got ${show(value)}`);
  }
  if ("const" in schema && schema.const !== value) {
    errors.push(`${where(path)} must be ${show(schema.const)}; got ${show(value)}`);
  }
  if (typeof value === "number") errors.push(...numberErrors(value, schema, path));
  if (typeof value === "string") errors.push(...stringErrors(value, schema, path));
  if (Array.isArray(value)) {
    if (typeof schema.minItems === "number" && value.length < schema.minItems) {
      errors.push(`${where(path)} must have at least ${schema.minItems} items; got ${value.length}`);
    }
    if (typeof schema.maxItems === "number" && value.length > schema.maxItems) {
      errors.push(`${where(path)} must have at most ${schema.maxItems} items; got ${value.length}`);
    }
    if (schema.items && typeof schema.items === "object") {
      value.forEach((item, i) => errors.push(...validate(item, schema.items as Schema, root, `${path}[${i}]`)));
    }
  }
  if (typeOf(value) === "object") errors.push(...objectErrors(value as Record<string, unknown>, schema, root, path));
  return errors;
}

function numberErrors(value: number, schema: Schema, path: string): string[] {
  const errors: string[] = [];
  const rules: [string, (limit: number) => boolean, string][] = [
    ["minimum", (limit) => value >= limit, "greater than or equal to"],
    ["maximum", (limit) => value <= limit, "less than or equal to"],
    ["exclusiveMinimum", (limit) => value > limit, "greater than"],
    ["exclusiveMaximum", (limit) => value < limit, "less than"],
  ];
  for (const [keyword, ok, words] of rules) {
    const limit = schema[keyword];
    if (typeof limit === "number" && !ok(limit)) errors.push(`${where(path)} must be ${words} ${limit}; got ${value}`);
  }
  return errors;
}

function stringErrors(value: string, schema: Schema, path: string): string[] {
  const errors: string[] = [];
  const length = [...value].length; // code points, as Python counts them
  if (typeof schema.minLength === "number" && length < schema.minLength) {
    errors.push(`${where(path)} must have at least ${schema.minLength} characters; got ${length}`);
  }
  if (typeof schema.maxLength === "number" && length > schema.maxLength) {
    errors.push(`${where(path)} must have at most ${schema.maxLength} characters; got ${length}`);
  }
  if (typeof schema.pattern === "string" && !new RegExp(schema.pattern, "u").test(value)) {
    errors.push(`${where(path)} must match ${schema.pattern}; got ${show(value)}`);
  }
  return errors;
}

function objectErrors(value: Record<string, unknown>, schema: Schema, root: Schema, path: string): string[] {
  const errors: string[] = [];
  const properties = (schema.properties ?? {}) as Record<string, Schema>;
  for (const name of (schema.required ?? []) as string[]) {
    if (!(name in value)) errors.push(`${where(path ? `${path}.${name}` : name)} is required`);
  }
  for (const [key, item] of Object.entries(value)) {
    const at = path ? `${path}.${key}` : key;
    if (key in properties) {
      errors.push(...validate(item, properties[key], root, at));
    } else if (schema.additionalProperties === false) {
      const known = Object.keys(properties);
      const close = closest(key, known);
      errors.push(`unknown key '${key}'${path ? ` in \`${path}\`` : ""}; ` +
        (close ? `did you mean '${close}'?` : `valid keys: ${known.join(", ")}`));
    } else if (schema.additionalProperties && typeof schema.additionalProperties === "object") {
      errors.push(...validate(item, schema.additionalProperties as Schema, root, at));
    }
  }
  return errors;
}

/** The known key nearest `key` by edit distance, if it is near enough to be a typo. */
function closest(key: string, known: string[]): string | null {
  let best: string | null = null;
  let bestDistance = Infinity;
  for (const candidate of known) {
    const distance = editDistance(key.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  const near = bestDistance <= Math.max(1, Math.floor(key.length / 3)) && bestDistance < key.length;
  return best !== null && near ? best : null;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}
