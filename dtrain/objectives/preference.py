"""What the preference objectives share: the config rules, the pair's log-probabilities and
rewards, the reference model, and the metrics of a preference.

A micro-batch of B pairs is 2B sequences, the B prompt + chosen then the B prompt + rejected
(dtrain.data.loader.collate_preference), run in one forward pass; with data.packing all of them
sit in one row and attend only to themselves. A response's log-probability is the sum of
log p(token) over its tokens (the prompt is masked in the labels): dtrain.objectives.reference's
`sequence_logps` returns it with the number of tokens, per sequence, in the batch's order.

The reference model (preference.reference) is one of three:

    adapters_disabled  the policy itself with its LoRA / DoRA / QLoRA adapters switched off: the
                       base model, without a second copy of its weights
    copy               a frozen copy of preference.reference_model (default model.path), loaded and
                       sharded by the strategy like the policy (as distillation's teacher is)
    precomputed        (preference.precompute_reference) its log-probabilities, computed in one pass
                       before training and stored with the prepared data; they come with each
                       batch as ref_* tensors, and no reference model is held during training

Metrics, at every logged step and evaluation (TRL's names with "_" for "/"): the loss,
rewards_chosen / rewards_rejected (beta x log(policy / reference) of each response, averaged over
the pairs), rewards_margin (their difference), rewards_accuracy (the fraction of pairs whose
chosen response has the higher reward) and logps_chosen / logps_rejected (the policy's summed
log-probabilities).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dtrain.objectives.base import LossTerms, Objective, frozen_copy
from dtrain.objectives.reference import REFERENCE, Reference, reference_mode, sequence_count, sequence_logps

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config, ModelConfig

PAIR_METRICS = ["loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen",
                "logps_rejected"]


# --------------------------------------------------------------------------------------
# The objectives' common part


class PreferenceObjective(Objective):
    """A loss of pairs (data.format=preference) of a causal LM; a subclass says whether it needs a
    reference model (uses_reference) and how a pair's log-probabilities make its loss (pair_losses)."""

    data_formats = ("preference",)
    model_task = "causal_lm"
    batch_fields = ("input_ids", "labels")
    uses_reference: ClassVar[bool] = True
    supports_packing: ClassVar[bool] = True
    whole_chosen: ClassVar[bool] = False  # the chosen sequences scored over the prompt too (ORPO's SFT term)
    evaluates_with_frozen = True  # the rewards are against the reference
    stored = ("ref_chosen_logps", "ref_rejected_logps")  # the precomputed tensors' names, chosen then rejected

    def __init__(self, cfg: "Config", reference: Reference | None):
        self.cfg, self.p, self.reference = cfg, cfg.preference, reference

    # ---- at config time

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        super().check_config(cfg)
        p = cfg.preference
        if cfg.data.train_on_prompt:
            raise ValueError(f"data.train_on_prompt: train.objective={cls.name} scores the responses only (the prompt "
                             "is what both responses answer); remove data.train_on_prompt")
        if cfg.data.packing and not cls.supports_packing:
            raise ValueError(f"data.packing: train.objective={cls.name} scores each sequence as a whole with its own "
                             "head call; set data.packing=false")
        if not cls.uses_reference:
            if p.reference not in ("auto", "none") or p.reference_model is not None or p.precompute_reference:
                set_keys = [k for k, on in (("preference.reference", p.reference not in ("auto", "none")),
                                            ("preference.reference_model", p.reference_model is not None),
                                            ("preference.precompute_reference", p.precompute_reference)) if on]
                raise ValueError(f"{', '.join(set_keys)}: train.objective={cls.name} uses no reference model; "
                                 f"remove {' and '.join(set_keys)} (or use dpo, ipo or kto, which do)")
            return
        mode = reference_mode(cfg)
        if mode == "none":
            raise ValueError(f"preference.reference=none: train.objective={cls.name} compares the policy with a "
                             "reference model; use adapters_disabled (with peft.method), copy or auto")
        if mode == "adapters_disabled" and cfg.peft.method == "none":
            raise ValueError("preference.reference=adapters_disabled needs adapters to switch off, but peft.method is "
                             "none: use preference.reference=copy (a frozen copy of the model) for a full fine-tune, or "
                             "set peft.method=lora")
        if mode == "adapters_disabled" and p.reference_model is not None:
            raise ValueError("preference.reference_model is set, but preference.reference=adapters_disabled uses the "
                             "policy's own base as the reference: set preference.reference=copy to load "
                             f"{p.reference_model}, or remove preference.reference_model")

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        return list(PAIR_METRICS)

    @classmethod
    def frozen_models(cls, cfg: "Config") -> dict[str, "ModelConfig"]:
        if not cls.uses_reference or reference_mode(cfg) != "copy" or cfg.preference.precompute_reference:
            return {}
        return {REFERENCE: frozen_copy(cfg, cfg.preference.reference_model or cfg.model.path)}

    # ---- during the run

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "PreferenceObjective":
        if not cls.uses_reference:
            return cls(cfg, None)
        mode = "precomputed" if cfg.preference.precompute_reference else reference_mode(cfg)
        return cls(cfg, Reference(mode, frozen.get(REFERENCE)))

    def prepare(self, data: "PreparedData", model: nn.Module, strategy: Any, pad_id: int) -> "PreparedData":
        """preference.precompute_reference: the reference's log-probabilities of every row, read
        from the prepared-data cache or computed there now, attached to the splits as ref_* columns."""
        if self.reference is None or self.reference.mode != "precomputed":
            return data
        from dtrain.objectives.precompute import attach_reference_logps

        return attach_reference_logps(self, data, model, strategy, pad_id)

    @property
    def reference_columns(self) -> tuple[str, ...]:
        """The names a row's precomputed reference log-probabilities are stored under."""
        return self.stored

    def reference_rows(self, model: nn.Module, batch: dict[str, torch.Tensor],
                       reference: Reference) -> dict[str, torch.Tensor]:
        """The reference's log-probabilities of a batch's rows, by the names they are stored under."""
        return dict(zip(self.stored, reference.logps(model, batch, self.stored)))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return sequence_count(batch) // 2

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"pairs": self.count(batch), **self.extra_counts(batch)}

    def pair_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's (and the reference's) log-probabilities of each pair's responses, and their lengths."""
        logps, lengths, *whole = sequence_logps(model, batch, whole=self.whole_chosen)
        out = {"chosen": logps.chunk(2)[0], "rejected": logps.chunk(2)[1],
               "chosen_tokens": lengths.chunk(2)[0], "rejected_tokens": lengths.chunk(2)[1]}
        if whole:  # the chosen sequences' log-probabilities over all their tokens, prompt included
            out["chosen_whole"], out["chosen_whole_tokens"] = whole[0].chunk(2)[0], whole[1].chunk(2)[0]
        if self.uses_reference:
            out["ref_chosen"], out["ref_rejected"] = self.reference.logps(model, batch, self.stored)
        return out

    def pair_losses(self, lp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each pair's loss and the rewards of its chosen and rejected responses."""
        raise NotImplementedError

    def extra_terms(self, lp: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms besides the per-pair one (ORPO's SFT term), by the count they are normalised by."""
        return {}

    def extra_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {}

    def pair_stats(self, model: nn.Module, batch: dict[str, torch.Tensor], valid: torch.Tensor | None = None,
                   lp: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss sums by count, detached sums of what the metrics report) over the batch's pairs
        (`valid`: those to count, default all; `lp`: their log-probabilities, if already computed)."""
        lp = self.pair_logps(model, batch) if lp is None else lp
        losses, chosen_rewards, rejected_rewards = self.pair_losses(lp)
        valid = torch.ones_like(losses, dtype=torch.bool) if valid is None else valid
        weight = valid.to(losses.dtype)
        sums = {"pairs": (losses * weight).sum(), **self.extra_terms(lp, valid)}
        stats = {"pairs": weight.sum(), "loss": (losses * weight).sum(),
                 "rewards_chosen": (chosen_rewards * weight).sum(), "rewards_rejected": (rejected_rewards * weight).sum(),
                 "rewards_accuracy": ((chosen_rewards > rejected_rewards).to(losses.dtype) * weight).sum(),
                 "logps_chosen": (lp["chosen"] * weight).sum(), "logps_rejected": (lp["rejected"] * weight).sum()}
        return sums, {key: value.detach() for key, value in stats.items()}

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        sums, stats = self.pair_stats(model, batch)
        return LossTerms(sums, stats)

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        return pair_metrics(stats, with_loss=False)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        valid = batch["index"] >= 0  # (a rank's repeated filler batch counts for nothing)
        _, stats = self.pair_stats(model, batch, valid)
        return stats, None

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        return pair_metrics({key: float(value) for key, value in sums.items()}, with_loss=True)


def pair_metrics(stats: dict[str, float], *, with_loss: bool) -> dict[str, float]:
    """Means over the pairs of the summed statistics (training steps log their loss apart)."""
    n = max(stats.get("pairs", 0.0), 1.0)
    out = {"loss": stats["loss"] / n} if with_loss else {}
    out.update({name: stats[name] / n for name in PAIR_METRICS[1:] if name in stats and name != "rewards_margin"})
    out["rewards_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return {name: out[name] for name in PAIR_METRICS if name in out}

