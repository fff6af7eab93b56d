"""LoRA adapters: PEFT-format loading and validation, and the slots they are served from."""
