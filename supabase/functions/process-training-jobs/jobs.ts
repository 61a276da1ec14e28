// process-training-jobs: submits queued `training_jobs` rows to the RunPod endpoint, once each,
// and settles rows whose RunPod job ended without the worker recording it (killed at the execution
// timeout, out of memory, cancelled).
//
// Pure logic with its dependencies passed in (fetch, config, clock), so it is tested without a
// network: see jobs_test.ts. index.ts is the Deno.serve entry that Supabase runs.
//
// Each row's input is checked against the worker's job schema (job-input.schema.json, a copy of
// schema/job-input.schema.json kept equal by tests) before it is submitted: a row the worker would
// refuse fails here at once, with the reason, and never costs a GPU start.

import jobSchema from "./job-input.schema.json" with { type: "json" };
import { assertSupported, type Schema, validate } from "./schema.ts";

assertSupported(jobSchema);

export interface Config {
  supabaseUrl: string;
  serviceRoleKey: string;
  runpodApiKey: string;
  runpodEndpointId: string;
  runpodApiBase: string; // https://api.runpod.ai/v2
  jobsTable: string; // training_jobs
  maxJobsPerRun: number;
  maxSubmitAttempts: number;
  executionTimeoutS: number | null; // RunPod policy.executionTimeout for each job
  claimStaleAfterS: number; // a claim older than this belonged to a crashed invocation
}

export interface JobRow {
  job_id: string;
  status: string;
  base_model: string | null;
  model_revision: string | null;
  dataset: unknown;
  hyperparameters: Record<string, unknown> | null;
  output_prefix: string | null;
  user_id: string | null;
  metadata: Record<string, unknown> | null;
  runpod_job_id: string | null;
  submit_attempts: number | null;
  submitted_at: string | null;
}

export interface Summary {
  submitted: { job_id: string; runpod_job_id: string }[];
  retried: { job_id: string; error: string }[];
  failed: { job_id: string; error: string }[];
  settled: { job_id: string; status: string }[];
  released: string[];
  rejected: { job_id: string; error: string }[];
}

type Fetch = typeof fetch;
const CLAIM = "claim:";

