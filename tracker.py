"""A job's progress: stages timed, and progress sent to RunPod and to the job row, throttled for training steps.

Any unexpected exception inside a stage becomes a ``WorkerError`` of that stage, so the caller always
knows where a job failed.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from errors import WorkerError
from storage.records import JobUpdate, Records

logger = logging.getLogger(__name__)

Notify = Callable[[dict[str, Any]], None]

# Where each stage starts on the job's 0..1 progress bar; training fills the span up to "save".
STAGE_PROGRESS = {"model": 0.01, "dataset": 0.03, "train": 0.05, "save": 0.92, "upload": 0.94,
                  "record": 0.98}
# After a progress row fails to be written, the next progress rows wait this long (RunPod still gets them).
RECORDS_PAUSE_S = 60.0
# A progress update's keys (what RunPod gets) → the job row's columns.
PROGRESS_COLUMNS = (("progress", "progress"), ("step", "current_step"), ("total_steps", "total_steps"),
                    ("loss", "last_loss"), ("stage", "stage"))


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
        self._writer = _ProgressWriter(job_id, records) if records is not None else None

    @contextmanager
    def stage(self, name: str, timing: str, *, report: bool = True) -> Iterator[None]:
        self.current = name
        if report:
            self.send({"stage": name, "progress": STAGE_PROGRESS.get(name, 0.0)}, force=True)
        started = time.monotonic()
        try:
            yield
        except WorkerError:
            raise
        except Exception as exc:  # an unexpected failure still belongs to a stage
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # not a bug: space to free, then retry
                raise WorkerError(_disk_full(exc), stage=name, retryable=True) from exc
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
        if self._writer is not None:
            self._writer.submit(JobUpdate(**{column: update[key] for key, column in PROGRESS_COLUMNS
                                             if update.get(key) is not None}))

    def close(self) -> None:
        """Stop writing progress rows: a row still being written is waited for and the unwritten ones
        dropped, so no progress row can land after the job's final row (which the caller writes next)."""
        if self._writer is not None:
            self._writer.close()

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


class _ProgressWriter:
    """Writes a job's progress rows in a thread of its own, so training never waits on the records
    service: only the newest row waiting is written (a row supersedes the one before it), and after a
    failed write the rows of the next ``RECORDS_PAUSE_S`` are dropped (RunPod still gets every update).
    A service that hangs costs this thread its timeout, never a training step."""

    def __init__(self, job_id: str, records: Records):
        self.job_id = job_id
        self.records = records
        self._waiting: JobUpdate | None = None
        self._closed = False
        self._paused_until = 0.0
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, row: JobUpdate) -> None:
        with self._ready:
            if self._closed or time.monotonic() < self._paused_until:
                return
            self._waiting = row
            if self._thread is None:  # started with the first row: validate and prefetch write none
                self._thread = threading.Thread(target=self._run, name=f"progress-{self.job_id}", daemon=True)
                self._thread.start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while self._waiting is None and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                row, self._waiting = self._waiting, None
            try:
                self.records.upsert_progress(self.job_id, row)
            except WorkerError as exc:  # a progress row is not worth failing, or holding up, a paid run for
                with self._ready:
                    self._paused_until = time.monotonic() + RECORDS_PAUSE_S
                    self._waiting = None
                logger.warning("progress record not written (the next try in %.0fs): %s", RECORDS_PAUSE_S, exc)
            except Exception:  # never let the writer die silently while the job goes on
                logger.exception("progress record not written")

    def close(self, timeout_s: float = 120.0) -> None:
        with self._ready:
            self._closed = True
            self._waiting = None
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)  # bounded by the records client's own timeout and retries
            if self._thread.is_alive():
                logger.warning("a progress row for job %s is still being written after %.0fs; the final row "
                               "is written now and may be overwritten by it", self.job_id, timeout_s)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: OSError) -> str:
    """A full disk, in whichever stage: what to do. Nothing half-written counts as done (checkpoints and
    folders are marked complete last), so the retry loses nothing that was finished."""
    where = f" writing {exc.filename}" if exc.filename else ""
    return (f"the disk is full ({os.strerror(exc.errno)}){where}: free space on the volume or give the worker "
            "a larger one, then send the same job (same job_id) again: it resumes from its newest complete "
            "checkpoint (or starts over if it has none)")


def _innermost_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown location"
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
