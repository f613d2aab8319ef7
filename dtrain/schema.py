"""The run configuration's schema: typed, documented sections, one field per config key.

Every field below is a config key (`optim.lr`, `train.max_steps`, ...); the README's config
reference is generated from these descriptions. This module knows no strategy and no
objective: the rules that depend on them (QLoRA with DeepSpeed, which metrics a task
reports, ...) are asked of the strategy and the objective by `dtrain.config.load_config`,
which also reads the YAML with its line numbers and applies command-line overrides.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


# model.task values built as a sequence-classification model: a classifier (one output per class)
# and a reward model (one scalar output for the whole sequence).
SEQUENCE_HEADS = ("classification", "reward")


class ConfigError(ValueError):
    """A configuration problem, worded for the user."""


class Section(BaseModel):
    # Unknown keys are errors (typos must never be silently ignored).
    # coerce numbers to str: `labels: [0, 1]` or `output_dir: 2024` are strings to the user too
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DropoutConfig(Section):
    """Dropout overrides; each reaches the config field(s) the architecture has for it (a model
    without such a field gets a warning)."""

    attention: float | None = Field(None, ge=0.0, lt=1.0, description="Attention-probability dropout; null: the model's.")
    hidden: float | None = Field(None, ge=0.0, lt=1.0, description="Hidden/residual dropout; null: the model's.")
    classifier: float | None = Field(None, ge=0.0, lt=1.0, description="Classification-head dropout; null: the model's.")


class ModelConfig(Section):
    path: str = Field(
        "tiny-llama",
        description="Local Hugging Face model directory, or a preset name "
        "(tiny-llama, tiny-qwen2, llama3-8b, qwen2-7b, mistral-7b, llama3-70b).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory; default: model.path, or the built-in byte tokenizer for presets."
    )
    task: Literal["causal_lm", "classification", "reward"] = Field(
        "causal_lm", description="causal_lm (next-token loss), classification (sequence-classification head) or "
        "reward (a one-output scalar head scoring a whole sequence: train.objective=reward_model).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in (train.precision controls autocast)."
    )
    trust_remote_code: bool = Field(False, description="Allow modelling code shipped inside model.path.")
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa; "
                            "on CPU sdpa_varlen (SDPA run per example on packed rows; plain SDPA otherwise).")
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing: recompute activations in backward.")
    activation_offloading: bool = Field(False, description="Keep what the decoder saves for backward in host "
                                        "memory (pinned, copied on a side stream on CUDA); with "
                                        "model.gradient_checkpointing only the layers' inputs.")
    compile: bool = Field(False, description="torch.compile each transformer block (torch strategies).")
    logits: Literal["auto", "chunked", "full"] = Field(
        "auto", description="How a causal LM's loss reads its head: chunked (the LM head and the loss computed "
        "together, model.logits_chunk_tokens positions at a time, so that the tokens x vocabulary logits are never "
        "held whole: dtrain/lm_head.py), full (the whole logits, as transformers returns them); auto: chunked when "
        "the model's head is a plain linear layer with nothing applied to its logits (Llama, Qwen2, Mistral, GPT-2; "
        "not Gemma's soft-capping), else full.")
    logits_chunk_tokens: int = Field(256, ge=1, description="model.logits=chunked: positions per chunk (each chunk "
                                     "holds chunk x vocabulary fp32 logits and their gradient: 0.5 GiB at 256 x "
                                     "Llama 3's 128,256).")
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)


class FreezeConfig(Section):
    """Partial fine-tuning: what does not train (applied after PEFT, before sharding)."""

    embeddings: bool = Field(False, description="Freeze the input embeddings.")
    layers: int = Field(0, ge=0, description="Freeze the first N transformer blocks.")
    patterns: list[str] = Field(default_factory=list, description="Freeze parameters whose name matches (fnmatch, e.g. '*.mlp.*').")
    head_only: bool = Field(False, description="Train only the output head (lm_head or the classification head).")


class ParamGroupConfig(Section):
    model_config = ConfigDict(allow_inf_nan=False)  # (the optimizer takes no inf / NaN)

    pattern: str = Field(description="fnmatch pattern on parameter names; the first group that matches wins.")
    lr_scale: float = Field(1.0, ge=0.0, description="Multiplies the LR (and the schedule) of these parameters.")
    weight_decay: float | None = Field(None, ge=0.0, description="Weight decay of these parameters; null: the default rule.")


class DistillConfig(Section):
    teacher: str | None = Field(None, description="Teacher: a local model directory or a preset; null: no distillation.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * task loss.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T of both distributions.")


class PreferenceConfig(Section):
    """Preference tuning (train.objective dpo, ipo, simpo, orpo, kto, reward_model) on data.format preference
    or unpaired_preference."""

    beta: float = Field(0.1, gt=0.0, description="dpo/kto: how far the policy may move from the reference (the "
                        "rewards are beta x log(policy / reference)); ipo: the regularisation tau; simpo: the reward "
                        "scale; orpo: lambda, the weight of the odds-ratio term.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo: the probability that a pair's preference "
                                   "is wrong (conservative DPO); simpo: the same for its sigmoid loss.")
    gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin between chosen and rejected "
                         "(TRL's simpo_gamma).")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: the weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: the weight of undesirable examples' losses.")
    reference: Literal["auto", "adapters_disabled", "copy", "none"] = Field(
        "auto", description="The reference model of dpo, ipo and kto: adapters_disabled (the policy itself with its "
        "LoRA/DoRA/QLoRA adapters switched off: no second copy of the weights), copy (a frozen copy of "
        "preference.reference_model, sharded like the policy); auto: adapters_disabled with an adapter, else copy; "
        "none for the reference-free objectives (simpo, orpo, reward_model).")
    reference_model: str | None = Field(None, description="reference=copy: the reference's model directory or "
                                        "preset; default: model.path (the policy's starting point).")
    precompute_reference: bool = Field(
        False, description="One pass over the data before training stores the reference log-probabilities with the "
        "prepared data, so that training holds one model (resumed runs read them back).")


class RewardConfig(Section):
    function: str = Field(..., description="A built-in (exact_answer, regex_format, length_penalty) or `module:function` "
                          "/ `path/to/file.py:function` of your project: imported and run (code execution, from your "
                          "config only, never from a checkpoint), called TRL's way with lists prompts=, completions=, "
                          "completion_ids= and each other field of the rows, returning one number per completion.")
    weight: float = Field(1.0, description="Its weight in the total reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments it is called with (a built-in's "
                                 "settings: exact_answer field; regex_format pattern; length_penalty target, per_token).")
    name: str | None = Field(None, description="Its name in the metrics (reward_<name>); default: the function's.")


class GrpoConfig(Section):
    """Online RL with rewards a program checks (train.objective=grpo on data.format=prompt)."""

    num_generations: int = Field(4, ge=1, description="Completions sampled per prompt (the group its advantages "
                                 "are normalised over). train.micro_batch_size counts completions and must be a "
                                 "multiple of it.")
    max_completion_length: int = Field(64, ge=1, description="Tokens generated at most per completion (a prompt "
                                       "may have data.max_seq_len).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (the log-probabilities are those of "
                               "the tempered distribution, as TRL's).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens with this "
                         "probability.")
    rewards: list[RewardConfig] = Field(default_factory=list, description="The reward functions, each with "
                                        "function, weight, args, name; the total is their weighted sum.")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="How the per-token losses are averaged: grpo (over each completion's tokens, then over "
        "completions), dr_grpo (sum / (completions x max_completion_length)), dapo (over all completion tokens of "
        "the step). TRL's names and formulas.")
    scale_rewards: bool = Field(True, description="Divide each advantage by its group's reward std (+1e-4); false: "
                                "Dr. GRPO's unscaled advantages.")
    epsilon: float = Field(0.2, ge=0.0, description="Clipping of the probability ratio: below 1 - epsilon.")
    epsilon_high: float | None = Field(None, ge=0.0, description="Upper clipping bound, 1 + epsilon_high (DAPO's "
                                       "clip-higher, e.g. 0.28); default: epsilon.")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of completions (PPO epochs), "
                                "with the log-probabilities of the policy that sampled them kept.")
    beta: float = Field(0.0, ge=0.0, description="Weight of the KL to the reference model (k3 estimator); 0 holds "
                        "no reference. The reference is preference.reference (adapters_disabled / copy).")
    kl_bias_correction: bool = Field(True, description="Multiply each token's KL term by its probability ratio, "
                                     "which makes its gradient the unbiased reverse-KL gradient (DeepSeek-V3.2; "
                                     "TRL's default, use_bias_correction_kl).")
    samples_every: int | None = Field(10, ge=1, description="Every N steps, the main rank's prompts, completions "
                                      "and rewards of that step are appended to samples.jsonl; null: never.")


class GenerationEvalConfig(Section):
    enabled: bool = Field(False, description="Greedy generation on validation prompts: exact-match / contains-answer accuracy.")
    max_examples: int = Field(64, ge=1, description="Validation examples to generate for (a seeded sample, the same at every evaluation).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate per answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")


class SourceConfig(Section):
    path: str | None = Field(None, description="A file (.jsonl .json .csv .parquet .txt .md .html) or a directory.")
    url: str | None = Field(None, description="SQLAlchemy database URL (with query), instead of a path.")
    query: str | None = Field(None, description="SQL query whose rows are the examples (with url).")
    weight: float = Field(1.0, gt=0.0, description="Mixing weight: >1 repeats the source's rows, <1 samples them.")

    @model_validator(mode="after")
    def _one_kind(self) -> "SourceConfig":
        if (self.path is None) == (self.url is None):
            raise ValueError("a data source needs either path or url (+ query)")
        if (self.url is None) != (self.query is None):
            raise ValueError("a SQL data source needs both url and query")
        return self


class CleanConfig(Section):
    unicode: Literal["NFKC", "NFC", "none"] = Field("NFKC", description="Unicode normalisation of every text field.")
    whitespace: bool = Field(True, description="Collapse runs of spaces, strip, at most one blank line.")
    exact_dedup: bool = Field(True, description="Drop exact duplicates (after normalisation), within and across splits.")
    near_dedup: bool = Field(False, description="Drop near-duplicates (MinHash LSH), within and across splits.")
    near_dedup_threshold: float = Field(0.85, gt=0.0, le=1.0, description="Estimated Jaccard similarity that counts as a near-duplicate.")
    min_tokens: int = Field(0, ge=0, description="Drop examples with fewer tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Drop (rather than truncate) examples with more tokens.")
    boilerplate: Literal["drop", "strip", "off"] = Field(
        "drop", description="Rows whose response contains a boilerplate phrase: drop them, strip the sentence, or keep.")
    boilerplate_phrases: list[str] | None = Field(
        None, description="Phrases that mark boilerplate; default: the 'As an AI language model' family.")


class AugmentConfig(Section):
    copies: int = Field(0, ge=0, description="EDA-augmented copies per training example (train split only); 0: off.")
    p_replace: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of words replaced by a synonym.")
    p_insert: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of words inserted (synonyms of other words).")
    p_swap: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of words swapped.")
    p_delete: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of words deleted (at least one word is kept).")
    synonyms: str = Field("wordnet", description="wordnet (Debian's wordnet-base via nltk) or a synonym file.")
    fields: list[str] | None = Field(None, description="Fields to augment; default: the text / instruction field.")


class DataConfig(Section):
    train: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="examples/data/arithmetic_alpaca.jsonl")],
        description="Training sources: paths, or {path|url+query, weight} mappings.",
    )
    validation: list[SourceConfig] = Field(
        default_factory=list, description="Validation sources; empty: split val_ratio off the training data."
    )
    test: list[SourceConfig] = Field(default_factory=list, description="Test sources; empty: split test_ratio off the training data.")
    format: Literal["text", "alpaca", "chat", "classification", "preference", "unpaired_preference", "prompt"] = Field(
        "alpaca", description="How a row becomes tokens: text, alpaca, chat, classification, preference ({prompt, "
        "chosen, rejected}: strings, or a message list and the assistant replies), unpaired_preference ({prompt, "
        "completion, label}, label true for a desirable completion: KTO) or prompt ({prompt, ...}: a string or "
        "messages to complete, the other fields going to the reward functions: GRPO).")
    val_ratio: float = Field(0.15, ge=0.0, lt=1.0, description="Validation fraction when no validation sources are given.")
    test_ratio: float = Field(0.15, ge=0.0, lt=1.0, description="Test fraction when no test sources are given.")
    max_seq_len: int = Field(512, ge=8, description="Longer examples are truncated to this many tokens.")
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens (alpaca/chat). Default: loss on the completion only."
    )
    add_eos: bool = Field(True, description="Append EOS to every trained completion so the model learns to stop.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="A malformed row fails the run (with file and line) or is skipped and counted."
    )
    text_field: str = Field("text", description="Column holding the text (text and classification formats).")
    instruction_field: str = Field("instruction", description="alpaca: the instruction column.")
    input_field: str = Field("input", description="alpaca: the optional input column.")
    output_field: str = Field("output", description="alpaca: the response column.")
    messages_field: str = Field("messages", description="chat: column with a list of {role, content}.")
    label_field: str = Field("label", description="classification: the label column; unpaired_preference: the "
                             "column saying whether the completion is desirable (true/false).")
    prompt_field: str = Field("prompt", description="preference, unpaired_preference, prompt: the prompt column (a string "
                              "or a message list; missing: the messages chosen and rejected begin with).")
    chosen_field: str = Field("chosen", description="preference: the preferred response column.")
    rejected_field: str = Field("rejected", description="preference: the dispreferred response column.")
    completion_field: str = Field("completion", description="unpaired_preference: the completion column.")
    truncation: Literal["prompt_first", "end"] = Field(
        "prompt_first", description="preference formats, a prompt + response longer than max_seq_len: prompt_first "
        "cuts the prompt's beginning (keeping its end, next to the responses) and cuts a response only when it "
        "alone is too long; end cuts every sequence's end.")
    labels: list[str] | None = Field(None, min_length=1,
                                     description="classification: the label set; default: labels seen in train.")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    balance: Literal["none", "oversample", "undersample", "class_weights"] = Field(
        "none", description="classification: balance the training classes, or weight the loss by class.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    packing: bool = Field(False, description="Pack several examples per sequence (attention kept within each).")
    group_by_length: bool = Field(False, description="Without packing: batch examples of similar length together.")
    shuffle: bool = Field(True, description="Shuffle the training data every epoch (seeded).")
    cache_dir: str | None = Field(None, description="Prepared-data cache; default: $DTRAIN_CACHE/data or ~/.cache/dtrain/data.")
    num_proc: int = Field(1, ge=1, description="Processes for cleaning and tokenization.")

    @model_validator(mode="before")
    @classmethod
    def _sources_from_strings(cls, values: Any) -> Any:
        if isinstance(values, dict):
            values = dict(values)
            for key in ("train", "validation", "test"):
                items = values.get(key)
                if isinstance(items, (str, dict)):
                    items = [items]
                if isinstance(items, list):
                    values[key] = [{"path": s} if isinstance(s, str) else s for s in items]
        return values

    @model_validator(mode="after")
    def _ratios(self) -> "DataConfig":
        if self.val_ratio + self.test_ratio >= 1.0:
            raise ValueError(f"data.val_ratio + data.test_ratio = {self.val_ratio + self.test_ratio} leaves no training data")
        return self


class PeftConfig(Section):
    method: Literal["none", "lora", "dora", "qlora"] = Field(
        "none", description="none (full fine-tune), lora, dora (weight-decomposed LoRA), or qlora (LoRA on a 4-bit base).")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="qlora: also quantise the quantisation constants.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="qlora: dtype of the de-quantised matmuls; auto: bfloat16 with train.precision=bf16, else float32.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="qlora: dtype the packed 4-bit weights are stored as; auto: bfloat16 for sharding "
        "strategies (what lets FSDP2 shard them), uint8 otherwise.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        # (Which names the model has is checked when the adapter is built: dtrain.peft.)
        if isinstance(value, str) and value != "all-linear":
            raise ValueError(f"give a list of module names, e.g. peft.target_modules=[{value}], or all-linear")
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError("the list is empty: give the names of the modules to adapt, e.g. [q_proj, v_proj], "
                             "or all-linear")
        return value


class FsdpConfig(Section):
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after forward (ZeRO-3 like); false keeps them until backward.")
    cpu_offload: bool = Field(False, description="Keep sharded parameters, gradients and optimizer state in CPU memory.")
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the gradient reduce-scatter (parameters use bf16 with train.precision=bf16).")


class MeshConfig(Section):
    replicate: int = Field(
        1, ge=1, description="fsdp: whole replicas of the sharded model (HSDP); parameters are gathered within a "
        "replica, gradients all-reduced across them: map nodes here (ranks are laid out replicate-major).")
    shard: int = Field(
        -1, ge=-1, description="fsdp: ranks each replica's parameters, gradients and optimizer state are sharded "
        "over; -1: the processes left over by replicate and tensor.")
    tensor: int = Field(
        1, ge=1, description="fsdp: tensor-parallel degree (with sequence parallel for the norms): each decoder "
        "block's linear layers split across this many consecutive ranks (keep them within a node); attention "
        "and KV heads must divide by it.")
    sequence: int = Field(
        1, ge=1, description="fsdp: sequence-parallel degree for long context (Ulysses): each sequence split "
        "across this many ranks, attention exchanging tokens for heads (all-to-all); attention and KV heads "
        "must divide by it. Causal LM training.")

    @field_validator("shard")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 for the processes left over by replicate and tensor")
        return value

    @property
    def is_default(self) -> bool:
        return self.replicate == 1 and self.shard == -1 and self.tensor == 1 and self.sequence == 1


class ParallelConfig(Section):
    strategy: Literal["single", "ddp", "fsdp", "deepspeed"] = Field(
        "single", description="single (one process), ddp, fsdp (FSDP2), or deepspeed (ZeRO-1/2/3, see deepspeed_config).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend; auto: nccl on CUDA, gloo on CPU.")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="fsdp: how the processes are arranged: "
                             "replicate x shard x tensor (HSDP, tensor parallel); default: all of them shard.")
    deepspeed_config: str | dict[str, Any] | None = Field(
        None, description="deepspeed: a JSON file (ds_configs/zero3.json, ...) or an inline mapping; batch size, "
        "accumulation, clipping and precision come from train.* / optim.* (\"auto\" or equal values only).")


class OptimConfig(Section):
    # torch's optimizers check their arguments only when built, minutes into a run, and name no key:
    # every rule they have is a constraint here (and an infinite or NaN value is refused too).
    model_config = ConfigDict(allow_inf_nan=False)

    name: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch), or bitsandbytes' 8-bit / paged AdamW (single and ddp).")
    lr: float = Field(3e-4, ge=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    fused: bool | None = Field(None, description="Fused AdamW kernel; default: on where the device supports it.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm to this; null: off.")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="Layer-wise LR decay: block i of L gets lr x decay^(L-i), the embeddings decay^(L+1); 1: off.")
    groups: list[ParamGroupConfig] = Field(default_factory=list, description="Per-pattern LR scale / weight decay: [{pattern, lr_scale, weight_decay}].")
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on trainable weight matrices (added as l1 x sign(w) to their gradient).")
    lr_scaling: Literal["none", "sqrt_tokens"] = Field(
        "none", description="sqrt_tokens: the LR used is lr x sqrt(tokens per global batch / optim.lr_reference_tokens), "
        "tokens per batch = micro_batch_size x grad_accum_steps x processes x data.max_seq_len; logged at the start.")
    lr_reference_tokens: int | None = Field(
        None, ge=1, description="Tokens per global batch at which optim.lr was tuned (needed by lr_scaling=sqrt_tokens).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        # torch.optim.AdamW (and bitsandbytes' optimizers) need 0 <= beta < 1 for each
        bad = [f"beta{i + 1}={b}" for i, b in enumerate(betas) if not 0.0 <= b < 1.0]
        if bad:
            raise ValueError(f"{' and '.join(bad)} out of range: both betas (the decay rates of AdamW's moment "
                             "estimates) must be >= 0 and < 1, e.g. [0.9, 0.999]")
        return betas

    @model_validator(mode="after")
    def _scaling_reference(self) -> "OptimConfig":
        if self.lr_scaling == "sqrt_tokens" and self.lr_reference_tokens is None:
            raise ValueError("optim.lr_scaling=sqrt_tokens needs optim.lr_reference_tokens: the tokens per global batch "
                             "at which optim.lr was tuned")
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "step", "exponential"] = Field(
        "cosine", description="LR decay after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a fraction of the total steps.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="linear/cosine: final LR as a fraction of the peak.")
    step_size: int = Field(100, ge=1, description="step: multiply the LR by gamma every step_size steps.")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step/exponential: decay factor.")


class TrainConfig(Section):
    objective: Literal["auto", "causal_lm", "classification", "distillation", "dpo", "ipo", "simpo", "orpo", "kto",
                       "reward_model", "grpo"] = Field(
        "auto", description="What is optimised (dtrain/objectives/): causal_lm (next-token loss on the trained "
        "tokens), classification (the sequence-classification head's loss), distillation (a teacher's soft targets "
        "mixed into the task's loss, see distill.*); on preference data (see preference.*): dpo, ipo, simpo, orpo, "
        "reward_model (a scalar head, Bradley-Terry loss); on unpaired_preference data: kto; on prompt data: grpo "
        "(online RL with reward functions, see grpo.*). auto: distillation "
        "when distill.teacher is set, dpo on preference data, kto on unpaired_preference data, grpo on prompt data, reward_model with "
        "model.task=reward, else model.task.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; set this or epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data; set this or max_steps.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    max_bad_steps: int = Field(
        3, ge=1, description="Stop after this many consecutive steps with a NaN/inf loss or gradient (skipped)."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy loss.")

    @model_validator(mode="before")
    @classmethod
    def _one_length(cls, values: Any) -> Any:
        if isinstance(values, dict):
            steps, epochs = values.get("max_steps"), values.get("epochs")
            if steps is not None and epochs is not None:
                raise ValueError("set only one of train.max_steps and train.epochs")
            if steps is None and epochs is None:
                values = {**values, "epochs": 1.0}
        return values


class EarlyStoppingConfig(Section):
    patience: int | None = Field(None, ge=1, description="Evaluations without improvement before stopping; null: off.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; null: only at the end.")
    max_batches: int | None = Field(None, ge=1, description="Cap the batches per evaluation (per rank): a seeded sample of max_batches x batch size x ranks rows, the same at every evaluation; null: whole split.")
    batch_size: int | None = Field(None, ge=1, description="Default: train.micro_batch_size.")
    metric: str = Field("loss", description="Metric for early stopping, best checkpoint and diagnosis: loss; causal_lm: perplexity; "
                        "classification: accuracy, f1_macro, f1_micro, precision_macro, recall_macro; generation: exact_match, contains_answer; "
                        "grpo: reward (greedy completions' mean total reward), reward_<name> of each function.")
    mode: Literal["min", "max"] | None = Field(None, description="Whether smaller or larger is better; default: min for loss/perplexity, else max.")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    generation: GenerationEvalConfig = Field(default_factory=GenerationEvalConfig)
    worst_examples: int = Field(10, ge=0, description="Validation examples with the highest loss written to worst_examples.md at the end.")


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps; null: only at the end.")
    keep_last: int = Field(2, ge=1, description="Newest complete checkpoints to keep.")
    keep_best: int = Field(0, ge=0, description="Also keep the N checkpoints with the best eval.metric (saved at an evaluation).")
    resume: str | None = Field(None, description="auto (newest complete checkpoint in output_dir), a checkpoint path, or null.")
    async_save: bool = Field(False, description="Write checkpoints in the background while training goes on (not deepspeed).")
    min_free_gb: float = Field(
        1.0, ge=0.0, description="Refuse to start a checkpoint unless this much disk (and at least the size of the last "
        "checkpoint) is free; nothing already written is touched.")
    stop_file: str | None = Field(
        None, description="A path on storage every rank sees: once a file is there, the run saves a checkpoint at the "
        "next step and stops (exit 75), as on SIGUSR1; a run started while it is there is refused. For processes no "
        "signal reaches: Ray workers, Tune trials (slurm/tune.sh sets it for a search).")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard events to output_dir/tensorboard.")
    wandb: bool = Field(False, description="Log to Weights & Biases (WANDB_MODE=offline works without network).")
    wandb_project: str = Field("dtrain", description="W&B project.")
    progress_bar: bool = Field(True, description="Progress bar on the main process.")


class RayConfig(Section):
    """How `python -m dtrain.ray_train` scales a run with Ray Train (the core never imports Ray)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (processes), across the cluster's nodes.")
    use_gpu: bool = Field(False, description="One GPU per worker (Ray's ScalingConfig.use_gpu).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker; default: 1 with use_gpu, else 0.")
    storage_path: str | None = Field(
        None, description="Shared storage (a path every node sees, or s3:// gs://) for Ray's run records and "
        "checkpoints; default: output_dir's parent.")
    address: str | None = Field(None, description="Ray cluster address (ray://host:10001, auto); null: start Ray locally.")