export function configFromEnv(env: (name: string) => string | undefined): Config {
  const required = (name: string): string => {
    const value = env(name);
    if (!value) throw new Error(`${name} is not set: set it in the function's secrets`);
    return value;
  };
  const number = (name: string, fallback: number): number => {
    const raw = env(name);
    if (raw === undefined || raw === "") return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} must be a positive number; got ${raw}`);
    return value;
  };
  const timeout = env("RUNPOD_EXECUTION_TIMEOUT_S");
  return {
    supabaseUrl: required("SUPABASE_URL").replace(/\/+$/, ""),
    serviceRoleKey: required("SUPABASE_SERVICE_ROLE_KEY"),
    runpodApiKey: required("RUNPOD_API_KEY"),
    runpodEndpointId: required("RUNPOD_ENDPOINT_ID"),
    runpodApiBase: (env("RUNPOD_API_BASE") || "https://api.runpod.ai/v2").replace(/\/+$/, ""),
    jobsTable: env("SUPABASE_JOBS_TABLE") || "training_jobs",
    maxJobsPerRun: number("MAX_JOBS_PER_RUN", 10),
    maxSubmitAttempts: number("MAX_SUBMIT_ATTEMPTS", 3),
    executionTimeoutS: timeout ? number("RUNPOD_EXECUTION_TIMEOUT_S", 0) : null,
    claimStaleAfterS: number("CLAIM_STALE_AFTER_S", 600),
  };
}

/** The worker's job input (its CONTRACT §1) built from a row. */
export function jobInput(row: JobRow): Record<string, unknown> {
  const input: Record<string, unknown> = { action: "train", job_id: row.job_id };
  if (row.base_model) input.base_model = row.base_model;
  if (row.model_revision) input.model_revision = row.model_revision;
  if (row.dataset !== null && row.dataset !== undefined) input.dataset = row.dataset;
  if (row.hyperparameters) input.hyperparameters = row.hyperparameters;
  if (row.output_prefix) input.output = { prefix: row.output_prefix };
  const metadata = { ...(row.metadata ?? {}) } as Record<string, unknown>;
  if (row.user_id) metadata.user_id = row.user_id;
  if (Object.keys(metadata).length) input.metadata = metadata;
  return input;
}

/** Why `input` breaks the worker's job schema: one sentence per problem, none when it is valid. */
export function jobInputErrors(input: unknown): string[] {
  return validate(input, jobSchema as Schema);
}

/** Error text without secrets: URLs lose their query strings, known keys are masked. */
export function scrub(text: string, secrets: string[]): string {
  let out = text.replace(/(https?:\/\/[^\s?#"'<>]+)\?[^\s"'<>]*/g, "$1?<redacted>");
  for (const secret of secrets) if (secret && secret.length >= 4) out = out.split(secret).join("<redacted>");
  return out;
}

class Rest {
  constructor(private config: Config, private fetchImpl: Fetch) {}

  private url(query: string): string {
    return `${this.config.supabaseUrl}/rest/v1/${this.config.jobsTable}?${query}`;
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return {
      apikey: this.config.serviceRoleKey,
      Authorization: `Bearer ${this.config.serviceRoleKey}`,
      "Content-Type": "application/json",
      ...extra,
    };
  }

  async select(query: string): Promise<JobRow[]> {
    const response = await this.fetchImpl(this.url(query), { headers: this.headers() });
    if (!response.ok) throw new Error(`reading ${this.config.jobsTable} failed: HTTP ${response.status} ${await response.text()}`);
    return await response.json();
  }

  /** PATCH rows matching `query`; returns the rows changed (a conditional update is a compare-and-set). */
  async update(query: string, values: Record<string, unknown>): Promise<JobRow[]> {
    const response = await this.fetchImpl(this.url(query), {
      method: "PATCH",
      headers: this.headers({ Prefer: "return=representation" }),
      body: JSON.stringify(values),
    });
    if (!response.ok) throw new Error(`updating ${this.config.jobsTable} failed: HTTP ${response.status} ${await response.text()}`);
    return await response.json();
  }
}

const eq = (value: string) => `eq.${encodeURIComponent(value)}`;

export async function processTrainingJobs(config: Config, fetchImpl: Fetch, now: () => Date = () => new Date()): Promise<Summary> {
  const rest = new Rest(config, fetchImpl);
  const secrets = [config.serviceRoleKey, config.runpodApiKey];
  const summary: Summary = { submitted: [], retried: [], failed: [], settled: [], released: [], rejected: [] };

  // 1. Claims left by an invocation that died between claiming and submitting go back to the queue.
  const staleBefore = new Date(now().getTime() - config.claimStaleAfterS * 1000).toISOString();
  const stale = await rest.update(
    `status=eq.queued&runpod_job_id=like.${CLAIM}*&submitted_at=lt.${encodeURIComponent(staleBefore)}`,
    { runpod_job_id: null },
  );
  summary.released.push(...stale.map((row) => row.job_id));

  // 2. Submit queued rows, oldest first, each claimed by a conditional update so that two
  //    overlapping invocations never submit the same row twice.
  const queued = await rest.select(
    `select=*&status=eq.queued&runpod_job_id=is.null&order=created_at.asc&limit=${config.maxJobsPerRun}`,
  );
  for (const row of queued) {
    const problems = jobInputErrors(jobInput(row));
    if (problems.length) {
      // The worker would fail it with an `input:` error: fail it here, without a GPU start. Only
      // while it is still queued and unclaimed, so a concurrent invocation's claim is never undone.
      const error = scrub(`input: ${problems.join("; ")}`, secrets).slice(0, 2000);
      const rejected = await rest.update(`job_id=${eq(row.job_id)}&status=eq.queued&runpod_job_id=is.null`, {
        status: "failed",
        error,
        finished_at: now().toISOString(),
      });
      if (rejected.length === 1) summary.rejected.push({ job_id: row.job_id, error });
      continue;
    }
    const claim = `${CLAIM}${crypto.randomUUID()}`;
    const claimed = await rest.update(`job_id=${eq(row.job_id)}&status=eq.queued&runpod_job_id=is.null`, {
      runpod_job_id: claim,
      submitted_at: now().toISOString(),
    });
    if (claimed.length !== 1) continue; // another invocation took it
    const attempts = (row.submit_attempts ?? 0) + 1;
    try {
      const runpodId = await submit(config, fetchImpl, row);
      await rest.update(`job_id=${eq(row.job_id)}&runpod_job_id=${eq(claim)}`, {
        runpod_job_id: runpodId,
        submit_attempts: attempts,
        error: null,
      });
      summary.submitted.push({ job_id: row.job_id, runpod_job_id: runpodId });
    } catch (error) {
      const message = scrub(`submitting to RunPod failed: ${(error as Error).message}`, secrets);
      const final = attempts >= config.maxSubmitAttempts;
      await rest.update(`job_id=${eq(row.job_id)}&runpod_job_id=${eq(claim)}`, {
        runpod_job_id: null,
        submit_attempts: attempts,
        error: final ? `${message} (gave up after ${attempts} attempts)` : message,
        ...(final ? { status: "failed", finished_at: now().toISOString() } : {}),
      });
      (final ? summary.failed : summary.retried).push({ job_id: row.job_id, error: message });
    }
  }

  // 3. Rows RunPod has finished with but the worker never settled (killed at the execution
  //    timeout, out of memory, cancelled, or a record write that failed).
  const open = await rest.select(
    `select=job_id,runpod_job_id,status&status=in.(queued,running)&runpod_job_id=not.is.null` +
      `&runpod_job_id=not.like.${CLAIM}*&limit=100`,
  );
  for (const row of open) {
    const state = await status(config, fetchImpl, row.runpod_job_id as string);
    if (state === null) continue;
    const settle = settlement(state);
    if (settle === null) continue;
    if (typeof settle.error === "string") settle.error = scrub(settle.error, secrets);
    const changed = await rest.update(`job_id=${eq(row.job_id)}&status=in.(queued,running)`, {
      ...settle,
      finished_at: now().toISOString(),
    });
    if (changed.length) summary.settled.push({ job_id: row.job_id, status: String(settle.status) });
  }
  return summary;
}

async function submit(config: Config, fetchImpl: Fetch, row: JobRow): Promise<string> {
  const body: Record<string, unknown> = { input: jobInput(row) };
  if (config.executionTimeoutS) body.policy = { executionTimeout: Math.round(config.executionTimeoutS * 1000) };
  const response = await fetchImpl(`${config.runpodApiBase}/${config.runpodEndpointId}/run`, {
    method: "POST",
    headers: { Authorization: `Bearer ${config.runpodApiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`HTTP ${response.status}: ${text.slice(0, 300)}`);
  const id = JSON.parse(text).id;
  if (typeof id !== "string" || !id) throw new Error(`RunPod answered without a job id: ${text.slice(0, 300)}`);
  return id;
}

