"""The training report in the job folder: metrics.json, train_log.jsonl and loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.result import TrainResult


def write_training_report(result: TrainResult, folder: Path) -> None:
    """metrics.json, train_log.jsonl and loss.png (train and eval loss by step) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"metrics": result.metrics, "log_history": result.log_history}, indent=2, default=str) + "\n")
    with open(folder / "train_log.jsonl", "w") as fh:
        for entry in result.log_history:
            fh.write(json.dumps(entry, default=str) + "\n")
    plot_loss(result.log_history, folder / "loss.png")


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
