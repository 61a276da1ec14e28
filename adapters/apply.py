"""Apply and merge: these load weights, only after the pair was verified."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters.manifest import MANIFEST_VERSION, library_versions
from adapters.verify import AdapterInfo, BaseInfo, Verdict
from files import MANIFEST_NAME, describe_files, publish_folder, write_json_atomic
from models.signature import read_signature


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
    from training.peft_setup import targets_as_written

    with targets_as_written():  # shared-expert layers named by path stay themselves (peft would remap them)
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
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
