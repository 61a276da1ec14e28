"""What one training run needs, as one serialisable value: pipeline builds it, every rank reads it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from config.job import Hyperparameters
from training.runtime import Runtime


class TrainRequest(BaseModel):
    """Everything ``train_lora`` needs except the data, the tokenizer and the live callbacks.

    A multi-process job writes ``model_dump_json()`` as the spec of its ranks and each rank reads it
    back with ``model_validate_json``; the rank entry adds its place among the processes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path
    # The tokenizer's folder when it is not the model's (a staged copy of the weights may lack it).
    tokenizer_path: Path | None = None
    hyperparameters: Hyperparameters
    output_dir: Path  # the adapter goes to output_dir/adapter
    # Kept across attempts: a re-delivered job resumes from its newest complete checkpoint.
    checkpoint_dir: Path
    base_model_id: str  # canonical id, written into the adapter instead of this worker's local path
    base_revision: str | None = None
    runtime: Runtime
    trust_remote_code: bool = False
    # A verified adapter folder to continue from, with its own rank, alpha and target modules.
    init_adapter: Path | None = None
    max_train_seconds: float | None = None
    # Several processes (torchrun): the Trainer wraps the model in DDP or FSDP.
    distributed: Literal["ddp", "fsdp"] | None = None
    rank: int = Field(default=0, ge=0)
    local_rank: int = Field(default=0, ge=0)  # the GPU of this process on its machine
    world_size: int = Field(default=1, ge=1)

    @field_serializer("hyperparameters")
    def _as_sent(self, hp: Hyperparameters) -> dict[str, Any]:
        # Only the fields the job set: a rank must see the same ``model_fields_set`` (lora_dropout_for
        # tells a default dropout from one the user asked for).
        return hp.model_dump(mode="json", exclude_unset=True)

    def for_rank(self, rank: int, local_rank: int, world_size: int) -> TrainRequest:
        """This request as one process of a multi-process job sees it."""
        return self.model_validate({**self.model_dump(), "rank": rank, "local_rank": local_rank,
                                    "world_size": world_size})
