// Tests for jobs.ts: run with `deno test --no-config --node-modules-dir=none` (scripts/test.sh does).
// Supabase's REST API (PostgREST) and RunPod's API are played by a fake `fetch` that keeps a table
// in memory and implements the PostgREST filters this function uses, so conditional updates behave
// as compare-and-set, as they do on the real server.
import assert from "node:assert/strict";
import { configFromEnv, jobInput, processTrainingJobs, scrub, type Config, type JobRow } from "./jobs.ts";

const SERVICE_KEY = "service-role-secret-0123456789";
const RUNPOD_KEY = "rp_secret_abcdefghijklmnop";

function config(overrides: Partial<Config> = {}): Config {
  return {
    supabaseUrl: "https://project.supabase.co",
    serviceRoleKey: SERVICE_KEY,
    runpodApiKey: RUNPOD_KEY,
    runpodEndpointId: "ep123",
    runpodApiBase: "https://api.runpod.ai/v2",
    jobsTable: "training_jobs",
    maxJobsPerRun: 10,
    maxSubmitAttempts: 3,
    executionTimeoutS: 7200,
    claimStaleAfterS: 600,
    ...overrides,
  };
}

function row(job_id: string, extra: Partial<JobRow> & Record<string, unknown> = {}): Record<string, unknown> {
  return {
    job_id, status: "queued", base_model: "Qwen/Qwen3-Next-80B-A3B-Instruct", model_revision: null,
    dataset: { uri: "https://project.supabase.co/storage/v1/object/sign/data/train.jsonl?token=abc" },
    hyperparameters: { epochs: 2, lora_r: 16 }, output_prefix: null, user_id: "user-1", metadata: {},
    runpod_job_id: null, submit_attempts: 0, submitted_at: null, error: null, created_at: "2026-11-25T10:00:00Z",
    ...extra,
  };
}

/** One PostgREST filter, as `column=op.value`. */
function matches(rowValue: unknown, filter: string): boolean {
  const [op, ...rest] = filter.split(".");
  const value = decodeURIComponent(rest.join("."));
  if (op === "eq") return String(rowValue) === value;
  if (op === "lt") return rowValue !== null && String(rowValue) < value;
  if (op === "is" && value === "null") return rowValue === null;
  if (op === "in") return value.replace(/^\(|\)$/g, "").split(",").includes(String(rowValue));
  if (op === "like") return rowValue !== null && new RegExp("^" + value.replace(/\*/g, ".*") + "$").test(String(rowValue));
  if (op === "not") return !matches(rowValue, rest.join("."));
  throw new Error(`filter not supported by the fake: ${filter}`);
}

class FakeApis {
  rows: Record<string, unknown>[];
  runs: { url: string; body: Record<string, unknown>; auth: string | null }[] = [];
  requests: { method: string; url: string; headers: Headers }[] = [];
  runpodStatus: Record<string, Record<string, unknown>> = {};
  runFailures = 0; // the next N /run calls answer 503
  nextRunpodId = 1;

  constructor(rows: Record<string, unknown>[]) {
    this.rows = rows;
  }

  fetch = async (input: string | URL | Request, init: RequestInit = {}): Promise<Response> => {
    const url = new URL(String(input));
    const method = init.method ?? "GET";
    const headers = new Headers(init.headers);
    this.requests.push({ method, url: url.toString(), headers });
    if (url.host === "project.supabase.co") return this.postgrest(url, method, headers, init.body as string | undefined);
    if (url.host === "api.runpod.ai") return this.runpod(url, method, headers, init.body as string | undefined);
    return new Response("unknown host", { status: 599 });
  };

  private postgrest(url: URL, method: string, headers: Headers, body?: string): Response {
    assert.equal(headers.get("apikey"), SERVICE_KEY);
    assert.equal(headers.get("Authorization"), `Bearer ${SERVICE_KEY}`);
    assert.equal(url.pathname, "/rest/v1/training_jobs");
    let selected = this.rows.filter((r) => {
      for (const [key, value] of url.searchParams) {
        if (["select", "order", "limit"].includes(key)) continue;
        if (!matches(r[key], value)) return false;
      }
      return true;
    });
    if (url.searchParams.get("order") === "created_at.asc") {
      selected = [...selected].sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
    }
    const limit = url.searchParams.get("limit");
    if (limit) selected = selected.slice(0, Number(limit));
    if (method === "PATCH") {
      assert.equal(headers.get("Prefer"), "return=representation");
      const values = JSON.parse(body ?? "{}");
      for (const r of selected) Object.assign(r, values);
    }
    return Response.json(selected.map((r) => ({ ...r })));
  }

