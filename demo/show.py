"""The demo's two ends around ``python handler.py --test_input``.

    python demo/show.py input    # test_input.json with a fresh job id, for --test_input
    python demo/show.py result   # that job's output JSON, then its adapter loaded and asked a question
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import WorkerSettings  # noqa: E402

QUESTION = "What is the capital of Japan?"


def _last_job_file(settings: WorkerSettings) -> Path:
    return settings.volume_root / "demo-last-job.txt"


def make_input() -> None:
    settings = WorkerSettings()
    job = json.loads((ROOT / "test_input.json").read_text())
    job_id = "demo-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    job["id"] = job_id  # RunPod's job id; the worker uses it as job_id when the input names none
    settings.volume_root.mkdir(parents=True, exist_ok=True)
    _last_job_file(settings).write_text(job_id)
    print(json.dumps(job))


def show_result() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from storage.records import SqliteRecords

    settings = WorkerSettings()
    job_id = _last_job_file(settings).read_text().strip()
    row = SqliteRecords(settings.records_path).get_job(job_id)
    if row is None or row["status"] != "succeeded":
        sys.exit(f"job {job_id} did not succeed: {row and row.get('error')}")
    output = row["output"]
    print("\n=== job output ===")
    print(json.dumps(output, indent=2))

    base_path = output["base_model"]["path"]
    adapter_dir = output["adapter"]["uri"].removeprefix("file://")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": QUESTION}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)

    def answer(model) -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    before = answer(base)
    model = PeftModel.from_pretrained(base, adapter_dir)
    print("\n=== the adapter, loaded with PeftModel.from_pretrained ===")
    print(f"adapter:        {adapter_dir}")
    print(f"question:       {QUESTION}")
    print(f"base model:     {before!r}")
    print(f"base + adapter: {answer(model)!r}")
    print(f"loss:           {output['metrics']['first_loss']:.3f} → {output['metrics']['last_loss']:.3f}")


if __name__ == "__main__":
    {"input": make_input, "result": show_result}[sys.argv[1] if len(sys.argv) > 1 else "result"]()
