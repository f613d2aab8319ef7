"""A reward model: a scalar head trained on preference pairs with the Bradley-Terry loss.

    loss = -log sigmoid(r(chosen) - r(rejected))

r is the model's one output at the last token of prompt + response (model.task=reward: a
sequence-classification model with one label, the head TRL's RewardTrainer trains, whose loss
this is). Evaluation reports the loss, the mean rewards of chosen and rejected responses, their
margin and the pairwise accuracy. `dtrain export` saves the model (AutoModelForSequenceClassification,
num_labels=1) for scoring, RLHF or best-of-n sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.lm_head import MODEL_INPUTS
from dtrain.objectives.preference import PreferenceObjective

METRICS = ["loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"]


class RewardModel(PreferenceObjective):
    name = "reward_model"
    model_task = "reward"
    uses_reference = False
    supports_packing = False  # one score per row

    @classmethod
    def metric_names(cls, cfg) -> list[str]:
        return list(METRICS)

    def pair_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        scores = model(**inputs, use_cache=False).logits.float().squeeze(-1)
        chosen, rejected = scores.chunk(2)
        # (the metrics read log-probabilities too: a reward model has none, the scores stand in)
        return {"chosen": chosen, "rejected": rejected}

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return -F.logsigmoid(lp["chosen"] - lp["rejected"]), lp["chosen"].detach(), lp["rejected"].detach()

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in super().step_metrics(stats).items() if k in METRICS}

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: v for k, v in super().eval_metrics(sums).items() if k in METRICS}
