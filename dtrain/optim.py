"""Optimizer and learning-rate schedules."""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from dtrain.schema import ConfigError, OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Torch param groups: weight decay on matrices only (never on norms, biases), unless an
    `optim.groups` pattern says otherwise; LR scaled by that pattern's `lr_scale` and by
    layer-wise decay (`layer_decay` ** (L + 1 - depth)). Each group's `lr` is its peak LR; the
    schedule multiplies every group alike."""
    from dtrain.finetune import parameter_depths

    depths, layers = parameter_depths(model) if cfg.layer_decay < 1.0 else ({}, 0)
    groups: dict[tuple[float, float, bool], list] = {}  # (lr scale, weight decay, matrix) -> params, in order
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = next((g for g in cfg.groups if fnmatch(name, g.pattern)), None)
        decay = rule.weight_decay if rule and rule.weight_decay is not None else (
            cfg.weight_decay if p.ndim >= 2 else 0.0)
        scale = (rule.lr_scale if rule else 1.0) * cfg.layer_decay ** (layers + 1 - depths.get(id(p), layers + 1))
        groups.setdefault((scale, decay, p.ndim >= 2), []).append(p)
    return [{"params": params, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay, _), params in groups.items()]


def scaled_lr(cfg: OptimConfig, tokens_per_batch: int) -> float:
    """optim.lr, or with lr_scaling=sqrt_tokens lr x sqrt(tokens_per_batch / lr_reference_tokens): an LR
    tuned at one batch size carried to another (the square-root rule for Adam-type optimizers)."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    return cfg.lr * math.sqrt(tokens_per_batch / cfg.lr_reference_tokens)


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """The optimizer optim.* describes. Its argument checks are the schema's constraints on optim.*
    (dtrain/schema.py), checked when the config is loaded; what the library still refuses (a fused
    kernel on a device or dtype it lacks, ...) is a ConfigError naming the keys."""
    groups = param_groups(model, cfg)
    fused = cfg.fused
    try:
        if cfg.name in BNB_OPTIMIZERS:
            # 8-bit states (a quarter of AdamW's memory) and paged states that spill to CPU
            # memory instead of failing on a CUDA out-of-memory spike.
            import bitsandbytes as bnb

            return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.name])(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        if fused is None:
            # torch's fused AdamW covers CUDA and CPU; other devices use the foreach kernel.
            device = next(model.parameters()).device.type
            fused = device in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    except (ValueError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "fused" not in str(exc):
            raise  # (not an argument check)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        hint = "; set optim.fused=false" if fused and "fused" in str(exc).lower() else ""
        raise ConfigError(f"optim.name={cfg.name} (optim.lr={cfg.lr}, optim.betas={list(cfg.betas)}, optim.eps={cfg.eps}, "
                          f"optim.weight_decay={cfg.weight_decay}, optim.fused={cfg.fused}): the optimizer refuses "
                          f"its arguments: {lines[0] if lines else type(exc).__name__}{hint}") from None


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Factor applied to the peak LR for optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup` steps ((step+1)/warmup, so the first step
    already learns); then the decay runs over the remaining steps.
    """
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    after = step - warmup
    progress = min(1.0, after / max(1, total_steps - warmup))
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "step":
        return cfg.gamma ** (after // cfg.step_size)
    if cfg.name == "exponential":
        return cfg.gamma**after
    raise ValueError(f"unknown schedule {cfg.name!r}")


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))
