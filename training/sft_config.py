"""TRL's SFTConfig, every field that matters set on purpose (its defaults are wrong for a CPU and for LoRA)."""

from __future__ import annotations

from config.job import Hyperparameters
from errors import InputError


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
