"""The worker's error taxonomy.

Every failure a user can act on is one of these. Each carries the stage it belongs to (the prefix of
RunPod's ``{"error": "<stage>: …"}``) and whether retrying the same job can help. Library code raises
them ``from`` the cause; ``handler.py`` is the one place that turns them into output.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import threading
from collections.abc import Iterable, Iterator


class WorkerError(Exception):
    """Base class: a failure with a stage and a message a user can act on."""

    stage = "train"
    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None, stage: str | None = None):
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        if stage is not None:
            self.stage = stage

    def __str__(self) -> str:
        return self.message

    def with_hint(self, hint: str) -> WorkerError:
        """The same error (class, stage, retryable) with ``hint`` appended: what to do, or what was kept.

        Raise it ``from`` the original: ``raise exc.with_hint("the adapter is kept at …") from exc``.
        """
        clone = copy.copy(self)
        clone.message = f"{self.message}; {hint}"
        clone.args = (clone.message,)
        return clone


class InputError(WorkerError):
    """The job input is wrong: fix the payload."""

    stage = "input"


class ModelError(WorkerError):
    """The base model cannot be found, fetched or loaded."""

    stage = "model"


class DatasetError(WorkerError):
    """The dataset cannot be fetched, parsed or tokenized."""

    stage = "dataset"


class TrainingError(WorkerError):
    """Training failed or was stopped."""

    stage = "train"


class StorageError(WorkerError):
    """The adapter could not be stored in the artifact store."""

    stage = "upload"
    retryable = True


class RecordError(WorkerError):
    """The job or artifact record could not be written."""

    stage = "record"
    retryable = True


# --------------------------------------------------------------------------------------------------
# Scrubbing: nothing secret leaves the process in an error, an output or a log line.


_URL_QUERY = re.compile(r"((?:https?|s3)://[^\s?#'\"<>]+)\?[^\s'\"<>]+")
# A request line as HTTP libraries log it ("GET /object/sign/x.jsonl?token=…"): a path, no scheme.
_PATH_QUERY = re.compile(r"((?:^|(?<=[\s'\"(]))/[^\s?#'\"<>]*)\?[^\s'\"<>]+")
_PATTERNS = (
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_<redacted>"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "<redacted-jwt>"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<redacted-key-id>"),
    (re.compile(r"(?i)(authorization|x-amz-security-token|apikey)(['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+)?([^\s'\",}]+)"),
     r"\1\2<redacted>"),
)


def scrub(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """Remove URL query strings (signed URLs), known secret values and token-shaped strings."""
    text = _URL_QUERY.sub(r"\1?<redacted>", str(text))
    text = _PATH_QUERY.sub(r"\1?<redacted>", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# The secret values of the jobs running now (a request's s3Config keys): every ScrubFilter masks them
# while their job runs. Process-wide, not a contextvar: the threads a job starts (boto3's transfers,
# the trainer's workers) log too, and a contextvar does not follow a job into them.
_job_secrets: list[tuple[str, ...]] = []
_job_secrets_lock = threading.Lock()


@contextlib.contextmanager
def job_secrets(secrets: Iterable[str]) -> Iterator[None]:
    """Mask ``secrets`` in every log line while the block (one job) runs."""
    entry = tuple(s for s in secrets if s)
    with _job_secrets_lock:
        _job_secrets.append(entry)
    try:
        yield
    finally:
        with _job_secrets_lock:
            _job_secrets.remove(entry)


def running_job_secrets() -> tuple[str, ...]:
    with _job_secrets_lock:
        return tuple(dict.fromkeys(s for entry in _job_secrets for s in entry))


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs every record before any handler formats it: token-shaped strings,
    URL queries, ``secrets`` (the worker's own, fixed when logging is configured) and the secrets of
    the jobs running now (``job_secrets``), so a filter is added once, never per job."""

    def __init__(self, secrets: tuple[str, ...] | list[str] = ()):
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = (*self.secrets, *running_job_secrets())
        message = record.getMessage()
        cleaned = scrub(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info:
            # A traceback can quote locals and URLs: keep the exception's one line, scrubbed.
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {scrub(str(exc), secrets)})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class TrainingCancelled(TrainingError):
    """The job was cancelled (RunPod cancel): training stopped at a step boundary, checkpoint kept."""
