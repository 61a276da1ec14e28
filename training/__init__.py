"""How training runs: the request, runtime and precision, LoRA targets and peft setup, SFT config, callbacks,
checkpoints, memory plan, launch."""
