-- What the process-training-jobs Edge Function needs on each training_jobs row: the job's request
-- (model revision, dataset, hyperparameters, output prefix) and the state of its submission to
-- RunPod. The app inserts a row with status 'queued'; the function claims it by setting
-- runpod_job_id with a conditional update (a compare-and-set), submits it to RunPod's /run, and
-- stores RunPod's job id; the worker then moves the row through running → succeeded/failed.
alter table public.training_jobs
    add column if not exists model_revision   text,
    add column if not exists dataset          jsonb,
    add column if not exists hyperparameters  jsonb,
    add column if not exists output_prefix    text,
    add column if not exists runpod_job_id    text,
    add column if not exists submit_attempts  integer not null default 0,
    add column if not exists submitted_at     timestamptz;

alter table public.training_jobs
    drop constraint if exists training_jobs_submit_attempts_check,
    add constraint training_jobs_submit_attempts_check check (submit_attempts >= 0);

-- The function's queue scan: queued rows not yet claimed, oldest first.
create index if not exists training_jobs_queue_idx
    on public.training_jobs (created_at)
    where status = 'queued' and runpod_job_id is null;

create index if not exists training_jobs_runpod_job_id_idx
    on public.training_jobs (runpod_job_id)
    where runpod_job_id is not null;
