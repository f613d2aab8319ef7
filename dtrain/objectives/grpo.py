"""GRPO: online RL against rewards a program checks (Shao et al., 2024), with Dr. GRPO's and
DAPO's variants, as TRL's GRPOTrainer computes them.

Each step, for every prompt of the step's micro-batches (data.format=prompt), the policy samples
grpo.num_generations completions (rollout.py); the reward functions score them (rewards.py); a
completion's advantage is its reward minus its group's mean (divided by the group's std + 1e-4
with grpo.scale_rewards). The loss of a completion token t is the clipped surrogate

    -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A),  r_t = pi(t) / pi_old(t)

plus beta x the k3 estimate of KL(pi || reference), exp(ref - logp) - (ref - logp) - 1 (times r_t
with grpo.kl_bias_correction, as TRL does by default: an unbiased reverse-KL gradient); pi_old is
the policy that sampled the completions (equal to pi, r_t = 1, with grpo.num_iterations=1). The
log-probabilities are those of softmax(logits / temperature), as sampled. grpo.loss_type says how
the token losses are averaged, each as a sum over the whole step divided by a count over the whole
step (the loop's exact accumulation): grpo, the mean over each completion's tokens then over the
completions; dr_grpo, the sum over completions x max_completion_length; dapo, the mean over every
completion token.

Metrics of a step (TRL's, with "_" for "/"): reward, reward_std, reward_<function>,
frac_reward_zero_std (groups whose completions all scored alike: no signal), completion_length,
truncated_ratio (completions that reached max_completion_length without EOS), entropy (mean per
token), kl (with beta > 0), clip_ratio_low / clip_ratio_high (tokens whose ratio was clipped).
Evaluation: one greedy completion per validation prompt: eval_reward, eval_reward_<function>,
eval_completion_length.

A group's prompt is read once to generate (rollout.generate). With data.packing, a micro-batch
trains as one padding-free row; with sdpa_varlen attention the row holds each prompt once and
its completions after it (rollout.shared_prefix_row), so the prompt is read once in training too.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.data.loader import batch_rows
from dtrain.lm_head import TokenLogprobs, head_outputs
from dtrain.objectives.base import LossTerms, Objective, frozen_copy
from dtrain.objectives.reference import REFERENCE, Reference, reference_mode
from dtrain.objectives.rewards import RewardError, load_rewards, reward_names, score
from dtrain.objectives.rollout import (Rollouts, completion_seed, flattened, generate, sequences,
                                      shared_prefix_row, target_owner)
from dtrain.precision import autocast

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config, ModelConfig

# What each loss_type divides the step's summed token losses by (a key of `counts`).
NORMALISERS = {"grpo": "completions", "dr_grpo": "token_budget", "dapo": "completion_tokens"}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward minus its group's mean (over consecutive `group_size` rewards), divided by the
    group's standard deviation (unbiased) + 1e-4 when `scale`; and whether each group's std is 0."""
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, unbiased=True)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std[:, None] + 1e-4)
    return advantages.reshape(-1), torch.isclose(std, torch.zeros_like(std))