interface RunpodState {
  status: string;
  error?: unknown;
  output?: unknown;
}

async function status(config: Config, fetchImpl: Fetch, runpodId: string): Promise<RunpodState | null> {
  const response = await fetchImpl(`${config.runpodApiBase}/${config.runpodEndpointId}/status/${encodeURIComponent(runpodId)}`, {
    headers: { Authorization: `Bearer ${config.runpodApiKey}` },
  });
  if (!response.ok) return null; // RunPod forgets finished jobs after a while: nothing to settle with
  return await response.json();
}

function settlement(state: RunpodState): Record<string, unknown> | null {
  switch (state.status) {
    case "COMPLETED": {
      const output = state.output as Record<string, unknown> | undefined;
      if (output && typeof output === "object" && "error" in output) {
        return { status: "failed", error: String(output.error) };
      }
      return { status: "succeeded", progress: 1, output: output ?? null, error: null };
    }
    case "FAILED":
      return { status: "failed", error: `runpod: ${typeof state.error === "string" ? state.error : JSON.stringify(state.error ?? "job failed")}` };
    case "TIMED_OUT":
      return {
        status: "failed",
        error: "runpod: the job passed the endpoint's execution timeout and was stopped; raise policy.executionTimeout " +
          "(RUNPOD_EXECUTION_TIMEOUT_S) or set MAX_TRAIN_SECONDS on the worker, then re-queue the job: it resumes from its last checkpoint",
      };
    case "CANCELLED":
      return { status: "cancelled", error: "runpod: the job was cancelled" };
    default:
      return null; // IN_QUEUE, IN_PROGRESS
  }
}
