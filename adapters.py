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
import re
import struct
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
    "num_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_value_head_dim": ("linear_value_head_dim",),
    "layer_types": ("layer_types",),
    "tie_word_embeddings": ("tie_word_embeddings",),
}
# Not part of the architecture: which exact weights and which published snapshot a folder holds.
_IDENTITY_KEYS = ("repo_id", "commit", "weights_sample_sha256")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLES_PER_FILE = 32
_SAMPLE_BYTES = 4096


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

    def describe(self) -> str:
        """'llama (2 layers, hidden 64)' — the words used in mismatch messages."""
        return describe_architecture(self.to_dict())


def describe_architecture(arch: dict[str, Any]) -> str:
    layers = arch.get("num_hidden_layers")
    hidden = arch.get("hidden_size")
    return f"{arch.get('model_type')} ({layers} layers, hidden {hidden})"


def weights_sample_digest(model_dir: str | Path) -> str | None:
    """sha256 over every weight file's name, size and 32 evenly spaced 4 KiB samples.

    Reads ~128 KiB per file (milliseconds even for a 160 GB model), so it is no full checksum: it
    tells different weights apart (another seed, another fine-tune) without reading them all.
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


def _hf_cache_identity(model_dir: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of a folder in the Hugging Face cache or made by snapshot_download(local_dir)."""
    parts = model_dir.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/"), parts[-1]
    metadata = model_dir / ".cache" / "huggingface" / "download" / "config.json.metadata"
    try:
        commit = metadata.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None, None
    return None, commit or None


def _marker_identity(model_dir: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) from the marker ``prefetch`` writes into a volume folder."""
    try:
        marker = json.loads((model_dir / ".worker-model.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(marker, dict):
        return None, None
    return marker.get("repo_id"), marker.get("revision")


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model folder, with a multimodal wrapper's text_config folded in."""
    return _text_config(json.loads((Path(model_dir) / "config.json").read_bytes()))


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
    repo_id, commit = _marker_identity(model_dir)
    cache_repo, cache_commit = _hf_cache_identity(model_dir)
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


# --------------------------------------------------------------------------------------------------
# Does an adapter fit a base? Read from headers and configs only: no weights are loaded, no torch.

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)

COMPATIBLE = "compatible"
DIFFERENT_REVISION = "compatible, different revision"
INCOMPATIBLE = "incompatible"
DAMAGED = "damaged"


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a safetensors file's header (its first 8 + N bytes) alone."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (header length {length})")
        header = json.loads(fh.read(length))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def read_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Every weight's shape in a model folder, from the safetensors headers; None if it has none."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(read_safetensors_shapes(model_dir / shard))
    return shapes


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder says about itself: manifest (ours), PEFT config, tensor shapes."""

    folder: Path
    source: str  # what the user named (scrubbed of any URL query)
    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]] | None
    manifest: dict[str, Any] | None
    file_problems: tuple[str, ...] = ()

    @property
    def trained_on(self) -> dict[str, Any] | None:
        """The base's record in our manifest: id, revision, fingerprint, architecture."""
        return (self.manifest or {}).get("base_model")


@dataclass(frozen=True)
class BaseInfo:
    folder: Path
    source: str
    signature: ModelSignature
    shapes: dict[str, tuple[int, ...]] | None


