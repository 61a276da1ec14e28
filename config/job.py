"""The job input (CONTRACT §1) as pydantic models.

Every field is typed and bounded here, unknown keys are rejected with the closest valid key named, and
``format_validation_error`` turns pydantic's report into one sentence per problem that names the
field, the value received and the fix. Nothing here touches the filesystem or the network.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from errors import InputError

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A Hugging Face repo id (`org/name` or `name`), a folder under the models root, or an absolute path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,254}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.*]{1,128}$")
DATASET_SCHEMES = ("https", "http", "s3", "hf")


class StrictModel(BaseModel):
    """Frozen, and an unknown key is an error that names the closest valid key."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        for key in data:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(sorted(known))
            raise ValueError(f"unknown key '{key}'; {hint}")
        return data


class DatasetSpec(StrictModel):
    uri: str | None = Field(default=None, min_length=1, max_length=8192)
    records: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=10_000)
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"] = "auto"
    eval_uri: str | None = Field(default=None, min_length=1, max_length=8192)
    eval_fraction: float = Field(default=0.0, ge=0.0, le=0.5)
    max_examples: int | None = Field(default=None, ge=1, le=10_000_000)
    subset: str | None = Field(default=None, max_length=256)
    split: str | None = Field(default=None, max_length=256)

    @field_validator("uri", "eval_uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
        if match and match.group(1).lower() not in DATASET_SCHEMES:
            raise ValueError(
                f"scheme '{match.group(1)}://' is not supported; use https://, http://, s3://bucket/key, "
                "hf://org/name, or a path on the volume"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.uri is None) == (self.records is None):
            raise ValueError(
                "give exactly one of 'uri' (a file or URL) or 'records' (inline examples)"
            )
        if self.eval_uri is not None and self.eval_fraction > 0:
            raise ValueError("give either 'eval_uri' or 'eval_fraction', not both")
        if (self.subset or self.split) and not (self.uri or "").lower().startswith("hf://"):
            raise ValueError(
                "'subset' and 'split' apply to hf:// datasets only; drop them or use an hf://org/name uri"
            )
        return self


class Hyperparameters(StrictModel):
    """Training knobs. Defaults are good for LoRA SFT; every bound is checked before any download."""

    # Accepted here because the Edge Function sends it here; reconciled with the top-level field.
    base_model: str | None = Field(default=None, min_length=1, max_length=4096)

    epochs: float = Field(default=3.0, gt=0, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5)
    weight_decay: float = Field(default=0.0, ge=0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0, le=100)
    batch_size: int = Field(default=4, ge=1, le=512)
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=1024)
    max_seq_length: int = Field(default=2048, ge=16, le=131_072)
    # "auto": padding-free batches (no pad tokens, no attention across examples) where the model's
    # layers allow it; true: bfd packing into max_seq_length rows (fewer, fuller steps); false: padded.
    packing: Literal["auto"] | bool = "auto"
    train_on_inputs: bool = False

    lora_r: int = Field(default=16, ge=1, le=1024)
    lora_alpha: float = Field(default=32, gt=0, le=8192)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"

    quantization: Literal["auto", "none", "8bit", "4bit"] = "auto"
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    seed: int = Field(default=42, ge=0, le=2**32 - 1)

    logging_steps: int = Field(default=10, ge=1, le=100_000)
    eval_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    save_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    save_total_limit: int = Field(default=2, ge=1, le=20)

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not 1 <= len(value) <= 64:
                raise ValueError(f"must name 1 to 64 modules; got {len(value)}")
            bad = [name for name in value if not _MODULE_NAME.match(name)]
            if bad:
                raise ValueError(
                    f"module names are letters, digits, '_', '.' and '*'; got {bad[:3]} "
                    "(or use \"auto\" to pick the attention and MLP projections)"
                )
            if {"lm_head", "embed_tokens"} & set(value):
                raise ValueError(
                    "LoRA on 'lm_head' or 'embed_tokens' is not supported: their adapters "
                    "do not transfer between tokenizers; name projection layers instead"
                )
        return value


class OutputSpec(StrictModel):
    prefix: str = Field(default="", max_length=512)

    @field_validator("prefix")
    @classmethod
    def _safe_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value and (not _PREFIX.match(value) or any(p in (".", "..") for p in value.split("/"))):
            raise ValueError(
                f"must be path segments of letters, digits, '_', '.', '=', '-' joined by '/'; "
                f"got {value!r}"
            )
        return value


Action = Literal["train", "prefetch", "validate", "selftest"]


