"""What an objective is: how a micro-batch becomes a loss, and what an evaluation reports.

The training loop and evaluation call only this interface, so a new objective is a new module
in this package plus one entry in OBJECTIVES (and the schema's `train.objective` values), never
a branch in dtrain/train.py:

    data_formats, model_task       the data.format values it trains on, the head the model needs
    batch_fields                   the tensors each micro-batch must carry
    check_config(cfg)              what it refuses in the rest of the config (at load time)
    frozen_models(cfg)             extra models it needs that do not train (a teacher; a reference
                                   model), by the config key naming them; loaded and placed (or
                                   sharded) by the strategy like the trained model
    from_config(cfg, data, frozen) the objective for a run (`frozen`: the loaded frozen models by key;
                                   empty when it is built to evaluate only)
    prepare(data, model, strategy, pad_id)
                                   what it computes once before the first step (the reference's
                                   log-probabilities, preference.precompute_reference): the data
                                   with it; by default the data as it is
    micro_batch_rows(cfg), micro_batch_multiple(cfg), sequence_length(cfg), training_batches(batches)
                                   how many data rows a micro-batch draws (default
                                   train.micro_batch_size; GRPO: prompts, each completed
                                   num_generations times), what train.micro_batch_size must be a
                                   multiple of (GRPO: a group), the longest sequence it trains on
                                   (GRPO: a prompt and its completion), and the iterator the loop takes its
                                   micro-batches from: the data's batches, or what the objective
                                   makes of them (GRPO's rollouts); it is checkpointed as the data
                                   position
    count(batch)                   how many things the batch's loss sums over (target tokens,
                                   examples, pairs): the loop normalises every micro-batch's loss by
                                   this count over the whole optimizer step, on every rank
    loss(model, batch)             the loss *summed* over those things
    counts(batch), loss_terms(model, batch), step_metrics(stats)
                                   the same for a loss of several terms, each normalised by its own
                                   count (ORPO: a per-token SFT term and a per-pair odds-ratio term),
                                   with statistics summed over the step and reported as training
                                   metrics (a preference objective's rewards and accuracy); by
                                   default one term, count() and loss(), and no statistics
    metric_names(cfg), eval_sums(model, batch), eval_metrics(sums), worst_examples(...)
                                   what an evaluation reports: sums over batches and ranks, then
                                   the metrics computed from them
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.lm_head import model_inputs

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config, ModelConfig



@dataclass
class ExampleScore:
    """One evaluated example, for the list of those with the highest loss."""

    loss: float
    index: int
    prompt_ids: list[int]  # the input before the first trained token (the whole input for classification)
    target_ids: list[int]
    predicted_ids: list[int]


@dataclass
class LossTerms:
    """What one micro-batch contributes to a step: each term of the loss summed over the things
    `counts(batch)` counts under the same key (the loop divides it by the step's total of them),
    and detached statistics, summed over the step's micro-batches and ranks for `step_metrics`."""

    sums: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]
    model_task: ClassVar[str]  # model.task: causal_lm (a language-model head) or classification
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "labels")
    evaluates_with_frozen: ClassVar[bool] = False  # its metrics need its frozen models too (a reference does)
    # Its loss, counts and metrics are sums over token positions, each needing only the logits at
    # that position: a sequence split across ranks (sequence parallel) sums to the whole.
    sums_over_tokens: ClassVar[bool] = False

    # ---- at config time

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Refuse (ValueError, naming the keys and the fix) what this objective cannot train."""
        cls.check_data(cfg)
        if cfg.distill.teacher is not None and "distill.teacher" not in cls.frozen_models(cfg):
            raise ValueError(f"distill.teacher is set, but train.objective={cls.name} uses no teacher; set "
                             "train.objective=distillation (or auto), or remove distill.teacher")

    @classmethod
    def check_data(cls, cfg: "Config") -> None:
        """The model head and the data this objective trains on."""
        if cfg.model.task != cls.model_task:
            raise ValueError(f"train.objective={cls.name} needs model.task={cls.model_task} "
                             f"(got model.task={cfg.model.task}); set model.task, or another train.objective")
        if cfg.data.format not in cls.data_formats:
            raise ValueError(cls.format_mismatch(cfg))

    @classmethod
    def format_mismatch(cls, cfg: "Config") -> str:
        return (f"data.format={cfg.data.format!r} does not fit train.objective={cls.name}, which trains on "
                f"data.format {' or '.join(cls.data_formats)}")

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        """What an evaluation reports, each as eval_<name>; the first is the loss. (The counts of
        what was scored, eval_examples and the like, are reported too, but are not metrics.)"""
        return ["loss"]

    @classmethod
    def frozen_models(cls, cfg: "Config") -> dict[str, "ModelConfig"]:
        return {}

    # ---- during the run

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "Objective":
        raise NotImplementedError

    def prepare(self, data: "PreparedData", model: nn.Module, strategy: Any, pad_id: int) -> "PreparedData":
        return data

    @classmethod
    def micro_batch_rows(cls, cfg: "Config") -> int:
        return cfg.train.micro_batch_size

    @classmethod
    def micro_batch_multiple(cls, cfg: "Config") -> int:
        return 1

    @classmethod
    def sequence_length(cls, cfg: "Config") -> int:
        return cfg.data.max_seq_len

    def training_batches(self, batches: Any) -> Any:
        return batches

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """What each term of the loss is normalised by (summed over the step's micro-batches and ranks)."""
        return {"loss": self.count(batch)}

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        return LossTerms({"loss": self.loss(model, batch)})

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """Training metrics of one step, from its summed `LossTerms.stats` (logged with the loss)."""
        return {}

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Quantities to add up over every evaluated batch and rank, and what `worst_examples` needs."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def worst_examples(self, batch: dict[str, torch.Tensor], scored: Any, index: torch.Tensor) -> list[ExampleScore]:
        return []


def frozen_copy(cfg: "Config", path: str) -> "ModelConfig":
    """The settings of a frozen model at `path` (a teacher, a reference): the run's model settings,
    its tokenizer, and none of the options that only training needs."""
    return cfg.model.model_copy(update={"path": path, "tokenizer": None, "gradient_checkpointing": False,
                                        "activation_offloading": False, "compile": False})


# --------------------------------------------------------------------------------------
# Shared by the objectives that predict labels (tokens or classes)


def head_format_mismatch(cls: type[Objective], cfg: "Config") -> str:
    """format_mismatch of the two model heads (causal LM, classification), given the other's data."""
    if cfg.data.format in ("preference", "unpaired_preference"):
        fits = "kto" if cfg.data.format == "unpaired_preference" else "dpo, ipo, simpo, orpo or reward_model"
        return (f"data.format={cfg.data.format!r} is preference data, which train.objective={cls.name} does not "
                f"train on: set train.objective to {fits} (auto picks one), or use another data.format")
    return (f"data.format={cfg.data.format!r} does not fit model.task={cfg.model.task!r}: "
            "use data.format=classification together with model.task=classification")


def logits_and_labels(model: nn.Module, batch: dict[str, torch.Tensor], *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits, in full, and the labels they predict (`shift`: causal LM, each position
    predicts the next token). A causal LM's objectives ask dtrain.lm_head for what they need
    from the logits instead, which never holds them whole."""
    logits = model(**model_inputs(batch), use_cache=False).logits.float()
    labels = batch["labels"]
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, *, weight: torch.Tensor | None = None,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The cross-entropy summed over the labelled positions (a sum: the loop normalises it by the
    targets of the whole optimizer step, so that k micro-batches of any lengths give exactly the
    gradient of one batch k times larger). Class weights scale each example's term."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum", weight=weight,
                                             label_smoothing=label_smoothing)


def scored_labels(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position loss (0 where unlabelled) and prediction, for evaluation."""
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return {"token_loss": token_loss, "predicted": logits.argmax(-1), "labels": labels}


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Sum over the positions where `mask` is true of KL(softmax(teacher/T) || softmax(student/T)) * T^2."""
    teacher = torch.nn.functional.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.nn.functional.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_position * mask).sum() * temperature**2


def mean_loss(sums: dict[str, torch.Tensor]) -> float:
    """Mean loss over the counted targets."""
    return (sums["loss"] / sums["targets"].clamp(min=1)).item()


def loss_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean loss over the counted target tokens, and its perplexity (for language models only:
    exp of a per-token cross-entropy is the effective vocabulary the model hesitates between;
    for a classifier's per-example loss it means nothing)."""
    import math

    loss = mean_loss(sums)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
