"""The stages of one job, in order, with their timings, progress and record updates.

    TrainingJob → ResolvedModel → PreparedDataset → TrainResult → StoredArtifact → record

``run`` is called by ``handler.handler`` with validated settings and a ``notify`` callback (RunPod's
progress_update, throttled here). Each stage runs inside ``Tracker.stage``: it is timed, reported, and
any unexpected exception becomes a ``WorkerError`` of that stage, so the caller always knows where a
job failed. Stages never call RunPod or read the environment.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from adapters.init import InitAdapter, prepare_init_adapter
from adapters.manifest import (
    MANIFEST_VERSION,
    AdapterManifest,
    BaseEntry,
    DatasetEntry,
    InitAdapterEntry,
    LoadEntry,
    LoraEntry,
    Metrics,
    RuntimeEntry,
    Versions,
    library_versions,
    load_manifest,
    render_model_card,
)
from config.job import TrainingJob
from config.settings import WorkerSettings
from errors import InputError, TrainingCancelled, TrainingError, WorkerError, scrub
from files import describe_files, verify_files
from model_resolver import (
    ModelNotCached,
    ResolvedModel,
    fetch_metadata,
    probe_missing,
    resolve_model,
)
from models.staging import plan_loading
from storage.artifacts import StoredArtifact, open_artifact_store
from storage.records import (
    ArtifactRow,
    JobUpdate,
    Records,
    now_iso,
    open_records,
    request_differences,
    request_fingerprint,
    stored_request,
)
from tracker import Notify, Tracker
from training.base_cache import BaseLease, BaseModelCache, base_key, lease_for

logger = logging.getLogger(__name__)


def run(job: TrainingJob, settings: WorkerSettings, notify: Notify | None = None,
        cancel: threading.Event | None = None, base_cache: BaseModelCache | None = None) -> dict[str, Any]:
    """Run one validated job; return its output or raise WorkerError.

    Only ``train`` writes records: a ``validate`` or ``prefetch`` sent with a training job's id must
    not mark that job as done. ``cancel``, once set (a RunPod cancel), stops training at the next
    step with a checkpoint; the job row then says ``cancelled``. ``base_cache``: the worker's warm
    base model (training/base_cache.py), used when ``WARM_MODEL_CACHE`` is on.
    """
    started = time.monotonic()
    job_id = job.job_id or "job"
    if job.action == "validate":
        return _validate(job, settings, Tracker(job_id, None, notify, settings.progress_interval_s), base_cache)
    if job.action == "prefetch":
        return _prefetch(job, settings, Tracker(job_id, None, notify, settings.progress_interval_s))

    with _job_lock(settings, job_id):  # a second live delivery waits here, touching nothing
        return _run_train(job, settings, notify, cancel, started, base_cache)


@contextmanager
def _job_lock(settings: WorkerSettings, job_id: str) -> Iterator[None]:
    """One live delivery per job_id on this volume; another waits (JOB_LOCK_TIMEOUT_S), then is told
    the job is running. Before any file or row of the job is touched, so the first keeps both."""
    from filelock import FileLock, Timeout

    path = settings.jobs_root / f".{job_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("job %s is running in another delivery: waiting up to %.0fs for it (lock %s)", job_id,
                    settings.job_lock_timeout_s, path)
        try:
            lock.acquire(timeout=settings.job_lock_timeout_s)
        except Timeout:
            raise TrainingError(
                f"job_id {job_id!r} is already running in another delivery (waited "
                f"{settings.job_lock_timeout_s:.0f}s for it); its result will be in its job record, or send "
                "the job again once it has finished to get the result", retryable=True) from None
    try:
        yield
    finally:
        lock.release()


def _run_train(job: TrainingJob, settings: WorkerSettings, notify: Notify | None,
               cancel: threading.Event | None, started: float,
               base_cache: BaseModelCache | None) -> dict[str, Any]:
    job_id = job.job_id or "job"
    records = open_records(settings)
    tracker = Tracker(job_id, records, notify, settings.progress_interval_s)
    request = _Request(job, settings, tracker)
    _refuse_another_request(request, records)  # before the row changes: it stays as it was
    records.upsert_job(job_id, _started_row(job, settings))
    try:
        stored, record_id = _train(job, settings, tracker, records, request, cancel, base_cache)
    except WorkerError as exc:
        tracker.close()  # no progress row after the final one
        _record_failure(records, job_id, exc, settings)
        raise
    finally:
        tracker.close()
    tracker.timings["total_s"] = round(time.monotonic() - started, 3)
    output = _train_output(job_id, stored, record_id, tracker.timings, _cost(tracker.timings, settings))
    try:
        # The final state, whole: a success clears any error an earlier write left.
        records.upsert_job(job_id, JobUpdate(status="succeeded", progress=1.0, stage="done", error=None,
                                             output=output, finished_at=now_iso()))
    except WorkerError as exc:
        raise exc.with_hint(
            f"the adapter is stored at {stored.adapter_uri} and its artifact record is written: re-run the "
            "job with the same job_id to finish the job record without training again") from exc
    return output


class _Request:
    """This delivery's request, compared with what an earlier one made; its dataset read at most once."""

    def __init__(self, job: TrainingJob, settings: WorkerSettings, tracker: Tracker):
        self.job, self.settings, self.tracker = job, settings, tracker

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        from dataset_loader import read_dataset

        job = self.job
        with self.tracker.stage("dataset", "dataset_s", report=False):
            report = read_dataset(job.dataset, self.settings, seed=job.hyperparameters.seed).report
        return request_fingerprint(job, self.settings, report.sha256, report.eval_sha256)

    def differences(self, manifest: AdapterManifest) -> list[str]:
        """How this request differs from the one ``manifest``'s adapter was made for."""
        return request_differences(stored_request(manifest), self.fingerprint)


