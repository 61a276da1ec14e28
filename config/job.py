"""The job input (CONTRACT §1) as pydantic models.

Every field is typed and bounded here, unknown keys are rejected with the closest valid key named, and
``format_validation_error`` turns pydantic's report into one sentence per problem that names the
field, the value received and the fix. Nothing here touches the filesystem or the network.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from errors import InputError

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A Hugging Face repo id (`org/name` or `name`), a folder under the models root, or an absolute path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,254}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.*]{1,128}$")
DATASET_SCHEMES = ("https", "http", "s3", "hf")


class StrictModel(BaseModel):
    """Frozen, strictly typed (``"3"`` is not 3 and ``true`` is not 1: a value of the wrong JSON type is
    an error, never coerced), and an unknown key is an error that names the closest valid key."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)

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
    """Where the training data is and how to read it; a string in its place is its uri."""

    uri: str | None = Field(
        default=None, min_length=1, max_length=8192,
        description="The data: a path on the volume (relative to it, or absolute inside it; a folder "
                    "means every data file in it), https:// or http:// (e.g. a Supabase Storage signed "
                    "URL; its query is never logged), s3://bucket/key, or hf://org/name (a Hugging Face "
                    "dataset). Give this or 'records'.")
    records: list[dict[str, Any]] | None = Field(
        default=None, min_length=1, max_length=10_000,
        description="Inline examples instead of a 'uri', for small sets (the endpoint may cap them "
                    "lower: MAX_INLINE_RECORDS).")
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"] = Field(
        default="auto",
        description="The record schema. 'auto' detects it per record: chat (messages), sharegpt "
                    "(conversations), prompt_completion, alpaca (instruction/input/output), text.")
    eval_uri: str | None = Field(
        default=None, min_length=1, max_length=8192,
        description="Evaluation data, read like 'uri'. Unset: no evaluation unless 'eval_fraction' is "
                    "given; for hf:// data, the same subset's validation (else test) split.")
    eval_fraction: float = Field(
        default=0.0, ge=0.0, le=0.5,
        description="Share of the examples held out for evaluation (a split seeded by "
                    "hyperparameters.seed, so a rerun holds out the same ones); 0: none.")
    max_examples: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="Read at most this many records (the first ones); unset: all.")
    subset: str | None = Field(
        default=None, max_length=256,
        description="hf:// only: the dataset's subset (the card's config_name).")
    split: str | None = Field(
        default=None, max_length=256, description="hf:// only: the split to train on; unset: train.")

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
    base_model: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="Same as the job's top-level 'base_model' (the Edge Function sends it here); both "
                    "given and different is an error.")

    epochs: float = Field(
        default=3.0, gt=0, le=100,
        description="Passes over the training data; a fraction stops part-way through the last one. "
                    "3 is the usual LoRA SFT choice for a few thousand examples.")
    max_steps: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Optimizer steps to train for; overrides 'epochs'. Unset: from 'epochs'.")
    learning_rate: float = Field(
        default=2e-4, gt=0, le=1.0,
        description="Peak learning rate of AdamW. 2e-4 is the common LoRA rate, ten times a full "
                    "fine-tune's, since only the small adapter matrices learn.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="How the learning rate decays after warmup.")
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=0.5,
        description="Share of the steps spent ramping the learning rate up from 0.")
    weight_decay: float = Field(
        default=0.0, ge=0, le=1.0,
        description="AdamW weight decay on the adapter weights; 0 because LoRA's low rank already "
                    "regularises.")
    max_grad_norm: float = Field(
        default=1.0, gt=0, le=100, description="Gradients are clipped to this global L2 norm.")
    batch_size: int = Field(
        default=4, ge=1, le=512, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=1024,
        description="Forward passes per optimizer step: the effective batch is batch_size × this × "
                    "the number of GPUs (16 examples on one GPU by default).")
    max_seq_length: int = Field(
        default=2048, ge=16, le=131_072,
        description="Tokens per example: longer examples are cut (counted as truncated), and dropped "
                    "when no trained token is left.")
    packing: Literal["auto"] | bool = Field(
        default="auto",
        description="'auto': padding-free batches (no pad tokens; positions restart per example, so "
                    "no attention across examples) where the model allows it; models with linear-"
                    "attention layers (Qwen3-Next) only where flash-linear-attention and causal-conv1d "
                    "run them (they keep examples apart), else padded; true: best-fit packing into "
                    "max_seq_length rows (fewer steps; not for linear attention); false: padded.")
    train_on_inputs: bool = Field(
        default=False,
        description="false: loss on the assistant/completion tokens only; true: on every token "
                    "(system and user turns, prompts too).")

    lora_r: int = Field(
        default=16, ge=1, le=1024,
        description="LoRA rank: the inner size of each adapter pair; more learns more, in a bigger "
                    "adapter.")
    lora_alpha: float = Field(
        default=32, gt=0, le=8192,
        description="LoRA scaling: updates are scaled by lora_alpha / lora_r (by lora_alpha / √lora_r "
                    "with use_rslora); 2 × lora_r is the common choice.")
    lora_dropout: float = Field(
        default=0.05, ge=0, lt=1,
        description="Dropout on the adapter's input. The default becomes 0 when fused MoE experts are "
                    "adapted (peft cannot apply dropout there); an explicit non-zero value with them "
                    "is an error.")
    use_rslora: bool = Field(
        default=False, description="Rank-stabilized scaling (lora_alpha / √lora_r), for high ranks.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        default="auto",
        description="Which layers get adapters. 'auto': every linear projection except lm_head, "
                    "embeddings and MoE routers, plus the fused routed-expert weights of MoE models (not "
                    "when they are 4-bit); 'all-linear': the linear layers only; or a list of leaf "
                    "names or paths (q_proj, mlp.shared_expert.gate_proj, gate_up_proj, "
                    "mlp.experts.down_proj).")

    quantization: Literal["auto", "none", "8bit", "4bit"] = Field(
        default="auto",
        description="How the frozen base is held: 'auto' is the memory plan's pick (none if the model "
                    "fits in 16 bits, else 4bit; none on a CPU); 4bit (QLoRA: NF4, double "
                    "quantization, bf16 compute; a mixture-of-experts model's routed experts too, "
                    "frozen unless target_modules names them) runs where bitsandbytes does, a CPU "
                    "included; 8bit needs a CUDA GPU.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        default="auto",
        description="Recompute activations in the backward pass: less memory, about a third more "
                    "time. 'auto': on with a GPU.")
    seed: int = Field(
        default=42, ge=0, le=2**32 - 1,
        description="Seeds the data order, the eval split and the LoRA initialisation: the same job "
                    "trains the same adapter.")

    logging_steps: int = Field(
        default=10, ge=1, le=100_000,
        description="Every this many steps, progress (loss, learning rate, tokens/s) is logged and sent.")
    eval_steps: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Evaluate every this many steps; unset: once per epoch. Only with eval data.")
    save_steps: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Checkpoint every this many steps, so a re-delivered or cut-short job resumes; "
                    "unset: every tenth of the run.")
    save_total_limit: int = Field(
        default=2, ge=1, le=20,
        description="Complete checkpoints kept on the volume (older ones are deleted); 2 so one "
                    "survives while the next is written.")

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
    """Where the artifact lands."""

    prefix: str = Field(
        default="", max_length=512,
        description="Artifacts land under <prefix>/<job_id>/ in the artifact store (below S3_PREFIX "
                    "with S3); path segments of letters, digits, '_', '.', '=', '-'.")

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
    """A job's input: what RunPod passes as job["input"] (CONTRACT §1)."""

    action: Action = Field(
        default="train",
        description="train: train an adapter. validate: check the input and the dataset, load no "
                    "weights. prefetch: download base_model into the volume's cache and stop. "
                    "selftest: the plumbing checklist on a tiny built-in model, against the configured "
                    "volume, store and records.")
    job_id: str | None = Field(
        default=None, pattern=JOB_ID_PATTERN,
        description="Your id for the job (e.g. the training_jobs row id); RunPod's job id when unset. "
                    "An idempotency key: it names the checkpoints, the artifact and the record, so the "
                    "same job delivered twice trains once.")
    base_model: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="A Hugging Face repo id (org/name), a folder under the models root, or an absolute "
                    "path on the volume. Unset: DEFAULT_BASE_MODEL, then MODEL_PATH.")
    model_revision: str | None = Field(
        default=None, max_length=255,
        description="A branch, tag or commit sha of the repo; unset: main. The resolved commit is "
                    "recorded with the adapter.")
    dataset: DatasetSpec | None = Field(
        default=None,
        description="The training data: an object, or a string (its uri). Needed by train and "
                    "validate.")
    dataset_url: str | None = Field(
        default=None, min_length=1, max_length=8192,
        description="An alias of dataset.uri.")
    init_adapter: str | None = Field(
        default=None, min_length=1, max_length=8192,
        description="An adapter to continue training (a volume path, s3:// or https:// folder); it is "
                    "verified against the base before any weight loads, and keeps its own rank, alpha "
                    "and target modules.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters,
        description="The training knobs; each has a default good for LoRA SFT.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where the artifact lands.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form, stored with the job record; metadata.user_id names the record's owner "
                    "(with Supabase, the owner's user id, a UUID).")

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded_metadata(cls, value: Any) -> Any:
        _check_json_bounds(value, "metadata")
        return value

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
            f"or an absolute path inside the models root, the Hugging Face cache or MODEL_PATH; got {value!r}"
        )
    return value


