"""cli.py verify: does an adapter fit a base? Decided from configs and headers, never from weights."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest

import cli
from adapters.verify import _WeightIndex
from models.safetensors import read_safetensors_shapes
from models.signature import read_signature
from tests.conftest import ROOT

LORA_R = 8  # small_job's lora_r


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def forbid_weight_loading(monkeypatch) -> list[str]:
    """From now on every way this code could load weights raises; the list records any attempt."""
    import safetensors
    import safetensors.torch
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    calls = []

    def refuse(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: weights were loaded")
        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse("AutoModelForCausalLM.from_pretrained"))
    monkeypatch.setattr(PeftModel, "from_pretrained", refuse("PeftModel.from_pretrained"))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse("safetensors.torch.load_file"))
    monkeypatch.setattr(safetensors, "safe_open", refuse("safetensors.safe_open"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    return calls


def plain_peft_adapter(base: Path, out: Path, r: int = 4) -> Path:
    """A PEFT adapter as other tools save it: adapter_config.json + safetensors, no manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"])).save_pretrained(out)
    assert not (out / "manifest.json").exists()
    return out


# --- architecture: other family, other size, other weights, the same ------------------------------


def test_mistral_adapter_on_qwen2_is_incompatible_without_loading_weights(trained_adapter, model_factory,
                                                                          capsys, monkeypatch):
    adapter, _ = trained_adapter("mistral")
    qwen2 = model_factory("qwen2")
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(qwen2))

    assert code == 3
    lines = out.splitlines()
    assert lines[0] == f"incompatible: adapter {adapter} on base {qwen2}"
    assert "  - adapter trained on mistral (2 layers, hidden 64); base is qwen2 (2 layers, hidden 64)" in lines
    assert "  - model type: mistral in the adapter's base, qwen2 in this base" in lines
    assert "  - architecture: ['MistralForCausalLM'] in the adapter's base, ['Qwen2ForCausalLM'] in this base" in lines
    assert "  fix: apply it to the base it was trained on (mistral), or train a new adapter on this base" in lines
    assert no_weights == []


def test_verify_imports_neither_torch_nor_transformers(trained_adapter, model_factory):
    """The proof that no weights load: the whole command runs without torch in the process."""
    adapter, _ = trained_adapter("mistral")
    qwen2 = model_factory("qwen2")
    script = ("import json, sys, cli; code = cli.main(['verify', '--adapter', sys.argv[1], '--base', sys.argv[2], "
              "'--json']); print(json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'transformers', "
              "'peft', 'safetensors') if m in sys.modules)}))")
    proc = subprocess.run([sys.executable, "-c", script, str(adapter), str(qwen2)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    verdict = json.loads(proc.stdout[: proc.stdout.rindex("}\n{") + 2])
    tail = json.loads(proc.stdout[proc.stdout.rindex("}\n{") + 2:])
    assert tail == {"code": 3, "heavy": []}, proc.stderr
    assert verdict["verdict"] == "incompatible" and verdict["exit_code"] == 3 and not verdict["fits"]
    assert verdict["adapter_trained_on"]["architecture"]["model_type"] == "mistral"
    assert verdict["base_signature"]["model_type"] == "qwen2"


def test_issue_example_mistral_on_qwen3_next_names_layers_and_missing_modules(trained_adapter, model_factory,
                                                                             capsys, monkeypatch):
    adapter, _ = trained_adapter("mistral")
    qwen3_next = model_factory("qwen3_next")
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(qwen3_next))

    assert code == 3
    assert "adapter trained on mistral (2 layers, hidden 64); base is qwen3_next (4 layers, hidden 64)" in out
    assert "  - layers: 2 in the adapter's base, 4 in this base" in out.splitlines()
    # Qwen3-Next layers 0-2 are linear attention: the adapter's q_proj there has nothing to attach to.
    assert "model.layers.*.self_attn.q_proj (layers 0-1): adapted by the adapter but not in the base" in out
    # The routed experts are per-expert modules; a dense mlp.down_proj does not exist there.
    assert "model.layers.*.mlp.down_proj (layers 0-1): adapted by the adapter but not in the base" in out
    assert no_weights == []


def test_same_family_other_hidden_size_names_the_shapes(trained_adapter, model_factory, capsys, monkeypatch):
    adapter, _ = trained_adapter("qwen2")
    narrow = model_factory("qwen2", hidden_size=32)
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(narrow))

    assert code == 3
    lines = out.splitlines()
    assert "  - adapter trained on qwen2 (2 layers, hidden 64); base is qwen2 (2 layers, hidden 32)" in lines
    assert "  - hidden size: 64 in the adapter's base, 32 in this base" in lines
    # q_proj of the narrow base is [4 heads * 8, 32]; the adapter's lora_A reads 64 features.
    assert (f"  - model.layers.*.self_attn.q_proj (layers 0-1): lora_A.weight is [{LORA_R}, 64], which needs "
            "in_features 32; the base's weight is [32, 32]") in lines
    assert (f"  - model.layers.*.self_attn.v_proj (layers 0-1): lora_B.weight is [32, {LORA_R}], which needs "
            "out_features 16; the base's weight is [16, 32]") in lines
    assert no_weights == []


