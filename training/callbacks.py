"""Trainer callbacks: progress out, stop requests in (cancel, time limit), TensorBoard events.

Imported only to train: transformers (and torch) at module level are fine here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from errors import TrainingCancelled, TrainingError
from training.request import TrainRequest
from training.result import ProgressEvent

logger = logging.getLogger(__name__)


class ProgressCallback(TrainerCallback):
    """Forwards the trainer's logs to ``on_progress`` and stops on a non-finite loss."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None] | None = None):
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.bad_loss: tuple[int, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        # A resumed run starts at its checkpoint's step: speed and ETA count this run only.
        self.start_step = state.global_step
        self.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss")
        grad_norm = logs.get("grad_norm")
        if loss is not None and not math.isfinite(loss):
            self.bad_loss = (state.global_step, loss)
        elif grad_norm is not None and not math.isfinite(grad_norm):
            self.bad_loss = (state.global_step, float("nan"))  # NaN gradients have poisoned the weights
        if self.bad_loss is not None:
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of broken weights is worth nothing
        if loss is None or self.on_progress is None:
            return
        self.on_progress(self._event(state, logs, float(loss)))

    def _event(self, state, logs: dict[str, Any], loss: float) -> ProgressEvent:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = state.global_step, state.max_steps
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else None
        return ProgressEvent(
            step=step, total_steps=total, loss=loss, learning_rate=logs.get("learning_rate"),
            epoch=logs.get("epoch"), tokens_per_second=tokens / elapsed if tokens > 0 else None, eta_s=eta,
        )


class StopControl(TrainerCallback):
    """Stops at the next step boundary, with a checkpoint, on a cancel or when the time is up."""

    def __init__(self, max_seconds: float | None, should_stop: Callable[[], bool] | None):
        self.max_seconds = max_seconds
        self.should_stop = should_stop
        self.started = time.monotonic()
        self.reason: str | None = None
        self.step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop is not None and self.should_stop():
            self.reason = "cancelled"
        elif self.max_seconds is not None and time.monotonic() - self.started >= self.max_seconds:
            self.reason = "time"
        self.reason = _agree(self.reason, args.device)
        if self.reason and state.global_step < state.max_steps:
            self.step = state.global_step
            control.should_training_stop = True
            control.should_save = True
        else:
            self.reason = None  # the last step: finishing is better than stopping


_STOP_REASONS = (None, "time", "cancelled")


def _agree(reason: str | None, device) -> str | None:
    """With several processes, all stop at the same step or none does (else a collective hangs)."""
    if not (dist.is_available() and dist.is_initialized()):
        return reason
    flag = torch.tensor([_STOP_REASONS.index(reason)], device=device or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a small sync point per step, only when distributed
    return _STOP_REASONS[int(flag.item())]


def raise_if_stopped(progress: ProgressCallback, stopper: StopControl, state, request: TrainRequest) -> None:
    """A run that ended early is an error saying how far it got: a NaN loss, a cancel, the time limit."""
    if progress.bad_loss is not None:
        step, loss = progress.bad_loss
        raise TrainingError(
            f"the loss became {loss} at step {step}; lower learning_rate (now "
            f"{request.hyperparameters.learning_rate}) or check the data for empty or corrupt examples"
        )
    if stopper.reason is None:
        return
    where = (f"at step {stopper.step} of {state.max_steps} (epoch "
             f"{state.epoch or 0:.2f}); its checkpoint is kept in {request.checkpoint_dir}")
    if stopper.reason == "cancelled":
        raise TrainingCancelled(f"training was cancelled {where}; sending the same job "
                                "(same job_id) again resumes from there")
    raise TrainingError(
        f"training stopped after MAX_TRAIN_SECONDS={request.max_train_seconds:g}s {where}; run the same "
        "job (same job_id) again to resume from there, or raise MAX_TRAIN_SECONDS together with "
        "the endpoint's executionTimeout", retryable=True)


def tensorboard_callback(log_dir: Path):
    """Event files next to metrics.json; None (with a warning) where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard event files for this job")
        return None
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))
    callback.logging_dir = str(log_dir)  # a writer reopened after train() (final eval) goes here too
    return callback
