"""Put the demo's base model and dataset on the (local) volume, as a user would on RunPod's.

    python demo/build_demo.py          # → $VOLUME_ROOT/models/tiny-llama-demo, datasets/demo-capitals.jsonl

Deterministic: the same files every time. Existing complete folders are left alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import WorkerSettings  # noqa: E402
from demo.tiny_models import build_tiny_model, chat_corpus  # noqa: E402

DEMO_MODEL = "tiny-llama-demo"
DEMO_DATA = ROOT / "demo" / "data" / "capitals.jsonl"


def main() -> None:
    settings = WorkerSettings()
    model_dir = build_tiny_model(settings.models_root / DEMO_MODEL, family="llama",
                                 corpus=chat_corpus(DEMO_DATA))
    data_dir = settings.volume_root / "datasets"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEMO_DATA, data_dir / "demo-capitals.jsonl")
    print(f"demo base model: {model_dir}")
    print(f"demo dataset:    {data_dir / 'demo-capitals.jsonl'}")


if __name__ == "__main__":
    main()
