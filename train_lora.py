"""PEFT LoRA training: a TrainRequest and a prepared dataset in; an adapter and a TrainResult out.

Thin glue around TRL's ``SFTTrainer`` (no hand-written loop), in the shape of TRL's scripts/sft.py:
config in, model loaded, LoRA applied, trainer built, trained, result out. Knows nothing of RunPod,
S3, Supabase or the environment: progress leaves through ``on_progress``; everything else through
the result. The SFTConfig is training/sft_config.py's, every value set on purpose.

``python train_lora.py SPEC`` is one rank of a multi-process job (started by training/launch.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from transformers import PrinterCallback, TrainerCallback
from trl import SFTTrainer

from dataset_loader import PreparedDataset, load_tokenizer
from errors import TrainingError, WorkerError
from files import write_json_atomic
from training.base_cache import BaseLease
from training.callbacks import ProgressCallback, StopControl, raise_if_stopped, tensorboard_callback
from training.checkpoints import CheckpointKeeper, find_resume_checkpoint, run_signature, step_of
from training.kernels import detect_kernels, kernels_in_use
from training.launch import PROGRESS_PREFIX, RESULT_NAME, STOP_NAME, launch_dir, load_dataset, rank_failure
from training.loading import load_base_model
from training.memory_plan import measure_loaded
from training.peft_setup import apply_lora
from training.request import TrainRequest
from training.result import LoraSettings, ProgressEvent, RankOutcome, TrainResult
from training.sft_config import build_sft_config, plan_batching

logger = logging.getLogger(__name__)


def train_lora(request: TrainRequest, data: PreparedDataset, *, tokenizer,
               on_progress: Callable[[ProgressEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               callbacks: list[TrainerCallback] | None = None, base: BaseLease | None = None) -> TrainResult:
    """Train a LoRA adapter and save it to ``output_dir/adapter``; return metrics and what was adapted.

    Checkpoints go to ``request.checkpoint_dir`` (complete ones marked, the newest
    ``save_total_limit`` kept); a run with the same settings and data resumes from the newest
    complete one. ``max_train_seconds`` and ``should_stop`` stop at the next step with a checkpoint
    and raise ``TrainingError`` / ``TrainingCancelled`` saying how far it got.

    ``base``: a lease on the base (training/base_cache.py). Its model, when it holds one, is used
    instead of loading, a load it has in flight (``start_loading``) is waited for, and a base loaded
    here is handed to it; the adapter wrapped around the base is named on it, so the lease can take
    the adapter out again however training ends.
    """
    hp = request.hyperparameters
    load_started = time.monotonic()
    if base is not None:  # kept from an earlier job, loading in its thread (start_loading), or loaded now
        model = base.take(lambda: _load(request))
    else:
        model = _load(request)
    load_seconds = time.monotonic() - load_started  # with a load in its thread: only the wait for it
    measured = measure_loaded(model)  # before LoRA: the base's weights, to set against the memory plan
    batching = plan_batching(hp, model.config)
    model, targets = apply_lora(model, request, batching)
    if base is not None:
        base.wrapped = model
    trainable = model.get_nb_trainable_parameters()[0]  # before the Trainer wraps (FSDP: shards) it

    signature = run_signature(hp, data, request.base_model_id, request.base_revision)
    resume_from = find_resume_checkpoint(request.checkpoint_dir, signature)
    progress = ProgressCallback(on_progress)
    stopper = StopControl(request.max_train_seconds, should_stop)
    keeper = CheckpointKeeper(request.checkpoint_dir, signature, hp.save_total_limit)
    tensorboard = tensorboard_callback(request.output_dir / "tensorboard")
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(request, batching, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[progress, stopper, keeper, *([tensorboard] if tensorboard else []), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; progress is logged by us
    resumed_step = step_of(resume_from) if resume_from else 0
    if resume_from:
        logger.info("resuming from %s (step %d)", resume_from.name, resumed_step)

    started = time.monotonic()
    output = _run(trainer, resume_from)
    train_seconds = time.monotonic() - started
    raise_if_stopped(progress, stopper, trainer.state, request)
    metrics = _metrics(trainer.state, output, progress, train_seconds, resumed_step=resumed_step,
                       batching=batching, trainable=trainable)
    if data.eval is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if tensorboard is not None and tensorboard.tb_writer is not None:
        tensorboard.tb_writer.close()

    adapter_dir = _save_adapter(trainer, model, request)
    logger.info("trained %d steps in %.1fs: loss %.4f → %.4f, %s tok/s", metrics["steps"], train_seconds,
                metrics["first_loss"] or float("nan"), metrics["last_loss"] or float("nan"),
                f"{metrics['tokens_per_second']:.0f}" if metrics["tokens_per_second"] else "?")
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        lora=LoraSettings.from_peft(model.peft_config["default"], targets),
        log_history=list(trainer.state.log_history),
        precision=request.runtime.precision,
        device=request.runtime.device,
        load_seconds=load_seconds,
        measured_bytes=measured,
        train_seconds=train_seconds,
        attention=getattr(model.config, "_attn_implementation", None),
        kernels=kernels_in_use(model, detect_kernels(request.runtime.device == "cuda")),
        model=model,
    )


def start_loading(request: TrainRequest, base: BaseLease) -> None:
    """Start loading the base in a thread of its own, so the caller can tokenize meanwhile; ``train_lora``
    with the same lease waits for it. Nothing starts when the lease already holds the base."""
    base.start_load(lambda: _load(request))


def _load(request: TrainRequest):
    return load_base_model(request.model_path, request.runtime, request.trust_remote_code,
                           local_rank=request.local_rank, world_size=request.world_size)


def _run(trainer: SFTTrainer, resume_from: Path | None):
    """``trainer.train``, with an out-of-memory error a user can act on."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise TrainingError(
                "the GPU ran out of memory; lower batch_size or max_seq_length, enable "
                "gradient_checkpointing, or use quantization '4bit'"
            ) from exc
        raise


