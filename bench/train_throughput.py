"""Training throughput of the batching strategies, side by side, through the worker's own train_lora.

    .venv/bin/python bench/train_throughput.py [--examples 256] [--rounds 2] [--out bench/results/train_throughput.json]

A tiny Llama (hidden 256, 4 layers) built from a config; one epoch over the same chat examples with
long-tailed lengths (lognormal, max_seq_length 512), batch 8 rows: every strategy trains on the same
tokens (packing makes fewer, fuller steps). Each round runs every strategy once, in turn, so a
noisy neighbour slows all of them alike; the report gives real (non-padding) tokens per second and
each strategy's ratio to the first one, "padded" (the baseline). Measurements, never a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STRATEGIES = {"padded": False, "padding_free": "auto", "packed": True}
WORDS = ("the capital of a country is its largest city in many cases but not always and rivers "
         "mountains languages answer question explain list summarise translate").split()


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(int(rng.lognormvariate(3.3, 0.9)), 300)  # words: median ~27, long tail
        answer = " ".join(rng.choice(WORDS) for _ in range(max(length, 2)))
        out.append({"messages": [{"role": "user", "content": "Tell me something."},
                                 {"role": "assistant", "content": answer}]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    # One thread: on a shared machine, idle OpenMP threads spin and bill CPU time to whoever waits.
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from config.job import TrainingJob
    from config.settings import WorkerSettings
    from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
    from demo.tiny_models import build_tiny_model
    from train_lora import train_lora
    from training.request import TrainRequest
    from training.runtime import plan_runtime

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data_records = records(args.examples)
    model_dir = build_tiny_model(work / "model", family="llama", hidden_size=256, layers=4,
                                 corpus=[" ".join(WORDS)])
    settings = WorkerSettings(volume_root=work / "volume")
    tokenizer = load_tokenizer(model_dir)
    results: dict[str, list[dict]] = {name: [] for name in STRATEGIES}
    for round_ in range(args.rounds):
        for name, packing in STRATEGIES.items():
            job = TrainingJob.from_payload({"dataset": {"records": data_records}, "hyperparameters": {
                "epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1,
                "max_seq_length": 512, "packing": packing, "learning_rate": 1e-3, "logging_steps": 10,
                "save_steps": 10_000, "lora_dropout": 0.0}})
            hp = job.hyperparameters
            data = tokenize_dataset(read_dataset(job.dataset, settings, seed=hp.seed), tokenizer,
                                    max_seq_length=hp.max_seq_length, train_on_inputs=False)
            started, cpu_started = time.monotonic(), time.process_time()
            request = TrainRequest(model_path=model_dir, hyperparameters=hp, output_dir=work / f"out-{name}-{round_}",
                                   checkpoint_dir=work / f"ckpt-{name}-{round_}", base_model_id="bench/tiny-llama",
                                   runtime=plan_runtime(hp))
            result = train_lora(request, data, tokenizer=tokenizer)
            cpu_seconds = time.process_time() - cpu_started  # load + train: this process's CPU time
            row = {"round": round_, "tokens_per_second": result.metrics["tokens_per_second"],
                   "tokens_per_cpu_second": result.metrics["train_tokens"] / cpu_seconds,
                   "cpu_seconds": cpu_seconds,
                   "train_seconds": result.train_seconds, "wall_seconds": time.monotonic() - started,
                   "train_tokens": result.metrics["train_tokens"], "steps": result.metrics["steps"],
                   "batching": result.metrics["batching"], "last_loss": result.metrics["last_loss"]}
            results[name].append(row)
            print(f"round {round_} {name:13s} {row['tokens_per_second']:8.0f} real tok/s "
                  f"{row['tokens_per_cpu_second']:8.0f} tok/CPU-s "
                  f"({row['train_tokens']} tokens in {row['train_seconds']:.1f}s, {cpu_seconds:.1f} CPU-s)", flush=True)

    # On a shared machine wall-clock speed swings with the neighbours' load; CPU time much less.
    summary = {}
    for name, rows in results.items():
        summary[name] = {
            "mean_tokens_per_second": sum(r["tokens_per_second"] for r in rows) / len(rows),
            "mean_tokens_per_cpu_second": sum(r["tokens_per_cpu_second"] for r in rows) / len(rows),
            "ratio_to_padded_by_round": [r["tokens_per_second"] / p["tokens_per_second"]
                                         for r, p in zip(rows, results["padded"])],
            "cpu_ratio_to_padded_by_round": [r["tokens_per_cpu_second"] / p["tokens_per_cpu_second"]
                                             for r, p in zip(rows, results["padded"])],
        }
    for name, s in summary.items():
        print(f"{name:13s} wall ×{', '.join(f'{x:.2f}' for x in s['ratio_to_padded_by_round'])}  "
              f"CPU ×{', '.join(f'{x:.2f}' for x in s['cpu_ratio_to_padded_by_round'])} of padded")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["bench/train_throughput.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {"model": "llama hidden 256, 4 layers", "examples": args.examples, "epochs": 1,
                  "batch_size": 8, "max_seq_length": 512},
        "runs": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
