"""The whole worker against what users would pick instead, side by side: `make bench`.

    .venv/bin/python bench/run.py [--quick] [--rounds 3] [--out bench/results/run.json]

One randomly initialised Llama (built from a config, saved with ``save_pretrained``) and one set of
chat examples with long-tailed lengths (lognormal, like real instruction data), the same LoRA (r 16,
alpha 32, every projection), batch 8, one epoch, fp32 on a CPU, one torch thread. Three arms, each
round running each arm once in turn in a fresh child process (so a noisy neighbour slows all alike,
and each arm's peak RSS is its own):

- ``padded``: a hand-written transformers ``Trainer`` + PEFT, batches padded to their longest row;
- ``trl_default``: TRL ``SFTTrainer`` with its defaults (only ``bf16`` off: a CPU has none);
- ``worker``: this worker through ``handler.handler``, two jobs with the same base on one warm
  worker. Before the first, the model's files are dropped from the page cache and read once
  sequentially (timed), then dropped again: the first job's load is a cold load from disk.

``load_vs_read`` is the worker's own cold load of the bench model (``load_base_model`` and the warm
cache's snapshot: what a job's ``load_s`` counts on a local disk), alone in a process with its
modules imported, ÷ a sequential read of the same files, the page cache evicted before each
(bench/bench_model_loading.py --worker-load, once per round). It is the load of a process that has
loaded a model before; ``first_load_vs_read`` is the process's first load, which also pays what a
worker pays once in its life (importing the family's modeling code, compiling transformers'
conversion patterns): on the 58 MB --quick model that one-time cost outweighs the read. The same is
timed on a larger Llama shape (``load_vs_read_large``: 0.5 GB, built once into build/bench-load-large). ``first_job_load_vs_read``
is the first job's ``load_s`` ÷ the worker arm's read: in a job the load runs beside tokenization,
sharing the CPU and the GIL with it.

Speed is real (non-padding) tokens per second of training. The last printed line is one JSON object:
each figure's median over the rounds and its spread (min, max). Measurements, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The data, the page-cache eviction and the timed read are the other benches' own.
from bench.bench_model_loading import evict, read_sequential  # noqa: E402
from bench.train_throughput import WORDS, records  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {"quick": {"hidden_size": 512, "layers": 6, "examples": 64},
         "full": {"hidden_size": 768, "layers": 8, "examples": 256}}
COMMON = {"epochs": 1, "batch_size": 8, "max_seq_length": 512, "lora_r": 16, "lora_alpha": 32,
          "lora_dropout": 0.0, "seed": 42, "learning_rate": 2e-4}
ARMS = ("padded", "trl_default", "worker")
# load_vs_read_large: a Llama shape of about 0.55 GB fp32 (vocab 32,000), random weights, built once
LARGE_LOAD = {"hidden": 768, "layers": 12, "workdir": ROOT / "build" / "bench-load-large"}


def _env() -> dict[str, str]:
    # One thread: on a shared machine, idle OpenMP threads spin and bill CPU time to whoever waits.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", "/tmp/mpl-bench")}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# the arms, each in a child process


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=COMMON["lora_r"], lora_alpha=COMMON["lora_alpha"],
                                            lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))


def arm_padded(work: Path) -> dict:
    """What a user writes by hand: tokenise, pad each batch to its longest row, Trainer + PEFT."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(COMMON["seed"])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rows = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
            for r in json.loads((work / "records.json").read_text())]
    rows = [{"input_ids": list(ids)[:COMMON["max_seq_length"]]} for ids in rows]
    model = _lora(AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32))
    args = TrainingArguments(output_dir=str(work / "out-padded"), per_device_train_batch_size=COMMON["batch_size"],
                             num_train_epochs=COMMON["epochs"], learning_rate=COMMON["learning_rate"],
                             report_to="none", save_strategy="no", logging_steps=1000, seed=COMMON["seed"],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    return {"tokens": sum(len(r["input_ids"]) for r in rows) * COMMON["epochs"], "train_s": seconds}


def arm_trl_default(work: Path) -> dict:
    """TRL's SFTTrainer as its documentation shows it: a dataset of messages, SFTConfig's defaults."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(work / "out-trl"), bf16=False,  # the defaults' bf16 needs a GPU
                     num_train_epochs=COMMON["epochs"], per_device_train_batch_size=COMMON["batch_size"],
                     report_to="none", save_strategy="no", logging_steps=1000, seed=COMMON["seed"],
                     disable_tqdm=True)
    from peft import LoraConfig

    trainer = SFTTrainer(model=str(work / "model"), args=args,
                         train_dataset=Dataset.from_list(json.loads((work / "records.json").read_text())),
                         peft_config=LoraConfig(r=COMMON["lora_r"], lora_alpha=COMMON["lora_alpha"],
                                                lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * COMMON["epochs"]
    return {"tokens": tokens, "train_s": seconds, "gradient_checkpointing": args.gradient_checkpointing}


def arm_worker(work: Path, round_: int) -> dict:
    """Two jobs with the same base on one warm worker, through handler.handler."""
    volume = work / f"volume-{round_}"
    os.environ.update({"VOLUME_ROOT": str(volume), "PROGRESS_INTERVAL_S": "60"})
    import handler

    model = volume / "models" / "bench-llama"
    evict(model)
    read_s = read_sequential(model)
    evict(model)
    # one optimizer step per batch, as the Trainer's and TRL's defaults do
    hp = {**COMMON, "target_modules": TARGETS, "logging_steps": 1000, "gradient_accumulation_steps": 1}
    jobs = []
    for n in (1, 2):
        job = {"base_model": "bench-llama", "job_id": f"bench-{round_}-{n}", "hyperparameters": hp,
               "dataset": {"uri": "datasets/records.jsonl"}}
        output = handler.handler({"id": job["job_id"], "input": job})
        if "error" in output:
            raise SystemExit(f"worker job failed: {output['error']}")
        jobs.append(output)
    first, second = jobs
    t = second["timings"]
    return {"tokens": second["metrics"]["train_tokens"], "train_s": t["train_s"], "read_s": read_s,
            "first_job_load_s": first["timings"]["load_s"], "second_job_load_s": t["load_s"],
            "reused": [j["base_model"]["load"]["reused"] for j in jobs],
            "overhead_fraction": (t["total_s"] - t["train_s"]) / t["total_s"], "total_s": t["total_s"]}


def child(arm: str, work: Path, round_: int) -> None:
    import torch

    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.WARNING)
    row = {"padded": lambda: arm_padded(work), "trl_default": lambda: arm_trl_default(work),
           "worker": lambda: arm_worker(work, round_)}[arm]()
    row["tokens_per_second"] = row["tokens"] / row["train_s"]
    row["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(row))


# --------------------------------------------------------------------------------------------------
# the parent: build once, run the rounds, summarise


def build(work: Path, size: dict) -> None:
    import shutil

    from demo.tiny_models import build_tiny_model

    data = records(size["examples"])
    (work / "records.json").write_text(json.dumps(data))
    build_tiny_model(work / "model", family="llama", hidden_size=size["hidden_size"], layers=size["layers"],
                     corpus=[" ".join(WORDS)])
    for round_ in range(ROUNDS):
        volume = work / f"volume-{round_}"
        shutil.copytree(work / "model", volume / "models" / "bench-llama")
        (volume / "datasets").mkdir(parents=True)
        (volume / "datasets" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "rounds": [round(v, 4) for v in values]}


def summarise(runs: dict[str, list[dict]]) -> dict:
    rounds = range(len(runs["worker"]))
    tps = {arm: [r["tokens_per_second"] for r in rows] for arm, rows in runs.items()}
    worker = runs["worker"]
    return {
        "vs_padded": spread([tps["worker"][i] / tps["padded"][i] for i in rounds]),
        "vs_trl_default": spread([tps["worker"][i] / tps["trl_default"][i] for i in rounds]),
        "overhead_fraction": spread([r["overhead_fraction"] for r in worker]),
        "first_job_load_s": spread([r["first_job_load_s"] for r in worker]),
        "second_job_load_s": spread([r["second_job_load_s"] for r in worker]),
        "second_vs_first_load": spread([r["second_job_load_s"] / r["first_job_load_s"] for r in worker]),
        "first_job_load_vs_read": spread([r["first_job_load_s"] / r["read_s"] for r in worker]),
        "tokens_per_second": {arm: spread(v) for arm, v in tps.items()},
        "peak_rss_mb": {arm: spread([r["peak_rss_mb"] for r in rows]) for arm, rows in runs.items()},
    }


ROUNDS = 3


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the small model and data (9 min on 2 shared cores; longer under heavy load)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "run.json")
    parser.add_argument("--gpu", choices=("auto", "off"), default="auto",
                        help="the GPU section (bench/gpu.py) after the CPU arms: auto runs it when CUDA is present")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args.arm, args.work, args.round)
        return
    ROUNDS = max(args.rounds, 1)
    size = SIZES["quick" if args.quick else "full"]
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    build(work, size)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_ in range(ROUNDS):
        for arm in ARMS:
            done = subprocess.run([sys.executable, __file__, "--arm", arm, "--work", str(work),
                                   "--round", str(round_)], env=_env(), capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[arm].append(row)
            print(f"round {round_} {arm:12s} {row['tokens_per_second']:7.0f} real tok/s "
                  f"({row['tokens']} tokens in {row['train_s']:.1f}s) peak {row['peak_rss_mb']:.0f} MB", flush=True)
    alone = [worker_load(_round_model(work, round_)) for round_ in range(ROUNDS)]
    large = [worker_load() for _ in range(ROUNDS)]
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "model")
    params = _count_parameters(work / "model")
    summary = summarise(runs)
    summary["load_vs_read"] = spread([r["load_vs_read"] for r in alone])
    summary["first_load_vs_read"] = spread([r["first_load_vs_read"] for r in alone])
    summary["load_vs_read_large"] = spread([r["load_vs_read"] for r in large])
    summary["large_model_mb"] = round(large[0]["bytes"] / 1e6, 1)
    from bench.gpu import section

    summary["gpu"] = section(args.gpu, args.out.with_name(args.out.stem + "-gpu.json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "torch": torch.__version__,
                    "threads": 1},
        "setup": {"model": f"llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                           f"{params / 1e6:.1f}M parameters (random)", "examples": size["examples"], **COMMON},
        "seconds": round(time.monotonic() - started, 1), "runs": runs, "loads": alone, "large_loads": large,
        "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))


def _round_model(work: Path, round_: int) -> Path:
    return work / f"volume-{round_}" / "models" / "bench-llama"


def worker_load(folder: Path | None = None) -> dict:
    """The worker's cold load against a sequential read, in a fresh process: of ``folder``, or of the
    larger model (LARGE_LOAD, built on first use)."""
    where = (["--folder", str(folder)] if folder is not None else
             ["--hidden", str(LARGE_LOAD["hidden"]), "--layers", str(LARGE_LOAD["layers"]),
              "--workdir", str(LARGE_LOAD["workdir"])])
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_model_loading.py"), "--worker-load", *where],
                          env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the load of {folder or 'the larger model'} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"load alone {row['load_s'] + row['snapshot_s']:.3f}s (the process's first: {row['first_load_s']:.3f}s), "
          f"read {row['read_s']:.3f}s ({row['bytes'] / 1e6:.0f} MB): {row['load_vs_read']:.2f}", flush=True)
    return row


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    main()
