"""Find and describe a base model: its signature, safetensors headers, Hub download and cache, staging."""
