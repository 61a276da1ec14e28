"""``cli.py plan`` for Qwen3-Next-80B-A3B's config, this tree against a baseline commit, side by side.

    .venv/bin/python bench/plan_cli.py [--baseline fe89ed5] [--runs 5]

Writes the 80B's published config.json (no weights) to a temporary folder, exports the baseline
commit's tree (``git archive``) next to it, then runs ``python cli.py plan --base <folder> --gpus 1x80``
alternately in the baseline and in this tree, ``--runs`` times each, and reports wall seconds (median,
min, max) per side, the ratio of the medians and the load average before and after (other work on a
shared machine slows both sides alike; alternating keeps a burst from landing on one side only).
JSON on stdout; figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config_folder(root: Path) -> Path:
    folder = root / "qwen3-next-80b-config"
    folder.mkdir()
    code = ("import sys, transformers; sys.path.insert(0, sys.argv[2]); from demo.tiny_models import QWEN3_NEXT_80B; "
            "transformers.Qwen3NextConfig(**QWEN3_NEXT_80B).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(folder), str(ROOT)], check=True, capture_output=True)
    return folder


def _timed(tree: Path, folder: Path) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cli.py", "plan", "--base", str(folder), "--gpus", "1x80"], cwd=tree,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "4-bit (quantization '4bit'): 62.7 GiB per GPU, fits" not in done.stdout:
        raise SystemExit(f"cli.py plan failed in {tree}: {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="fe89ed5", help="the commit to compare with (meta-device planner)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        tmp = Path(tmp)
        folder = _config_folder(tmp)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"baseline": [], "this_tree": []}
        for _ in range(args.runs):
            times["baseline"].append(_timed(baseline, folder))
            times["this_tree"].append(_timed(ROOT, folder))
        load_after = os.getloadavg()
    summary = {side: {"median_s": round(statistics.median(t), 2), "min_s": round(min(t), 2),
                      "max_s": round(max(t), 2), "runs_s": [round(x, 2) for x in t]} for side, t in times.items()}
    print(json.dumps({"baseline": args.baseline, "runs": args.runs, **summary,
                      "speedup_of_medians": round(statistics.median(times["baseline"])
                                                  / statistics.median(times["this_tree"]), 1),
                      "load_average_before": [round(x, 2) for x in load_before],
                      "load_average_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
