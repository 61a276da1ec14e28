"""PEFT LoRA training: a model folder, a prepared dataset and hyperparameters in; an adapter out.

Thin glue around TRL's ``SFTTrainer`` (no hand-written loop). Knows nothing of RunPod, S3, Supabase or
the environment: progress leaves through ``on_progress``; everything else through the result.
TRL's ``SFTConfig`` defaults (gradient checkpointing on, bf16 on, lr 2e-5) are wrong for a CPU and for
LoRA, so every one that matters is set here on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from config.job import Hyperparameters
from dataset_loader import PreparedDataset
from errors import TrainingCancelled, TrainingError, WorkerError
from training.callbacks import (
    ProgressCallback,
    ProgressEvent,
    StopControl,
    tensorboard_callback,
)
from training.checkpoints import (
    CheckpointKeeper,
    find_resume_checkpoint,
    run_signature,
    step_of,
)
from training.launch import PROGRESS_PREFIX, RESULT_NAME
from training.loading import load_base_model
from training.result import LoraSettings, TrainResult
from training.runtime import Runtime, plan_runtime
from training.sft_config import plan_batching
from training.targets import Targets, lora_dropout_for, resolve_targets

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# what LoRA adapts


# --------------------------------------------------------------------------------------------------
# batching


# --------------------------------------------------------------------------------------------------
# loading


# --------------------------------------------------------------------------------------------------
# the training loop's hooks


# --------------------------------------------------------------------------------------------------
# training


def train_lora(
    model_path: str | Path,
    data: PreparedDataset,
    hp: Hyperparameters,
    output_dir: str | Path,
    *,
    checkpoint_dir: str | Path,
    tokenizer,
    base_model_id: str,
    base_revision: str | None = None,
    runtime: Runtime | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    trust_remote_code: bool = False,
    callbacks: list | None = None,
    init_adapter: str | Path | None = None,
    max_train_seconds: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    distributed: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter and save it to ``output_dir/adapter``; return metrics and the module list.

    With ``init_adapter`` (a verified adapter folder), training continues from that adapter, with its
    own rank, alpha and target modules, instead of starting a new one. Checkpoints go to
    ``checkpoint_dir`` (complete ones marked, the newest ``save_total_limit`` kept); a run with the
    same settings and data resumes from the newest complete one. ``max_train_seconds`` and
    ``should_stop`` stop at the next step with a checkpoint and raise ``TrainingError`` /
    ``TrainingCancelled`` saying how far it got. ``distributed`` ("ddp" or "fsdp") is set by
    launch.py in each of several processes (torchrun): the Trainer wraps the model accordingly.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    runtime = runtime or plan_runtime(hp)
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir)
    load_started = time.monotonic()
    model = load_base_model(Path(model_path), runtime, trust_remote_code)
    load_seconds = time.monotonic() - load_started
    batching = plan_batching(hp, model.config)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        saved = model.peft_config["default"]
        modules = saved.target_modules
        # a str is PEFT's regex form: keep it one entry
        modules = [modules] if isinstance(modules, str) else sorted(modules or [])
        targets = Targets(modules, sorted(saved.target_parameters or []))
    else:
        targets = resolve_targets(model, hp.target_modules)
        dropout = lora_dropout_for(hp, targets)
        set_seed(hp.seed)  # the LoRA init draws from the RNG: same seed, same starting adapter
        lora = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=dropout,
            use_rslora=hp.use_rslora,
            target_modules=targets.modules,
            target_parameters=targets.parameters or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        # peft 0.21 remaps leaf names of a transformers-4 MoE layout ('gate_proj', 'up_proj',
        # 'down_proj' on qwen2_moe-like models, Qwen3-Next included) onto the fused expert
        # parameters, so a shared expert's Linear layers of those names are not adapted. Report
        # what peft really targets.
        applied = model.peft_config["default"]
        params = set(applied.target_parameters or [])
        params = {p for p in params if not any(q != p and q.endswith("." + p) for q in params)}
        targets = Targets(sorted(applied.target_modules or []), sorted(params))
    trainable, total = model.get_nb_trainable_parameters()
    active = model.peft_config["default"]
    logger.info("LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters (%.3f%%), %s %s, %s batches",
                active.r, active.lora_alpha, ",".join(targets.names),
                f" (continued from {init_adapter})" if init_adapter is not None else "", trainable, total,
                100 * trainable / total, runtime.device, runtime.precision, batching)

    signature = run_signature(hp, data, base_model_id, base_revision)
    resume_from = find_resume_checkpoint(checkpoint_dir, signature)
    has_eval = data.eval is not None
    fsdp = distributed == "fsdp"
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        bf16=runtime.precision == "bf16",
        fp16=runtime.precision == "fp16",  # with the Trainer's loss scaling
        use_cpu=runtime.device == "cpu",
        # Under FSDP, activation checkpointing is FSDP's own (fsdp_config below).
        gradient_checkpointing=runtime.gradient_checkpointing and not fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=hp.seed,
        data_seed=hp.seed,  # the same shuffle on a resume: the Trainer skips the batches already seen
        # Rows are truncated by the dataset stage; only packing needs a length to pack to.
        max_length=hp.max_seq_length if batching != "padding_free" else None,
        packing=batching == "packed",
        packing_strategy="bfd",
        padding_free=batching != "padded",
        logging_steps=hp.logging_steps,
        logging_first_step=True,
        # The default filter logs a NaN/inf step loss as the mean of earlier ones: it would hide
        # exactly the failure that must stop the job.
        logging_nan_inf_filter=False,
        eval_strategy=("steps" if hp.eval_steps else "epoch") if has_eval else "no",
        eval_steps=hp.eval_steps,
        save_strategy="steps",
        save_steps=hp.save_steps or 0.1,  # a float below 1: every tenth of the run
        save_total_limit=None,  # rotation by _CheckpointKeeper, after the new one is complete
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if distributed else None,  # LoRA: every adapter is used
        fsdp="full_shard auto_wrap" if fsdp else None,
        fsdp_config={"use_orig_params": True, "cpu_ram_efficient_loading": True, "sync_module_states": True,
                     "activation_checkpointing": runtime.gradient_checkpointing} if fsdp else None,
    )
    progress = ProgressCallback(on_progress)
    stopper = StopControl(max_train_seconds, should_stop)
    keeper = CheckpointKeeper(checkpoint_dir, signature, hp.save_total_limit)
    tensorboard = tensorboard_callback(output_dir / "tensorboard")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[progress.callback, stopper.callback, keeper.callback,
                   *([tensorboard] if tensorboard else []), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; progress is logged by us
    resumed_step = step_of(resume_from) if resume_from else 0
    if resume_from:
        logger.info("resuming from %s (step %d)", resume_from.name, resumed_step)
    started = time.monotonic()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise TrainingError(
                "the GPU ran out of memory; lower batch_size or max_seq_length, enable "
                "gradient_checkpointing, or use quantization '4bit'"
            ) from exc
        raise
    train_seconds = time.monotonic() - started
    if progress.bad_loss is not None:
        step, loss = progress.bad_loss
        raise TrainingError(
            f"the loss became {loss} at step {step}; lower learning_rate (now {hp.learning_rate}) "
            "or check the data for empty or corrupt examples"
        )
    if stopper.reason is not None:
        where = (f"at step {stopper.step} of {trainer.state.max_steps} (epoch "
                 f"{trainer.state.epoch or 0:.2f}); its checkpoint is kept in {checkpoint_dir}")
        if stopper.reason == "cancelled":
            raise TrainingCancelled(f"training was cancelled {where}; sending the same job "
                                    "(same job_id) again resumes from there")
        raise TrainingError(
            f"training stopped after MAX_TRAIN_SECONDS={max_train_seconds:g}s {where}; run the same "
            "job (same job_id) again to resume from there, or raise MAX_TRAIN_SECONDS together with "
            "the endpoint's executionTimeout", retryable=True)

    this_run_tokens = int(trainer.state.num_input_tokens_seen or 0) - progress.start_tokens
    metrics: dict[str, Any] = {
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
        "resumed_from_step": resumed_step,
        "batching": batching,
        "trainable_parameters": trainable,
    }
    metrics["tokens_per_second"] = this_run_tokens / train_seconds if train_seconds else None
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics["first_loss"] = losses[0] if losses else None
    metrics["last_loss"] = losses[-1] if losses else None
    if has_eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if tensorboard is not None and tensorboard.tb_writer is not None:
        tensorboard.tb_writer.close()

    adapter_dir = output_dir / "adapter"
    peft_config = model.peft_config["default"]
    # The adapter names its base by canonical id, never by this worker's local path.
    peft_config.base_model_name_or_path = base_model_id
    peft_config.revision = base_revision
    # Embeddings are never adapted; "auto" would look the base up on the Hub to compare vocabularies.
    if distributed:
        # Every rank joins the gather (FSDP shards); rank 0 alone writes.
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.is_world_process_zero():
            model.save_pretrained(str(adapter_dir), state_dict=state, save_embedding_layers=False)
        trainer.accelerator.wait_for_everyone()
    else:
        model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    logger.info("trained %d steps in %.1fs: loss %.4f → %.4f, %s tok/s", metrics["steps"], train_seconds,
                metrics["first_loss"] or float("nan"), metrics["last_loss"] or float("nan"),
                f"{metrics['tokens_per_second']:.0f}" if metrics["tokens_per_second"] else "?")
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        lora=LoraSettings.from_peft(peft_config, targets),
        log_history=list(trainer.state.log_history),
        precision=runtime.precision,
        device=runtime.device,
        load_seconds=load_seconds,
        train_seconds=train_seconds,
        model=model,
    )


def rank_main(spec_path: str) -> int:
    """One rank: rebuild the inputs from the spec, train, and (rank 0) write the outcome."""
    from datasets import load_from_disk

    from config.job import Hyperparameters
    from dataset_loader import PreparedDataset, load_tokenizer
    from train_lora import train_lora
    from training.runtime import Runtime

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s rank" + os.environ.get("RANK", "0") + " %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    stop_file = Path(spec["stop_file"])

    def report(event) -> None:
        if rank0:
            print(PROGRESS_PREFIX + json.dumps(asdict(event)), flush=True)

    class _Report:  # what train_lora reads from data.report
        def __init__(self, values: dict[str, Any]):
            self.__dict__.update(values)

        def to_dict(self):
            return dict(self.__dict__)

    outcome: dict[str, Any]
    try:
        data = PreparedDataset(train=load_from_disk(str(work / "train")),
                               eval=load_from_disk(str(work / "eval")) if (work / "eval").exists() else None,
                               report=_Report(spec["report"]))
        result = train_lora(
            spec["model_path"], data, Hyperparameters(**spec["hyperparameters"]), spec["output_dir"],
            checkpoint_dir=spec["checkpoint_dir"], tokenizer=load_tokenizer(Path(spec["tokenizer_path"])),
            base_model_id=spec["base_model_id"], base_revision=spec["base_revision"],
            runtime=Runtime(**spec["runtime"]), on_progress=report,
            trust_remote_code=spec["trust_remote_code"], max_train_seconds=spec["max_train_seconds"],
            should_stop=stop_file.exists, distributed=spec["strategy"],
            init_adapter=Path(spec["init_adapter"]) if spec.get("init_adapter") else None,
        )
        outcome = {"adapter_dir": str(result.adapter_dir), "metrics": result.metrics,
                   "lora": result.lora.model_dump(mode="json"),
                   "log_history": result.log_history, "precision": result.precision, "device": result.device,
                   "load_seconds": result.load_seconds, "train_seconds": result.train_seconds}
    except WorkerError as exc:
        outcome = {"error": {"class": type(exc).__name__, "stage": exc.stage, "message": exc.message,
                             "retryable": exc.retryable}}
    if rank0:
        tmp = work / f".{RESULT_NAME}.tmp"
        tmp.write_text(json.dumps(outcome, default=str))
        os.replace(tmp, work / RESULT_NAME)
    return 0 if "error" not in outcome else 1


if __name__ == "__main__":  # one rank of a multi-GPU job, started by training/launch.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(rank_main(sys.argv[1]))
