"""Direct preference optimisation against a reference model (Rafailov et al., 2023), and IPO.

    dpo   loss = -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d),
          d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
          e = preference.label_smoothing: the chance that a pair's label is wrong (conservative
          DPO, Mitchell 2023); with e = 0 it is DPO's sigmoid loss, and ln 2 while pi = ref.
    ipo   loss = (d' - 1 / (2 beta))^2 with d' the same difference of per-token averages (Azar et
          al., 2023, eq. 17, length-normalised as TRL does, with the IPO authors' agreement)

The rewards are beta x (log pi - log ref) of each response, summed over its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.objectives.preference import PreferenceObjective


def rewards(beta: float, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * (lp["chosen"] - lp["ref_chosen"]).detach(), beta * (lp["rejected"] - lp["ref_rejected"]).detach()


def smoothed_sigmoid_loss(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): a binary cross-entropy with a soft label."""
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


class DPO(PreferenceObjective):
    name = "dpo"

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        margin = (lp["chosen"] - lp["ref_chosen"]) - (lp["rejected"] - lp["ref_rejected"])
        return smoothed_sigmoid_loss(self.p.beta * margin, self.p.label_smoothing), *rewards(self.p.beta, lp)


class IPO(PreferenceObjective):
    name = "ipo"

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = (lp["chosen"] - lp["ref_chosen"]) / lp["chosen_tokens"].clamp(min=1)
        rejected = (lp["rejected"] - lp["ref_rejected"]) / lp["rejected_tokens"].clamp(min=1)
        return (chosen - rejected - 1 / (2 * self.p.beta)) ** 2, *rewards(self.p.beta, lp)
