"""A base model's identity: the architecture signature and fingerprint, from config.json and headers alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from files import sha256_file
from models.cache import cache_identity
from models.folder import read_config
from models.safetensors import INDEX_NAME

WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


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
    "num_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_value_head_dim": ("linear_value_head_dim",),
    "layer_types": ("layer_types",),
    "tie_word_embeddings": ("tie_word_embeddings",),
}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


_SAMPLES_PER_FILE = 32


_SAMPLE_BYTES = 4096


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal wrappers keep the language model's shape under text_config.
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


@dataclass(frozen=True)
class ModelSignature:
    """The architecture of a base model, as read from its files, and which weights it holds.

    ``fingerprint`` hashes the architecture and config.json (two folders with the same fingerprint
    accept the same adapters); ``weights_sample_sha256``, ``repo_id`` and ``commit`` tell two
    copies of one architecture with different weights apart, and are not part of the fingerprint.
    """

    model_type: str | None
    architectures: tuple[str, ...]
    fields: dict[str, Any]
    config_sha256: str
    weights_index_sha256: str | None
    repo_id: str | None = None
    commit: str | None = None
    weights_sample_sha256: str | None = None

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.architecture_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def architecture_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            **self.fields,
            "config_sha256": self.config_sha256,
            "weights_index_sha256": self.weights_index_sha256,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.architecture_dict(),
            "repo_id": self.repo_id,
            "commit": self.commit,
            "weights_sample_sha256": self.weights_sample_sha256,
        }


def describe_architecture(arch: dict[str, Any]) -> str:
    """'llama (2 layers, hidden 64)': the words mismatch messages use for an architecture."""
    layers = arch.get("num_hidden_layers")
    hidden = arch.get("hidden_size")
    return f"{arch.get('model_type')} ({layers} layers, hidden {hidden})"


def weights_sample_digest(model_dir: str | Path) -> str | None:
    """sha256 over every weight file's name, size and 32 evenly spaced 4 KiB samples.

    Reads ~128 KiB per file (milliseconds even for a 160 GB model), so it is no full checksum: it
    tells different weights apart (another seed, another fine-tune) without reading them all.
    Every weight file at the root counts, not only the shards loading reads (``weight_files``): the
    digest is recorded in manifests already written, and must come out the same for the same folder.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and not p.name.startswith("adapter_"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        step = max(size - _SAMPLE_BYTES, 0) / (_SAMPLES_PER_FILE - 1)
        with open(path, "rb") as fh:
            for i in range(_SAMPLES_PER_FILE):
                fh.seek(int(i * step))
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def hf_cache_identity(model_dir: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of a folder in the Hugging Face cache or made by snapshot_download(local_dir)."""
    repo_id, commit = cache_identity(model_dir.resolve())
    if repo_id is not None:
        return repo_id, commit
    metadata = model_dir / ".cache" / "huggingface" / "download" / "config.json.metadata"
    try:
        commit = metadata.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None, None
    return None, commit or None


MARKER_NAME = ".worker-model.json"  # in a volume folder: its canonical repo id and commit


def read_marker(model_dir: Path) -> dict[str, Any]:
    """The marker of a volume folder ({} when it has none, or an unreadable one)."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def marker_identity(model_dir: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) from a volume folder's marker."""
    marker = read_marker(model_dir)
    return marker.get("repo_id"), marker.get("revision")


def read_signature(model_dir: str | Path) -> ModelSignature:
    """Fingerprint a model folder from config.json and its weight index (no weights read)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = text_config(read_config(model_dir))
    raw = config_path.read_bytes()
    fields = {}
    for name, spellings in _SIGNATURE_FIELDS.items():
        for key in spellings:
            if config.get(key) is not None:
                fields[name] = config[key]
                break
    index_sha = None
    for index_name in WEIGHT_INDEXES:
        if (model_dir / index_name).is_file():
            index_sha = sha256_file(model_dir / index_name)
            break
    # A folder's place says what it is before its own marker does: a cache snapshot is its repo's.
    cache_repo, cache_commit = hf_cache_identity(model_dir)
    repo_id, commit = (cache_repo, cache_commit) if cache_repo is not None else marker_identity(model_dir)
    commit = commit or cache_commit
    return ModelSignature(
        model_type=config.get("model_type"),
        architectures=tuple(config.get("architectures") or ()),
        fields=fields,
        config_sha256=hashlib.sha256(raw).hexdigest(),
        weights_index_sha256=index_sha,
        repo_id=repo_id or cache_repo,
        commit=commit or cache_commit,
        weights_sample_sha256=weights_sample_digest(model_dir),
    )
