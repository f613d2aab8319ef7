"""Load the tokenizer and the model: a local Hugging Face directory or a built-in preset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from dtrain import presets
from dtrain.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(cfg: ModelConfig) -> None:
    """Fail early, naming the key, if model.path or model.tokenizer cannot be loaded."""
    if not presets.is_preset(cfg.path):
        path = Path(cfg.path)
        if not path.is_dir():
            raise ConfigError(
                f"model.path: {cfg.path!r} is neither a local model directory nor a preset "
                f"({', '.join(presets.PRESETS)})"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: {cfg.path!r} has no config.json (is it a Hugging Face model directory?)")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: {cfg.tokenizer!r} is not a directory")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    check_model_path(cfg)
    if cfg.tokenizer is None and presets.is_preset(cfg.path):
        tokenizer = presets.preset_tokenizer(cfg.path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer or cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels -100, attention mask 0).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    check_model_path(cfg)
    if presets.is_preset(cfg.path):
        return presets.preset_config(cfg.path)
    return AutoConfig.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, num_labels: int | None = None, seed: int = 0
) -> nn.Module:
    """Build a preset with random weights or `from_pretrained` a local directory.

    The seed is set right before construction so that randomly initialised weights
    (a preset, a new classification head) are the same in every run and on every rank.
    """
    check_model_path(cfg)
    torch.manual_seed(seed)
    model_cls = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    extra = {"num_labels": num_labels} if cfg.task == "classification" else {}
    if presets.is_preset(cfg.path):
        config = presets.preset_config(cfg.path)
        for key, value in extra.items():
            setattr(config, key, value)
        config._attn_implementation = cfg.attn_implementation
        model = model_cls.from_config(config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)
    else:
        model = model_cls.from_pretrained(
            cfg.path,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    if cfg.task == "classification":
        # Sequence-classification heads pool the last non-pad token: they must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
