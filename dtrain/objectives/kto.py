"""KTO: Kahneman-Tversky optimisation on unpaired judgements (Ethayarajh et al., 2024):
data.format=unpaired_preference, each row one completion and whether it is desirable.

    desirable:    w_d (1 - sigmoid(beta (r - z)))      r = log pi(y|x) - log ref(y|x)
    undesirable:  w_u (1 - sigmoid(beta (z - r)))      z = max(0, mean over the micro-batch of
                                                           log pi(y'|x) - log ref(y'|x))

z, the reference point, estimates KL(pi || ref) from mismatched pairs: each prompt with the
completion of the next row of the split (dtrain.data.loader.Judged), scored without gradient;
its mean is taken over the whole micro-batch of every rank, so that the loss does not depend on
how the batch is split among them. w_d, w_u = preference.desirable_weight / undesirable_weight.
The loss is averaged over the step's examples; the rewards are beta r. The same loss as TRL's
KTOTrainer (loss_type="kto") given the same mismatched pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtrain.objectives.base import LossTerms
from dtrain.objectives.preference import PreferenceObjective
from dtrain.objectives.reference import sequence_count, sequence_logps

# No rewards_accuracy (no pair to be right about); kl: the reference point z.
METRICS = ["loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "logps_chosen", "logps_rejected", "kl"]


class KTO(PreferenceObjective):
    name = "kto"
    data_formats = ("unpaired_preference",)
    stored = ("ref_logps",)
    kl_stored = ("ref_kl_logps",)

    @classmethod
    def metric_names(cls, cfg) -> list[str]:
        return list(METRICS)

    @property
    def reference_columns(self) -> tuple[str, ...]:
        return (*self.stored, *self.kl_stored)

    def reference_rows(self, model: nn.Module, batch: dict[str, torch.Tensor], reference) -> dict[str, torch.Tensor]:
        (logps,), (mismatched,) = reference.logps(model, batch, self.stored), reference.logps(
            model, batch, self.kl_stored, prefix="kl_")
        return {"ref_logps": logps, "ref_kl_logps": mismatched}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return sequence_count(batch)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"examples": self.count(batch)}

    def reference_point(self, model: nn.Module, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """z: the mean over the micro-batch (all ranks) of the mismatched pairs' log-ratios, at least 0."""
        with torch.no_grad():
            policy = sequence_logps(model, batch, prefix="kl_")[0]
            (reference,) = self.reference.logps(model, batch, self.kl_stored, prefix="kl_")
            totals = self.comm.data_sum(torch.stack([((policy - reference) * valid).sum(),
                                                           valid.sum().to(policy.dtype)]))
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)

    def example_stats(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, _ = sequence_logps(model, batch)
        valid = torch.ones_like(logps, dtype=torch.bool) if valid is None else valid
        (reference,) = self.reference.logps(model, batch, self.stored)
        z = self.reference_point(model, batch, valid)
        ratio = logps - reference
        desirable = batch["desirable"].bool()
        losses = torch.where(desirable, self.p.desirable_weight * (1 - torch.sigmoid(self.p.beta * (ratio - z))),
                             self.p.undesirable_weight * (1 - torch.sigmoid(self.p.beta * (z - ratio))))
        good, bad, weight = (desirable & valid).to(logps.dtype), (~desirable & valid).to(logps.dtype), valid.to(logps.dtype)
        rewards = self.p.beta * ratio.detach()
        stats = {"examples": weight.sum(), "loss": (losses.detach() * weight).sum(), "desirable": good.sum(),
                 "undesirable": bad.sum(), "rewards_chosen": (rewards * good).sum(),
                 "rewards_rejected": (rewards * bad).sum(), "logps_chosen": (logps.detach() * good).sum(),
                 "logps_rejected": (logps.detach() * bad).sum(), "kl": z * weight.sum()}
        return (losses * weight).sum(), stats

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        loss, stats = self.example_stats(model, batch)
        return LossTerms({"examples": loss}, stats)

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        return kto_metrics(stats, with_loss=False)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        _, stats = self.example_stats(model, batch, batch["index"] >= 0)
        return stats, None

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        return kto_metrics({key: float(value) for key, value in sums.items()}, with_loss=True)


def kto_metrics(stats: dict[str, float], *, with_loss: bool) -> dict[str, float]:
    """Means of the summed statistics: desirable ones over the desirable examples, and so on."""
    good, bad, n = (max(stats.get(k, 0.0), 1.0) for k in ("desirable", "undesirable", "examples"))
    out = {"loss": stats["loss"] / n} if with_loss else {}
    out.update(rewards_chosen=stats["rewards_chosen"] / good, rewards_rejected=stats["rewards_rejected"] / bad,
               logps_chosen=stats["logps_chosen"] / good, logps_rejected=stats["logps_rejected"] / bad,
               kl=stats["kl"] / n)
    out["rewards_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return {name: out[name] for name in METRICS if name in out}

