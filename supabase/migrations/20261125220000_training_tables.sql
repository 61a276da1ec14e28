-- The LoRA worker's records: one training_jobs row and one training_artifacts row per job_id.
--
-- The worker writes both with the service-role key through PostgREST, always as an upsert on
-- job_id (POST ?on_conflict=job_id, Prefer: resolution=merge-duplicates), so a job RunPod delivers
-- twice still gives one row in each table. The app reads them as the signed-in user: row level
-- security lets a user see only the rows whose user_id is theirs (the Edge Function fills user_id).
--
-- Keep in step with storage/records.py (SCHEMA, JOB_COLUMNS, ARTIFACT_COLUMNS): same tables, same
-- columns; tests/test_migrations.py checks it.

create table public.training_jobs (
    id            uuid primary key default gen_random_uuid(),
    job_id        text not null,
    status        text not null default 'queued',
    progress      double precision not null default 0,
    current_step  integer,
    total_steps   integer,
    last_loss     double precision,
    stage         text,
    error         text,
    base_model    text,
    user_id       uuid,
    metadata      jsonb,
    output        jsonb,
    started_at    timestamptz,
    finished_at   timestamptz,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    constraint training_jobs_job_id_key unique (job_id),
    constraint training_jobs_status_check
        check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    constraint training_jobs_progress_check check (progress >= 0 and progress <= 1)
);

comment on table public.training_jobs is
    'One row per training job (job_id): status and progress, written by the LoRA worker.';
comment on column public.training_jobs.job_id is
    'The id the worker knows the job by; defaults to id::text when the Edge Function inserts a row without it.';
comment on column public.training_jobs.user_id is
    'The owner (auth.users.id); the owner may read the row.';

create table public.training_artifacts (
    id                      uuid primary key default gen_random_uuid(),
    job_id                  text not null
                            references public.training_jobs (job_id) on delete cascade,
    uri                     text not null,
    bytes                   bigint not null,
    base_model_id           text not null,
    base_model_revision     text,
    base_model_fingerprint  text not null,
    metrics                 jsonb,
    manifest                jsonb,
    download_urls           jsonb,
    download_expires_at     timestamptz,
    created_at              timestamptz not null default now(),
    updated_at              timestamptz not null default now(),
    constraint training_artifacts_job_id_key unique (job_id),
    constraint training_artifacts_bytes_check check (bytes >= 0)
);

comment on table public.training_artifacts is
    'One row per stored adapter (job_id): where it is, what base it fits, its manifest.';
comment on column public.training_artifacts.download_urls is
    'Presigned GET URLs per adapter file (when the worker has PRESIGN_SECONDS), valid until download_expires_at.';

-- The app lists a user's jobs newest first, and the worker's queue views look at live jobs.
create index training_jobs_user_id_created_at_idx on public.training_jobs (user_id, created_at desc);
create index training_jobs_live_status_idx on public.training_jobs (status)
    where status in ('queued', 'running');
create index training_artifacts_base_model_id_idx on public.training_artifacts (base_model_id);

-- updated_at on every write; job_id from id when a row is inserted without one.
create function public.training_touch_updated_at() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

create function public.training_jobs_default_job_id() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    if new.job_id is null then
        new.job_id := new.id::text;
    end if;
    return new;
end;
$$;

create trigger training_jobs_default_job_id
    before insert on public.training_jobs
    for each row execute function public.training_jobs_default_job_id();
create trigger training_jobs_updated_at
    before insert or update on public.training_jobs
    for each row execute function public.training_touch_updated_at();
create trigger training_artifacts_updated_at
    before insert or update on public.training_artifacts
    for each row execute function public.training_touch_updated_at();

-- Row level security: the service role writes; a signed-in user reads their own rows; anon nothing.
alter table public.training_jobs enable row level security;
alter table public.training_artifacts enable row level security;

create policy "service role writes training jobs" on public.training_jobs
    for all to service_role using (true) with check (true);
create policy "owners read their training jobs" on public.training_jobs
    for select to authenticated using (user_id = (select auth.uid()));

create policy "service role writes training artifacts" on public.training_artifacts
    for all to service_role using (true) with check (true);
create policy "owners read their training artifacts" on public.training_artifacts
    for select to authenticated using (
        exists (
            select 1 from public.training_jobs j
            where j.job_id = training_artifacts.job_id and j.user_id = (select auth.uid())
        )
    );

-- Supabase grants every API role everything on new tables; narrow that to what the policies allow.
revoke all on public.training_jobs, public.training_artifacts from anon, authenticated;
grant select on public.training_jobs, public.training_artifacts to authenticated;
grant select, insert, update, delete on public.training_jobs, public.training_artifacts to service_role;