def _refuse_another_request(request: _Request, records: Records) -> None:
    """A job_id that already succeeded answers only the same request: another one is an input error."""
    tracker = request.tracker
    previous = records.get_job(tracker.job_id)
    if not previous or previous.get("status") != "succeeded":
        return
    # The artifact record, not the store at this request's prefix: another prefix is another request
    # (one job_id owns one place), not a job never seen.
    artifact = records.get_artifact(tracker.job_id)
    try:
        manifest = AdapterManifest.model_validate(artifact["manifest"]) if artifact else None
    except (ValueError, TypeError, KeyError):
        manifest = None
    if manifest is None:
        return  # nothing to compare with (no artifact record): train again
    differences = request.differences(manifest)
    if differences:
        raise InputError(
            f"job_id {tracker.job_id!r} already succeeded with a different request: {'; '.join(differences)}. "
            "Send it with a new job_id to train again (the stored adapter is kept), or resend the same request "
            "to get its result")


def _started_row(job: TrainingJob, settings: WorkerSettings) -> JobUpdate:
    """The job row as training starts; it clears an earlier attempt's error.

    The Edge Function may have created the row with its owner and metadata: an upsert overwrites
    every column it names, so user_id and metadata are named only when this job carries them.
    """
    owner = {"user_id": str(job.metadata["user_id"])} if job.metadata.get("user_id") else {}
    return JobUpdate(status="running", stage="model", error=None, started_at=now_iso(),
                     base_model=job.base_model or settings.default_base_model,
                     **owner, **({"metadata": job.metadata} if job.metadata else {}))


def _record_failure(records: Records, job_id: str, exc: WorkerError, settings: WorkerSettings) -> None:
    try:
        records.upsert_job(job_id, JobUpdate(
            status="cancelled" if isinstance(exc, TrainingCancelled) else "failed", stage=exc.stage,
            # the record is read by the app: scrubbed like the output (signed URLs, keys)
            error=scrub(f"{exc.stage}: {exc.message}", settings.secret_values()),
            finished_at=now_iso()))
    except WorkerError as record_exc:  # the job's own error, which names what was kept, wins
        logger.warning("job %s: its failure was not recorded: %s", job_id, record_exc)


