"""Knowledge distillation: a frozen teacher's softened predictions as a second target.

    loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss

(Hinton et al., 2015: the T^2 keeps the gradient scale of the soft term independent of T.)
Both terms are sums over the trained positions, normalised with the task loss by the number
of targets in the whole optimizer step, so accumulation and world size change nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import Config, ConfigError, ModelConfig


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Sum over the positions where `mask` is true of KL(softmax(teacher/T) || softmax(student/T)) * T^2."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_position * mask).sum() * temperature**2


def teacher_config(cfg: Config) -> ModelConfig:
    """The teacher is loaded like the student (same task, dtype, attention), from distill.teacher."""
    return cfg.model.model_copy(update={"path": cfg.distill.teacher, "tokenizer": None, "gradient_checkpointing": False,
                                        "compile": False})


def check_same_tokenizer(student: object, teacher: object, teacher_path: str) -> None:
    """The soft targets are distributions over the teacher's vocabulary: it must be the student's."""
    if student.get_vocab() != teacher.get_vocab():
        raise ConfigError(f"distill.teacher={teacher_path} has another tokenizer than the student "
                          f"({len(teacher.get_vocab())} vs {len(student.get_vocab())} tokens, or other ids); "
                          "distillation needs the same vocabulary")


def load_teacher(cfg: Config, tokenizer: object, num_labels: int | None, strategy) -> nn.Module:
    from dtrain.model import load_model, load_tokenizer

    model_cfg = teacher_config(cfg)
    check_same_tokenizer(tokenizer, load_tokenizer(model_cfg), cfg.distill.teacher)
    teacher = load_model(model_cfg, tokenizer, num_labels=num_labels, seed=cfg.seed, device=strategy.device)
    return strategy.wrap_frozen(teacher)
