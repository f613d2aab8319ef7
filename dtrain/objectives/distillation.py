"""Knowledge distillation: a frozen teacher's softened predictions as a second target.

    loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss

(Hinton et al., 2015: the T^2 keeps the gradient scale of the soft term independent of T.)
The task is the objective of model.task (next-token or classification), which computes both
terms (`distillation_loss`; a language model's over the vocabulary from both LM heads in chunks,
dtrain.lm_head, so that neither model's logits are ever held whole). Both are sums over the
task's trained positions, normalised with the task loss by the number of targets in the whole
optimizer step, so accumulation and world size change nothing. The teacher is loaded like the student (same task, dtype, attention) and placed
or sharded by the strategy like it; evaluation reports the task's metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.objectives.base import Objective, frozen_copy
from dtrain.objectives.causal_lm import CausalLM
from dtrain.objectives.classification import Classification

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config, ModelConfig

TEACHER = "distill.teacher"
TASKS = {task.model_task: task for task in (CausalLM, Classification)}  # model.task -> what the student learns


class Distillation(Objective):
    name = "distillation"
    data_formats = tuple(fmt for task in TASKS.values() for fmt in task.data_formats)

    def __init__(self, task: CausalLM | Classification, teacher: nn.Module | None, *, alpha: float, temperature: float):
        self.task, self.teacher, self.alpha, self.temperature = task, teacher, alpha, temperature

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "Distillation":
        task = TASKS[cfg.model.task].from_config(cfg, data, {})
        return cls(task, frozen.get(TEACHER), alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        if cfg.distill.teacher is None:
            raise ValueError("train.objective=distillation needs distill.teacher: a local model directory or a preset")
        if cfg.model.task not in TASKS:
            raise ValueError(f"distill.teacher: distillation trains a causal_lm or classification student, not "
                             f"model.task={cfg.model.task}; remove distill.teacher or change model.task")
        TASKS[cfg.model.task].check_data(cfg)

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        return TASKS[cfg.model.task].metric_names(cfg)

    @classmethod
    def frozen_models(cls, cfg: "Config") -> dict[str, "ModelConfig"]:
        return {TEACHER: frozen_copy(cfg, cfg.distill.teacher)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.task.count(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("distillation was built without its teacher (only for evaluation)")
        return self.task.distillation_loss(model, self.teacher, batch, alpha=self.alpha, temperature=self.temperature)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        return self.task.eval_sums(model, batch)

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.task.eval_metrics(sums)

    def worst_examples(self, batch: dict[str, torch.Tensor], scored: Any, index: torch.Tensor) -> list:
        return self.task.worst_examples(batch, scored, index)
