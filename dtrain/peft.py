"""Parameter-efficient fine-tuning through the peft library."""

from __future__ import annotations

from torch import nn

from dtrain.config import PeftConfig


def apply_peft(model: nn.Module, cfg: PeftConfig, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap `model` with LoRA adapters; only the adapters (and a classification head) train."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    if gradient_checkpointing:
        # With checkpointing and frozen embeddings, inputs must require grad or no grad flows.
        model.enable_input_require_grads()
    return get_peft_model(model, lora)