def test_same_config_other_weights_warns_and_strict_refuses(trained_adapter, model_factory, capsys, monkeypatch):
    adapter, base = trained_adapter("qwen2")
    other = model_factory("qwen2", seed=1)
    assert (other / "config.json").read_bytes() == (base / "config.json").read_bytes()
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(other))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"compatible, different revision: adapter {adapter} on base {other}"
    assert any(line.startswith("  warning: the weight files differ from those the adapter was trained on "
                               "(qwen2): same architecture, other weights or the same ones saved differently "
                               "(weights sample sha256 ")
               for line in lines), out

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(other), "--strict", "--json")
    verdict = json.loads(out)
    assert code == 3 and verdict["exit_code"] == 3
    assert verdict["verdict"] == "compatible, different revision" and verdict["fits"]
    assert len(verdict["warnings"]) == 1 and verdict["mismatches"] == []
    assert no_weights == []


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "qwen3_next"])
def test_the_matching_pair_is_compatible_and_every_tensor_is_checked(family, trained_adapter, capsys,
                                                                     monkeypatch):
    adapter, base = trained_adapter(family)
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(base), "--json")

    verdict = json.loads(out)
    assert code == 0
    assert (verdict["verdict"], verdict["mismatches"], verdict["warnings"]) == ("compatible", [], [])
    lora_tensors = read_safetensors_shapes(adapter / "adapter_model.safetensors")
    assert verdict["checked_tensors"] == len(lora_tensors) > 0
    assert verdict["adapter_trained_on"]["fingerprint"] == read_signature(base).fingerprint
    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(base), "--strict")
    assert code == 0 and out.startswith("compatible: ")
    assert no_weights == []


def test_a_job_folder_is_read_through_its_adapter_subfolder(trained_adapter, capsys):
    adapter, base = trained_adapter("qwen2")
    code, out, _ = run_cli(capsys, "verify", "--adapter", adapter.parent.as_uri() + "/", "--base", str(base))
    assert code == 0 and out.startswith("compatible: "), out


# --- adapters from elsewhere: no manifest, shapes from the header alone ---------------------------


def test_plain_peft_folder_is_verified_from_its_header(model_factory, tmp_path, capsys, monkeypatch):
    qwen2 = model_factory("qwen2")
    narrow = model_factory("qwen2", hidden_size=32)
    plain = plain_peft_adapter(qwen2, tmp_path / "plain")
    no_weights = forbid_weight_loading(monkeypatch)  # building it loaded weights; verifying must not

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(plain), "--base", str(qwen2), "--json")
    verdict = json.loads(out)
    assert code == 0 and verdict["verdict"] == "compatible"
    assert verdict["adapter_trained_on"] is None
    assert verdict["checked_tensors"] == 2 * 3 * 2  # lora_A and lora_B, 3 modules, 2 layers
    assert any("has no manifest.json" in note for note in verdict["notes"])

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(plain), "--base", str(narrow))
    assert code == 3
    assert (f"  - adapter made for {str(qwen2)!r} (hidden 64, at least 2 layers, from its tensor shapes); base "
            "is qwen2 (2 layers, hidden 32)") in out.splitlines()
    assert ("  - model.layers.*.mlp.down_proj (layers 0-1): lora_A.weight is [4, 128], which needs "
            "in_features 64; the base's weight is [32, 64]") in out.splitlines()
    assert no_weights == []