def read_adapter(folder: str | Path, source: str | None = None) -> AdapterInfo:
    """Read an adapter folder without loading its weights; check its files against its manifest."""
    from errors import InputError

    folder = Path(folder)
    source = source or str(folder)
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise InputError(
            f"adapter {source} has no {ADAPTER_CONFIG_NAME}, so it is not a PEFT adapter folder; "
            "name the folder that holds adapter_config.json and adapter_model.safetensors"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InputError(f"adapter {source}: {ADAPTER_CONFIG_NAME} is not valid JSON ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(
            f"adapter {source} is a {config.get('peft_type')} adapter; only LoRA adapters are checked here"
        )
    problems: list[str] = []
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        manifest, problems = None, [f"{MANIFEST_NAME} is not valid JSON ({exc})"]
    if manifest is not None and not isinstance(manifest.get("files") if isinstance(manifest, dict) else None, list):
        manifest, problems = None, [f"{MANIFEST_NAME} has no list of files; it is not this worker's manifest"]
    if manifest is not None:
        problems += verify_files(folder, manifest)
    weights = folder / ADAPTER_WEIGHTS_NAME
    tensors = None
    if weights.is_file() and not any(p.startswith(ADAPTER_WEIGHTS_NAME) for p in problems):
        try:
            tensors = read_safetensors_shapes(weights)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            problems.append(f"{ADAPTER_WEIGHTS_NAME} is not a readable safetensors file ({exc})")
    elif not weights.is_file() and not problems:
        if (folder / "adapter_model.bin").is_file():
            tensors = None  # a pickle: its shapes cannot be read without loading it (reported below)
        else:
            problems.append(f"{ADAPTER_WEIGHTS_NAME} is missing")
    return AdapterInfo(folder, source, config, tensors, manifest, tuple(problems))


def read_base(folder: str | Path, source: str | None = None) -> BaseInfo:
    from errors import ModelError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"base {source or folder} has no config.json, so it is not a model folder; name the "
            "folder that holds config.json and the model's *.safetensors"
        )
    try:
        shapes = read_weight_shapes(folder)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ModelError(f"base {source or folder}: its safetensors headers cannot be read ({exc}); "
                         "download the model again") from exc
    return BaseInfo(folder, source or str(folder), read_signature(folder), shapes)


@dataclass
class Verdict:
    """The answer of ``verify``: a status, and every reason for it in words."""

    status: str
    adapter: str
    base: str
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_tensors: int = 0
    adapter_base: dict[str, Any] | None = None
    base_signature: dict[str, Any] | None = None

    @property
    def fits(self) -> bool:
        return self.status in (COMPATIBLE, DIFFERENT_REVISION)

    def exit_code(self, strict: bool = False) -> int:
        if self.status == COMPATIBLE or (self.status == DIFFERENT_REVISION and not strict):
            return 0
        return 3

    def to_dict(self, strict: bool = False) -> dict[str, Any]:
        return {
            "verdict": self.status,
            "fits": self.fits,
            "exit_code": self.exit_code(strict),
            "adapter": self.adapter,
            "base": self.base,
            "mismatches": self.mismatches,
            "warnings": self.warnings,
            "notes": self.notes,
            "checked_tensors": self.checked_tensors,
            "adapter_trained_on": self.adapter_base,
            "base_signature": self.base_signature,
        }

    def render(self) -> str:
        lines = [f"{self.status}: adapter {self.adapter} on base {self.base}"]
        lines += [f"  - {m}" for m in self.mismatches]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        if self.status == INCOMPATIBLE:
            trained = (self.adapter_base or {}).get("id")
            lines.append("  fix: apply it to the base it was trained on"
                         + (f" ({trained})" if trained else "") + ", or train a new adapter on this base")
        elif self.status == DAMAGED:
            lines.append("  fix: download the adapter again (its files do not match its manifest.json)")
        elif self.status == DIFFERENT_REVISION:
            lines.append("  it will load, but the quality it was trained for is not guaranteed on these "
                         "weights; use the exact base it was trained on, or pass --strict to refuse")
        else:
            lines.append(f"  checked {self.checked_tensors} LoRA tensors against the base's weights")
        return "\n".join(lines)


_ARCH_LABELS = {
    "model_type": "model type", "architectures": "architecture", "num_hidden_layers": "layers",
    "hidden_size": "hidden size", "intermediate_size": "intermediate size",
    "moe_intermediate_size": "expert intermediate size",
    "shared_expert_intermediate_size": "shared expert intermediate size", "vocab_size": "vocabulary",
    "num_attention_heads": "attention heads", "num_key_value_heads": "key/value heads",
    "head_dim": "head dim", "linear_num_key_heads": "linear-attention key heads",
    "linear_num_value_heads": "linear-attention value heads", "num_experts": "experts",
    "num_experts_per_tok": "experts per token", "num_shared_experts": "shared experts",
    "linear_key_head_dim": "linear-attention key head dim",
    "linear_value_head_dim": "linear-attention value head dim", "layer_types": "layer types",
    "tie_word_embeddings": "tie_word_embeddings",
}


