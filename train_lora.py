"""PEFT LoRA training: a model folder, a prepared dataset and hyperparameters in; an adapter out.

Thin glue around TRL's ``SFTTrainer`` (no hand-written loop). Knows nothing of RunPod, S3, Supabase or
the environment: progress leaves through ``on_progress``; everything else through the result.
TRL's ``SFTConfig`` defaults (gradient checkpointing on, bf16 on, lr 2e-5) are wrong for a CPU and for
LoRA, so every one that matters is set here on purpose.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from checkpoints import CHECKPOINT_MARKER, CheckpointKeeper, find_resume_checkpoint, run_signature, step_of  # noqa: F401
from config.job import Hyperparameters
from dataset_loader import PreparedDataset
from errors import InputError, ModelError, TrainingError

logger = logging.getLogger(__name__)

# Never adapted by "auto": output head, embeddings, and mixture-of-experts routers, whose adapters
# would change which experts run rather than what they compute.
EXCLUDED_MODULES = frozenset({"lm_head", "embed_tokens", "gate", "shared_expert_gate", "router",
                              "score", "classifier"})


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    epoch: float | None
    tokens_per_second: float | None
    eta_s: float | None


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


class TrainingCancelled(TrainingError):
    """The job was cancelled (RunPod cancel): training stopped at a step boundary, checkpoint kept."""


@dataclass(frozen=True)
class Runtime:
    """Where and how training runs: decided once, before any weight is loaded."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    quantization: str  # none | 8bit | 4bit
    gradient_checkpointing: bool


def plan_runtime(hp: Hyperparameters, memory_plan=None) -> Runtime:
    """Check the request against this machine; raise InputError before any load if it cannot run.

    ``quantization: auto`` takes the memory plan's choice (none when the model fits in 16 bits, else
    4-bit), and is always none on a CPU.
    """
    import torch

    cuda = torch.cuda.is_available()
    if hp.quantization in ("4bit", "8bit") and not cuda:
        raise InputError(
            f"hyperparameters.quantization '{hp.quantization}' needs a CUDA GPU (bitsandbytes); this "
            "worker has none. Use 'auto' or 'none'"
        )
    if hp.quantization != "auto":
        quantization = hp.quantization
    elif memory_plan is not None and cuda:
        quantization = memory_plan.quantization
    else:
        quantization = "none"
    if cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"
    checkpointing = cuda if hp.gradient_checkpointing == "auto" else bool(hp.gradient_checkpointing)
    return Runtime("cuda" if cuda else "cpu", precision, quantization, checkpointing)


# --------------------------------------------------------------------------------------------------
# what LoRA adapts