def _cost(timings: dict[str, float], settings: WorkerSettings) -> dict[str, Any] | None:
    if settings.gpu_hourly_usd is None:
        return None
    rate = settings.gpu_hourly_usd / 3600
    return {
        "gpu_hourly_usd": settings.gpu_hourly_usd,
        "estimated_usd": round(timings["total_s"] * rate, 6),
        "resolve_usd": round(timings.get("resolve_s", 0.0) * rate, 6),
        "load_usd": round(timings.get("load_s", 0.0) * rate, 6),
        "train_usd": round(timings.get("train_s", 0.0) * rate, 6),
    }


# --------------------------------------------------------------------------------------------------
# actions


def _resolve(job: TrainingJob, settings: WorkerSettings, tracker: Tracker) -> ResolvedModel:
    with tracker.stage("model", "resolve_s"):
        return resolve_model(job.base_model, job.model_revision, settings)


def _locate(job: TrainingJob, settings: WorkerSettings, tracker: Tracker) -> ResolvedModel | None:
    """The model if it is on this worker; else None after checking the Hub can supply it (one call).

    The download itself waits until the dataset has been read, so a bad dataset fails in seconds
    instead of after a long download.
    """
    with tracker.stage("model", "resolve_s"):
        try:
            return resolve_model(job.base_model, job.model_revision, settings, download=False)
        except ModelNotCached as miss:
            probe_missing(miss, job.model_revision, settings)
            return None


def _read(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, resolved: ResolvedModel | None):
    """Read the data (cheap, no tokenizer), check the request against this machine (e.g. 4-bit without
    CUDA) before any download, fetch the model if needed, load its tokenizer: every record-level error
    is found here, before any weight is read. The runtime itself comes from the memory plan later."""
    from dataset_loader import load_tokenizer, read_dataset, require_something_to_learn
    from training.runtime import check_runnable

    with tracker.stage("dataset", "dataset_s"):
        raw = read_dataset(job.dataset, settings, seed=job.hyperparameters.seed)
        require_something_to_learn(raw, train_on_inputs=job.hyperparameters.train_on_inputs)
    check_runnable(job.hyperparameters)
    if resolved is None:
        resolved = _resolve(job, settings, tracker)  # the download: counted in resolve_s
    with tracker.stage("dataset", "dataset_s"):
        tokenizer = load_tokenizer(resolved.path, resolved.trust_remote_code)
    return raw, resolved, tokenizer


def _tokenize(job: TrainingJob, tracker: Tracker, raw, tokenizer):
    from dataset_loader import tokenize_dataset

    hp = job.hyperparameters
    with tracker.stage("dataset", "dataset_s"):
        return tokenize_dataset(raw, tokenizer, max_seq_length=hp.max_seq_length, train_on_inputs=hp.train_on_inputs)


def _prepare(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, resolved: ResolvedModel | None):
    """The data read, the model fetched if needed, the data tokenized (``validate``: no weights at all)."""
    raw, resolved, tokenizer = _read(job, settings, tracker, resolved)
    return resolved, tokenizer, _tokenize(job, tracker, raw, tokenizer)


def _init_adapter(job: TrainingJob, settings: WorkerSettings, tracker: Tracker,
                  resolved: ResolvedModel, workdir: Path | None = None) -> InitAdapter | None:
    """The adapter to continue from, fetched and verified against the base before any weight loads."""
    if not job.init_adapter:
        return None
    with tracker.stage("model", "resolve_s"):
        init = prepare_init_adapter(job.init_adapter, resolved.path,
                                    workdir or _init_workdir(settings, tracker.job_id), settings, job.hyperparameters)
    for warning in init.warnings:
        logger.warning("init_adapter %s: %s", init.source, warning)
    return init


