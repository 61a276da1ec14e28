"""RunPod serverless entry: validate the job, run its stages, return the output or {"error": …}.

    python handler.py                      # the worker on RunPod
    python handler.py --test_input '{…}'   # one local job, as the runpod SDK gives it
    python handler.py --rp_serve_api       # RunPod's local /run, /runsync, /status API

``import handler; handler.handler({"id": "…", "input": {…}})`` works from the repo root: settings are
read from the environment on first use, not at import.

RunPod is given ``async_handler``: the job runs in a worker thread while the SDK's event loop stays
free, so a RunPod cancel (the SDK cancels the job's task) reaches us; we set a flag that training
checks at every step, wait for it to stop with a checkpoint, and the job row says ``cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from functools import lru_cache, partial
from typing import Any

from pydantic import ValidationError

from config.job import TrainingJob, format_validation_error
from config.settings import WorkerSettings
from errors import ScrubFilter, WorkerError, scrub

logger = logging.getLogger("handler")


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    return WorkerSettings()


def configure_logging(settings: WorkerSettings) -> None:
    root = logging.getLogger()
    if not root.handlers:  # the runpod SDK installs one when imported; else ours
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    secrets = settings.secret_values()
    for handler in root.handlers:
        filters = [f for f in handler.filters if isinstance(f, ScrubFilter)]
        if not filters:
            handler.addFilter(ScrubFilter(secrets))
        for scrub_filter in filters:  # a request's s3Config brings secrets of its own
            scrub_filter.secrets = tuple(dict.fromkeys((*scrub_filter.secrets, *secrets)))
    root.setLevel(settings.log_level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _runpod_notify(job: dict[str, Any]):
    """RunPod's progress_update, when there is a RunPod job to report to (not in local test mode)."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") or job.get("id") in (None, "local_test"):
        return None
    import runpod

    return lambda update: runpod.serverless.progress_update(job, update)


def handler(job: dict[str, Any], cancel: threading.Event | None = None) -> dict[str, Any]:
    """One job, synchronously. ``cancel``, once set, stops training at its next step."""
    secrets: list[str] = []
    try:
        try:
            settings = get_settings()
        except ValidationError as exc:
            stage = "upload" if "S3" in str(exc) else "record" if "Supabase" in str(exc) else "input"
            raise WorkerError(f"worker settings: {format_validation_error(exc)}", stage=stage) from None
        if job.get("s3Config") is not None:
            # RunPod's per-request bucket: it replaces the environment's, for this job only.
            try:
                settings = settings.with_s3_config(job["s3Config"])
            except ValueError as exc:
                raise WorkerError(str(exc), stage="upload") from None
        secrets = settings.secret_values()
        configure_logging(settings)
        request = TrainingJob.from_payload(job.get("input"), default_job_id=job.get("id"))
        logger.info("job %s: %s %s", request.job_id, request.action, request.base_model or "(default model)")

        # heavy imports (torch) only once a job is valid
        if request.action == "selftest":
            import selftest

            output = selftest.run_selftest(settings, _runpod_notify(job))
        else:
            import pipeline

            output = pipeline.run(request, settings, notify=_runpod_notify(job), cancel=cancel)
        logger.info("job %s: %s in %.1fs", request.job_id, output.get("status"),
                    output.get("timings", {}).get("total_s", 0.0))
        return output
    except WorkerError as exc:
        message = scrub(f"{exc.stage}: {exc.message}", secrets)
        logger.error("job %s failed: %s", job.get("id"), message)
        return {"error": message}


async def async_handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod's entry: ``handler`` in a thread, cancellable from the SDK's event loop."""
    cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, partial(handler, job, cancel))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        logger.warning("job %s: cancelled; stopping at the next training step", job.get("id"))
        # The thread cannot be killed; it stops at a step boundary, saves a checkpoint, records
        # the job as cancelled and returns. Waiting for it keeps the checkpoint whole.
        await asyncio.wait({future})
        raise


if __name__ == "__main__":
    # The SDK logs each raw job payload at DEBUG, its default level: payloads can carry credentials.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    import runpod

    runpod.serverless.start({"handler": async_handler})
