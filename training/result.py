"""What training returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]
    target_modules: list[str]
    lora_config: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"
    load_seconds: float = 0.0
    train_seconds: float = 0.0
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers that evaluate it
    target_parameters: list[str] = field(default_factory=list)  # fused expert weights adapted