  private runpod(url: URL, method: string, headers: Headers, body?: string): Response {
    assert.equal(headers.get("Authorization"), `Bearer ${RUNPOD_KEY}`);
    if (method === "POST" && url.pathname === "/v2/ep123/run") {
      if (this.runFailures > 0) {
        this.runFailures -= 1;
        return new Response(`{"error":"no workers; key ${RUNPOD_KEY}"}`, { status: 503 });
      }
      this.runs.push({ url: url.toString(), body: JSON.parse(body ?? "{}"), auth: headers.get("Authorization") });
      return Response.json({ id: `rp-${this.nextRunpodId++}`, status: "IN_QUEUE" });
    }
    const found = url.pathname.match(/^\/v2\/ep123\/status\/(.+)$/);
    if (method === "GET" && found) {
      const state = this.runpodStatus[found[1]];
      return state ? Response.json({ id: found[1], ...state }) : new Response("not found", { status: 404 });
    }
    return new Response("no route", { status: 404 });
  }
}

const at = (iso: string) => () => new Date(iso);

Deno.test("queued rows are submitted once each, oldest first, with the worker's input", async () => {
  const apis = new FakeApis([
    row("job-b", { created_at: "2026-11-25T10:05:00Z", output_prefix: "team-a", model_revision: "main" }),
    row("job-a"),
    row("job-done", { status: "succeeded" }),
  ]);
  const summary = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z"));
  assert.deepEqual(summary.submitted, [{ job_id: "job-a", runpod_job_id: "rp-1" }, { job_id: "job-b", runpod_job_id: "rp-2" }]);
  assert.equal(apis.runs.length, 2);
  assert.deepEqual(apis.runs[1].body, {
    input: {
      action: "train", job_id: "job-b", base_model: "Qwen/Qwen3-Next-80B-A3B-Instruct", model_revision: "main",
      dataset: { uri: "https://project.supabase.co/storage/v1/object/sign/data/train.jsonl?token=abc" },
      hyperparameters: { epochs: 2, lora_r: 16 }, output: { prefix: "team-a" }, metadata: { user_id: "user-1" },
    },
    policy: { executionTimeout: 7_200_000 },
  });
  assert.equal(apis.rows[0].runpod_job_id, "rp-2");
  assert.equal(apis.rows[1].runpod_job_id, "rp-1");
  assert.equal(apis.rows[1].submit_attempts, 1);

  const again = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:01:00Z"));
  assert.deepEqual(again.submitted, []);
  assert.equal(apis.runs.length, 2, "a row was submitted twice");
});

Deno.test("two overlapping invocations never submit the same row twice", async () => {
  const apis = new FakeApis([row("job-1"), row("job-2"), row("job-3")]);
  const [one, two] = await Promise.all([
    processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z")),
    processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z")),
  ]);
  const ids = [...one.submitted, ...two.submitted].map((s) => s.job_id).sort();
  assert.deepEqual(ids, ["job-1", "job-2", "job-3"]);
  assert.equal(apis.runs.length, 3);
});

Deno.test("a failed submission is retried on the next run, then given up with the reason", async () => {
  const apis = new FakeApis([row("job-1")]);
  apis.runFailures = 5;
  const cfg = config({ maxSubmitAttempts: 2 });
  const first = await processTrainingJobs(cfg, apis.fetch, at("2026-11-25T11:00:00Z"));
  assert.equal(first.retried.length, 1);
  assert.equal(apis.rows[0].status, "queued");
  assert.equal(apis.rows[0].runpod_job_id, null);
  assert.match(String(apis.rows[0].error), /submitting to RunPod failed: HTTP 503/);
  assert.ok(!String(apis.rows[0].error).includes(RUNPOD_KEY), "the RunPod key reached the row");
  const second = await processTrainingJobs(cfg, apis.fetch, at("2026-11-25T11:01:00Z"));
  assert.equal(second.failed.length, 1);
  assert.equal(apis.rows[0].status, "failed");
  assert.match(String(apis.rows[0].error), /gave up after 2 attempts/);
});

Deno.test("a claim left by a crashed invocation is released after it goes stale", async () => {
  const apis = new FakeApis([row("job-1", { runpod_job_id: "claim:dead", submitted_at: "2026-11-25T10:00:00Z" })]);
  const early = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T10:05:00Z"));
  assert.deepEqual([early.released, early.submitted], [[], []]);
  const late = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T10:11:00Z"));
  assert.deepEqual(late.released, ["job-1"]);
  assert.deepEqual(late.submitted.map((s) => s.job_id), ["job-1"]);
});

