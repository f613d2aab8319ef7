"""Training objectives: one module each, behind one small interface (base.py).

    causal_lm.py       next-token loss on the trained tokens (completion-only masking)
    classification.py  the sequence-classification head's loss; accuracy, F1, confusion matrix
    distillation.py    a frozen teacher's soft targets mixed into the task's loss

`train.objective` names one (auto: distillation when distill.teacher is set, else model.task).
A new objective is a module here, one entry in OBJECTIVES and its name among the schema's
allowed values of train.objective (a test keeps the two equal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dtrain.objectives.base import Objective
from dtrain.objectives.causal_lm import CausalLM
from dtrain.objectives.classification import Classification
from dtrain.objectives.distillation import TASKS, Distillation

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config

__all__ = ["OBJECTIVES", "CausalLM", "Classification", "Distillation", "Objective", "build_objective", "objective_class",
           "objective_name"]

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CausalLM, Classification, Distillation)}


def objective_name(cfg: "Config") -> str:
    if cfg.train.objective != "auto":
        return cfg.train.objective
    return Distillation.name if cfg.distill.teacher is not None else TASKS[cfg.model.task].name


def objective_class(cfg: "Config") -> type[Objective]:
    return OBJECTIVES[objective_name(cfg)]


def build_objective(cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> Objective:
    return objective_class(cfg).from_config(cfg, data, frozen)