def _sanitize_job_id(raw: str) -> str:
    """RunPod ids are safe already; a local caller's may not be. Keep it a valid job_id."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", str(raw)).lstrip("._-")[:128]
    return cleaned or "job"


# Free-form JSON a job carries (metadata) is stored and echoed: bounded so that serialising it can
# neither recurse without end nor fill a record.
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 10_000
MAX_SHOWN_VALUE = 120  # characters of a rejected value quoted back in an error


def _check_json_bounds(value: Any, field: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or with more than MAX_JSON_ITEMS values, without
    recursing (a payload nested 100,000 deep must not exhaust the stack while it is checked)."""
    stack, items = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_JSON_DEPTH} levels; flatten {field} "
                             "(it is stored with the job record, not read by training)")
        if items > MAX_JSON_ITEMS:
            raise ValueError(f"holds more than {MAX_JSON_ITEMS} values; keep {field} small (it is "
                             "stored with the job record)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def format_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One sentence per field: where, what is wrong, and the value received."""
    by_loc: dict[str, list[str]] = {}
    given_at: dict[str, Any] = {}
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = _TYPE_WORDS.get(err["type"], err["msg"])
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
            # JSON's spelling for JSON's values: a caller sent true or null, not True or None
            shown = json.dumps(given) if given is None or isinstance(given, bool) else repr(given)
            # a 1 MB value must not come back as a 1 MB error: its start is enough to recognise it
            text += f"; got {shown if len(shown) <= MAX_SHOWN_VALUE else shown[:MAX_SHOWN_VALUE] + '…'}"
        parts.append(f"{loc}: {text}" if loc else text)
    if len(by_loc) > limit:
        parts.append(f"and {len(by_loc) - limit} more")
    return "; ".join(parts)


# Strict types (no "3" → 3, no true → 1): the words say which JSON value is wanted.
_TYPE_WORDS = {
    "int_type": "Input should be a whole number (a JSON number such as 4, not a string, true/false or 4.0)",
    "float_type": "Input should be a number (a JSON number such as 0.0002, not a string or true/false)",
    "bool_type": "Input should be true or false (a JSON boolean, not a string or a number)",
    "string_type": "Input should be a string",
}


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's type name into the location ("literal['auto']", "list[str]").
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def job_json_schema() -> dict[str, Any]:
    schema = TrainingJob.model_json_schema()
    schema["title"] = "LoRA training job input"
    # A string in the dataset's place is its uri (``_dataset_string_is_uri``, before pydantic's schema).
    schema["properties"]["dataset"]["anyOf"].insert(1, {"type": "string", "minLength": 1, "maxLength": 8192})
    return schema


# --------------------------------------------------------------------------------------------------
# The README's hyperparameter table, generated from the fields above so the two cannot disagree.


def hyperparameters_markdown() -> str:
    """The hyperparameter table (name, default, bounds or values, meaning) as Markdown.

    README.md holds this between its ``hyperparameters`` marker comments; ``python cli.py schema
    --markdown`` prints it, and tests/test_readme.py fails when the README's copy differs.
    """
    rows = ["| name | default | bounds / values | meaning |", "|---|---|---|---|"]
    for name, field in Hyperparameters.model_fields.items():
        cells = (f"`{name}`", _markdown_default(field), _markdown_values(field), field.description or "")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _markdown_default(field: FieldInfo) -> str:
    return "unset" if field.default is None else _markdown_value(field.default)


def _markdown_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value:,}"