def _init_workdir(settings: WorkerSettings, job_id: str, *, own: bool = False) -> Path:
    """Where a job's init adapter is fetched: removed on every exit path (``_scratch``). ``own``: a
    folder of its own (``validate`` runs unlocked, beside a training delivery of the same job_id)."""
    tag = f".{uuid.uuid4().hex[:8]}" if own else ""
    return settings.jobs_root / f".{job_id}{tag}.init-adapter"


@contextmanager
def _scratch(folder: Path) -> Iterator[None]:
    """Remove ``folder`` however the block ends: success, failure or cancel."""
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _plan_memory(job: TrainingJob, resolved: ResolvedModel, tracker: Tracker,
                 base_cache: BaseModelCache | None = None):
    """The memory plan, before any weight is loaded: a job that cannot fit fails here, in seconds.

    For a family it cannot derive from config.json the plan builds the model on the meta device, and
    transformers sets torch's default dtype for the whole process while it builds one: a base an
    earlier job left loading is waited for first (counted in this job's load_s).
    """
    from training.memory_plan import plan_memory, require_fit
    from training.runtime import plan_runtime

    if base_cache is not None and base_cache.loading:
        with tracker.stage("model", "stage_s"):
            base_cache.settle()
    with tracker.stage("train", "plan_s"):
        plan = plan_memory(resolved.path, job.hyperparameters, trust_remote_code=resolved.trust_remote_code)
        runtime = plan_runtime(job.hyperparameters, plan)
        logger.info("memory plan: %s", plan.summary())
        require_fit(plan)
    return plan, runtime


def _validate(job: TrainingJob, settings: WorkerSettings, tracker: Tracker,
              base_cache: BaseModelCache | None = None) -> dict:
    with tracker.stage("model", "resolve_s"):
        try:
            located = resolve_model(job.base_model, job.model_revision, settings, download=False)
        except ModelNotCached as miss:  # validation needs the tokenizer, never the weights
            located = fetch_metadata(miss, job.model_revision, settings)
    if located.source != "hub_metadata":  # an init adapter is checked against the base's weight shapes
        workdir = _init_workdir(settings, tracker.job_id, own=True)
        with _scratch(workdir):
            _init_adapter(job, settings, tracker, located, workdir)
    resolved, _, prepared = _prepare(job, settings, tracker, located)
    plan, _ = _plan_memory(job, resolved, tracker, base_cache)
    return {"job_id": job.job_id, "status": "valid", "base_model": resolved.to_output(),
            "dataset": prepared.report.to_dict(), "memory_plan": plan.to_dict()}


def _prefetch(job: TrainingJob, settings: WorkerSettings, tracker: Tracker) -> dict:
    resolved = _resolve(job, settings, tracker)
    return {"job_id": job.job_id, "status": "cached", "base_model": resolved.to_output(),
            "bytes": resolved.bytes, "seconds": round(resolved.seconds, 3)}