def _architecture_mismatches(trained: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Field by field, where the adapter's base and this base differ in shape or kind."""
    out = []
    for key, label in _ARCH_LABELS.items():
        if key not in trained or key not in base:
            continue  # an older manifest, or a family without the field: nothing to compare
        a, b = trained[key], base[key]
        if key == "architectures":
            a, b = list(a or []), list(b or [])
        if a != b:
            if key == "layer_types" and isinstance(a, list) and isinstance(b, list):
                a, b = _summarize_layers(a), _summarize_layers(b)
            out.append(f"{label}: {a} in the adapter's base, {b} in this base")
    return out


def _summarize_layers(types: list[Any]) -> str:
    counts: dict[str, int] = {}
    for t in types:
        counts[str(t)] = counts.get(str(t), 0) + 1
    return ", ".join(f"{n}× {t}" for t, n in counts.items())


def _shape(s: tuple[int, ...] | None) -> str:
    return "[" + ", ".join(map(str, s)) + "]" if s is not None else "?"


def _layer_of(module: str) -> tuple[str, str | None]:
    """'model.layers.3.self_attn.q_proj' → ('model.layers.*.self_attn.q_proj', '3')."""
    m = re.search(r"\.(\d+)\.", module)
    if not m:
        return module, None
    return module[: m.start()] + ".*." + module[m.end():], m.group(1)


def _ranges(numbers: list[str]) -> str:
    values = sorted({int(n) for n in numbers})
    spans, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(spans)


def _layer_tail(name: str) -> str | None:
    """'model.language_model.layers.3.mlp.up_proj' → 'layers.3.mlp.up_proj': the part wrappers keep."""
    at = name.find("layers.")
    if at < 0 or (at > 0 and name[at - 1] != "."):
        return None
    return name[at:]


class _WeightIndex:
    """The base's weight names, indexed once so each adapter tensor is a set lookup (an 80B MoE
    checkpoint has ~75k names)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.prefixes: set[str] = set()
        self.tails: dict[str, str | None] = {}  # layer tail of a weight → its name (None: ambiguous)
        for key in shapes:
            end = key.rfind(".")
            while end > 0:
                prefix = key[:end]
                if prefix in self.prefixes:
                    break  # its own prefixes are in already
                self.prefixes.add(prefix)
                end = key.rfind(".", 0, end)
            tail = _layer_tail(key)
            if tail is not None:
                self.tails[tail] = key if tail not in self.tails else None
        self._prefix_tails: set[str] | None = None

    def weight_of(self, module: str) -> str | None:
        """The base weight a module's LoRA adapts, allowing for a wrapper's different prefix."""
        key = module + ".weight"
        if key in self.shapes:
            return key
        parts = key.split(".")
        for n in range(1, min(4, len(parts) - 1)):
            if ".".join(parts[n:]) in self.shapes:
                return ".".join(parts[n:])
        tail = _layer_tail(key)
        return self.tails.get(tail) if tail is not None else None

    def has_module(self, module: str) -> bool:
        if module in self.prefixes:
            return True
        tail = _layer_tail(module)
        if tail is None:
            return False
        if self._prefix_tails is None:  # only for adapters whose names carry another wrapper's prefix
            self._prefix_tails = {t for t in map(_layer_tail, self.prefixes) if t is not None}
        return tail in self._prefix_tails


def _tensor_mismatches(adapter: AdapterInfo, base: BaseInfo) -> tuple[list[str], list[str], int]:
    """Every LoRA tensor against the base module it adapts: (mismatches, notes, tensors checked)."""
    shapes = base.shapes or {}
    index = _WeightIndex(shapes)
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    groups: dict[tuple[str, ...], list[str]] = {}  # same problem in many layers → one line
    missing: dict[str, list[str]] = {}
    notes: list[str] = []
    checked = 0
    ranks: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in sorted((adapter.tensors or {}).items()):
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if not match and ".token_adapter." in name:
            # trainable_token_indices: deltas for a few rows of the embedding, not a full copy.
            checked += 1
            continue
        if not match:
            # modules_to_save: a full copy of a base tensor, same shape.
            base_key = index.weight_of(name[: -len(".weight")]) if name.endswith(".weight") else (
                name if name in shapes else None)
            if base_key is None:
                pattern, layer = _layer_of(name)
                missing.setdefault(pattern, []).extend([layer] if layer else [])
            elif shapes[base_key] != shape:
                groups.setdefault((name, "tensor", _shape(shape), _shape(shapes[base_key]), ""), []).append("")
            checked += 1
            continue
        module, kind, param = match["module"], match["kind"], match["param"] or "weight"
        ranks.setdefault(module, {})[f"{kind}.{param}"] = shape
        if module.endswith(".base_layer") or ".base_layer." in module or kind == "lora_magnitude_vector":
            module = module.replace(".base_layer", "")
        base_key = index.weight_of(module)
        pattern, layer = _layer_of(module)
        if base_key is None:
            if index.has_module(module):
                # PEFT's target_parameters wrap fused 3-D expert tensors; the checkpoint stores them
                # per expert, so only the module's presence can be checked from the header.
                note = f"{pattern}: fused parameters (target_parameters), checked for presence only"
                if note not in notes:
                    notes.append(note)
                checked += 1
            else:
                missing.setdefault(pattern, []).extend([layer] if layer else [])
            continue
        checked += 1
        weight = shapes[base_key]
        if len(weight) != 2:
            continue
        out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else (weight[0], weight[1])
        if kind == "lora_embedding_A":
            ok, needs = shape[-1] == weight[0], f"needs {weight[0]} rows"
        elif kind == "lora_embedding_B":
            ok, needs = shape[0] == weight[1], f"needs {weight[1]} columns"
        elif kind == "lora_A":
            ok, needs = len(shape) == 2 and shape[1] == in_f, f"needs in_features {in_f}"
        elif kind == "lora_B" and param == "bias":
            ok, needs = shape[0] == out_f, f"needs out_features {out_f}"
        elif kind == "lora_B":
            ok, needs = len(shape) == 2 and shape[0] == out_f, f"needs out_features {out_f}"
        else:  # DoRA magnitude: one value per output feature
            ok, needs = shape[-1] == out_f, f"needs {out_f} values"
        if not ok:
            groups.setdefault((pattern, f"{kind}.{param}", _shape(shape), _shape(weight), needs), []).append(
                layer or "")
    out = []
    for (pattern, kind, got, base_shape, needs), layers in groups.items():
        where = f" (layers {_ranges([l for l in layers if l])})" if any(layers) else ""
        if kind == "tensor":
            out.append(f"{pattern}: the adapter's copy is {got}, the base's weight is {base_shape}")
        else:
            out.append(f"{pattern}{where}: {kind} is {got}, which {needs}; the base's weight is {base_shape}")
    for pattern, layers in missing.items():
        where = f" (layers {_ranges(layers)})" if layers else ""
        out.append(f"{pattern}{where}: adapted by the adapter but not in the base")
    for module, parts in ranks.items():
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a and b and len(a) == 2 and len(b) == 2 and a[0] != b[1]:
            out.append(f"{module}: lora_A {_shape(a)} and lora_B {_shape(b)} disagree on the rank; "
                       "the adapter file is inconsistent")
    return out, notes, checked


def _missing_targets(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Target module names in adapter_config.json that match no module of the base."""
    modules = {k.rsplit(".", 1)[0] for k in shapes if "." in k}
    targets = config.get("target_modules")
    if not targets:
        return []
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in modules):
            return []
        return [targets]
    leaves = {part for m in modules for part in m.split(".")}
    missing = []
    for target in targets:
        if "." in target:
            if not any(m == target or m.endswith("." + target) for m in modules):
                missing.append(target)
        elif target not in leaves:
            missing.append(target)
    return missing


