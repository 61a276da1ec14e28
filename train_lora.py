"""PEFT LoRA training: a model folder, a prepared dataset and hyperparameters in; an adapter out.

Thin glue around TRL's ``SFTTrainer`` (no hand-written loop). Knows nothing of RunPod, S3, Supabase or
the environment: progress leaves through ``on_progress``; everything else through the result.
TRL's ``SFTConfig`` defaults (gradient checkpointing on, bf16 on, lr 2e-5) are wrong for a CPU and for
LoRA, so every one that matters is set here on purpose.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


@dataclass(frozen=True)
class Runtime:
    """Where and how training runs: decided once, before any weight is loaded."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    quantization: str  # none | 8bit | 4bit
    gradient_checkpointing: bool


def plan_runtime(hp: Hyperparameters) -> Runtime:
    """Check the request against this machine; raise InputError before any load if it cannot run."""
    import torch

    cuda = torch.cuda.is_available()
    if hp.quantization in ("4bit", "8bit") and not cuda:
        raise InputError(
            f"hyperparameters.quantization '{hp.quantization}' needs a CUDA GPU (bitsandbytes); this "
            "worker has none. Use 'auto' or 'none'"
        )
    quantization = "none" if hp.quantization == "auto" else hp.quantization
    if cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"
    checkpointing = cuda if hp.gradient_checkpointing == "auto" else bool(hp.gradient_checkpointing)
    return Runtime("cuda" if cuda else "cpu", precision, quantization, checkpointing)


def find_target_modules(model, requested: str | list[str]) -> list[str]:
    """The leaf names of the linear layers LoRA adapts; explicit names are checked against the model."""
    import torch.nn as nn

    linear_leaves: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear_leaves.add(name.rsplit(".", 1)[-1])
    if requested in ("auto", "all-linear"):
        chosen = sorted(linear_leaves - EXCLUDED_MODULES)
        if not chosen:
            raise ModelError("the model has no linear projection layers for LoRA to adapt")
        return chosen
    missing = [name for name in requested if name not in linear_leaves]
    if missing:
        raise InputError(
            f"hyperparameters.target_modules {missing} match no linear layer of this model; "
            f"it has: {', '.join(sorted(linear_leaves))}"
        )
    return list(requested)


def quiet_progress_bars() -> None:
    """tqdm bars are carriage-return noise in a worker's log; progress is logged per step instead."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def load_base_model(model_path: Path, runtime: Runtime, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if runtime.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            if runtime.quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": 0}
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


class _ProgressCallback:
    """Forwards the trainer's logs to ``on_progress`` and stops on a non-finite loss."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None] | None):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.started = time.monotonic()

            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.handle_log(state, control, logs or {})

        self.callback = Callback()
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.bad_loss: tuple[int, float] | None = None

    def handle_log(self, state, control, logs: dict[str, Any]) -> None:
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_loss = (state.global_step, loss)
            control.should_training_stop = True
        if loss is None or self.on_progress is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = state.global_step, state.max_steps
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        eta = elapsed / step * (total - step) if step else None
        self.on_progress(ProgressEvent(
            step=step, total_steps=total, loss=float(loss), learning_rate=logs.get("learning_rate"),
            epoch=logs.get("epoch"), tokens_per_second=tokens / elapsed if tokens else None, eta_s=eta,
        ))


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
) -> TrainResult:
    """Train a LoRA adapter and save it to ``output_dir/adapter``; return metrics and the module list.

    With ``init_adapter`` (a verified adapter folder), training continues from that adapter, with its
    own rank, alpha and target modules, instead of starting a new one.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    runtime = runtime or plan_runtime(hp)
    output_dir = Path(output_dir)
    load_started = time.monotonic()
    model = load_base_model(Path(model_path), runtime, trust_remote_code)
    load_seconds = time.monotonic() - load_started
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        saved = model.peft_config["default"].target_modules
        targets = [saved] if isinstance(saved, str) else sorted(saved)  # a str is PEFT's regex form
    else:
        targets = find_target_modules(model, hp.target_modules)
        set_seed(hp.seed)  # the LoRA init draws from the RNG: same seed, same starting adapter
        lora = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            use_rslora=hp.use_rslora,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    active = model.peft_config["default"]
    logger.info("LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters (%.3f%%), %s %s",
                active.r, active.lora_alpha, ",".join(targets),
                f" (continued from {init_adapter})" if init_adapter is not None else "", trainable, total,
                100 * trainable / total, runtime.device, runtime.precision)

    has_eval = data.eval is not None
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
        fp16=runtime.precision == "fp16",
        use_cpu=runtime.device == "cpu",
        gradient_checkpointing=runtime.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=hp.seed,
        data_seed=hp.seed,
        max_length=hp.max_seq_length,
        packing=hp.packing,
        logging_steps=hp.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if hp.eval_steps else "epoch") if has_eval else "no",
        eval_steps=hp.eval_steps,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    progress = _ProgressCallback(on_progress)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[progress.callback, *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; progress is logged by us
    started = time.monotonic()
    try:
        output = trainer.train()
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

    metrics: dict[str, Any] = {
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
    }
    metrics["tokens_per_second"] = metrics["train_tokens"] / train_seconds if train_seconds else None
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics["first_loss"] = losses[0] if losses else None
    metrics["last_loss"] = losses[-1] if losses else None
    if has_eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    adapter_dir = output_dir / "adapter"
    peft_config = model.peft_config["default"]
    # The adapter names its base by canonical id, never by this worker's local path.
    peft_config.base_model_name_or_path = base_model_id
    peft_config.revision = base_revision
    # Embeddings are never adapted; "auto" would look the base up on the Hub to compare vocabularies.
    model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    logger.info("trained %d steps in %.1fs: loss %.4f → %.4f, %s tok/s", metrics["steps"], train_seconds,
                metrics["first_loss"] or float("nan"), metrics["last_loss"] or float("nan"),
                f"{metrics['tokens_per_second']:.0f}" if metrics["tokens_per_second"] else "?")
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        target_modules=targets,
        lora_config=peft_config.to_dict(),
        log_history=list(trainer.state.log_history),
        precision=runtime.precision,
        device=runtime.device,
        load_seconds=load_seconds,
        train_seconds=train_seconds,
        model=model,
    )


def write_training_report(result: TrainResult, folder: Path) -> None:
    """metrics.json, train_log.jsonl and loss.png (train and eval loss by step) into ``folder``."""
    import json

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