class GRPO(Objective):
    name = "grpo"
    data_formats = ("prompt",)
    model_task = "causal_lm"

    def __init__(self, cfg: "Config", reference: Reference | None, rewards: list):
        self.cfg, self.g, self.reference, self.rewards = cfg, cfg.grpo, reference, rewards
        self.names = reward_names(cfg.grpo)
        self.weights = torch.tensor([f.weight for f in rewards], dtype=torch.float32)
        self.policy: nn.Module | None = None  # the wrapped model, set by `prepare`
        self.strategy: Any = None  # what it is wrapped with: which module generates (`generating`)
        self.synced = False
        self.packed = False  # each micro-batch's sequences in one padding-free row (data.packing)
        self.shares_prefix = False  # ... each prompt in it once, read by its completions (sdpa_varlen)
        self.out = None  # the run directory, where the main rank appends samples.jsonl

    # ---- at config time

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        super().check_config(cfg)
        g = cfg.grpo
        if not g.rewards:
            raise ValueError("grpo.rewards is empty: GRPO learns from rewards; add one, e.g. grpo.rewards: "
                             "[{function: exact_answer, args: {field: answer}}] or your own module:function")
        if g.num_generations < 2:
            raise ValueError(f"grpo.num_generations={g.num_generations}: a completion's advantage is its reward "
                             "against the other completions of its prompt, so each group needs at least 2; set "
                             "grpo.num_generations to 2 or more (4 to 16 is usual)")
        if cfg.train.micro_batch_size % g.num_generations:
            lower = cfg.train.micro_batch_size // g.num_generations * g.num_generations
            fits = " or ".join(str(n) for n in (lower, lower + g.num_generations) if n > 0)
            raise ValueError(f"train.micro_batch_size={cfg.train.micro_batch_size} is not a multiple of "
                             f"grpo.num_generations={g.num_generations}: a micro-batch holds whole groups (its "
                             f"completions, num_generations per prompt); set train.micro_batch_size to {fits}")
        for key, on in (("data.train_on_prompt", cfg.data.train_on_prompt),
                        ("eval.generation.enabled", cfg.eval.generation.enabled),
                        ("preference.precompute_reference", cfg.preference.precompute_reference)):
            if on:
                why = {"data.train_on_prompt": "it trains on the generated completions only",
                       "eval.generation.enabled": "its evaluation already generates (eval_reward)",
                       "preference.precompute_reference": "its completions do not exist before training"}[key]
                raise ValueError(f"{key}: train.objective=grpo does not take it ({why}); remove {key}")
        if cfg.parallel.mesh.tensor > 1:
            raise ValueError(f"parallel.mesh.tensor={cfg.parallel.mesh.tensor} with train.objective=grpo: generating "
                             "with a tensor-parallel model is not built yet; use parallel.mesh.tensor=1 (FSDP2 or "
                             "ZeRO-3 shard the model for generation too)")
        if cfg.eval.metric == "loss":
            raise ValueError("eval.metric=loss: train.objective=grpo has no evaluation loss; set eval.metric=reward "
                             "(the mean reward of greedy completions of the validation prompts; eval.mode max)")
        if g.beta > 0:
            mode = reference_mode(cfg)
            if mode == "none":
                raise ValueError("preference.reference=none with grpo.beta > 0: the KL term needs a reference; use "
                                 "adapters_disabled (with peft.method), copy or auto, or set grpo.beta=0")
            if mode == "adapters_disabled" and cfg.peft.method == "none":
                raise ValueError("preference.reference=adapters_disabled needs adapters to switch off, but "
                                 "peft.method is none: use preference.reference=copy, or set peft.method=lora")

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        return ["reward", *(f"reward_{name}" for name in reward_names(cfg.grpo)), "completion_length"]

    @classmethod
    def frozen_models(cls, cfg: "Config") -> dict[str, "ModelConfig"]:
        if cfg.grpo.beta == 0 or reference_mode(cfg) != "copy":
            return {}
        return {REFERENCE: frozen_copy(cfg, cfg.preference.reference_model or cfg.model.path)}

    @classmethod
    def micro_batch_rows(cls, cfg: "Config") -> int:
        return cfg.train.micro_batch_size // cfg.grpo.num_generations  # prompts; each brings its group

    @classmethod
    def micro_batch_multiple(cls, cfg: "Config") -> int:
        return cfg.grpo.num_generations

    @classmethod
    def sequence_length(cls, cfg: "Config") -> int:
        return cfg.data.max_seq_len + cfg.grpo.max_completion_length

    # ---- during the run

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "GRPO":
        reference = Reference(reference_mode(cfg), frozen.get(REFERENCE)) if cfg.grpo.beta > 0 else None
        return cls(cfg, reference, load_rewards(cfg.grpo))

    def prepare(self, data: "PreparedData", model: nn.Module, strategy: Any, pad_id: int) -> "PreparedData":
        from pathlib import Path

        from dtrain.attention import shares_prefixes, uses_varlen_attention
        from dtrain.schema import ConfigError

        self.policy, self.strategy = model, strategy
        self.synced, self.out = strategy.collective_forward, Path(self.cfg.output_dir)
        self.packed = self.cfg.data.packing
        if self.packed and not uses_varlen_attention(strategy.unwrap(model)):
            raise ConfigError("data.packing with train.objective=grpo trains each micro-batch's prompts and completions "
                              "as one padding-free row, which needs variable-length attention: set "
                              "model.attn_implementation to sdpa_varlen (or flash_attention_2 on CUDA), or "
                              "data.packing=false")
        scorers = [strategy.unwrap(model)] + ([strategy.unwrap(self.reference.model)]
                                              if self.reference is not None and self.reference.model is not None else [])
        self.shares_prefix = self.packed and all(shares_prefixes(m, self.sequence_length(self.cfg)) for m in scorers)
        return data

    def training_batches(self, prompts: Any) -> Rollouts:
        return Rollouts(prompts, self, self.cfg.train.grad_accum_steps, self.g.num_iterations)

    @torch.no_grad()
    def rollout(self, prompts: dict[str, torch.Tensor], *, epoch: int, step: int, steps: int) -> dict[str, torch.Tensor]:
        """A micro-batch of prompts completed num_generations times each, scored, with the
        advantages (and the old and reference log-probabilities) the loss needs."""
        g, comm, G = self.g, self.comm, self.g.num_generations
        device = comm.device
        prompt_ids, prompt_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
        seeds = [completion_seed(self.cfg.seed, epoch, int(row), j) for row in prompts["index"] for j in range(G)]
        with autocast(self.cfg.train.precision, device), self.generating(self.policy) as generator:
            ids, mask, ended = generate(generator, prompt_ids, prompt_mask, max_new_tokens=g.max_completion_length,
                                        pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id,
                                        synced=self.synced, seeds=seeds, temperature=g.temperature, top_p=g.top_p,
                                        repeats=G)
        rows = [row for row in batch_rows(prompts["row_utf8"]) for _ in range(G)]
        per_function, texts = self.score(rows, ids, mask)
        rewards = per_function @ self.weights
        advantages, zero_std = group_advantages(rewards, G, g.scale_rewards)
        if self.shares_prefix:
            batch = shared_prefix_row(prompt_ids, prompt_mask, ids, mask)
        else:
            batch = sequences(prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), ids, mask)
            if self.packed:
                batch = flattened(batch)
        batch.update({"advantages": advantages.to(device), "rewards": rewards.to(device),
                      "rewards_by_function": per_function.to(device), "truncated": (~ended).float(),
                      "zero_std_groups": zero_std.float().repeat_interleave(G).to(device) / G})
        if steps > 1:  # several updates on these completions: the sampling policy's log-probabilities stay fixed
            with autocast(self.cfg.train.precision, device):
                batch["old_logps"] = head_outputs(self.policy, batch, TokenLogprobs(batch["labels"], g.temperature))
        if self.reference is not None:
            with autocast(self.cfg.train.precision, device), self.reference.scorer(self.policy) as reference:
                batch["ref_logps"] = head_outputs(reference, batch, TokenLogprobs(batch["labels"], g.temperature))
        if comm.is_main and g.samples_every and (step == 1 or any(
                s % g.samples_every == 0 for s in range(step, step + steps))):
            from dtrain.tracking import append_samples

            append_samples(self.out, [{"step": step, "prompt": row["row"].get(self.cfg.data.prompt_field),
                                       "completion": text, "reward": float(total),
                                       **{f"reward_{n}": float(v) for n, v in zip(self.names, values)}}
                                      for row, text, total, values in zip(rows, texts, rewards.tolist(),
                                                                          per_function.tolist())])
        return batch

    def generating(self, model: nn.Module) -> Any:
        """The module that generates: as the strategy says, or (built to evaluate only) `model` itself."""
        return self.strategy.generating(model) if self.strategy is not None else contextlib.nullcontext(model)

    def score(self, rows: list[dict[str, Any]], ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Each completion's reward from each function (completions x functions), and the
        completions' text. A function that fails on any rank stops every rank, that rank's
        message naming the function and the row."""
        completion_ids = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompt_field = self.cfg.data.prompt_field
        error = None
        try:
            values = score(self.rewards, [row["row"].get(prompt_field) for row in rows], texts, completion_ids,
                           [{k: v for k, v in row["row"].items() if k != prompt_field} for row in rows],
                           [row["where"] for row in rows])
        except RewardError as exc:
            error, values = exc, [[0.0] * len(self.rewards) for _ in rows]
        failed = self.comm.all_reduce_sum(torch.tensor(float(error is not None), device=self.comm.device))
        if error is not None:
            raise error
        if failed.item():
            raise RewardError("a reward function failed on another rank (its message says which and on what row)")
        return torch.tensor(values, dtype=torch.float32), texts

    # -- the loss

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        key = NORMALISERS[self.g.loss_type]
        completions = len(batch["advantages"])
        if key == "completions":
            return {key: completions}
        if key == "token_budget":
            return {key: completions * self.g.max_completion_length}
        return {key: int((batch["labels"] != IGNORE_INDEX).sum())}

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        g = self.g
        request = TokenLogprobs(batch["labels"], g.temperature, with_entropy=True)
        logps = head_outputs(model, batch, request)  # (rows, T - 1): position t scores token t + 1
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(logps.dtype)
        owner = target_owner(batch)  # which completion each position scores (padded rows, or one packed row)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ratio = torch.exp(logps - old)
        low, high = 1 - g.epsilon, 1 + (g.epsilon_high if g.epsilon_high is not None else g.epsilon)
        advantages = batch["advantages"][owner]
        per_token = -torch.min(ratio * advantages, ratio.clamp(low, high) * advantages)
        stats: dict[str, torch.Tensor] = {}
        if g.beta > 0:
            delta = batch["ref_logps"] - logps
            kl = torch.exp(delta) - delta - 1
            stats["kl"] = (kl * mask).sum()
            if g.kl_bias_correction:  # (the ratio's gradient counts even where it is 1)
                kl = kl * ratio
            per_token = per_token + g.beta * kl
        lengths = torch.zeros(len(batch["advantages"]), dtype=mask.dtype, device=mask.device).index_add(
            0, owner.reshape(-1), mask.reshape(-1))
        if g.loss_type == "grpo":  # each completion's mean over its tokens
            total = (per_token * mask / lengths.clamp(min=1)[owner]).sum()
        else:
            total = (per_token * mask).sum()
        with torch.no_grad():
            stats.update({
                "completions": torch.tensor(float(len(lengths))), "tokens": lengths.sum(),
                "reward": batch["rewards"].sum(), "reward_squares": (batch["rewards"] ** 2).sum(),
                **{f"reward_{name}": batch["rewards_by_function"][:, i].sum() for i, name in enumerate(self.names)},
                "zero_std_groups": batch["zero_std_groups"].sum(), "truncated": batch["truncated"].sum(),
                "entropy": (request.entropies * mask).sum(),
                "clipped_low": (((ratio < low) & (advantages < 0)).to(mask.dtype) * mask).sum(),
                "clipped_high": (((ratio > high) & (advantages > 0)).to(mask.dtype) * mask).sum()})
        return LossTerms({NORMALISERS[g.loss_type]: total}, {k: v.detach().float() for k, v in stats.items()})

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        n, tokens = max(stats["completions"], 1.0), max(stats["tokens"], 1.0)
        mean = stats["reward"] / n
        variance = (stats["reward_squares"] - n * mean**2) / max(n - 1, 1.0)
        out = {"reward": mean, "reward_std": math.sqrt(max(variance, 0.0)),
               **{f"reward_{name}": stats[f"reward_{name}"] / n for name in self.names},
               "frac_reward_zero_std": stats["zero_std_groups"] / (n / self.g.num_generations),
               "completion_length": stats["tokens"] / n, "truncated_ratio": stats["truncated"] / n,
               "entropy": stats["entropy"] / tokens, "clip_ratio_low": stats["clipped_low"] / tokens,
               "clip_ratio_high": stats["clipped_high"] / tokens}
        if "kl" in stats:
            out["kl"] = stats["kl"] / tokens
        return out

    # -- evaluation: one greedy completion per prompt

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        device = batch["input_ids"].device
        with self.generating(model) as generator:
            ids, mask, _ = generate(generator, batch["input_ids"], batch["attention_mask"],
                                    max_new_tokens=self.g.max_completion_length, pad_id=self.tokenizer.pad_token_id,
                                    eos_id=self.tokenizer.eos_token_id, synced=self.synced)
        per_function, _ = self.score(batch_rows(batch["row_utf8"]), ids, mask)
        counted = (batch["index"] >= 0).float().cpu()  # (a rank's repeated filler batch counts for nothing)
        sums = {"prompts": counted.sum(), "reward": (per_function @ self.weights * counted).sum(),
                "completion_length": (mask.sum(-1).float().cpu() * counted).sum(),
                **{f"reward_{name}": (per_function[:, i] * counted).sum() for i, name in enumerate(self.names)}}
        return {key: value.to(device) for key, value in sums.items()}, None

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        n = max(float(sums["prompts"]), 1.0)
        return {name: float(sums[name]) / n for name in self.metric_names(self.cfg)}
