"""Weights: the registry (weights.toml), the Hugging Face Hub and its cache, loading a pipeline (GGUF,
quantization, LoRAs, ControlNets) and CLEAR's checkpoints. May import `core`, `models`, `attention`,
`files` and `errors`; nothing here plans or runs."""
