"""One worker, several GPUs: training in one process per GPU (torchrun), DDP or FSDP via the Trainer.

The handler's process keeps the job: it writes the prepared dataset and a spec into the job folder,
starts ``python -m torch.distributed.run --nproc_per_node N launch.py SPEC`` and reads the ranks'
progress lines from rank 0's stdout. The Trainer (accelerate underneath) wraps the model in DDP, or in
FSDP when the memory plan says the model does not fit one GPU (weights and LoRA state sharded).
A cancel becomes a stop file every rank checks at each step; MAX_TRAIN_SECONDS is passed down.
Errors come back as JSON and are raised again as the same WorkerError in the parent.

Nothing here reads the worker's environment: everything the ranks need is in the spec.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import errors
from errors import TrainingError, WorkerError

logger = logging.getLogger(__name__)
PROGRESS_PREFIX = "@@progress "
RESULT_NAME = "distributed-result.json"
# The repository root: each rank runs ``python train_lora.py <spec>`` from it.
ROOT = Path(__file__).resolve().parent.parent


def train_distributed(model_path, data, hp, output_dir, *, processes: int, strategy: str, checkpoint_dir,
                      base_model_id: str, base_revision: str | None, runtime, on_progress=None,
                      trust_remote_code: bool = False, max_train_seconds: float | None = None,
                      should_stop: Callable[[], bool] | None = None, tokenizer_path=None,
                      init_adapter=None):
    """``train_lora.train_lora`` in ``processes`` ranks; returns its TrainResult (without the model)."""
    from training.callbacks import ProgressEvent
    from training.result import LoraSettings, TrainResult

    output_dir = Path(output_dir)
    work = output_dir / ".launch"
    work.mkdir(parents=True, exist_ok=True)
    data.train.save_to_disk(str(work / "train"))
    if data.eval is not None:
        data.eval.save_to_disk(str(work / "eval"))
    stop_file = work / "stop"
    spec = {
        "model_path": str(model_path), "tokenizer_path": str(tokenizer_path or model_path),
        "hyperparameters": hp.model_dump(mode="json", exclude_unset=True), "output_dir": str(output_dir),
        "checkpoint_dir": str(checkpoint_dir), "base_model_id": base_model_id, "base_revision": base_revision,
        "runtime": asdict(runtime), "strategy": strategy, "trust_remote_code": trust_remote_code,
        "max_train_seconds": max_train_seconds, "stop_file": str(stop_file), "work": str(work),
        "report": data.report.to_dict(), "init_adapter": str(init_adapter) if init_adapter else None,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "train_lora.py"), str(work / "spec.json")]
    logger.info("training in %d processes (%s)", processes, strategy)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def watch_stop():
        while proc.poll() is None:
            if should_stop is not None and should_stop() and not stop_file.exists():
                stop_file.write_text("stop")
            threading.Event().wait(0.5)

    watcher = threading.Thread(target=watch_stop, daemon=True)
    watcher.start()
    for line in proc.stdout:  # rank 0's progress lines; everything else is the ranks' log
        if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
            on_progress(ProgressEvent(**json.loads(line[len(PROGRESS_PREFIX):])))
        else:
            sys.stdout.write(line)
    code = proc.wait()
    result_file = work / RESULT_NAME
    if not result_file.is_file():
        raise TrainingError(f"the {processes} training processes exited with code {code} and no result; "
                            "see the worker log for the first rank that failed")
    outcome = json.loads(result_file.read_text())
    if "error" in outcome:
        cls = getattr(errors, outcome["error"]["class"], None)
        if outcome["error"]["class"] == "TrainingCancelled":
            from errors import TrainingCancelled as cls
        if not (isinstance(cls, type) and issubclass(cls, WorkerError)):
            cls = WorkerError
        raise cls(outcome["error"]["message"], stage=outcome["error"]["stage"],
                  retryable=outcome["error"]["retryable"])
    return TrainResult(adapter_dir=Path(outcome["adapter_dir"]), metrics=outcome["metrics"],
                       lora=LoraSettings.model_validate(outcome["lora"]),
                       log_history=outcome["log_history"], precision=outcome["precision"],
                       device=outcome["device"], load_seconds=outcome["load_seconds"],
                       train_seconds=outcome["train_seconds"])