def _train(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, records: Records,
           request: _Request, cancel: threading.Event | None = None,
           base_cache: BaseModelCache | None = None) -> tuple[StoredArtifact, str]:
    """Train, store, record — each at most once per job_id; the stored artifact and its record id.

    A job delivered again goes on from the furthest finished step: a complete stored artifact is
    only recorded; a complete job folder on the volume (trained, not stored) is only uploaded.
    """
    job_id = tracker.job_id
    store = open_artifact_store(settings)  # a misconfigured store fails before any GPU minute
    job_dir = settings.jobs_root / job_id

    with tracker.stage("upload", "upload_s", report=False):
        store.claim(job.output.prefix, job_id)  # another job's place fails here, before any GPU minute
        stored = store.find_complete(job.output.prefix, job_id)
    # Verified once: it hashes every file of the folder, an adapter of gigabytes included.
    folder = _complete_job_folder(job_dir) if stored is None else None
    kept = stored.manifest if stored is not None else folder
    if kept is not None and request.differences(kept):
        # An earlier delivery that did not succeed, of another request: it starts over.
        logger.info("job %s: the earlier attempt was another request; training anew", job_id)
        stored = folder = None
        shutil.rmtree(job_dir, ignore_errors=True)
    if stored is not None:
        logger.info("job %s: already stored at %s; recording it without training again", job_id,
                    stored.adapter_uri)
    elif folder is not None:
        logger.info("job %s: the trained adapter at %s is complete; storing it without training again",
                    job_id, job_dir)
    else:
        with _scratch(_init_workdir(settings, job_id)):
            _train_into(job, settings, tracker, job_dir, cancel, base_cache)
    for skipped in ("resolve_s", "dataset_s", "plan_s", "load_s", "load_overlap_s", "train_s", "save_s"):
        tracker.timings.setdefault(skipped, 0.0)  # the output keeps its shape when a stage was not needed

    if stored is None:
        try:
            with tracker.stage("upload", "upload_s"):
                stored = store.put(job_dir, job.output.prefix, job_id)
        except WorkerError as exc:
            raise exc.with_hint(
                f"the trained adapter is kept at {job_dir / 'adapter'}: re-run the job with the same job_id "
                "to store it without training again") from exc

    try:
        with tracker.stage("record", "record_s"):
            record_id = records.upsert_artifact(job_id, _artifact_record(stored))
    except WorkerError as exc:
        raise exc.with_hint(f"the adapter is stored at {stored.adapter_uri}: re-run the job with the same "
                            "job_id to write the record without training again") from exc

    shutil.rmtree(job_dir, ignore_errors=True)  # stored and recorded: the scratch copy is redundant
    shutil.rmtree(settings.checkpoints_root / job_id, ignore_errors=True)  # and nothing is left to resume
    return stored, record_id


def _complete_job_folder(job_dir: Path) -> AdapterManifest | None:
    """An earlier delivery's finished job folder: its adapter manifest, if the folder's manifest verifies."""
    try:
        manifest = load_manifest(job_dir)
        adapter_manifest = load_manifest(job_dir / "adapter") if manifest is not None else None
        if adapter_manifest is None:
            return None
        problems = verify_files(job_dir, manifest.to_dict())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("job folder %s is unreadable (%s); training again", job_dir, exc)
        return None
    if problems:
        logger.warning("job folder %s is incomplete (%s); training again", job_dir, "; ".join(problems[:3]))
    return None if problems else adapter_manifest