def _same_commit(a: str | None, b: str | None) -> bool | None:
    if not a or not b or not _is_commit(a) or not _is_commit(b):
        return None
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _is_commit(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{7,64}", str(value)))


def verify_adapter(adapter: AdapterInfo, base: BaseInfo) -> Verdict:
    """Compare an adapter with a base from files alone: architecture, modules, every tensor's shape."""
    sig = base.signature.to_dict()
    trained = adapter.trained_on
    arch = (trained or {}).get("architecture") or None
    verdict = Verdict(status=COMPATIBLE, adapter=adapter.source, base=base.source,
                      adapter_base=({k: trained.get(k) for k in ("id", "revision", "fingerprint", "architecture")}
                                    if trained else None),
                      base_signature=sig)
    if adapter.file_problems:
        verdict.status = DAMAGED
        verdict.mismatches += [p.replace("does not match its sha256", "does not match the sha256 in "
                                         "manifest.json (changed after training, or a broken download)")
                               for p in adapter.file_problems]
        return verdict

    if arch:
        differences = _architecture_mismatches(arch, sig)
        if differences:
            verdict.mismatches.append(
                f"adapter trained on {describe_architecture(arch)}; base is {describe_architecture(sig)}")
            verdict.mismatches += differences
    else:
        verdict.notes.append(("the adapter has no manifest.json (not made by this worker)" if adapter.manifest
                              is None else "the adapter's manifest.json records no base architecture")
                             + ": checked from adapter_config.json and the tensor shapes in its "
                             "safetensors header")

    if base.shapes is None:
        verdict.notes.append("the base has no *.safetensors files, so tensor shapes were not checked; "
                             "convert it to safetensors for a full check")
    else:
        missing = _missing_targets(adapter.config, base.shapes)
        if missing:
            verdict.mismatches.append(
                f"target modules {', '.join(missing)} do not exist in the base "
                f"(it is {describe_architecture(sig)})")
    if base.shapes is not None and adapter.tensors is None:
        verdict.notes.append("the adapter's weights are a pickle (adapter_model.bin), whose shapes cannot "
                             "be read without loading it; tensor shapes were not checked")
    elif base.shapes is not None:
        shape_problems, notes, verdict.checked_tensors = _tensor_mismatches(adapter, base)
        verdict.mismatches += shape_problems
        verdict.notes += notes
    if verdict.mismatches:
        if not arch and adapter.tensors:
            verdict.mismatches.insert(0, f"{_describe_plain(adapter)}; base is {describe_architecture(sig)}")
        verdict.status = INCOMPATIBLE
        return verdict

    # Same architecture: is it also the same base weights the adapter was trained on?
    if trained:
        _revision_warnings(verdict, trained, arch or {}, sig)
    else:
        named = adapter.config.get("base_model_name_or_path")
        if named and sig.get("repo_id") and named != sig["repo_id"] and not Path(named).is_absolute():
            verdict.warnings.append(f"adapter_config.json names base {named!r}; this base is {sig['repo_id']!r}")
        elif named:
            verdict.notes.append(f"adapter_config.json names base {named!r}; without a manifest its "
                                 "weights cannot be compared, only its shapes")
    if verdict.warnings:
        verdict.status = DIFFERENT_REVISION
    return verdict


def _describe_plain(adapter: AdapterInfo) -> str:
    """What a manifest-less adapter was made for, read from its tensors: hidden size and layer count."""
    widths: dict[int, int] = {}
    layers = -1
    for key, shape in (adapter.tensors or {}).items():
        match = _LORA_KEY.match(key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key)
        if not match:
            continue
        found = re.search(r"\.(\d+)\.", match["module"])
        if found:
            layers = max(layers, int(found.group(1)))
        leaf = match["module"].rsplit(".", 1)[-1]
        if match["kind"] == "lora_A" and leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") \
                and len(shape) == 2:
            widths[shape[1]] = widths.get(shape[1], 0) + 1
    named = adapter.config.get("base_model_name_or_path")
    facts = []
    if widths:
        facts.append(f"hidden {max(widths, key=widths.get)}")
    if layers >= 0:
        facts.append(f"at least {layers + 1} layers")
    what = f"adapter made for {named!r}" if named else "adapter made for another model"
    return what + (f" ({', '.join(facts)}, from its tensor shapes)" if facts else "")


def _revision_warnings(verdict: Verdict, trained: dict[str, Any], arch: dict[str, Any],
                       sig: dict[str, Any]) -> None:
    commit = arch.get("commit") or trained.get("revision")
    same = _same_commit(commit, sig.get("commit"))
    if same is False:
        verdict.warnings.append(f"the adapter was trained on commit {commit}; this base is commit {sig['commit']}")
    if arch.get("config_sha256") and arch["config_sha256"] != sig.get("config_sha256"):
        verdict.warnings.append(
            f"config.json differs from the one the adapter was trained with (sha256 "
            f"{arch['config_sha256'][:12]}… then, {str(sig.get('config_sha256'))[:12]}… here)")
    if (arch.get("weights_index_sha256") and sig.get("weights_index_sha256")
            and arch["weights_index_sha256"] != sig["weights_index_sha256"]):
        verdict.warnings.append("the weight index (model.safetensors.index.json) differs from the "
                                "adapter's base")
    a, b = arch.get("weights_sample_sha256"), sig.get("weights_sample_sha256")
    if a and b and a != b:
        verdict.warnings.append(
            f"the weight files differ from those the adapter was trained on ({trained.get('id')}"
            + (f"@{trained['revision']}" if trained.get("revision") else "")
            + f"): same architecture, other weights or the same ones saved differently (weights sample "
            f"sha256 {a[:12]}… then, {b[:12]}… here)")
    elif not (a and b) and same is None and not verdict.warnings:
        verdict.notes.append("neither a commit nor a weights digest is recorded on both sides: the "
                             "architecture matches, but whether the weights are the same is unknown")


# --------------------------------------------------------------------------------------------------
# Where the adapter and the base are: a folder, an s3:// prefix or https URLs; a repo id in the cache.


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at huggingface_hub's import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def locate_base(ref: str, revision: str | None = None) -> Path:
    """A base model folder: ``ref`` itself, or the repo id's snapshot in the local Hugging Face cache.

    Offline by construction (``local_files_only``): checking or applying an adapter never downloads
    a base model.
    """
    from errors import ModelError

    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelError(f"base {ref} is not a folder; name a model folder (with config.json) or a "
                         "Hugging Face repo id that is in your local cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(ref, revision=revision, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        raise ModelError(
            f"base {ref}{'@' + revision if revision else ''} is neither a folder nor in the Hugging Face "
            f"cache at {cache} ({type(exc).__name__}); download it first (`hf download {ref}`) or "
            "name its folder"
        ) from None


def fetch_adapter(refs: str | list[str], dest: Path, *, settings: Any = None) -> Path:
    """The folder of an adapter: a local folder as is; an s3:// prefix or https URLs downloaded to ``dest``.

    ``settings`` (WorkerSettings) gives the S3 endpoint and credentials. Downloaded files are checked
    against the adapter's manifest.json later, by ``read_adapter``.
    """
    from errors import InputError

    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise InputError("no adapter given: name a folder, an s3:// prefix or https URLs")
    first = refs[0]
    if first.startswith("s3://"):
        if len(refs) > 1:
            raise InputError("give one s3:// prefix (the adapter folder), not several")
        return _download_s3(first, dest, settings)
    if first.startswith(("https://", "http://")):
        return _download_https(refs, dest)
    if len(refs) > 1:
        raise InputError("give one adapter folder, not several")
    path = Path(first.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter {first} is not a folder; name the adapter folder, an s3:// prefix "
                         "or https URLs of its files")
    if not (path / ADAPTER_CONFIG_NAME).is_file() and (path / "adapter" / ADAPTER_CONFIG_NAME).is_file():
        return path / "adapter"  # a job folder: its adapter is inside
    return path


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _download_s3(uri: str, dest: Path, settings: Any) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    from errors import InputError, StorageError
    from storage.s3 import make_s3_client

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise InputError(f"{uri} names no bucket; use s3://bucket/prefix/adapter/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if settings is None:
        raise InputError("an s3:// adapter needs S3 settings (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY)")
    client = make_s3_client(settings)
    try:
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        names = {k[len(prefix):]: k for k in keys}
        if ADAPTER_CONFIG_NAME not in names and f"adapter/{ADAPTER_CONFIG_NAME}" in names:
            names = {n[len("adapter/"):]: k for n, k in names.items() if n.startswith("adapter/")}
        if not names:
            raise InputError(f"there is nothing under {uri}; name the adapter's folder "
                             "(s3://bucket/<prefix>/<job_id>/adapter/)")
        dest.mkdir(parents=True, exist_ok=True)
        for name, key in sorted(names.items()):
            if not _safe_relative(name):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StorageError(f"could not download {uri}: S3 answered {code}; check the bucket, the "
                           "prefix and the S3 credentials") from None
    except BotoCoreError as exc:
        raise StorageError(f"could not download {uri}: {type(exc).__name__}; check S3_ENDPOINT_URL "
                           "and the network") from None
    return dest


def _download_https(urls: list[str], dest: Path) -> Path:
    """Each URL is one file (presigned URLs sign one object each); a lone manifest.json URL pulls the
    files it lists from the same folder, with the same query string."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    from errors import InputError

    dest.mkdir(parents=True, exist_ok=True)
    given = set()
    for url in urls:
        name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if not name or not _safe_relative(name):
            raise InputError(f"{_scrub_url(url)} does not name a file; give the URL of each adapter "
                             "file (manifest.json, adapter_config.json, adapter_model.safetensors)")
        _http_get(url, dest / name)
        given.add(name)
    manifest = read_manifest(dest)
    if manifest is not None:
        base = urlsplit(urls[[unquote(urlsplit(u).path.rsplit("/", 1)[-1]) for u in urls].index(MANIFEST_NAME)]
                        if MANIFEST_NAME in given else urls[0])
        folder = base.path.rsplit("/", 1)[0] + "/"
        for entry in manifest.get("files", []):
            name = entry["name"]
            if name in given or not _safe_relative(name):
                continue
            url = urlunsplit((base.scheme, base.netloc, folder + name, base.query, ""))
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            _http_get(url, dest / name, hint=" (a presigned URL signs one file: pass one --adapter URL "
                      "per file: manifest.json, adapter_config.json, adapter_model.safetensors)")
    return dest


def _scrub_url(url: str) -> str:
    from errors import scrub

    return scrub(url)


def _http_get(url: str, target: Path, hint: str = "") -> None:
    import shutil
    import urllib.error
    import urllib.request

    from errors import StorageError

    tmp = target.with_name(f".{target.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, 1024 * 1024)
        os.replace(tmp, target)
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"could not download {_scrub_url(url)}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise StorageError(f"could not download {_scrub_url(url)}: {_scrub_url(str(reason))}") from None


def check_pair(adapter_refs: str | list[str], base_ref: str, workdir: Path, *, revision: str | None = None,
               settings: Any = None) -> tuple[Verdict, AdapterInfo, BaseInfo]:
    """Fetch (if remote), read and verify an adapter against a base: the one entry point for all."""
    refs = [adapter_refs] if isinstance(adapter_refs, str) else list(adapter_refs)
    folder = fetch_adapter(refs, workdir / "adapter", settings=settings)
    source = ", ".join(_scrub_url(r) for r in refs)
    adapter = read_adapter(folder, source)
    base_dir = locate_base(base_ref, revision)
    base = read_base(base_dir, base_ref if Path(base_ref).expanduser().is_dir() else f"{base_ref} ({base_dir})")
    return verify_adapter(adapter, base), adapter, base


# --------------------------------------------------------------------------------------------------
# Apply and merge (these do load weights: only after the pair was verified).


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_adapted(adapter_dir: Path, base_dir: Path, *, device: str = "auto", dtype: str = "auto"):
    """(PeftModel, tokenizer) for a verified pair: the base from its folder, the adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    device = _pick_device(device)
    # On a GPU, accelerate places the weights as they load (a 7B model never sits twice in memory).
    placement = {"device_map": "auto"} if device == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype, **placement)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not placement:
        model = model.to(device)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Generation:
    prompt_text: str
    text: str
    token_ids: list[int]


def build_prompt(tokenizer, prompt: str, chat: bool | None = None) -> str:
    """The chat template's rendering of one user turn when the base has a template, else the prompt."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, chat: bool | None = None,
             temperature: float = 0.0, seed: int = 0) -> Generation:
    """Greedy by default (temperature 0): the same pair and prompt give the same text every time."""
    import torch

    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    text = build_prompt(tokenizer, prompt, use_chat)
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (e.g. BOS).
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not use_chat)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs["temperature"] = temperature
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return Generation(text, tokenizer.decode(new, skip_special_tokens=True), new)


def merge_adapter(adapter: AdapterInfo, base: BaseInfo, out: Path, verdict: Verdict,
                  *, dtype: str = "auto") -> dict[str, Any]:
    """merge_and_unload into a standalone model folder (safetensors + tokenizer + manifest.json).

    Written to a temporary folder next to ``out`` and renamed into place, manifest last: a folder at
    ``out`` is always complete.
    """
    import shutil
    from datetime import datetime, timezone

    model, tokenizer = load_adapted(adapter.folder, base.folder, device="cpu", dtype=dtype)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        trained = adapter.trained_on or {}
        manifest = {
            "kind": "merged_model",
            "manifest_version": MANIFEST_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "merged": {
                "adapter": {
                    "source": adapter.source,
                    "job_id": (adapter.manifest or {}).get("job_id"),
                    "trained_on": {k: trained.get(k) for k in ("id", "revision", "fingerprint")} or None,
                    "peft": {k: adapter.config.get(k) for k in ("peft_type", "r", "lora_alpha",
                                                                "use_rslora", "target_modules")},
                    "files": [asdict(f) for f in describe_files(adapter.folder)],
                },
                "into": {
                    "source": base.source,
                    "fingerprint": base.signature.fingerprint,
                    "architecture": base.signature.to_dict(),
                },
                "verdict": verdict.status,
                "warnings": verdict.warnings,
            },
            "model": {"architecture": read_signature(tmp).to_dict()},
            "versions": library_versions(),
        }
        manifest["files"] = [asdict(f) for f in describe_files(tmp)]
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------------------------------
# Continued training: the worker's side of the same check.


@dataclass(frozen=True)
class InitAdapter:
    """An adapter a job continues training from, fetched onto the volume and verified."""

    path: Path
    source: str  # scrubbed
    verdict: str
    warnings: tuple[str, ...]
    job_id: str | None  # the job that trained it, from its manifest
    files: tuple[FileEntry, ...]

    def to_manifest(self) -> dict[str, Any]:
        return {"uri": self.source, "verdict": self.verdict, "warnings": list(self.warnings),
                "job_id": self.job_id, "files": [asdict(f) for f in self.files]}


def prepare_init_adapter(ref: str, base_dir: Path, workdir: Path, settings: Any,
                         hp: Any = None) -> InitAdapter:
    """Fetch ``init_adapter`` (s3://, https://, or a path on the volume) and verify it against the
    job's base, from files alone: an adapter that does not fit fails here, before any weight loads.
    """
    from errors import InputError, ModelError, StorageError
    from model_resolver import check_inside

    if ref.startswith(("s3://", "https://", "http://")):
        folder_ref = ref
    else:
        raw = ref.removeprefix("file://")
        path = Path(raw) if raw.startswith("/") else settings.volume_root / raw
        folder_ref = str(check_inside(str(path), settings.allowed_roots, "init_adapter"))
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)  # a remote adapter from an earlier attempt: fetch it fresh
    workdir.mkdir(parents=True)
    source = _scrub_url(ref)
    try:
        verdict, adapter, _ = check_pair(folder_ref, str(base_dir), workdir, settings=settings)
    except StorageError as exc:
        raise InputError(f"init_adapter could not be fetched: {exc.message}", retryable=True) from exc
    except InputError as exc:
        raise InputError(f"init_adapter: {exc.message}") from exc
    if verdict.status == DAMAGED:
        raise InputError(f"init_adapter {source} is damaged: {'; '.join(verdict.mismatches)}; "
                         "upload it again or name another adapter")
    if verdict.status == INCOMPATIBLE:
        raise ModelError(f"init_adapter {source} does not fit the base model: "
                         f"{'; '.join(verdict.mismatches)}. Continue from an adapter trained on this base, "
                         "or drop init_adapter to train a new one")
    if hp is not None:
        for field_name, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("use_rslora", "use_rslora")):
            given, saved = getattr(hp, field_name), adapter.config.get(key)
            if field_name in hp.model_fields_set and saved is not None and given != saved:
                raise InputError(f"hyperparameters.{field_name} is {given} but init_adapter {source} has "
                                 f"{key}={saved}; drop {field_name} (continued training keeps the "
                                 "adapter's own) or set it to the adapter's")
    trained = adapter.manifest or {}
    return InitAdapter(adapter.folder, source, verdict.status, tuple(verdict.warnings),
                       trained.get("job_id"), tuple(describe_files(adapter.folder)))