def test_a_rank_that_disagrees_between_lora_a_and_b_is_reported(model_factory, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    qwen2 = model_factory("qwen2")
    plain = plain_peft_adapter(qwen2, tmp_path / "plain")
    tensors = load_file(plain / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, plain / "adapter_model.safetensors")

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(plain), "--base", str(qwen2))
    assert code == 3
    assert ("  - model.layers.1.self_attn.q_proj: lora_A [4, 64] and lora_B [64, 2] disagree on the rank; "
            "the adapter file is inconsistent") in out.splitlines()


def test_safetensors_header_shapes_match_the_library(trained_adapter):
    from safetensors import safe_open

    adapter, base = trained_adapter("qwen2")
    for path in (adapter / "adapter_model.safetensors", base / "model.safetensors"):
        with safe_open(path, "pt") as fh:
            expected = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        assert read_safetensors_shapes(path) == expected


# --- bases from the Hugging Face cache (offline) ---------------------------------------------------


def _fake_hf_cache(cache: Path, repo_id: str, model: Path, commit: str) -> Path:
    """The layout huggingface_hub writes: refs/main → commit, snapshots/<commit>/ with the files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model, snapshot)
    return snapshot


def test_a_repo_id_is_found_in_the_local_hf_cache(trained_adapter, tmp_path, monkeypatch, capsys):
    adapter, base = trained_adapter("qwen2")
    commit = "a" * 40
    _fake_hf_cache(tmp_path / "hub", "org/tiny-qwen2", base, commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", "org/tiny-qwen2", "--json")
    verdict = json.loads(out)
    assert code == 0 and verdict["verdict"] == "compatible", verdict
    assert (verdict["base_signature"]["repo_id"], verdict["base_signature"]["commit"]) == ("org/tiny-qwen2", commit)

    code, out, err = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", "org/not-cached")
    assert code == 2 and out == ""
    assert err.startswith("model: base org/not-cached is neither a folder nor in the Hugging Face cache at "
                          f"{tmp_path / 'hub'}")
    assert "hf download org/not-cached" in err
    code, out, err = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", "org/not-cached", "--json")
    assert code == 2 and json.loads(out) == {"verdict": None, "error": err.strip(), "exit_code": 2}


def test_missing_adapter_and_base_are_usage_errors(tmp_path, capsys, model_factory):
    code, _, err = run_cli(capsys, "verify", "--adapter", str(tmp_path / "nope"), "--base", str(tmp_path))
    assert code == 2
    assert err.strip() == (f"input: adapter {tmp_path / 'nope'} is not a folder; name the adapter folder, an "
                           "s3:// prefix or https URLs of its files")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "verify", "--adapter", str(tmp_path / "empty"), "--base", str(model_factory("qwen2")))
    assert code == 2 and "has no adapter_config.json" in err


# --- remote adapters: S3 and presigned https URLs, checked against their manifest -----------------


@pytest.fixture
def s3_env(s3_server, shared_s3_bucket, monkeypatch):
    from tests.conftest import worker_env_names

    for name in worker_env_names():
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env(shared_s3_bucket)
    env.pop("S3_BUCKET")  # the user's machine: credentials and endpoint, the bucket is in the URI
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return shared_s3_bucket


def _upload(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_s3_adapter_is_downloaded_and_checksum_verified(trained_adapter, s3_server, s3_env, capsys):
    adapter, base = trained_adapter("qwen2")
    client = s3_server.client()
    _upload(client, s3_env, adapter.parent, "team-a/job-1")

    for uri in (f"s3://{s3_env}/team-a/job-1/adapter/", f"s3://{s3_env}/team-a/job-1"):
        code, out, err = run_cli(capsys, "verify", "--adapter", uri, "--base", str(base), "--json")
        verdict = json.loads(out)
        assert code == 0 and verdict["verdict"] == "compatible", (uri, verdict, err)
        assert verdict["adapter"] == uri

    # A changed file: the manifest's sha256 no longer matches, whatever the shapes say.
    body = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    body[-1] ^= 0xFF
    client.put_object(Bucket=s3_env, Key="team-a/job-1/adapter/adapter_model.safetensors", Body=bytes(body))
    code, out, _ = run_cli(capsys, "verify", "--adapter", f"s3://{s3_env}/team-a/job-1/adapter/", "--base", str(base))
    assert code == 3
    lines = out.splitlines()
    assert lines[0].startswith("damaged: adapter s3://")
    assert ("  - adapter_model.safetensors does not match the sha256 in manifest.json (changed after training, "
            "or a broken download)") in lines
    assert "  fix: download the adapter again (its files do not match its manifest.json)" in lines
    assert s3_server.secret_key not in out


def test_s3_errors_name_the_uri_not_the_secret(s3_server, s3_env, capsys, model_factory):
    code, out, err = run_cli(capsys, "verify", "--adapter", f"s3://{s3_env}/nothing/here/",
                             "--base", str(model_factory("qwen2")))
    assert code == 2
    assert err.strip() == (f"input: there is nothing under s3://{s3_env}/nothing/here/; name the adapter's "
                           "folder (s3://bucket/<prefix>/<job_id>/adapter/)")
    assert s3_server.secret_key not in err + out


def test_an_s3_adapter_file_over_the_cap_is_not_downloaded(trained_adapter, s3_server, s3_env, tmp_path):
    from adapters.fetch import fetch_adapter
    from config.settings import WorkerSettings
    from errors import StorageError

    adapter, _ = trained_adapter("qwen2")
    _upload(s3_server.client(), s3_env, adapter, "capped/adapter")
    cap = (adapter / "adapter_model.safetensors").stat().st_size - 1
    with pytest.raises(StorageError) as info:
        fetch_adapter(f"s3://{s3_env}/capped/adapter/", tmp_path / "a", settings=WorkerSettings(s3_bucket=s3_env),
                      max_file_bytes=cap)
    assert str(info.value) == (f"s3://{s3_env}/capped/adapter/adapter_model.safetensors is {cap + 1} bytes, over "
                               f"the {cap}-byte cap for one adapter file; is the prefix an adapter folder?")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


@pytest.fixture
def http_folder(tmp_path):
    """A static file server over a folder that insists on a signature query, as presigned URLs carry."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            if "X-Amz-Signature=" not in self.path:
                self.send_error(403)
                return
            self.path = self.path.split("?", 1)[0]
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_presigned_urls_one_per_file(trained_adapter, http_folder, capsys):
    adapter, base = trained_adapter("qwen2")
    root, url, seen = http_folder
    shutil.copytree(adapter, root / "adapter")
    sig = "?X-Amz-Signature=deadbeefsecret&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
    names = ["manifest.json", "adapter_config.json", "adapter_model.safetensors", "README.md"]
    argv = ["verify", "--base", str(base)]
    for name in names:
        argv += ["--adapter", f"{url}/adapter/{name}{sig}"]

    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.startswith("compatible: "), out + err
    assert "deadbeefsecret" not in out + err and "AKIAIOSFODNN7EXAMPLE" not in out + err
    assert sorted(p.split("?")[0] for p in seen) == sorted(f"/adapter/{n}" for n in names)

    # A lone manifest URL: the files it lists come from the same folder with the same query (a
    # tokenized folder URL; this server accepts any signature).
    code, out, err = run_cli(capsys, "verify", "--base", str(base),
                             "--adapter", f"{url}/adapter/manifest.json{sig}")
    assert code == 0, err
    (root / "adapter" / "README.md").write_text("changed")
    code, out, err = run_cli(capsys, "verify", "--base", str(base),
                             "--adapter", f"{url}/adapter/manifest.json{sig}")
    assert code == 3
    assert ("  - README.md does not match the sha256 in manifest.json (changed after training, or a broken "
            "download)") in out.splitlines()
    assert "deadbeefsecret" not in out + err


