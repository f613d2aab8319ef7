"""ORPO: odds-ratio preference optimisation, an SFT loss and a preference term in one, without a
reference model (Hong et al., 2024).

    loss = NLL(chosen) - beta x mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected)),
    log odds(y) = log p / (1 - p), p = exp(average log pi(y) per token)

The NLL is the chosen sequences' cross-entropy over all their tokens, prompt included (as the
ORPO authors and TRL compute it), averaged over those tokens of the whole step; the odds-ratio
term is averaged over the step's pairs: two terms, each normalised by its own count. The odds
are those of the responses alone. beta = preference.beta is the paper's lambda. The rewards are
beta x the average log-probabilities. The same loss as TRL's ORPOTrainer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.objectives.preference import PreferenceObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(PreferenceObjective):
    name = "orpo"
    uses_reference = False

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = lp["chosen"] / lp["chosen_tokens"].clamp(min=1)
        rejected = lp["rejected"] / lp["rejected_tokens"].clamp(min=1)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        return -self.p.beta * F.logsigmoid(log_odds), self.p.beta * chosen.detach(), self.p.beta * rejected.detach()

    whole_chosen = True

    def extra_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"chosen_tokens": chosen_tokens(batch)}

    def extra_terms(self, lp: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"chosen_tokens": -(lp["chosen_whole"] * valid).sum()}  # the chosen sequences' summed NLL

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        valid = batch["index"] >= 0
        lp = self.pair_logps(model, batch)
        sums, stats = self.pair_stats(model, batch, valid, lp)
        stats["nll"] = sums["chosen_tokens"].detach()
        stats["chosen_tokens"] = (lp["chosen_whole_tokens"] * valid).sum()
        return stats, None

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        metrics = super().eval_metrics(sums)
        metrics["loss"] += float(sums["nll"]) / max(float(sums["chosen_tokens"]), 1.0)  # the SFT term's mean, too
        return metrics


def chosen_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the chosen sequences of a batch of pairs predict (the first half of its sequences):
    all but each sequence's first, and no padding."""
    from dtrain.objectives.reference import sequence_count

    if "position_ids" in batch:  # packed: the first half of the sequences in the one row
        starts = (batch["position_ids"][0] == 0).nonzero().flatten()
        half = sequence_count(batch) // 2
        return int(starts[half]) - half
    mask = batch["attention_mask"][: batch["attention_mask"].shape[0] // 2]
    return int(mask.sum() - mask.shape[0])
