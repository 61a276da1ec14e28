"""Loading the base while the data is tokenized, against loading it after: one job's wall, side by side.

    .venv/bin/python bench/overlap.py [--examples 2000 --rounds 3 --hidden 512 --layers 6]

The --quick model of bench/run.py (a random Llama built from a config) on a volume, and chat examples
with long-tailed lengths (bench/train_throughput.py's). Each round runs the same job twice through
``handler.handler`` in this one process, in turn: ``overlapped`` (the worker as it is: the base loads
in its thread while the data is tokenized) and ``sequential`` (``train_lora.start_loading`` patched
out, so the base loads after tokenizing, as before). Before each job the warm cache is emptied and the
model's files dropped from the page cache: every load is cold, from disk. Training is two steps
(``max_steps``), so the figure is the part of the job the overlap can change. One torch thread.
Prints medians over the rounds and the ratio sequential ÷ overlapped; measurements, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model_loading import evict  # noqa: E402
from bench.train_throughput import WORDS, records  # noqa: E402

FIGURES = ("total_s", "dataset_s", "load_s", "load_overlap_s", "train_s")


def run_job(volume: Path, job_id: str, examples: int) -> dict:
    import handler

    handler.get_base_cache().clear("a cold load for each job")
    evict(volume / "models" / "bench-llama")
    hp = {"max_steps": 2, "batch_size": 8, "max_seq_length": 512, "lora_r": 16, "lora_alpha": 32,
          "gradient_accumulation_steps": 1, "logging_steps": 1000, "seed": 42}
    job = {"base_model": "bench-llama", "job_id": job_id, "hyperparameters": hp,
           "dataset": {"uri": "datasets/records.jsonl", "max_examples": examples}}
    started = time.monotonic()
    output = handler.handler({"id": job_id, "input": job})
    wall = time.monotonic() - started
    if "error" in output:
        raise SystemExit(f"job failed: {output['error']}")
    timings = output["timings"]
    # the part of the job the overlap can change: everything but the training steps
    return {"wall_s": round(wall, 3), "wall_but_train_s": round(wall - timings["train_s"], 3),
            **{k: timings[k] for k in FIGURES}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overlap.json")
    args = parser.parse_args()
    for name, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                        "PROGRESS_INTERVAL_S": "60", "LOG_LEVEL": "WARNING"}.items():
        os.environ.setdefault(name, value)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from demo.tiny_models import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    volume = work / "volume"
    build_tiny_model(volume / "models" / "bench-llama", family="llama", hidden_size=args.hidden,
                     layers=args.layers, corpus=[" ".join(WORDS)])
    (volume / "datasets").mkdir(parents=True)
    (volume / "datasets" / "records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records(args.examples)))
    os.environ["VOLUME_ROOT"] = str(volume)

    import train_lora

    real_start = train_lora.start_loading
    runs: dict[str, list[dict]] = {"overlapped": [], "sequential": []}
    try:
        run_job(volume, "warm-up", 16)  # imports and first-call costs, out of every measured job
        for round_ in range(args.rounds):
            for arm in runs:
                train_lora.start_loading = real_start if arm == "overlapped" else (lambda request, base: None)
                row = run_job(volume, f"{arm}-{round_}", args.examples)
                runs[arm].append(row)
                print(f"round {round_} {arm:10s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    finally:
        train_lora.start_loading = real_start
        shutil.rmtree(work, ignore_errors=True)

    median = {arm: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for arm, rows in runs.items()}
    summary = {"median": median, **{f"sequential_vs_overlapped_{figure}": _ratio(runs, figure)
                                     for figure in ("wall_but_train_s", "wall_s")},
               "saved_s": round(median["sequential"]["wall_but_train_s"] - median["overlapped"]["wall_but_train_s"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["bench/overlap.py", *sys.argv[1:]]),
                                    "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
                                    "examples": args.examples, "runs": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))


def _ratio(runs: dict[str, list[dict]], figure: str) -> dict:
    """sequential ÷ overlapped, round by round (the two ran back to back): median and spread."""
    ratios = [s[figure] / o[figure] for s, o in zip(runs["sequential"], runs["overlapped"])]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


if __name__ == "__main__":
    main()
