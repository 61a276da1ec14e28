"""One worker, several GPUs: training in one process per GPU (torchrun), DDP or FSDP via the Trainer.

The handler's process keeps the job: it writes the prepared dataset and the ``TrainRequest`` (as JSON,
the ranks' spec) into the job folder, starts ``python -m torch.distributed.run --nproc_per_node N
train_lora.py SPEC`` and reads the ranks' progress lines from rank 0's stdout. The Trainer (accelerate
underneath) wraps the model in DDP, or in FSDP when the memory plan says the model does not fit one
GPU (weights and LoRA state sharded). A cancel becomes a stop file every rank checks at each step;
MAX_TRAIN_SECONDS travels in the request. Rank 0 writes a ``RankOutcome``: the result, or the error,
raised again here as the same WorkerError; a rank that fails writes its error too, since torchrun may
stop rank 0 before it has written.

Nothing here reads the worker's environment: everything the ranks need is in the spec and the folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from pydantic import TypeAdapter

import errors
from data.report import DatasetReport
from dataset_loader import PreparedDataset
from errors import TrainingError, WorkerError
from training.request import TrainRequest
from training.result import ProgressEvent, RankFailure, RankOutcome, TrainResult

logger = logging.getLogger(__name__)
PROGRESS_PREFIX = "@@progress "
SPEC_NAME = "spec.json"
RESULT_NAME = "distributed-result.json"
STOP_NAME = "stop"
_REPORT = TypeAdapter(DatasetReport)
# The repository root: each rank runs ``python train_lora.py <spec>`` from it.
ROOT = Path(__file__).resolve().parent.parent


def launch_dir(request: TrainRequest) -> Path:
    """The folder the worker and its ranks share: dataset, spec, stop file and result."""
    return request.output_dir / ".launch"


def train_distributed(request: TrainRequest, data: PreparedDataset, *, processes: int,
                      on_progress: Callable[[ProgressEvent], None] | None = None,
                      should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """``train_lora.train_lora`` in ``processes`` ranks; returns its TrainResult (without the model)."""
    if request.distributed is None:
        raise ValueError("train_distributed needs request.distributed ('ddp' or 'fsdp')")
    work = launch_dir(request)
    work.mkdir(parents=True, exist_ok=True)
    (work / RESULT_NAME).unlink(missing_ok=True)  # an earlier attempt's outcome is not this one's
    save_dataset(data, work)
    spec = work / SPEC_NAME
    spec.write_text(request.model_dump_json())
    stop_file = work / STOP_NAME
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "train_lora.py"), str(spec)]
    logger.info("training in %d processes (%s)", processes, request.distributed)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def watch_stop():
        while proc.poll() is None:
            if should_stop is not None and should_stop() and not stop_file.exists():
                stop_file.write_text("stop")
            threading.Event().wait(0.5)

    threading.Thread(target=watch_stop, daemon=True).start()
    for line in proc.stdout:  # rank 0's progress lines; everything else is the ranks' log
        if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
            on_progress(ProgressEvent.model_validate_json(line[len(PROGRESS_PREFIX):]))
        else:
            sys.stdout.write(line)
    code = proc.wait()
    result_file = work / RESULT_NAME
    if not result_file.is_file():
        raise TrainingError(f"the {processes} training processes exited with code {code} and no result; "
                            "see the worker log for the first rank that failed")
    outcome = RankOutcome.model_validate_json(result_file.read_text())
    if outcome.failure is not None:
        raise as_worker_error(outcome.failure)
    if outcome.result is None:
        raise TrainingError(f"the training processes wrote neither a result nor an error to {result_file}")
    return outcome.result


def save_dataset(data: PreparedDataset, work: Path) -> None:
    """The prepared dataset where the ranks read it: train/, eval/ and its report."""
    data.train.save_to_disk(str(work / "train"))
    if data.eval is not None:
        data.eval.save_to_disk(str(work / "eval"))
    (work / "report.json").write_bytes(_REPORT.dump_json(data.report))


def load_dataset(work: Path) -> PreparedDataset:
    from datasets import load_from_disk

    return PreparedDataset(train=load_from_disk(str(work / "train")),
                           eval=load_from_disk(str(work / "eval")) if (work / "eval").exists() else None,
                           report=_REPORT.validate_json((work / "report.json").read_bytes()))


def rank_failure(exc: WorkerError) -> RankFailure:
    return RankFailure(error_class=type(exc).__name__, stage=exc.stage, message=exc.message,
                       retryable=exc.retryable)


def as_worker_error(failure: RankFailure) -> WorkerError:
    """The rank's error as the same class here (a WorkerError if the name is not one of ours)."""
    cls = getattr(errors, failure.error_class, None)
    if not (isinstance(cls, type) and issubclass(cls, WorkerError)):
        cls = WorkerError
    return cls(failure.message, stage=failure.stage, retryable=failure.retryable)