def test_an_unsigned_url_refused_by_the_server_is_a_clear_error(trained_adapter, http_folder, capsys):
    adapter, base = trained_adapter("qwen2")
    root, url, _ = http_folder
    shutil.copytree(adapter, root / "adapter")
    code, out, err = run_cli(capsys, "verify", "--base", str(base), "--adapter", f"{url}/adapter/manifest.json")
    assert code == 1 and out == ""
    assert err.strip() == f"download: could not download {url}/adapter/manifest.json: HTTP 403"


# --- bases in other layouts -------------------------------------------------------------------------


def test_a_sharded_base_is_read_through_its_index(trained_adapter, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, base = trained_adapter("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(base).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    no_weights = forbid_weight_loading(monkeypatch)

    code, out, _ = run_cli(capsys, "verify", "--adapter", str(adapter), "--base", str(sharded), "--json")

    verdict = json.loads(out)
    assert verdict["checked_tensors"] == len(read_safetensors_shapes(adapter / "adapter_model.safetensors"))
    assert verdict["mismatches"] == []
    # Same architecture, but other files: the weight index and the weight files are not the ones trained on.
    assert code == 0 and verdict["verdict"] == "compatible, different revision"
    assert any(w.startswith("the weight files differ from those the adapter was trained on")
               for w in verdict["warnings"])
    assert no_weights == []


def test_a_wrapper_prefix_in_the_base_still_finds_each_module():
    index = _WeightIndex({
        "model.language_model.layers.0.self_attn.q_proj.weight": (32, 64),
        "model.language_model.layers.0.mlp.experts.3.up_proj.weight": (16, 64),
        "lm_head.weight": (100, 64),
    })
    assert index.weight_of("model.layers.0.self_attn.q_proj") == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert index.weight_of("model.layers.1.self_attn.q_proj") is None
    assert index.has_module("model.language_model.layers.0.mlp.experts")
    assert index.has_module("model.layers.0.mlp.experts")
    assert not index.has_module("model.layers.0.mlp.shared_expert")


def test_the_fingerprint_is_the_architecture_not_the_copy(trained_adapter, tmp_path):
    _, base = trained_adapter("qwen2")
    snapshot = _fake_hf_cache(tmp_path / "hub", "org/tiny-qwen2", base, "b" * 40)
    here, cached = read_signature(base), read_signature(snapshot)
    assert (cached.repo_id, cached.commit) == ("org/tiny-qwen2", "b" * 40)
    assert (here.repo_id, here.commit) == (None, None)
    assert cached.fingerprint == here.fingerprint
    assert cached.weights_sample_sha256 == here.weights_sample_sha256


@pytest.mark.parametrize("manifest, problem", [
    ("{not json", "manifest.json is not valid JSON"),
    ("[1, 2]", "manifest.json has no list of files; it is not this worker's manifest"),
])
def test_a_broken_manifest_is_damaged_not_a_traceback(trained_adapter, tmp_path, capsys, manifest, problem):
    adapter, base = trained_adapter("qwen2")
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    (copy / "manifest.json").write_text(manifest)
    code, out, _ = run_cli(capsys, "verify", "--adapter", str(copy), "--base", str(base))
    assert code == 3
    assert out.splitlines()[0] == f"damaged: adapter {copy} on base {base}"
    assert out.splitlines()[1].startswith(f"  - {problem}")


def test_modules_to_save_copies_are_checked_whole(model_factory, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    qwen2 = model_factory("qwen2")
    narrow = model_factory("qwen2", hidden_size=32)
    out = tmp_path / "with-head"
    model = AutoModelForCausalLM.from_pretrained(qwen2)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(out)
    vocab = model.config.vocab_size
    assert "base_model.model.lm_head.weight" in read_safetensors_shapes(out / "adapter_model.safetensors")

    code, text, _ = run_cli(capsys, "verify", "--adapter", str(out), "--base", str(qwen2), "--json")
    assert code == 0 and json.loads(text)["checked_tensors"] == 2 * 2 + 1
    code, text, _ = run_cli(capsys, "verify", "--adapter", str(out), "--base", str(narrow))
    assert code == 3
    assert f"  - lm_head.weight: the adapter's copy is [{vocab}, 64], the base's weight is [{vocab}, 32]" in text.splitlines()
