"""Training objectives: one module each, behind one small interface (base.py).

    causal_lm.py       next-token loss on the trained tokens (completion-only masking)
    classification.py  the sequence-classification head's loss; accuracy, F1, confusion matrix
    distillation.py    a frozen teacher's soft targets mixed into the task's loss
    preference.py      what the preference objectives share: responses' log-probabilities, the
                       reference model (adapters off, a frozen copy, or precomputed), the metrics
    dpo.py             DPO (with conservative label smoothing) and IPO, against a reference
    simpo.py           SimPO: length-normalised, reference-free, with a target margin
    orpo.py            ORPO: SFT plus an odds-ratio term, reference-free
    kto.py             KTO on unpaired judgements (data.format=unpaired_preference)
    reward_model.py    a scalar reward head, Bradley-Terry loss (model.task=reward)
    grpo.py            GRPO / Dr. GRPO / DAPO: online RL on prompts (data.format=prompt), with
                       rollout.py (seeded generation, the rollout batches) and rewards.py

`train.objective` names one (auto: distillation when distill.teacher is set, dpo on preference
data, kto on unpaired preference data, grpo on prompt data, reward_model with model.task=reward, else model.task).
A new objective is a module here, one entry in OBJECTIVES and its name among the schema's
allowed values of train.objective (a test keeps the two equal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.objectives.base import Objective
from dtrain.objectives.causal_lm import CausalLM
from dtrain.objectives.classification import Classification
from dtrain.objectives.distillation import TASKS, Distillation
from dtrain.objectives.dpo import DPO, IPO
from dtrain.objectives.grpo import GRPO
from dtrain.objectives.kto import KTO
from dtrain.objectives.orpo import ORPO
from dtrain.objectives.reward_model import RewardModel
from dtrain.objectives.simpo import SimPO
from dtrain.parallel.collectives import Collectives

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config

__all__ = ["OBJECTIVES", "CausalLM", "Classification", "Distillation", "Objective", "build_objective", "objective_class",
           "objective_name"]

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CausalLM, Classification, Distillation, DPO, IPO, SimPO, ORPO, KTO, RewardModel, GRPO)}
# What train.objective=auto trains on each data format that has an objective of its own.
BY_FORMAT = {"preference": DPO, "unpaired_preference": KTO, "prompt": GRPO}


def objective_name(cfg: "Config") -> str:
    if cfg.train.objective != "auto":
        return cfg.train.objective
    if cfg.distill.teacher is not None:
        return Distillation.name
    if cfg.model.task == "reward":
        return RewardModel.name
    return BY_FORMAT[cfg.data.format].name if cfg.data.format in BY_FORMAT else TASKS[cfg.model.task].name


def objective_class(cfg: "Config") -> type[Objective]:
    return OBJECTIVES[objective_name(cfg)]


def build_objective(cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module],
                    comm: "Collectives | None" = None, tokenizer: Any = None) -> Objective:
    """The run's objective; `comm`: the ranks its batch-level statistics are taken over (one
    process by default); `tokenizer`: the run's, for an objective that reads or writes text."""
    objective = objective_class(cfg).from_config(cfg, data, frozen)
    objective.comm = comm if comm is not None else Collectives(torch.device("cpu"))
    objective.tokenizer = tokenizer
    return objective
