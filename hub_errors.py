"""The Hugging Face Hub's exceptions in words a user can act on: one map for base models and datasets.

What went wrong (gated, missing, no such revision, offline, the Hub answered an error, the Hub could not
be reached) is decided once, here; what to do about it depends on what was being fetched, so each
kind has its own hints, and its own error class (its stage: ``model:`` or ``dataset:``).

A leaf: it imports only the error taxonomy (and huggingface_hub, when an error is mapped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from errors import DatasetError, ModelError, WorkerError

Kind = Literal["model", "dataset"]


@dataclass(frozen=True)
class HubTarget:
    """What was being fetched from the Hub, as the error should name it."""

    kind: Kind
    repo_id: str
    revision: str | None
    has_token: bool  # whether HF_TOKEN is set (never the token itself)
    shown: str = ""  # how messages name it; the repo id when empty

    @property
    def name(self) -> str:
        return self.shown or self.repo_id


ERROR_CLASSES: dict[Kind, type[WorkerError]] = {"model": ModelError, "dataset": DatasetError}

# Per kind and problem: the message, and whether a re-run can help. Fields: name, revision, token
# (why a gated repo refused us), status (the Hub's HTTP status), detail (the exception, one line).
_MESSAGES: dict[Kind, dict[str, tuple[str, bool]]] = {
    "model": {
        "gated": ("{name} is a gated model and {token}: accept its license on huggingface.co and set HF_TOKEN "
                  "on the endpoint to a token of that account", False),
        "missing": ("{name} was not found on the Hugging Face Hub (a private repo also needs HF_TOKEN); check "
                    "the id, or put the model on the volume under MODELS_DIR", False),
        "revision": ("revision {revision!r} of {name} does not exist on the Hub; use a branch, tag or commit of "
                     "that repo", False),
        "offline": ("HF_HUB_OFFLINE is set, so {name} cannot be downloaded; prefetch it onto the volume or "
                    "unset HF_HUB_OFFLINE", False),
        # A model download keeps what arrived: whatever failed, a re-run resumes it.
        "answered": ("downloading {name} failed ({detail}); what was downloaded is kept in the cache and a "
                     "re-run resumes it", True),
        "unreachable": ("downloading {name} failed ({detail}); what was downloaded is kept in the cache and a "
                        "re-run resumes it", True),
        "failed": ("downloading {name} failed ({detail}); what was downloaded is kept in the cache and a "
                   "re-run resumes it", True),
    },
    "dataset": {
        "gated": ("{name} is gated: accept its terms on the Hub with the account whose HF_TOKEN the endpoint "
                  "uses, or set HF_TOKEN", False),
        "missing": ("{name}: no such dataset on the Hub (or it is private: set HF_TOKEN); check the name", False),
        "revision": ("{name}: revision {revision!r} does not exist; use a branch, tag or commit of the dataset",
                     False),
        "offline": ("{name} is not in the Hugging Face cache on the volume and HF_HUB_OFFLINE is set; unset it "
                    "or prefetch the dataset", False),
        "answered": ("{name}: the Hub answered {status}; try again", True),
        "unreachable": ("{name}: the Hub could not be reached ({kind_of}); try again or prefetch the dataset "
                        "onto the volume", True),
        "failed": ("{name}: download failed ({kind_of}); try again", True),
    },
}


def _problem(exc: BaseException) -> str:
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return "gated"
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return "missing"
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return "revision"
    if isinstance(exc, hf_errors.OfflineModeIsEnabled) or (
            isinstance(exc, hf_errors.LocalEntryNotFoundError) and "HF_HUB_OFFLINE" in str(exc)):
        return "offline"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return "answered"
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, OSError)) or "httpx" in type(exc).__module__:
        return "unreachable"
    return "failed"


def hub_error(exc: BaseException, target: HubTarget) -> WorkerError:
    """The error (class and words) for ``exc``, raised by the Hub client while fetching ``target``."""
    problem = _problem(exc)
    template, retryable = _MESSAGES[target.kind][problem]
    response = getattr(exc, "response", None)
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    message = template.format(
        name=target.name,
        revision=target.revision,
        token="the account of HF_TOKEN has no access" if target.has_token else "HF_TOKEN is not set",
        status=getattr(response, "status_code", None) or "?",
        detail=f"{type(exc).__name__}: {first_line}",
        kind_of=type(exc).__name__,
    )
    return ERROR_CLASSES[target.kind](message, retryable=retryable)
