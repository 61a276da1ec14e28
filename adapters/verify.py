"""Does an adapter fit a base? Decided from configs and safetensors headers alone: no weight loads, no torch.

The base's side is its architecture signature (models/signature.py) and its weights' shapes; the
adapter's side is adapter_config.json, its tensors' shapes and, when this worker made it, the
manifest recording the base it was trained on. Every mismatch is reported in words, grouped by layer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.manifest import read_manifest
from errors import InputError, ModelError
from files import MANIFEST_NAME, verify_files
from models.safetensors import read_safetensors_shapes, read_weight_shapes
from models.signature import ModelSignature, describe_architecture, read_signature

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)

COMPATIBLE = "compatible"
DIFFERENT_REVISION = "compatible, different revision"
INCOMPATIBLE = "incompatible"
DAMAGED = "damaged"


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
