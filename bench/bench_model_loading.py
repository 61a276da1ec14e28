"""How should a worker load a base model: memory-map it in place, or stage it onto local disk first?

    .venv/bin/python bench/bench_model_loading.py [--hidden 1024 --layers 12 --repeats 3]

Builds a Llama-shaped model (about 0.9 GB of fp32 safetensors with the defaults) and times, side by
side and alternating, from a cold page cache (POSIX_FADV_DONTNEED on every file before each run):

  direct   from_pretrained on the folder (safetensors are memory-mapped: page-fault sized reads)
  staged   model_staging.stage_folder (16 MiB sequential reads into a local copy) + from_pretrained

and the raw read pattern underneath each (sequential 16 MiB blocks vs touching every page through a
memory map in tensor order).

``--worker-load`` instead times, once, in this fresh process, the worker's own load path against a
sequential read of the same files from the same disk (page cache evicted before each): what a job's
``load_s`` counts on a local disk, ``training.loading.load_base_model`` (fp32 on a CPU) and the warm
cache's snapshot of the loaded base. One JSON line; bench/run.py runs it once per round for its
``load_vs_read_large``. Prints medians and the ratio staged/direct. On a local disk staging is
pure overhead (an extra copy); the case it exists for is a network filesystem, where each small
read costs a round trip — which this machine cannot reproduce (no network filesystem here).
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache, so the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())  # dirty pages (a model just written) are not dropped otherwise
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def build(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 256, 1),
                         vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="400MB")
    return folder


def load(folder: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    # Touch every weight, as moving it to a GPU would: an mmap'd tensor is read only when used.
    total = sum(float(p.detach().view(-1)[:: 4096].sum()) for p in model.parameters())
    elapsed = time.perf_counter() - started
    del model, total
    return elapsed


def read_sequential(folder: Path) -> float:
    started = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as fh:
            while fh.read(16 * 1024 * 1024):
                pass
    return time.perf_counter() - started


def read_mmap_tensor_order(folder: Path) -> float:
    """Touch every page through a memory map, tensor by tensor in header order (what loading does)."""
    started = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            base = 8 + length
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                for offset in range(base + start, base + end, mmap.PAGESIZE):
                    mm[offset]
            mm.close()
    return time.perf_counter() - started


def worker_load(folder: Path) -> dict:
    """The worker's cold load of ``folder`` (its load and the warm cache's snapshot, timed apart) and a
    sequential read of the same files, each from a cold page cache, in this process: the process's
    first load (``first_load_s``) and a load after it (``load_s``)."""
    import torch

    import train_lora  # noqa: F401  imports are not the load: a worker has its modules before its first job
    from training.base_cache import snapshot
    from training.loading import load_base_model
    from training.runtime import Runtime

    torch.set_num_threads(1)
    runtime = Runtime("cpu", "fp32", "none", False)
    evict(folder)
    read_s = read_sequential(folder)
    # The first load in a process also pays what a process pays once in its life, whatever it loads
    # next: importing the model family's modeling code and compiling transformers' weight-conversion
    # patterns. Timed apart (first_load_s), then the load again from a cold page cache.
    evict(folder)
    started = time.perf_counter()
    first = load_base_model(folder, runtime)
    first_load_s = time.perf_counter() - started
    del first
    gc.collect()
    evict(folder)
    started = time.perf_counter()
    model = load_base_model(folder, runtime)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    snapshot(model)
    snapshot_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"bytes": size, "read_s": read_s, "first_load_s": first_load_s, "load_s": load_s,
            "snapshot_s": snapshot_s, "load_vs_read": (load_s + snapshot_s) / read_s,
            "first_load_vs_read": (first_load_s + snapshot_s) / read_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(ROOT / "build" / "bench-loading"))
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="serve the model through bench/latency_fs.py, adding this delay to every read")
    parser.add_argument("--worker-load", action="store_true",
                        help="time the worker's own load path once against a sequential read (one JSON line)")
    parser.add_argument("--folder", type=Path, help="with --worker-load: this saved model instead of one built")
    args = parser.parse_args()

    if args.worker_load and args.folder:
        print(json.dumps(worker_load(args.folder)))
        return
    from models.staging import filesystem_type, stage_folder

    work = Path(args.workdir)
    model = build(work / "model", args.hidden, args.layers)
    if args.worker_load:
        print(json.dumps(worker_load(model)))
        return
    fuse = None
    if args.latency_ms > 0:
        import subprocess

        mount = work / "mnt"
        mount.mkdir(exist_ok=True)
        fuse = subprocess.Popen([sys.executable, str(ROOT / "bench" / "latency_fs.py"), str(model), str(mount),
                                 "--latency-ms", str(args.latency_ms)])
        for _ in range(50):
            if (mount / "config.json").exists():
                break
            time.sleep(0.2)
        model = mount
    print(f"reading from {model} ({filesystem_type(model) or '?'}"
          f"{f', +{args.latency_ms} ms per read' if args.latency_ms else ''})")
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    results: dict[str, list[float]] = {k: [] for k in ("direct", "staged", "seq_read", "mmap_read")}
    for _ in range(args.repeats):
        evict(model)
        results["direct"].append(load(model))

        evict(model)
        stage_root = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        staged, _ = stage_folder(model, stage_root)
        results["staged"].append(time.perf_counter() - started + load(staged))
        shutil.rmtree(stage_root)

        evict(model)
        results["seq_read"].append(read_sequential(model))
        evict(model)
        results["mmap_read"].append(read_mmap_tensor_order(model))

    if fuse is not None:
        subprocess.run(["fusermount", "-u", str(model)], check=False)
        fuse.wait(timeout=10)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"model: {size / 1e9:.2f} GB fp32 safetensors in {len(list(model.glob('*.safetensors')))} shards, "
          f"{args.repeats} alternating runs, cold page cache each run")
    for key, value in med.items():
        print(f"  {key:10s} median {value:6.2f} s   ({size / 1e6 / value:7.0f} MB/s)   runs {[round(x, 2) for x in results[key]]}")
    print(f"  ratio staged/direct load: {med['staged'] / med['direct']:.2f}")
    print(f"  ratio mmap/sequential read: {med['mmap_read'] / med['seq_read']:.2f}")


if __name__ == "__main__":
    main()