@dataclass(frozen=True)
class Targets:
    """Linear layers LoRA wraps (by leaf name) and fused expert weights it wraps as parameters."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [*self.modules, *self.parameters]


def _generic_name(module_path: str) -> str:
    """'model.layers.7.mlp.experts' → 'mlp.experts': the same name in every layer."""
    import re

    return re.sub(r"^.*?\.\d+\.", "", module_path)


def fused_expert_parameters(model) -> list[str]:
    """The 3-D routed-expert weights (transformers 5 fuses each layer's experts into one parameter).

    Returned as 'mlp.experts.gate_up_proj'-style names for peft's ``target_parameters``. Convolutions
    (linear attention's short conv is 3-D too) and anything outside an experts module are ignored.
    """
    import torch.nn as nn

    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "expert" not in type(module).__name__.lower() and leaf != "experts":
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3:
                found.add(f"{_generic_name(name)}.{pname}")
    return sorted(found)


def _linear_leaves(model) -> set[str]:
    import torch.nn as nn

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def resolve_targets(model, requested: str | list[str]) -> Targets:
    """What LoRA adapts: linear projections, plus fused expert weights for mixture-of-experts models.

    ``auto``: every linear layer but heads, embeddings and routers, and the fused routed experts.
    ``all-linear``: the linear layers only. A list: each name is a linear layer's leaf name or a fused
    expert parameter ('gate_up_proj', 'experts.down_proj' or 'mlp.experts.down_proj').
    """
    linear = _linear_leaves(model)
    fused = fused_expert_parameters(model)
    if requested in ("auto", "all-linear"):
        modules = sorted(linear - EXCLUDED_MODULES)
        parameters = fused if requested == "auto" else []
        if not modules and not parameters:
            raise ModelError("the model has no linear projection layers for LoRA to adapt")
        return Targets(modules, parameters)
    modules, parameters, missing = [], [], []
    for name in requested:
        matches = [p for p in fused if p == name or p.endswith("." + name)]
        if name in linear:
            modules.append(name)
        elif matches:
            parameters.extend(m for m in matches if m not in parameters)
        else:
            missing.append(name)
    if missing:
        fused_text = f"; fused expert weights: {', '.join(fused)}" if fused else ""
        raise InputError(
            f"hyperparameters.target_modules {missing} match no linear layer or expert weight of this "
            f"model; it has linear layers: {', '.join(sorted(linear))}{fused_text}"
        )
    return Targets(modules, parameters)


def lora_dropout_for(hp: Hyperparameters, targets: Targets) -> float:
    """peft cannot apply dropout inside a fused expert weight (its ParamWrapper refuses any).

    The default dropout gives way to 0 there, and says so; a dropout the user asked for is an error.
    """
    if not targets.parameters or hp.lora_dropout == 0:
        return hp.lora_dropout
    if "lora_dropout" in hp.model_fields_set:
        raise InputError(
            f"hyperparameters.lora_dropout must be 0 when fused expert weights "
            f"({', '.join(targets.parameters)}) are adapted: peft's LoRA on parameters has no dropout; "
            f"got {hp.lora_dropout}. Set lora_dropout to 0, or list target_modules without the experts"
        )
    logger.info("lora_dropout 0 instead of the default %g: fused expert weights are adapted",
                hp.lora_dropout)
    return 0.0


# --------------------------------------------------------------------------------------------------
# batching


def has_recurrent_layers(config) -> bool:
    """Linear attention / state-space layers carry state along the sequence, across packed examples."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
    return any(kind not in attention for kind in (getattr(text, "layer_types", None) or []))


def plan_batching(hp: Hyperparameters, config) -> str:
    """'packed' (bfd packing), 'padding_free' (one flat row per batch) or 'padded'.

    Both unpadded forms pass position ids restarting at 0 per example and no attention mask, so
    attention never crosses examples. A linear-attention layer's recurrent state would, on the
    reference kernels (they ignore sequence boundaries), so such models are padded.
    """
    recurrent = has_recurrent_layers(config)
    if hp.packing is True:
        if recurrent:
            raise InputError(
                f"hyperparameters.packing true is not supported for {config.model_type}: its linear-"
                "attention layers would carry state from one packed example into the next; set packing "
                "to false or 'auto'"
            )
        return "packed"
    if hp.packing == "auto" and not recurrent:
        return "padding_free"
    return "padded"


# --------------------------------------------------------------------------------------------------
# loading


def quiet_progress_bars() -> None:
    """tqdm bars are carriage-return noise in a worker's log; progress is logged per step instead."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def quantization_config(quantization: str, compute_dtype):
    """bitsandbytes settings: NF4 with double quantization (QLoRA), or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model_path: Path, runtime: Runtime, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if runtime.quantization != "none":
        kwargs["quantization_config"] = quantization_config(runtime.quantization, dtype)
        # bitsandbytes quantizes while placing: the whole model on this process's device.
        kwargs["device_map"] = {"": _local_device(runtime)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the base model from {model_path}: {exc}") from exc
    if runtime.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=runtime.gradient_checkpointing
        )
    model.config.use_cache = False  # caches are for generation; they waste memory in training
    return model


def _local_device(runtime: Runtime):
    if runtime.device != "cuda":
        return "cpu"
    return int(os.environ.get("LOCAL_RANK", "0"))  # accelerate sets it per process; 0 when alone


# --------------------------------------------------------------------------------------------------
# the training loop's hooks


class _ProgressCallback:
    """Forwards the trainer's logs to ``on_progress`` and stops on a non-finite loss."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None] | None):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()
                # A resumed run starts at its checkpoint's step: speed and ETA count this run only.
                outer.start_step = state.global_step
                outer.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.handle_log(state, control, logs or {})

        self.callback = Callback()
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.bad_loss: tuple[int, float] | None = None

    def handle_log(self, state, control, logs: dict[str, Any]) -> None:
        loss = logs.get("loss")
        grad_norm = logs.get("grad_norm")
        if loss is not None and not math.isfinite(loss):
            self.bad_loss = (state.global_step, loss)
        elif grad_norm is not None and not math.isfinite(grad_norm):
            self.bad_loss = (state.global_step, float("nan"))  # NaN gradients have poisoned the weights
        if self.bad_loss is not None:
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of broken weights is worth nothing
        if loss is None or self.on_progress is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = state.global_step, state.max_steps
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else None
        self.on_progress(ProgressEvent(
            step=step, total_steps=total, loss=float(loss), learning_rate=logs.get("learning_rate"),
            epoch=logs.get("epoch"), tokens_per_second=tokens / elapsed if tokens > 0 else None, eta_s=eta,
        ))


class _StopControl:
    """Stops at the next step boundary, with a checkpoint, on a cancel or when the time is up."""

    def __init__(self, max_seconds: float | None, should_stop: Callable[[], bool] | None):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                outer.check(state, control, args.device)

        self.callback = Callback()
        self.max_seconds = max_seconds
        self.should_stop = should_stop
        self.started = time.monotonic()
        self.reason: str | None = None
        self.step = 0

    def check(self, state, control, device=None) -> None:
        if self.should_stop is not None and self.should_stop():
            self.reason = "cancelled"
        elif self.max_seconds is not None and time.monotonic() - self.started >= self.max_seconds:
            self.reason = "time"
        self.reason = _agree(self.reason, device)
        if self.reason and state.global_step < state.max_steps:
            self.step = state.global_step
            control.should_training_stop = True
            control.should_save = True
        else:
            self.reason = None  # the last step: finishing is better than stopping


_STOP_REASONS = (None, "time", "cancelled")


def _agree(reason: str | None, device) -> str | None:
    """With several processes, all stop at the same step or none does (else a collective hangs)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return reason
    flag = torch.tensor([_STOP_REASONS.index(reason)], device=device or "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a small sync point per step, only when distributed
    return _STOP_REASONS[int(flag.item())]


def _tensorboard_callback(log_dir: Path):
    """Event files next to metrics.json; None (with a warning) where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard event files for this job")
        return None
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))
    callback.logging_dir = str(log_dir)  # a writer reopened after train() (final eval) goes here too
    return callback


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
    progress = _ProgressCallback(on_progress)
    stopper = _StopControl(max_train_seconds, should_stop)
    keeper = CheckpointKeeper(checkpoint_dir, signature, hp.save_total_limit)
    tensorboard = _tensorboard_callback(output_dir / "tensorboard")
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
        target_modules=targets.modules,
        lora_config=peft_config.to_dict(),
        log_history=list(trainer.state.log_history),
        precision=runtime.precision,
        device=runtime.device,
        load_seconds=load_seconds,
        train_seconds=train_seconds,
        model=model,
        target_parameters=targets.parameters,
    )


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
