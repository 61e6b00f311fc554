"""Training: LoRA / QLoRA supervised fine-tuning on chat rows (`finetune`)."""