def _metrics(state, output, progress: ProgressCallback, train_seconds: float, *, resumed_step: int,
             batching: str, trainable: int) -> dict[str, Any]:
    """The run's figures; speed counts this run's tokens only (a resumed run started part-way)."""
    seen = int(state.num_input_tokens_seen or 0)
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {
        "train_loss": output.training_loss,
        "steps": state.global_step,
        "epochs": state.epoch,
        "train_tokens": seen,
        "resumed_from_step": resumed_step,
        "batching": batching,
        "trainable_parameters": trainable,
        "tokens_per_second": (seen - progress.start_tokens) / train_seconds if train_seconds else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def _save_adapter(trainer: SFTTrainer, model, request: TrainRequest) -> Path:
    adapter_dir = request.output_dir / "adapter"
    peft_config = model.peft_config["default"]
    # The adapter names its base by canonical id, never by this worker's local path.
    peft_config.base_model_name_or_path = request.base_model_id
    peft_config.revision = request.base_revision
    # Embeddings are never adapted; "auto" would look the base up on the Hub to compare vocabularies.
    if request.distributed:
        # Every rank joins the gather (FSDP shards); rank 0 alone writes.
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.is_world_process_zero():
            model.save_pretrained(str(adapter_dir), state_dict=state, save_embedding_layers=False)
        trainer.accelerator.wait_for_everyone()
    else:
        model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    return adapter_dir


def rank_main(spec_path: str) -> int:
    """One rank: the request from the spec, train, and write the outcome next to it (rank 0, or a rank
    that failed)."""
    # The entry point reads torchrun's environment, once; below it, the rank is in the request.
    rank, local_rank, world_size = (int(os.environ.get(name, default)) for name, default in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    request = TrainRequest.model_validate_json(Path(spec_path).read_text()).for_rank(rank, local_rank, world_size)
    work = launch_dir(request)

    def report(event: ProgressEvent) -> None:
        if rank == 0:
            print(PROGRESS_PREFIX + event.model_dump_json(), flush=True)

    try:
        tokenizer = load_tokenizer(request.tokenizer_path or request.model_path)
        result = train_lora(request, load_dataset(work), tokenizer=tokenizer, on_progress=report,
                            should_stop=(work / STOP_NAME).exists)
        outcome = RankOutcome(result=result)
    except WorkerError as exc:
        outcome = RankOutcome(failure=rank_failure(exc))
    # Rank 0 writes the result. A failing rank writes its failure too: torchrun stops the others as
    # soon as one exits with an error, and rank 0 may be stopped before it has written anything.
    if rank == 0 or outcome.failure is not None:
        write_json_atomic(work / RESULT_NAME, outcome.model_dump(mode="json"))
    return 0 if outcome.failure is None else 1


if __name__ == "__main__":  # one rank of a multi-GPU job, started by training/launch.py
    sys.exit(rank_main(sys.argv[1]))