class TrainingJob(StrictModel):
    action: Action = "train"
    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    base_model: str | None = Field(default=None, min_length=1, max_length=4096)
    model_revision: str | None = Field(default=None, max_length=255)
    dataset: DatasetSpec | None = None
    dataset_url: str | None = Field(default=None, min_length=1, max_length=8192)
    init_adapter: str | None = Field(default=None, min_length=1, max_length=8192)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    output: OutputSpec = Field(default_factory=OutputSpec)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_string_is_uri(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value

    @field_validator("base_model")
    @classmethod
    def _model_reference(cls, value: str | None) -> str | None:
        return _check_model_reference(value)

    @field_validator("init_adapter")
    @classmethod
    def _adapter_reference(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        scheme = value.split("://", 1)[0] if "://" in value else None
        if scheme is not None and scheme not in ("s3", "https", "http", "file"):
            raise ValueError(
                f"must be an s3:// or https:// URI of an adapter folder, or a path on the volume; "
                f"got a {scheme}:// URI"
            )
        path = value.split("?", 1)[0].split("://", 1)[-1]
        if ".." in path.split("/"):
            raise ValueError("may not contain '..'; name the adapter folder directly")
        return value

    @field_validator("model_revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not _REVISION.match(value) or ".." in value):
            raise ValueError(
                f"must be a branch, tag or commit sha (letters, digits, '_', '.', '-', '/'); "
                f"got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _reconcile(self) -> TrainingJob:
        nested = _check_model_reference(self.hyperparameters.base_model)
        if nested and self.base_model and nested != self.base_model:
            raise ValueError(
                f"'base_model' is {self.base_model!r} but 'hyperparameters.base_model' is "
                f"{nested!r}; send one of them, or the same value in both"
            )
        if nested and not self.base_model:
            object.__setattr__(self, "base_model", nested)
        if self.dataset_url is not None:
            if self.dataset is not None and self.dataset.uri != self.dataset_url:
                raise ValueError(
                    "'dataset_url' and 'dataset.uri' differ; send one of them (dataset_url is an "
                    "alias of dataset.uri)"
                )
            if self.dataset is None:
                object.__setattr__(self, "dataset", DatasetSpec(uri=self.dataset_url))
        if self.action == "selftest" and (self.dataset is not None or self.base_model):
            raise ValueError("action 'selftest' brings its own tiny model and data; send no 'base_model' "
                             "or 'dataset'")
        if self.action in ("train", "validate") and self.dataset is None:
            raise ValueError(
                f"action '{self.action}' needs a 'dataset' (an object with 'uri' or 'records', "
                "or a uri string)"
            )
        return self

    @classmethod
    def from_payload(cls, payload: Any, *, default_job_id: str | None = None) -> TrainingJob:
        """Validate ``job["input"]``; raise ``InputError`` with every problem in words."""
        if not isinstance(payload, dict):
            raise InputError(
                f"the job input must be a JSON object; got {type(payload).__name__}"
            )
        data = dict(payload)
        if data.get("job_id") is None and default_job_id:
            data["job_id"] = _sanitize_job_id(default_job_id)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(format_validation_error(exc)) from None


def _check_model_reference(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("/"):
        if any(part == ".." for part in value.split("/")):
            raise ValueError(f"an absolute path may not contain '..'; got {value!r}")
        return value
    if not _REPO_ID.match(value) or ".." in value:
        raise ValueError(
            "must be a Hugging Face repo id ('org/name'), a folder name under the models root, "
            f"or an absolute path on the volume; got {value!r}"
        )
    return value


def _sanitize_job_id(raw: str) -> str:
    """RunPod ids are safe already; a local caller's may not be. Keep it a valid job_id."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", str(raw)).lstrip("._-")[:128]
    return cleaned or "job"


def format_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One sentence per field: where, what is wrong, and the value received."""
    by_loc: dict[str, list[str]] = {}
    given_at: dict[str, Any] = {}
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = err["msg"]
        for prefix, keep in (("Value error, ", ""), ("Input should be ", "should be "),
                             ("String should ", "should "), ("List should ", "should ")):
            if msg.startswith(prefix):
                msg = keep + msg[len(prefix):]
                break
        if loc in by_loc and msg.startswith("should be "):
            msg = msg[len("should be "):]  # union members: "should be A or B"
        by_loc.setdefault(loc, []).append(msg)
        if err["type"] not in ("value_error", "missing", "assertion_error"):
            given_at.setdefault(loc, err.get("input"))
    parts = []
    for loc, msgs in list(by_loc.items())[:limit]:
        text = " or ".join(dict.fromkeys(msgs))
        given = given_at.get(loc)
        if loc in given_at and not isinstance(given, (dict, list)):
            text += f"; got {given!r}"
        parts.append(f"{loc}: {text}" if loc else text)
    if len(by_loc) > limit:
        parts.append(f"and {len(by_loc) - limit} more")
    return "; ".join(parts)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's type name into the location ("literal['auto']", "list[str]").
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def job_json_schema() -> dict[str, Any]:
    schema = TrainingJob.model_json_schema()
    schema["title"] = "LoRA training job input"
    return schema
