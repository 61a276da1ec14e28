"""cli.py apply and merge: the same text as PEFT by hand, the same logits as base + adapter, and an
incompatible pair refused before any weight is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.manifest import read_manifest
from files import verify_files
from models.signature import read_signature
from tests.test_verify import forbid_weight_loading, run_cli

PROMPT = "What is the capital of Peru?"


def by_hand(adapter, base, prompt: str, max_new_tokens: int) -> list[int]:
    """What a user would write with PEFT directly: chat template, greedy decoding."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_apply_generates_what_peft_by_hand_generates(trained_adapter, capsys):
    adapter, base = trained_adapter("qwen2")

    code, out, err = run_cli(capsys, "apply", "--adapter", str(adapter), "--base", str(base),
                             "--prompt", PROMPT, "--max-new-tokens", "12", "--json")

    assert code == 0, err
    result = json.loads(out)
    expected = by_hand(adapter, base, PROMPT, 12)
    assert result["token_ids"] == expected and len(expected) > 0
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert result["prompt"].startswith("<|im_start|>user\n" + PROMPT)  # the base's chat template

    # Plain output is the text alone; and the adapter is really applied: the base alone says otherwise.
    code, out, _ = run_cli(capsys, "apply", "--adapter", str(adapter), "--base", str(base),
                           "--prompt", PROMPT, "--max-new-tokens", "12")
    assert code == 0 and out == result["text"] + "\n"
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = tokenizer(result["prompt"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        alone = plain.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert alone[0, ids["input_ids"].shape[1]:].tolist() != expected


def test_merge_gives_the_logits_of_base_plus_adapter(trained_adapter, tmp_path, capsys):
    adapter, base = trained_adapter("qwen2")
    out_dir = tmp_path / "merged"

    code, out, err = run_cli(capsys, "merge", "--adapter", str(adapter), "--base", str(base), "--out", str(out_dir))

    assert code == 0, err
    assert json.loads(out)["out"] == str(out_dir)
    names = {p.name for p in out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer("The capital of Peru is Lima.", return_tensors="pt")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()(**ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(**ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3), "the merge changed nothing"

    # Its own manifest: what was merged into what, and every file's sha256.
    manifest = read_manifest(out_dir)
    assert verify_files(out_dir, manifest) == []
    assert manifest["kind"] == "merged_model"
    merged_from = manifest["merged"]
    assert merged_from["adapter"]["source"] == str(adapter)
    assert merged_from["adapter"]["job_id"] == "adapter-qwen2"
    assert merged_from["adapter"]["trained_on"]["fingerprint"] == read_signature(base).fingerprint
    assert merged_from["into"]["fingerprint"] == read_signature(base).fingerprint
    assert merged_from["verdict"] == "compatible"
    # The merged model is a base of the same architecture as the one it came from.
    assert read_signature(out_dir).model_type == "qwen2"
    assert manifest["model"]["architecture"]["hidden_size"] == 64


@pytest.mark.parametrize("command", ["apply", "merge"])
def test_an_incompatible_pair_is_refused_before_loading_weights(command, trained_adapter, model_factory,
                                                                tmp_path, capsys, monkeypatch):
    adapter, _ = trained_adapter("mistral")
    qwen2 = model_factory("qwen2")
    attempts = forbid_weight_loading(monkeypatch)
    extra = ["--prompt", PROMPT] if command == "apply" else ["--out", str(tmp_path / "merged")]

    code, out, err = run_cli(capsys, command, "--adapter", str(adapter), "--base", str(qwen2), *extra)

    assert code == 3 and out == ""
    assert err.startswith(f"incompatible: adapter {adapter} on base {qwen2}\n")
    assert "adapter trained on mistral (2 layers, hidden 64); base is qwen2 (2 layers, hidden 64)" in err
    assert attempts == []
    assert not (tmp_path / "merged").exists()


def test_strict_refuses_other_weights_and_merge_refuses_a_used_folder(trained_adapter, model_factory,
                                                                      tmp_path, capsys, monkeypatch):
    adapter, _ = trained_adapter("qwen2")
    other = model_factory("qwen2", seed=1)
    attempts = forbid_weight_loading(monkeypatch)
    code, out, err = run_cli(capsys, "apply", "--adapter", str(adapter), "--base", str(other),
                             "--prompt", PROMPT, "--strict")
    assert code == 3 and err.startswith("compatible, different revision: ")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, "merge", "--adapter", str(adapter), "--base", str(other), "--out", str(used))
    assert code == 2 and err.strip() == f"--out {used} exists and is not empty; name a new folder"
    assert (used / "keep.txt").read_text() == "mine" and attempts == []


def test_apply_without_the_chat_template_sends_the_prompt_as_is(trained_adapter, capsys):
    adapter, base = trained_adapter("qwen2")
    code, out, err = run_cli(capsys, "apply", "--adapter", str(adapter), "--base", str(base), "--prompt",
                             "The capital of Peru is", "--max-new-tokens", "6", "--no-chat-template", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt"] == "The capital of Peru is"
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("The capital of Peru is", return_tensors="pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert result["token_ids"] == expected[0, ids["input_ids"].shape[1]:].tolist()
