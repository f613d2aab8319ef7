"""SimPO: simple preference optimisation without a reference model (Meng et al., 2024).

    loss = -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d),
    d = avg log pi(chosen) - avg log pi(rejected) - gamma / beta

with per-token averages (the length normalisation that stops it favouring long answers),
gamma = preference.gamma the target reward margin, e = preference.label_smoothing. The rewards
are beta x the average log-probabilities. The same loss as TRL's CPOTrainer with
loss_type="simpo" and cpo_alpha=0.
"""

from __future__ import annotations

import torch

from dtrain.objectives.dpo import smoothed_sigmoid_loss
from dtrain.objectives.preference import PreferenceObjective


class SimPO(PreferenceObjective):
    name = "simpo"
    uses_reference = False

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = lp["chosen"] / lp["chosen_tokens"].clamp(min=1)
        rejected = lp["rejected"] / lp["rejected_tokens"].clamp(min=1)
        loss = smoothed_sigmoid_loss(self.p.beta * (chosen - rejected - self.p.gamma / self.p.beta),
                                     self.p.label_smoothing)
        return loss, self.p.beta * chosen.detach(), self.p.beta * rejected.detach()