def _train_into(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, job_dir: Path,
                cancel: threading.Event | None = None, base_cache: BaseModelCache | None = None) -> None:
    """Resolve, read, plan, load while tokenizing, train and save the job folder (manifests last).

    The records are read and checked, the model fetched, its tokenizer loaded and the memory plan made
    before any weight is read, so a bad dataset or a job that cannot fit fails in seconds. Then the
    base loads in a thread of its own while the data is tokenized here (one process, base not kept);
    a dataset that tokenizes to nothing fails at once, and its load goes to the warm cache for the
    next job (training/base_cache.py).
    """
    from train_lora import start_loading, train_lora
    from training.request import TrainRequest

    job_id = tracker.job_id
    located = _locate(job, settings, tracker)
    # An init adapter is verified as soon as the base is on this worker: before the data, if it is.
    init = _init_adapter(job, settings, tracker, located) if located is not None else None
    raw, resolved, tokenizer = _read(job, settings, tracker, located)
    if located is None:
        init = _init_adapter(job, settings, tracker, resolved)
    plan, runtime = _plan_memory(job, resolved, tracker, base_cache)

    with tracker.stage("model", "stage_s"):
        load = plan_loading(resolved.path, settings.model_load_strategy, settings.local_stage_dir)
    distributed = plan.strategy if plan.strategy in ("ddp", "fsdp") else None
    request = TrainRequest(
        model_path=load.path, tokenizer_path=resolved.path, hyperparameters=job.hyperparameters,
        output_dir=job_dir,
        # Kept across attempts: a re-delivered job resumes from its newest complete checkpoint.
        checkpoint_dir=settings.checkpoints_root / job_id,
        base_model_id=resolved.id, base_revision=resolved.revision, runtime=runtime,
        trust_remote_code=resolved.trust_remote_code, init_adapter=init.path if init else None,
        max_train_seconds=settings.max_train_seconds, distributed=distributed,
    )
    should_stop = cancel.is_set if cancel is not None else None
    if distributed:  # several GPUs: one process each (training/launch.py), each loading its own copy
        from training.launch import train_distributed

        prepared = _tokenize(job, tracker, raw, tokenizer)
        with tracker.stage("train", "train_s"):
            _clean(job_dir)
            if base_cache is not None:  # the ranks' copies need every GPU's memory: the kept one goes
                base_cache.clear("a multi-process job needs every GPU's memory")
            result = train_distributed(request, prepared, processes=len(plan.device_bytes),
                                       on_progress=tracker.on_train_progress, should_stop=should_stop)
        lease = None
    else:
        with _base_lease(base_cache, settings, resolved, request) as lease:
            start_loading(request, lease)  # no thread when the kept base is reused
            prepared = _tokenize(job, tracker, raw, tokenizer)
            with tracker.stage("train", "train_s"):
                _clean(job_dir)
                result = train_lora(request, prepared, tokenizer=tokenizer, on_progress=tracker.on_train_progress,
                                    should_stop=should_stop, base=lease)
    _time_load(tracker.timings, result.load_seconds, lease)
    tracker.timings["train_s"] = round(result.train_seconds, 3)

    with tracker.stage("save", "save_s"):
        report = prepared.report
        _write_job_folder(job, resolved, report.to_dict(), result, job_dir, runtime, load, plan, init=init,
                          reused=lease is not None and lease.reused,
                          request=request_fingerprint(job, settings, report.sha256, report.eval_sha256))
    result.model = None  # saved: free the weights before the upload


def _clean(job_dir: Path) -> None:
    if job_dir.exists():  # an earlier attempt that never finished: start clean
        shutil.rmtree(job_dir)


def _time_load(timings: dict[str, float], waited: float, lease: BaseLease | None) -> None:
    """``load_s``: staging plus the load's own duration; ``load_overlap_s``: the part of it that ran
    while the job went on (tokenizing, then clearing the job folder), so the stages add up to about
    ``total_s`` plus that. A base kept or joined from an earlier job's load counts the wait for it,
    overlapping nothing."""
    own = lease.load_seconds if lease is not None else None
    timings["load_s"] = round(timings.pop("stage_s") + (own if own is not None else waited), 3)
    timings["load_overlap_s"] = round(max(own - waited, 0.0), 3) if own is not None else 0.0


def _base_lease(base_cache: BaseModelCache | None, settings: WorkerSettings, resolved: ResolvedModel,
                request) -> AbstractContextManager[BaseLease]:
    """The base for this job: the warm cache's lease, or its own (cache off; freed when the job ends)."""
    key = base_key(resolved.path, resolved.revision, resolved.fingerprint, request.model_path, request.runtime,
                   request.trust_remote_code, request.local_rank)
    return lease_for(base_cache, settings.warm_model_cache, key)


def _artifact_record(stored: StoredArtifact) -> ArtifactRow:
    manifest = stored.manifest
    return ArtifactRow(
        uri=stored.adapter_uri, bytes=stored.bytes, base_model_id=manifest.base.id,
        base_model_revision=manifest.base.revision, base_model_fingerprint=manifest.base.fingerprint,
        metrics=manifest.metrics.model_dump(exclude_unset=True), manifest=manifest.to_dict(),
        download_urls=stored.download_urls, download_expires_at=stored.download_expires_at,
    )


