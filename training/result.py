"""What training returns: the adapter folder, its LoRA settings as applied, metrics and timings.

All of it serialisable: the ranks of a multi-process job send their result (or their error) back
to the worker as JSON, and their progress as one line per event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class ProgressEvent(BaseModel):
    """One logged training step, as ``on_progress`` receives it."""

    # A NaN loss is news (training stops on it): it crosses from a rank as NaN, not as null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    epoch: float | None
    tokens_per_second: float | None
    eta_s: float | None


class TrainResult(BaseModel):
    # Metrics and log entries keep a NaN as NaN on their way back from a rank (json.dumps does too).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    adapter_dir: Path
    metrics: dict[str, Any]
    lora: LoraSettings
    log_history: list[dict[str, Any]] = []
    precision: str = "fp32"
    device: str = "cpu"
    load_seconds: float = 0.0
    # What the loaded base held (training/memory_plan.measure_loaded), set against the plan by the pipeline.
    measured_bytes: dict[str, Any] | None = None
    train_seconds: float = 0.0
    # The attention implementation the model ran with, and the optional kernels it really used.
    attention: str | None = None
    kernels: dict[str, str] = {}
    # The trained PeftModel, for callers that evaluate it; never serialised (a rank's stays there).
    model: Any = Field(default=None, exclude=True, repr=False)

    @property
    def target_modules(self) -> list[str]:
        return self.lora.target_modules

    @property
    def target_parameters(self) -> list[str]:
        """Fused expert weights adapted (peft's ``target_parameters``)."""
        return self.lora.target_parameters


class RankFailure(BaseModel):
    """A rank's WorkerError, to be raised again as the same class in the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_class: str
    stage: str
    message: str
    retryable: bool


class RankOutcome(BaseModel):
    """What rank 0 (or a rank that failed) writes when a multi-process run ends: the result, or the error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    result: TrainResult | None = None
    failure: RankFailure | None = None
