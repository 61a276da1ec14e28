"""Trainer callbacks: progress out, stop requests in (cancel, time limit), TensorBoard events."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    epoch: float | None
    tokens_per_second: float | None
    eta_s: float | None


class ProgressCallback:
    """Forwards the trainer's logs to ``on_progress`` and stops on a non-finite loss."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None] | None):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()
                # A resumed run starts at its checkpoint's step: speed and ETA count this run only.
                outer.start_step = state.global_step
                outer.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.handle_log(state, control, logs or {})

        self.callback = Callback()
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.bad_loss: tuple[int, float] | None = None

    def handle_log(self, state, control, logs: dict[str, Any]) -> None:
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
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = state.global_step, state.max_steps
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else None
        self.on_progress(ProgressEvent(
            step=step, total_steps=total, loss=float(loss), learning_rate=logs.get("learning_rate"),
            epoch=logs.get("epoch"), tokens_per_second=tokens / elapsed if tokens > 0 else None, eta_s=eta,
        ))


class StopControl:
    """Stops at the next step boundary, with a checkpoint, on a cancel or when the time is up."""

    def __init__(self, max_seconds: float | None, should_stop: Callable[[], bool] | None):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                outer.check(state, control, args.device)

        self.callback = Callback()
        self.max_seconds = max_seconds
        self.should_stop = should_stop
        self.started = time.monotonic()
        self.reason: str | None = None
        self.step = 0

    def check(self, state, control, device=None) -> None:
        if self.should_stop is not None and self.should_stop():
            self.reason = "cancelled"
        elif self.max_seconds is not None and time.monotonic() - self.started >= self.max_seconds:
            self.reason = "time"
        self.reason = _agree(self.reason, device)
        if self.reason and state.global_step < state.max_steps:
            self.step = state.global_step
            control.should_training_stop = True
            control.should_save = True
        else:
            self.reason = None  # the last step: finishing is better than stopping


_STOP_REASONS = (None, "time", "cancelled")


def _agree(reason: str | None, device) -> str | None:
    """With several processes, all stop at the same step or none does (else a collective hangs)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return reason
    flag = torch.tensor([_STOP_REASONS.index(reason)], device=device or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a small sync point per step, only when distributed
    return _STOP_REASONS[int(flag.item())]


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