class SearchDimension(Section):
    """One key of tune.search_space: exactly one of these."""

    grid: list[Any] | None = Field(None, min_length=1, description="Every value, each in its own trial (x num_samples).")
    choice: list[Any] | None = Field(None, min_length=1, description="One value drawn per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi]: a float drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[lo, hi], both > 0: uniform in log space.")
    randint: tuple[int, int] | None = Field(None, description="[lo, hi): an integer drawn uniformly, hi excluded.")
    quniform: tuple[float, float, float] | None = Field(None, description="[lo, hi, q]: uniform, rounded to a multiple of q.")

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDimension":
        given = [name for name in SEARCH_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_KINDS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        bounds = getattr(self, kind)
        if kind in ("uniform", "loguniform", "randint", "quniform") and not bounds[0] < bounds[1]:
            raise ValueError(f"{kind}: the lower bound must be below the upper bound (got {list(bounds)})")
        if kind == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform needs bounds > 0 (a log scale), got {list(bounds)}; use uniform to include 0")
        if kind == "quniform" and bounds[2] <= 0:
            raise ValueError(f"quniform: the step q must be > 0 (got {bounds[2]})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in SEARCH_KINDS if getattr(self, name) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")


class TuneSchedulerConfig(Section):
    name: Literal["asha", "median", "none"] = Field(
        "asha", description="Early stopping of poor trials on tune.metric: asha (async successive halving), "
        "median (stop below the median of the others at the same step), or none.")
    grace_period: int = Field(1, ge=1, description="Steps a trial runs before it can be stopped (both).")
    reduction_factor: float = Field(2.0, gt=1.0, description="asha: keep 1/reduction_factor of the trials at each rung.")
    max_t: int | None = Field(None, ge=1, description="asha: the step at which trials end; default: train.max_steps.")
    min_samples_required: int = Field(3, ge=1, description="median: trials needed at a step before stopping any.")


class TuneResourcesConfig(Section):
    workers: int = Field(1, ge=1, description="Processes per trial; more than 1 runs the trial through Ray Train "
                         "(parallel.strategy ddp or fsdp).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (a single-worker trial: per trial).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker.")


class TuneConfig(Section):
    """`python -m dtrain.tune` (Ray Tune): which keys to search and how; `dtrain train` ignores it."""

    search_space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="Config key (dotted, e.g. optim.lr) -> {grid | choice | uniform | "
        "loguniform | randint | quniform: ...}.")
    algorithm: Literal["grid", "random", "bayesian"] = Field(
        "random", description="grid (every grid point; no sampled dimensions), random, or bayesian (Optuna TPE).")
    num_samples: int = Field(8, ge=1, description="Trials (grid: repetitions of the whole grid).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials at once; default: as many as the CPUs/GPUs allow.")
    seed: int | None = Field(None, description="Seed of the search algorithm; default: the config's seed.")
    metric: str | None = Field(None, description="Metric to optimise, as reported by evaluation: eval_loss, "
                               "eval_accuracy, ...; default: eval_<eval.metric>.")
    mode: Literal["min", "max"] | None = Field(None, description="Default: eval.mode for eval_<eval.metric>, else min for "
                                               "loss/perplexity, max otherwise.")
    scheduler: TuneSchedulerConfig = Field(default_factory=TuneSchedulerConfig)
    resources: TuneResourcesConfig = Field(default_factory=TuneResourcesConfig)
    storage_dir: str = Field("runs/tune", description="Directory (or s3:// gs://) holding searches; the search is "
                             "storage_dir/name, with one dtrain run directory per trial and the results.")
    name: str = Field("search", description="The search's name; rerun with --resume to continue it.")

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        for key in space:
            if key.split(".")[0] in UNSEARCHABLE:
                raise ValueError(f"`{key}` cannot be searched: the search sets {', '.join(UNSEARCHABLE)} itself")
            if key not in ALL_KEYS:
                raise PydanticCustomError("search_space_key", "unknown key {key}", {"key": key})
            if key in SECTION_KEYS:
                raise PydanticCustomError("search_space_section", "section {key}", {"key": key})
        return space


