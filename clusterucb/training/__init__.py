"""LoRA training with AdamW and its learning-rate schedule, resumable."""
