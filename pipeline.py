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
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import adapters
from config.job import TrainingJob
from config.settings import WorkerSettings
from errors import TrainingError, WorkerError
from model_resolver import ModelNotCached, ResolvedModel, fetch_metadata, probe_missing, resolve_model
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.records import Records, now_iso, open_records

logger = logging.getLogger(__name__)

Notify = Callable[[dict[str, Any]], None]

# Where each stage starts on the job's 0..1 progress bar; training fills the span up to "save".
STAGE_PROGRESS = {"model": 0.01, "dataset": 0.03, "train": 0.05, "save": 0.92, "upload": 0.94,
                  "record": 0.98}


class Tracker:
    """Times stages, and sends progress to RunPod and the job row, throttled for training steps."""

    def __init__(self, job_id: str, records: Records | None, notify: Notify | None, interval_s: float):
        self.job_id = job_id
        self.records = records
        self.notify = notify
        self.interval_s = interval_s
        self.timings: dict[str, float] = {}
        self.current = "input"
        self._last_sent = 0.0

    @contextmanager
    def stage(self, name: str, timing: str) -> Iterator[None]:
        self.current = name
        self.send({"stage": name, "progress": STAGE_PROGRESS.get(name, 0.0)}, force=True)
        started = time.monotonic()
        try:
            yield
        except WorkerError:
            raise
        except Exception as exc:  # an unexpected failure still belongs to a stage
            where = _innermost_frame(exc)
            raise WorkerError(f"unexpected {type(exc).__name__} ({where}): {exc}", stage=name) from exc
        finally:
            self.timings[timing] = round(self.timings.get(timing, 0.0) + time.monotonic() - started, 3)

    def send(self, update: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < self.interval_s:
            return
        self._last_sent = now
        update = {"job_id": self.job_id, **update}
        if self.notify is not None:
            self.notify(update)
        row = {"progress": update.get("progress")}
        for key, column in (("step", "current_step"), ("total_steps", "total_steps"),
                            ("loss", "last_loss"), ("stage", "stage")):
            if update.get(key) is not None:
                row[column] = update[key]
        if self.records is None:
            return
        try:
            self.records.upsert_job(self.job_id, {k: v for k, v in row.items() if v is not None})
        except WorkerError as exc:  # a progress row is not worth failing a paid training run for
            logger.warning("progress record not written: %s", exc)

    def on_train_progress(self, event) -> None:
        fraction = event.step / event.total_steps if event.total_steps else 0.0
        span = STAGE_PROGRESS["save"] - STAGE_PROGRESS["train"]
        logger.info("step=%d/%d loss=%.4f lr=%.2e tok/s=%s", event.step, event.total_steps,
                    event.loss, event.learning_rate or 0.0,
                    f"{event.tokens_per_second:.0f}" if event.tokens_per_second else "?")
        self.send({
            "stage": "train",
            "progress": round(STAGE_PROGRESS["train"] + span * fraction, 4),
            "step": event.step, "total_steps": event.total_steps, "loss": event.loss,
            "learning_rate": event.learning_rate, "tokens_per_second": event.tokens_per_second,
            "eta_s": round(event.eta_s, 1) if event.eta_s is not None else None,
        }, force=event.step == event.total_steps)


def _innermost_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown location"
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


def run(job: TrainingJob, settings: WorkerSettings, notify: Notify | None = None,
        cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run one validated job; return its output or raise WorkerError.

    Only ``train`` writes records: a ``validate`` or ``prefetch`` sent with a training job's id must
    not mark that job as done. ``cancel``, once set (a RunPod cancel), stops training at the next
    step with a checkpoint; the job row then says ``cancelled``.
    """
    started = time.monotonic()
    job_id = job.job_id or "job"
    if job.action == "validate":
        return _validate(job, settings, Tracker(job_id, None, notify, settings.progress_interval_s))
    if job.action == "prefetch":
        return _prefetch(job, settings, Tracker(job_id, None, notify, settings.progress_interval_s))
    if job.action != "train":
        raise WorkerError(f"action '{job.action}' is not available in this worker build; "
                          "use 'train', 'validate' or 'prefetch'", stage="input")

    records = open_records(settings)
    tracker = Tracker(job_id, records, notify, settings.progress_interval_s)
    records.upsert_job(job_id, {
        "status": "running", "stage": "model", "error": None, "started_at": now_iso(),
        "base_model": job.base_model or settings.default_base_model,
        "user_id": str(job.metadata.get("user_id")) if job.metadata.get("user_id") else None,
        "metadata": job.metadata,
    })
    try:
        output = _train(job, settings, tracker, records, cancel)
    except WorkerError as exc:
        from train_lora import TrainingCancelled

        records.upsert_job(job_id, {
            "status": "cancelled" if isinstance(exc, TrainingCancelled) else "failed",
            "stage": exc.stage, "error": f"{exc.stage}: {exc.message}",
            "finished_at": now_iso(),
        })
        raise
    tracker.timings["total_s"] = round(time.monotonic() - started, 3)
    output["timings"] = tracker.timings
    cost = _cost(tracker.timings, settings)
    if cost:
        output["cost"] = cost
    records.upsert_job(job_id, {
        "status": "succeeded", "progress": 1.0, "stage": "done", "output": output,
        "finished_at": now_iso(),
    })
    return output


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


def _prepare(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, resolved: ResolvedModel | None):
    """Read the data (cheap, no tokenizer), check the runtime, fetch the model if needed, tokenize."""
    from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
    from train_lora import plan_runtime

    hp = job.hyperparameters
    with tracker.stage("dataset", "dataset_s"):
        raw = read_dataset(job.dataset, settings, seed=hp.seed)
    runtime = plan_runtime(hp)
    if resolved is None:
        resolved = _resolve(job, settings, tracker)  # the download: counted in resolve_s
    with tracker.stage("dataset", "dataset_s"):
        tokenizer = load_tokenizer(resolved.path, resolved.trust_remote_code)
        prepared = tokenize_dataset(raw, tokenizer, max_seq_length=hp.max_seq_length,
                                    train_on_inputs=hp.train_on_inputs)
    return resolved, runtime, tokenizer, prepared


def _plan_memory(job: TrainingJob, resolved: ResolvedModel, tracker: Tracker):
    """The memory plan, before any weight is loaded: a job that cannot fit fails here, in seconds."""
    from memory_plan import plan_memory, require_fit
    from train_lora import plan_runtime

    with tracker.stage("train", "plan_s"):
        plan = plan_memory(resolved.path, job.hyperparameters, trust_remote_code=resolved.trust_remote_code)
        runtime = plan_runtime(job.hyperparameters, plan)
        logger.info("memory plan: %s", plan.summary())
        require_fit(plan)
    return plan, runtime


def _validate(job: TrainingJob, settings: WorkerSettings, tracker: Tracker) -> dict:
    with tracker.stage("model", "resolve_s"):
        try:
            located = resolve_model(job.base_model, job.model_revision, settings, download=False)
        except ModelNotCached as miss:  # validation needs the tokenizer, never the weights
            located = fetch_metadata(miss, job.model_revision, settings)
    resolved, _, _, prepared = _prepare(job, settings, tracker, located)
    plan, _ = _plan_memory(job, resolved, tracker)
    return {"job_id": job.job_id, "status": "valid", "base_model": resolved.to_output(),
            "dataset": prepared.report.to_dict(), "memory_plan": plan.to_dict()}


def _prefetch(job: TrainingJob, settings: WorkerSettings, tracker: Tracker) -> dict:
    resolved = _resolve(job, settings, tracker)
    return {"job_id": job.job_id, "status": "cached", "base_model": resolved.to_output(),
            "bytes": resolved.bytes, "seconds": round(resolved.seconds, 3)}


def _train(job: TrainingJob, settings: WorkerSettings, tracker: Tracker, records: Records,
           cancel: threading.Event | None = None) -> dict:
    from train_lora import train_lora

    job_id = tracker.job_id
    hp = job.hyperparameters
    store = open_artifact_store(settings)  # a misconfigured store fails before any GPU minute
    resolved, runtime, tokenizer, prepared = _prepare(job, settings, tracker, _locate(job, settings, tracker))
    plan, runtime = _plan_memory(job, resolved, tracker)

    job_dir = settings.jobs_root / job_id
    # Kept across attempts: a re-delivered job resumes from its newest complete checkpoint here.
    checkpoint_dir = settings.checkpoints_root / job_id
    with tracker.stage("train", "train_s"):
        if job_dir.exists():
            shutil.rmtree(job_dir)  # an earlier attempt that never finished: start clean
        common = dict(
            checkpoint_dir=checkpoint_dir, base_model_id=resolved.id, base_revision=resolved.revision,
            runtime=runtime, on_progress=tracker.on_train_progress,
            trust_remote_code=resolved.trust_remote_code, max_train_seconds=settings.max_train_seconds,
            should_stop=cancel.is_set if cancel is not None else None,
        )
        if plan.strategy in ("ddp", "fsdp"):  # several GPUs: one process each (launch.py)
            from launch import train_distributed

            result = train_distributed(resolved.path, prepared, hp, job_dir, processes=len(plan.device_bytes),
                                       strategy=plan.strategy, **common)
        else:
            result = train_lora(resolved.path, prepared, hp, job_dir, tokenizer=tokenizer, **common)
    tracker.timings["load_s"] = round(result.load_seconds, 3)
    tracker.timings["train_s"] = round(result.train_seconds, 3)

    with tracker.stage("save", "save_s"):
        manifest = _write_job_folder(job, resolved, prepared.report.to_dict(), result, job_dir, runtime)
    result.model = None  # saved: free the weights before the upload

    with tracker.stage("upload", "upload_s"):
        try:
            stored = store.put(job_dir, job.output.prefix, job_id)
        except WorkerError as exc:
            raise WorkerError(f"{exc.message} (the trained adapter is kept at {job_dir / 'adapter'})",
                              stage="upload", retryable=True) from exc

    with tracker.stage("record", "record_s"):
        try:
            record_id = records.upsert_artifact(job_id, {
                "uri": stored.adapter_uri, "bytes": stored.bytes,
                "base_model_id": resolved.id, "base_model_revision": resolved.revision,
                "base_model_fingerprint": resolved.fingerprint,
                "metrics": result.metrics, "manifest": manifest,
            })
        except WorkerError as exc:
            raise WorkerError(f"{exc.message}; the adapter is stored at {stored.adapter_uri}",
                              stage="record", retryable=True) from exc

    shutil.rmtree(job_dir, ignore_errors=True)  # stored and recorded: the scratch copy is redundant
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # and nothing is left to resume
    metrics = {k: result.metrics.get(k) for k in
               ("train_loss", "eval_loss", "steps", "epochs", "train_tokens", "tokens_per_second",
                "first_loss", "last_loss", "resumed_from_step")}
    return {
        "job_id": job_id,
        "status": "succeeded",
        "base_model": {k: v for k, v in resolved.to_output().items() if k != "architecture"},
        "adapter": stored.to_output(),
        "record_id": record_id,
        "metrics": metrics,
        "dataset": {k: v for k, v in prepared.report.to_dict().items()
                    if k in ("examples", "eval_examples", "tokens", "trained_tokens", "truncated",
                             "dropped", "sha256")},
        "lora": {"r": hp.lora_r, "alpha": hp.lora_alpha, "target_modules": result.target_modules,
                 "target_parameters": result.target_parameters},
        "memory_plan": plan.to_dict(),
    }


def _write_job_folder(job: TrainingJob, resolved: ResolvedModel, report: dict, result, job_dir: Path,
                      runtime) -> dict:
    """Model card, metrics, loss curve, then the manifests, last, into the job folder."""
    from train_lora import write_training_report

    if not any(result.adapter_dir.glob("adapter_model.*")):
        raise TrainingError(f"training finished but no adapter weights were saved in {result.adapter_dir}")
    lora = result.lora_config
    manifest = adapters.Manifest(
        job_id=job.job_id or "",
        base_model={k: v for k, v in resolved.to_output().items()},
        peft={"peft_type": "LORA", "r": lora.get("r"), "lora_alpha": lora.get("lora_alpha"),
              "lora_dropout": lora.get("lora_dropout"), "use_rslora": lora.get("use_rslora"),
              "target_modules": result.target_modules,
              "target_parameters": result.target_parameters, "task_type": "CAUSAL_LM"},
        hyperparameters=job.hyperparameters.model_dump(mode="json"),
        dataset=report,
        metrics=result.metrics,
        versions=adapters.library_versions(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest_dict = manifest.to_dict()
    manifest_dict["runtime"] = {"device": runtime.device, "precision": runtime.precision,
                                "quantization": runtime.quantization}
    (result.adapter_dir / "README.md").write_text(adapters.render_model_card(manifest_dict))
    write_training_report(result, job_dir)
    # The adapter's own manifest lists the adapter's files; the job's lists the whole folder.
    adapter_manifest = {**manifest_dict, "files": adapters.describe_files(result.adapter_dir)}
    adapters.write_json_atomic(result.adapter_dir / adapters.MANIFEST_NAME, _jsonable(adapter_manifest))
    job_manifest = {**manifest_dict, "files": adapters.describe_files(job_dir)}
    adapters.write_json_atomic(job_dir / adapters.MANIFEST_NAME, _jsonable(job_manifest))
    return _jsonable(adapter_manifest)


def _jsonable(manifest: dict) -> dict:
    from dataclasses import asdict, is_dataclass

    files = [asdict(f) if is_dataclass(f) else f for f in manifest.get("files", [])]
    return {**manifest, "files": files}
