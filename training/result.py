"""What training returns: the adapter folder, its LoRA settings as applied, metrics and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class LoraSettings(BaseModel):
    """The LoRA that peft really applied (not only what was asked): the manifest's ``peft`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool = False
    target_modules: list[str]
    target_parameters: list[str] = []

    @classmethod
    def from_peft(cls, config, targets) -> LoraSettings:
        """From peft's LoraConfig and the Targets it adapted."""
        return cls(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                   use_rslora=bool(config.use_rslora), target_modules=list(targets.modules),
                   target_parameters=list(targets.parameters))


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]
    lora: LoraSettings
    log_history: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"
    load_seconds: float = 0.0
    train_seconds: float = 0.0
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers that evaluate it

    @property
    def target_modules(self) -> list[str]:
        return self.lora.target_modules

    @property
    def target_parameters(self) -> list[str]:
        """Fused expert weights adapted (peft's ``target_parameters``)."""
        return self.lora.target_parameters
