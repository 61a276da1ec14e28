// Supabase Edge Function entry: `supabase functions deploy process-training-jobs`, then invoke it on a
// schedule (pg_cron + pg_net) or from a database webhook on inserts into training_jobs.
import { configFromEnv, processTrainingJobs, scrub } from "./jobs.ts";

Deno.serve(async (request: Request): Promise<Response> => {
  if (request.method !== "POST") {
    return Response.json({ error: "POST to this function to process queued training jobs" }, { status: 405 });
  }
  let config;
  try {
    config = configFromEnv((name) => Deno.env.get(name));
  } catch (error) {
    return Response.json({ error: (error as Error).message }, { status: 500 });
  }
  try {
    const summary = await processTrainingJobs(config, fetch);
    return Response.json(summary);
  } catch (error) {
    const message = scrub((error as Error).message, [config.serviceRoleKey, config.runpodApiKey]);
    return Response.json({ error: message }, { status: 502 });
  }
});
