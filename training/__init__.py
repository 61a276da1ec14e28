"""How training runs: runtime and precision, LoRA targets, SFT config, callbacks, checkpoints, memory plan, launch."""