UNSEARCHABLE = ("tune", "output_dir", "ray")  # per trial, these are set by the search itself


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    seed: int = Field(42, description="Seeds model init, data order and dropout.")
    output_dir: str = Field("runs/default", description="Run directory: config, metrics, checkpoints, final model.")

    @model_validator(mode="after")
    def _defaults_and_device(self) -> "Config":
        # (Rules that depend on the objective or the strategy are theirs: see dtrain.config.)
        if self.eval.mode is None:
            self.eval.mode = "min" if self.eval.metric in ("loss", "perplexity") else "max"
        tune = self.tune
        if tune.metric is None:
            tune.metric = f"eval_{self.eval.metric}"
        if tune.mode is None:
            tune.mode = self.eval.mode if tune.metric == f"eval_{self.eval.metric}" else (
                "min" if tune.metric in ("eval_loss", "eval_perplexity") else "max")
        if self.model.attn_implementation == "flash_attention_2" and self.parallel.device == "cpu":
            raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA device (parallel.device=cpu); "
                             "use sdpa or auto")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every value, secrets included: for handing the config to another process of this run."""
        return self.model_dump(mode="json")

    def public_dict(self) -> dict[str, Any]:
        """What may be written or logged (config.yaml, manifests, W&B, `config show`): every data
        source's database password as *** (a resumed run reads it again from the user's config, or
        from the environment when the URL says `${NAME}`)."""
        from dtrain.data.sources import is_sql_source, redact_url

        data = self.to_dict()
        for split in ("train", "validation", "test"):
            for source in data["data"].get(split) or []:
                if source.get("url"):
                    source["url"] = redact_url(source["url"])
                if source.get("path") and is_sql_source(source["path"]):
                    source["path"] = redact_url(source["path"])
        return data

    def to_yaml(self) -> str:
        """The config as written to a run's config.yaml (public_dict: no secrets)."""
        return yaml.safe_dump(self.public_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Every key, by its dotted name


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, key + "."))
    return keys


ALL_KEYS = _all_keys(Config)
SECTION_KEYS = {key.rsplit(".", 1)[0] for key in ALL_KEYS if "." in key}  # the keys that hold others


def reference_markdown() -> str:
    """The config reference table in README.md, generated from the schema (a test keeps them equal)."""

    def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.extend(rows(ann, f"{prefix}{name}."))
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(mode="json", exclude_defaults=True) for d in default]
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            out.append(f"| `{prefix}{name}` | `{shown}` | {field.description or ''} |")
        return out

    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(Config)])
