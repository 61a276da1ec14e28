"""The adapter manifest: what an adapter is and which base it fits. Written last; read everywhere.

``AdapterManifest`` is the one object behind the adapter's ``manifest.json``, the job folder's
``manifest.json`` (the same but for ``files``), the artifact row and the job output.

Manifests written by earlier versions of the worker are read back when a job is delivered again,
so every section keeps keys it does not know (``extra="allow"``) and treats what it knows as
optional unless an artifact cannot be recorded without it (the base's id and fingerprint).
``to_dict()`` writes back exactly the keys that were set or read, so a stored manifest round-trips
unchanged and an absent key (``init_adapter``, ``eval_loss``) stays absent rather than null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from files import MANIFEST_NAME, FileEntry, write_json_atomic

MANIFEST_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)


class LoadEntry(_Section):
    """How the base's weights were read (staged to local disk or not), or that a warm worker kept them."""

    load_path: str | None = None
    staged: bool | None = None
    stage_reason: str | None = None
    stage_seconds: float | None = None
    staged_bytes: int | None = None
    # True: a warm worker kept this base in memory from an earlier job and did not load it again
    reused: bool | None = None


class BaseEntry(_Section):
    """The one base model the adapter fits."""

    id: str
    revision: str | None = None
    source: str | None = None  # volume | model_path | hf_cache | download
    path: str | None = None
    fingerprint: str
    # ModelSignature.to_dict(): compared key by key by adapters/verify.py, so kept as written.
    architecture: dict[str, Any] | None = None
    bytes: int | None = None
    downloaded_bytes: int | None = None
    seconds: float | None = None
    load: LoadEntry | None = None


class LoraEntry(_Section):
    """The LoRA peft applied (the ``peft`` key of the manifest)."""

    peft_type: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    use_rslora: bool | None = None
    target_modules: list[str] | None = None
    target_parameters: list[str] | None = None
    task_type: str | None = None


class DatasetEntry(_Section):
    """The dataset report (data/report.py's DatasetReport), as the manifest keeps it."""

    source: str | None = None
    format: str | None = None
    file_format: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    records: int | None = None
    examples: int | None = None
    eval_examples: int | None = None
    tokens: int | None = None
    trained_tokens: int | None = None
    eval_tokens: int | None = None
    truncated: int | None = None
    dropped: dict[str, int] | None = None
    dropped_examples: list[dict[str, str]] | None = None
    formats: dict[str, int] | None = None
    max_seq_length: int | None = None
    longest: int | None = None
    token_stats: dict[str, int | float] | None = None  # min/p50/max are ints, mean a float
    max_examples: int | None = None
    eval_source: str | None = None
    eval_sha256: str | None = None
    eval_fraction: float | None = None
    warnings: list[str] | None = None
    seconds: float | None = None


class Metrics(_Section):
    """What training measured; ``eval_loss`` is present only when there was an eval split."""

    train_loss: float | None = None
    steps: int | None = None
    epochs: float | None = None
    train_tokens: int | None = None
    resumed_from_step: int | None = None
    batching: str | None = None
    trainable_parameters: int | None = None
    tokens_per_second: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None


class Versions(_Section):
    """The libraries that trained the adapter; a library not installed is absent."""

    torch: str | None = None
    transformers: str | None = None
    peft: str | None = None
    trl: str | None = None
    accelerate: str | None = None
    bitsandbytes: str | None = None


class RuntimeEntry(_Section):
    device: str | None = None
    precision: str | None = None
    quantization: str | None = None
    attention: str | None = None  # the attention implementation the model ran with
    kernels: dict[str, str] = {}  # optional kernels really used ({distribution: version})


class InitAdapterEntry(_Section):
    """The adapter this one continued training from."""

    uri: str | None = None
    verdict: str | None = None
    warnings: list[str] = []
    job_id: str | None = None
    files: list[FileEntry] = []


class AdapterManifest(_Section):
    """What an adapter is and what it fits. Serialized as manifest.json, written last."""

    job_id: str = ""
    base: BaseEntry = Field(alias="base_model")
    lora: LoraEntry = Field(default_factory=LoraEntry, alias="peft")
    # The job's hyperparameters as validated: an echo of the input, kept verbatim so that a manifest
    # written by an older worker (other knobs, other defaults) still reads.
    hyperparameters: dict[str, Any] = {}
    dataset: DatasetEntry = Field(default_factory=DatasetEntry)
    metrics: Metrics = Field(default_factory=Metrics)
    versions: Versions = Field(default_factory=Versions)
    files: list[FileEntry] = []
    manifest_version: int = MANIFEST_VERSION
    created_at: str = ""
    # training/memory_plan.py's MemoryPlan.to_dict(): the plan's own record, shown as it was made.
    memory_plan: dict[str, Any] | None = None
    runtime: RuntimeEntry | None = None
    init_adapter: InitAdapterEntry | None = None
    # The request that made it (pipeline.request_fingerprint): what a re-delivered job_id is compared with.
    request: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json form: the keys that were set (or read), in the order consumers know."""
        return self.model_dump(by_alias=True, exclude_unset=True)

    def with_files(self, files: list[FileEntry]) -> AdapterManifest:
        return self.model_copy(update={"files": list(files)})

    def write(self, folder: str | Path) -> None:
        write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_dict())


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """Any adapter's manifest.json as JSON (None if absent): also those this worker did not write."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_manifest(folder: str | Path) -> AdapterManifest | None:
    """This worker's manifest in ``folder``, typed; None if absent, ValueError if it does not parse."""
    raw = read_manifest(folder)
    return None if raw is None else AdapterManifest.model_validate(raw)


def render_model_card(manifest: AdapterManifest) -> str:
    """The adapter's README.md: what it is, which base it fits, and how to load it."""
    base, lora, metrics, data = manifest.base, manifest.lora, manifest.metrics, manifest.dataset
    architecture = base.architecture or {}
    lines = [
        "---",
        f"base_model: {base.id}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags: [lora, peft, sft]",
        "---",
        "",
        f"# LoRA adapter `{manifest.job_id}`",
        "",
        f"This adapter fits exactly one base model: **{base.id}** (revision `{base.revision or 'unknown'}`, "
        f"fingerprint `{base.fingerprint}`). It will not work on any other model.",
        "Check a local base before using it:",
        "",
        "```bash",
        f"python cli.py verify --adapter <this folder> --base <your copy of {base.id}>",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {architecture.get('model_type')} |",
        f"| LoRA | r={lora.r}, alpha={lora.lora_alpha}, modules: {', '.join(lora.target_modules or [])} |",
        f"| data | {data.examples} examples, {data.tokens} tokens, sha256 `{(data.sha256 or '')[:16]}…` |",
        f"| train loss | {metrics.first_loss} → {metrics.last_loss} |",
        f"| eval loss | {metrics.eval_loss} |",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained(\"{base.id}\""
        + (f", revision=\"{base.revision}\")" if base.revision else ")"),
        "model = PeftModel.from_pretrained(base, \"<this folder>\")",
        "```",
        "",
    ]
    return "\n".join(lines)