Deno.test("jobs RunPod ended without the worker recording it are settled", async () => {
  const apis = new FakeApis([
    row("timed-out", { status: "running", runpod_job_id: "rp-a" }),
    row("failed", { status: "running", runpod_job_id: "rp-b" }),
    row("completed", { status: "running", runpod_job_id: "rp-c" }),
    row("still-running", { status: "running", runpod_job_id: "rp-d" }),
    row("recorded", { status: "succeeded", runpod_job_id: "rp-e" }),
  ]);
  apis.runpodStatus = {
    "rp-a": { status: "TIMED_OUT" },
    "rp-b": { status: "FAILED", error: "train: the loss became nan at step 3" },
    "rp-c": { status: "COMPLETED", output: { job_id: "completed", status: "succeeded" } },
    "rp-d": { status: "IN_PROGRESS" },
    "rp-e": { status: "COMPLETED", output: {} },
  };
  const summary = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z"));
  const byId = Object.fromEntries(apis.rows.map((r) => [r.job_id, r]));
  assert.equal(byId["timed-out"].status, "failed");
  assert.match(String(byId["timed-out"].error), /execution timeout.*resumes from its last checkpoint/);
  assert.equal(byId["failed"].status, "failed");
  assert.equal(byId["failed"].error, "runpod: train: the loss became nan at step 3");
  assert.equal(byId["completed"].status, "succeeded");
  assert.deepEqual(byId["completed"].output, { job_id: "completed", status: "succeeded" });
  assert.equal(byId["still-running"].status, "running");
  assert.deepEqual(summary.settled.map((s) => s.job_id).sort(), ["completed", "failed", "timed-out"]);
});

Deno.test("configuration errors name the variable; scrub removes secrets and signed-URL queries", () => {
  assert.throws(() => configFromEnv(() => undefined), /SUPABASE_URL is not set/);
  const env: Record<string, string> = {
    SUPABASE_URL: "https://p.supabase.co/", SUPABASE_SERVICE_ROLE_KEY: "k", RUNPOD_API_KEY: "r",
    RUNPOD_ENDPOINT_ID: "e", MAX_JOBS_PER_RUN: "zero",
  };
  assert.throws(() => configFromEnv((n) => env[n]), /MAX_JOBS_PER_RUN must be a positive number; got zero/);
  delete env.MAX_JOBS_PER_RUN;
  const cfg = configFromEnv((n) => env[n]);
  assert.equal(cfg.supabaseUrl, "https://p.supabase.co");
  assert.equal(cfg.executionTimeoutS, null);
  assert.equal(scrub("GET https://x/sign/a.jsonl?token=abc failed, key rp_secret_abcdefghijklmnop", [RUNPOD_KEY]),
    "GET https://x/sign/a.jsonl?<redacted> failed, key <redacted>");
});

Deno.test("jobInput leaves out what the row does not set", () => {
  const input = jobInput({ ...row("j"), base_model: null, dataset: "datasets/x.jsonl", hyperparameters: null, user_id: null } as unknown as JobRow);
  assert.deepEqual(input, { action: "train", job_id: "j", dataset: "datasets/x.jsonl" });
});

Deno.test("a row the worker's schema refuses fails at once with the reason, and is never submitted", async () => {
  const apis = new FakeApis([
    row("job-bad", { hyperparameters: { lora_rank: 8, lora_dropout: 1.5 } }),
    row("job-good", { created_at: "2026-11-25T10:01:00Z" }),
  ]);
  const summary = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z"));
  assert.deepEqual(summary.submitted, [{ job_id: "job-good", runpod_job_id: "rp-1" }]);
  assert.equal(apis.runs.length, 1);
  assert.equal(apis.runs[0].body.input && (apis.runs[0].body.input as Record<string, unknown>).job_id, "job-good");
  const bad = apis.rows.find((r) => r.job_id === "job-bad")!;
  assert.equal(bad.status, "failed");
  assert.equal(bad.runpod_job_id, null);
  assert.equal(bad.finished_at, "2026-11-25T11:00:00.000Z");
  assert.equal(bad.error, "input: unknown key 'lora_rank' in `hyperparameters`; did you mean 'lora_r'?; " +
    "`hyperparameters.lora_dropout` must be less than 1; got 1.5");
  assert.deepEqual(summary.rejected, [{ job_id: "job-bad", error: bad.error }]);

  const again = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:01:00Z"));
  assert.deepEqual(again.rejected, [], "a failed row is not looked at again");
});

Deno.test("a rejected row's error carries no secret and no signed-URL query", async () => {
  const apis = new FakeApis([row("job-x", {
    dataset: { uri: "https://project.supabase.co/storage/v1/object/sign/d.jsonl?token=abc", formatt: SERVICE_KEY },
  })]);
  const summary = await processTrainingJobs(config(), apis.fetch, at("2026-11-25T11:00:00Z"));
  assert.equal(summary.rejected.length, 1);
  const error = String(apis.rows[0].error);
  assert.ok(error.startsWith("input: unknown key 'formatt' in `dataset`; did you mean 'format'?"), error);
  assert.ok(!error.includes(SERVICE_KEY) && !error.includes("token=abc"), error);
});