def _markdown_values(field: FieldInfo) -> str:
    """A range from the field's bounds ("1 … 1,024", "(0, 100]"), else its choices."""
    low = high = None
    low_open = high_open = False
    for bound in field.metadata:  # pydantic keeps Field(ge=…, lt=…) as annotated_types.Ge, Lt, …
        if getattr(bound, "ge", None) is not None:
            low = bound.ge
        elif getattr(bound, "gt", None) is not None:
            low, low_open = bound.gt, True
        elif getattr(bound, "le", None) is not None:
            high = bound.le
        elif getattr(bound, "lt", None) is not None:
            high, high_open = bound.lt, True
    kinds = _choices(field.annotation)
    if low is not None and high is not None:
        if "int" in kinds and not (low_open or high_open):
            return f"{_markdown_value(low)} … {_markdown_value(high)}"
        return f"{'(' if low_open else '['}{_markdown_value(low)}, {_markdown_value(high)}{')' if high_open else ']'}"
    return ", ".join(kind for kind in kinds if kind not in ("int", "float"))


def _choices(annotation: Any) -> list[str]:
    origin = get_origin(annotation)
    if origin is Literal:
        return [_markdown_value(v) for v in get_args(annotation)]
    if origin in (Union, types.UnionType):
        return [kind for arg in get_args(annotation) for kind in _choices(arg)]
    if origin is list:
        return ["a list of names"]
    if annotation is bool:
        return ["true", "false"]
    return {int: ["int"], float: ["float"], str: ["text"]}.get(annotation, [])
