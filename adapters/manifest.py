"""The adapter manifest: what an adapter is and which base it fits. Written last; read everywhere."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from files import MANIFEST_NAME, FileEntry

MANIFEST_VERSION = 1


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


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


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
