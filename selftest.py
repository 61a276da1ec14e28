"""``action: selftest`` — the plumbing checklist, on a tiny built-in model, in seconds, for cents.

Runs a real training job through the same pipeline as every other job, against the configured
volume, artifact store and records (S3/Supabase when set, else the local defaults), and reports
each step as passed or failed with the reason: the volume is writable, the model loads, the dataset
loads, training runs, the adapter is saved, uploaded, and its artifact row written.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from config.job import TrainingJob
from config.settings import WorkerSettings
from errors import WorkerError

SELFTEST_MODEL = "selftest-tiny-llama"
DEMO_DATA = Path(__file__).resolve().parent / "demo" / "data" / "capitals.jsonl"
# (check name, the pipeline stage whose failure fails it, the timing keys that measure it)
CHECKS = (
    ("model loading", "model", ("resolve_s", "load_s")),
    ("dataset loading", "dataset", ("dataset_s",)),
    ("training", "train", ("train_s",)),
    ("adapter saving", "save", ("save_s",)),
    ("upload", "upload", ("upload_s",)),
    ("artifact row", "record", ("record_s",)),
)


def _check(name: str, passed: bool | None, seconds: float, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "seconds": round(seconds, 3), "detail": detail}


def run_selftest(settings: WorkerSettings, notify: Callable[[dict], None] | None = None) -> dict[str, Any]:
    import pipeline
    from demo.tiny_models import build_tiny_model, chat_corpus

    checks: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        settings.volume_root.mkdir(parents=True, exist_ok=True)
        probe = settings.volume_root / f".selftest-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
        build_tiny_model(settings.models_root / SELFTEST_MODEL, corpus=chat_corpus(DEMO_DATA))
        checks.append(_check("volume", True, time.monotonic() - started,
                             f"{settings.volume_root} is writable; test model at {settings.models_root / SELFTEST_MODEL}"))
    except OSError as exc:
        checks.append(_check("volume", False, time.monotonic() - started,
                             f"{settings.volume_root} is not writable: {exc.strerror or exc}"))
        return {"status": "failed", "checks": checks}

    job_id = "selftest-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    records = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:16]]
    job = TrainingJob.from_payload({
        "job_id": job_id,
        "base_model": SELFTEST_MODEL,
        "dataset": {"records": records, "format": "chat"},
        "hyperparameters": {"epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1,
                            "learning_rate": 5e-3, "max_seq_length": 128, "lora_r": 4, "lora_alpha": 8,
                            "logging_steps": 1, "quantization": "none"},
        "output": {"prefix": "selftest"},
        "metadata": {"selftest": True},
    })
    failure: WorkerError | None = None
    output: dict[str, Any] = {}
    try:
        output = pipeline.run(job, settings, notify)
    except WorkerError as exc:
        failure = exc
    timings = output.get("timings", {})
    failed_at = failure.stage if failure else None
    reached = True
    for name, stage, keys in CHECKS:
        seconds = sum(timings.get(k, 0.0) for k in keys)
        if not reached:
            checks.append(_check(name, None, 0.0, "not run: an earlier step failed"))
        elif failed_at == stage or (failure and stage == "model" and failed_at == "input"):
            checks.append(_check(name, False, seconds, f"{failure.stage}: {failure.message}"))
            reached = False
        else:
            checks.append(_check(name, True, seconds, _detail(name, output)))
    passed = failure is None and all(c["passed"] for c in checks)
    return {"job_id": job_id, "status": "passed" if passed else "failed", "checks": checks,
            "seconds": round(time.monotonic() - started, 3)}


def _detail(name: str, output: dict[str, Any]) -> str:
    if name == "model loading":
        base = output.get("base_model", {})
        return f"{base.get('id')} from {base.get('source')} ({base.get('path')})"
    if name == "dataset loading":
        data = output.get("dataset", {})
        return f"{data.get('examples')} examples, {data.get('tokens')} tokens"
    if name == "training":
        m = output.get("metrics", {})
        return f"{m.get('steps')} steps, loss {m.get('first_loss', 0):.3f} → {m.get('last_loss', 0):.3f}"
    if name == "adapter saving":
        return f"{len(output.get('adapter', {}).get('files', []))} files with sha256, manifest last"
    if name == "upload":
        return f"{output.get('adapter', {}).get('uri')}"
    return f"record {output.get('record_id')}"