# The dataset report's figures that the job output repeats (the manifest keeps the whole report).
OUTPUT_DATASET_KEYS = {"examples", "eval_examples", "tokens", "trained_tokens", "truncated", "dropped", "sha256"}


def _train_output(job_id: str, stored: StoredArtifact, record_id: str, timings: dict[str, float],
                  cost: dict[str, Any] | None) -> dict[str, Any]:
    """The job output, from the stored manifest alone: a re-delivered job answers the same."""
    manifest = stored.manifest
    metrics, lora = manifest.metrics, manifest.lora
    output = {
        "job_id": job_id,
        "status": "succeeded",
        "base_model": manifest.base.model_dump(exclude={"architecture"}, exclude_unset=True),
        "adapter": stored.to_output(),
        "record_id": record_id,
        "metrics": {"train_loss": metrics.train_loss, "eval_loss": metrics.eval_loss, "steps": metrics.steps,
                    "epochs": metrics.epochs, "train_tokens": metrics.train_tokens,
                    "tokens_per_second": metrics.tokens_per_second, "first_loss": metrics.first_loss,
                    "last_loss": metrics.last_loss, "resumed_from_step": metrics.resumed_from_step},
        "dataset": manifest.dataset.model_dump(include=OUTPUT_DATASET_KEYS, exclude_unset=True),
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": lora.target_modules,
                 "target_parameters": lora.target_parameters},
        "memory_plan": manifest.memory_plan,
        "timings": timings,
    }
    if manifest.runtime is not None:  # absent from manifests written before it was recorded
        output["runtime"] = manifest.runtime.model_dump(exclude_unset=True)
    if cost:
        output["cost"] = cost
    return output


def _plan_with_measurement(plan, result) -> dict[str, Any]:
    """The plan, with what the loaded model really held beside it (``measured``; a >10% gap is logged)."""
    from training.memory_plan import compare_measured

    if result.measured_bytes is not None:
        plan.measured = compare_measured(plan, result.measured_bytes, log=logger)
    return plan.to_dict()


def _write_job_folder(job: TrainingJob, resolved: ResolvedModel, report: dict, result, job_dir: Path,
                      runtime, load, plan, init: InitAdapter | None = None, reused: bool = False,
                      request: dict[str, Any] | None = None) -> AdapterManifest:
    """Model card, metrics, loss curve, then the manifests, last, into the job folder."""
    from training.report import write_training_report

    if not any(result.adapter_dir.glob("adapter_model.*")):
        raise TrainingError(f"training finished but no adapter weights were saved in {result.adapter_dir}")
    manifest = AdapterManifest(
        job_id=job.job_id or "",
        base=BaseEntry(**resolved.to_output(), load=LoadEntry(**load.to_output(), reused=reused)),
        lora=LoraEntry(peft_type="LORA", **result.lora.model_dump(), task_type="CAUSAL_LM"),
        hyperparameters=job.hyperparameters.model_dump(mode="json"),
        dataset=DatasetEntry(**report),
        metrics=Metrics(**result.metrics),
        versions=Versions(**library_versions()),
        manifest_version=MANIFEST_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        memory_plan=_plan_with_measurement(plan, result),
        runtime=RuntimeEntry(device=runtime.device, precision=runtime.precision,
                             quantization=runtime.quantization, attention=result.attention,
                             kernels=result.kernels),
        # what this adapter continued from; absent (not null) when it started fresh
        **({"init_adapter": InitAdapterEntry(**init.to_manifest())} if init is not None else {}),
        request=request,
    )
    (result.adapter_dir / "README.md").write_text(render_model_card(manifest))
    write_training_report(result, job_dir)
    # The adapter's own manifest lists the adapter's files; the job's lists the whole folder.
    adapter_manifest = manifest.with_files(describe_files(result.adapter_dir))
    adapter_manifest.write(result.adapter_dir)
    manifest.with_files(describe_files(job_dir)).write(job_dir)
    return adapter_manifest
