"""TRL's SFTConfig, every field that matters set on purpose (its defaults are wrong for a CPU and for LoRA).

TRL's defaults (gradient checkpointing on, bf16 on, lr 2e-5) would silently change a CPU or LoRA run,
so ``build_sft_config`` sets each value itself. Imported only to train (trl at module level).
"""

from __future__ import annotations

from trl import SFTConfig

from config.job import Hyperparameters
from errors import InputError
from training.kernels import keeps_sequence_boundaries
from training.request import TrainRequest


def has_recurrent_layers(config) -> bool:
    """Linear attention / state-space layers carry state along the sequence, across packed examples."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
    return any(kind not in attention for kind in (getattr(text, "layer_types", None) or []))


def plan_batching(hp: Hyperparameters, config) -> str:
    """'packed' (bfd packing), 'padding_free' (one flat row per batch) or 'padded'.

    Both unpadded forms pass position ids restarting at 0 per example and no attention mask, so
    attention never crosses examples. A linear-attention layer carries its state along the row: it
    keeps examples apart only when transformers runs it on the fused kernels (flash-linear-attention
    and causal-conv1d), to which it passes the boundaries TRL's collator computes (``cu_seq_lens_q``
    as ``cu_seqlens``, and ``seq_idx``). Its torch reference code cannot, and raises on them; such a
    model is padded then (docs/linear-attention-padding-free.md).
    """
    recurrent = has_recurrent_layers(config)
    if hp.packing is True:
        if recurrent:
            raise InputError(
                f"hyperparameters.packing true is not supported for {config.model_type}: its linear-"
                "attention layers carry state along a packed row; set packing to 'auto' (padding-free "
                "batches where the fused linear-attention kernels keep examples apart, else padded) or false"
            )
        return "packed"
    if hp.packing == "auto" and (not recurrent or keeps_sequence_boundaries(config.model_type)):
        return "padding_free"
    return "padded"


def build_sft_config(request: TrainRequest, batching: str, has_eval: bool) -> SFTConfig:
    """The SFTConfig of this run: every value chosen here, none left to TRL's defaults."""
    hp = request.hyperparameters
    runtime = request.runtime
    fsdp = request.distributed == "fsdp"
    return SFTConfig(
        output_dir=str(request.checkpoint_dir),
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
        save_total_limit=None,  # rotation by CheckpointKeeper, after the new one is complete
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if request.distributed else None,  # LoRA: every adapter is used
        fsdp="full_shard auto_wrap" if fsdp else None,
        fsdp_config={"use_orig_params": True, "cpu_ram_efficient_loading": True, "sync_module_states": True,
                     "activation_checkpointing": runtime.gradient_checkpointing} if fsdp else None,
    )
