"""Parameter-efficient fine-tuning through the peft library: LoRA, DoRA and QLoRA.

QLoRA is LoRA on a base whose linear weights are stored in 4 bits (bitsandbytes NF4/FP4,
loaded by `dtrain.model.load_model`); here it only adds peft's k-bit preparation.
"""

from __future__ import annotations

from torch import nn

from dtrain.schema import PeftConfig


def apply_peft(model: nn.Module, cfg: PeftConfig, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap `model` with (Do)LoRA adapters; only the adapters (and a classification head) train."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.method == "dora",
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    if cfg.method == "qlora":
        # Freezes the base, upcasts norms and the head to fp32 for stability, and (with
        # checkpointing) makes the inputs require grad; the model's own setting is kept.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        # With checkpointing and frozen embeddings, inputs must require grad or no grad flows.
        model.enable_input_require_grads()
    return get_peft_model(model, lora)
