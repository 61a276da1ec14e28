"""Which base an adapter belongs to: the architecture fingerprint and the manifest.

The fingerprint is computed from a model folder's files alone (config.json and the weight index),
so it costs milliseconds and loads no weights. The manifest written last into an adapter folder
records the base's id, revision and fingerprint, the PEFT settings, the data and every file's sha256;
an adapter folder without it is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Architecture fields, looked up under every spelling the families use.
_SIGNATURE_FIELDS: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
    "vocab_size": ("vocab_size",),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "linear_num_key_heads": ("linear_num_key_heads",),
    "linear_num_value_heads": ("linear_num_value_heads",),
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "moe_topk"),
    "tie_word_embeddings": ("tie_word_embeddings",),
}


def sha256_file(path: str | Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal wrappers keep the language model's shape under text_config.
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


@dataclass(frozen=True)
class ModelSignature:
    """The architecture of a base model, as read from its files."""

    model_type: str | None
    architectures: tuple[str, ...]
    fields: dict[str, Any]
    config_sha256: str
    weights_index_sha256: str | None

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            **self.fields,
            "config_sha256": self.config_sha256,
            "weights_index_sha256": self.weights_index_sha256,
        }

    def describe(self) -> str:
        """'llama (2 layers, hidden 64)' — the words used in mismatch messages."""
        layers = self.fields.get("num_hidden_layers")
        hidden = self.fields.get("hidden_size")
        return f"{self.model_type} ({layers} layers, hidden {hidden})"


def read_signature(model_dir: str | Path) -> ModelSignature:
    """Fingerprint a model folder from config.json and its weight index (no weights read)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    raw = config_path.read_bytes()
    config = _text_config(json.loads(raw))
    fields = {}
    for name, spellings in _SIGNATURE_FIELDS.items():
        for key in spellings:
            if config.get(key) is not None:
                fields[name] = config[key]
                break
    index_sha = None
    for index_name in _WEIGHT_INDEXES:
        if (model_dir / index_name).is_file():
            index_sha = sha256_file(model_dir / index_name)
            break
    return ModelSignature(
        model_type=config.get("model_type"),
        architectures=tuple(config.get("architectures") or ()),
        fields=fields,
        config_sha256=hashlib.sha256(raw).hexdigest(),
        weights_index_sha256=index_sha,
    )


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    sha256: str


def describe_files(folder: str | Path, *, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> list[FileEntry]:
    """Every file under ``folder`` (recursively, sorted) with its size and sha256."""
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    return entries


@dataclass
class Manifest:
    """What an adapter is and what it fits. Serialized as manifest.json, written last."""

    job_id: str
    base_model: dict[str, Any]
    peft: dict[str, Any]
    hyperparameters: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    files: list[FileEntry] = field(default_factory=list)
    manifest_version: int = MANIFEST_VERSION
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``folder`` and write manifest.json last, atomically."""
    manifest.files = describe_files(folder)
    write_json_atomic(Path(folder) / MANIFEST_NAME, manifest.to_dict())
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify_files(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The problems (missing or changed files) of ``folder`` against its manifest; [] if intact."""
    folder = Path(folder)
    problems = []
    for entry in manifest.get("files", []):
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']} is missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['name']} does not match its sha256")
    return problems


def render_model_card(manifest: dict[str, Any]) -> str:
    """The adapter's README.md: what it is, which base it fits, and how to load it."""
    base = manifest["base_model"]
    peft = manifest["peft"]
    metrics = manifest.get("metrics", {})
    data = manifest.get("dataset", {})
    revision = base.get("revision") or "unknown"
    lines = [
        "---",
        f"base_model: {base['id']}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags: [lora, peft, sft]",
        "---",
        "",
        f"# LoRA adapter `{manifest['job_id']}`",
        "",
        f"This adapter fits exactly one base model: **{base['id']}** (revision `{revision}`, "
        f"fingerprint `{base['fingerprint']}`). It will not work on any other model.",
        "Check a local base before using it:",
        "",
        "```bash",
        f"python cli.py verify --adapter <this folder> --base <your copy of {base['id']}>",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {base.get('architecture', {}).get('model_type')} |",
        f"| LoRA | r={peft.get('r')}, alpha={peft.get('lora_alpha')}, "
        f"modules: {', '.join(peft.get('target_modules') or [])} |",
        f"| data | {data.get('examples')} examples, {data.get('tokens')} tokens, sha256 "
        f"`{str(data.get('sha256', ''))[:16]}…` |",
        f"| train loss | {metrics.get('first_loss')} → {metrics.get('last_loss')} |",
        f"| eval loss | {metrics.get('eval_loss')} |",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained(\"{base['id']}\""
        + (f", revision=\"{base['revision']}\")" if base.get("revision") else ")"),
        "model = PeftModel.from_pretrained(base, \"<this folder>\")",
        "```",
        "",
    ]
    return "\n".join(lines)
