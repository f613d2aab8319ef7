"""`dtrain estimate CONFIG`: will it fit, with which strategy, and how long will an epoch take?

Everything is computed from the model *config*: the model is built on the meta device (no
memory, no weights), with the run's PEFT adapters and freezing applied, so the parameter
counts are those of the real model, exactly. Memory per device is then the sum of

    weights       parameters as stored (model.dtype; a QLoRA base in 4 bits)
    gradients     one per trainable parameter, in its dtype (+ DDP's bucket copy)
    optimizer     AdamW's two moments (+ the fp32 master copy DeepSpeed keeps) or 8-bit states
    activations   what autograd saves for backward, per transformer layer (Korthikanti et al.
                  2022 / "Transformer Math 101" style, counted for the Hugging Face Llama-family
                  layer as it runs under SDPA: no attention matrix is stored, but a padding or
                  packing mask is, per layer), or with activation checkpointing only each
                  layer's input plus one layer recomputed in backward
    logits/loss   the transient logits copies at the loss: batch x seq x vocab (fp32) in full, or
                  one chunk of model.logits_chunk_tokens positions x vocab with model.logits
                  chunked (dtrain.lm_head; the default where the model's head allows it)

each divided over the ranks as each strategy really does it (see `strategy_memory`). The
sum is a conservative peak: with gradient accumulation the gradients do coexist with a
full set of activations; without it the true peak can be lower by up to the gradients.

The formulas were checked against measurement on CPU (tests/test_estimate.py): parameter,
gradient and optimizer bytes exactly; saved activations within a few percent.

Any architecture transformers builds is sized: its dimensions are read under the names its
config gives them (DIM_NAMES: GPT-2's n_embd / n_layer / n_head / n_inner, OPT's ffn_dim ...),
with the documented default where one is null; the parameter counts stay exact, and a line
says what the activations could not account for (another layer type, dropout).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dtrain.schema import SEQUENCE_HEADS, Config, ConfigError

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Memory left for the CUDA context, the caching allocator's fragmentation and NCCL buffers:
# a strategy "fits" when its estimate is at most this fraction of the device's memory.
USABLE_FRACTION = 0.9
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (the usual reference for MFU)


# --------------------------------------------------------------------------------------
# Parameters, counted on the meta device


@dataclass
class ParamInfo:
    shape: tuple[int, ...]
    trainable: bool
    quantized: bool  # a QLoRA 4-bit base weight
    block: int | None  # index of the transformer block holding it; None: the root (embeddings, norm, head)
    tp_dim: int | None = None  # the dimension tensor parallel splits it along (dtrain.parallel.tensor); None: whole

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelShape:
    dims: "Dims"  # layers, hidden, heads, kv_heads, head_dim, intermediate
    vocab: int
    params: list[ParamInfo]
    matmul_params: int  # weights used in matmuls per token (the tied head counted as a matmul)
    trainable_matmul_params: int
    notes: list[str] = field(default_factory=list)  # what the estimate had to assume about this model (dims' too)
    chunkable_head: bool = False  # a causal LM head dtrain.lm_head can chunk (model.logits)
    tensor_plan: bool = False  # dtrain has a tensor-parallel plan for the architecture
    tensor_collectives: Any = None  # its dtrain.parallel.tensor.BlockCollectives
    embeddings_train: bool = True  # (else the first block's input needs no gradient)
    head_params: int = 0  # elements of the output head's weight (the embeddings' when tied)
    separate_embeddings: int = 0  # elements of the input embeddings when they are not the head's weight

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def quantized(self) -> int:
        return sum(p.numel for p in self.params if p.quantized)


# The names architecture families give a dimension in their config, the usual one first.
# PretrainedConfig.attribute_map already answers the first for most (GPT-2's n_embd, n_layer,
# n_head; T5's d_model, num_heads); the others are for configs that map nothing.
DIM_NAMES = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    # GPT-2/GPT-J/CodeGen n_inner, OPT ffn_dim, T5 d_ff, Falcon ffn_hidden_size, BART, DistilBERT
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "encoder_ffn_dim",
                     "hidden_dim"),
}


def dim_field(config: Any, kind: str) -> str | None:
    """The name `config` gives dimension `kind` (DIM_NAMES): the first with a value, else the first
    present though null; None if it has none."""
    present = [name for name in DIM_NAMES[kind] if hasattr(config, name)]
    return next((name for name in present if getattr(config, name) is not None), present[0] if present else None)


def _dim(config: Any, kind: str) -> int | None:
    return next((v for v in (getattr(config, n, None) for n in DIM_NAMES[kind]) if v is not None), None)


@dataclass
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    notes: list[str] = field(default_factory=list)


def model_dims(config: Any) -> Dims:
    """The transformer's dimensions from its (text) config, each architecture's documented default
    where a field is null; a ConfigError naming the model if one the estimate needs is missing."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # (a multimodal model's LM)
    kind_of = getattr(config, "model_type", None) or type(config).__name__
    required = {}
    for kind, what in (("layers", "number of layers"), ("hidden", "hidden size"),
                       ("heads", "number of attention heads")):
        value = _dim(text, kind)
        if not isinstance(value, int) or value < 1:
            where = getattr(config, "_name_or_path", "") or "the model"
            raise ConfigError(f"model.path: the {kind_of} config of {where} gives no {what} "
                              f"({' / '.join(DIM_NAMES[kind])}); cannot size the model without it")
        required[kind] = value
    hidden, heads = required["hidden"], required["heads"]
    notes = []
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # GPT-BigCode, Falcon-7B: one key/value head
    else:
        kv_heads = _dim(text, "kv_heads") or heads  # absent or null: plain multi-head attention
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads  # (d_kv: T5)
    intermediate = _dim(text, "intermediate")
    if intermediate is None:
        if getattr(text, "expansion_ratio", None):  # MPT
            intermediate = int(text.expansion_ratio * hidden)
        else:
            # null n_inner (GPT-2, GPT-J), ffn_hidden_size (Falcon), intermediate_size (GPT-Neo): 4 x hidden,
            # as their configs document; Bloom has no field and is 4 x hidden too.
            intermediate = 4 * hidden
            if dim_field(text, "intermediate") is None and kind_of != "bloom":
                notes.append(f"the {kind_of} config names no MLP width ({' / '.join(DIM_NAMES['intermediate'])}); "
                             f"activations assume 4 x hidden = {intermediate}")
    return Dims(required["layers"], hidden, heads, kv_heads, head_dim, intermediate, notes)


def _model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task in SEQUENCE_HEADS else AutoModelForCausalLM


def build_from_config(cfg: Config, config: Any) -> nn.Module:
    """The run's model class (causal LM or classification) built from `config`, on the current
    default device; a config it cannot be built from is a ConfigError naming model.path."""
    try:
        return _model_class(cfg.model.task).from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        kind = getattr(config, "model_type", None) or type(config).__name__
        if str(exc).startswith("Unrecognized configuration class"):
            head = "sequence-classification" if cfg.model.task in SEQUENCE_HEADS else "causal-LM"
            raise ConfigError(f"model.task={cfg.model.task}: transformers has no {head} model for {kind} "
                              f"({cfg.model.path}); use another model.task, or a model whose architecture has one "
                              "(Llama, Qwen2, Mistral, GPT-2 ...)") from None
        raise ConfigError(f"model.path: cannot build a {kind} model for model.task={cfg.model.task} from the "
                          f"config of {cfg.model.path}: {(lines[0] if lines else type(exc).__name__).rstrip('.')}; "
                          "check its config.json") from None


def _matmul_modules():
    """Module types whose weight is a matmul: nn.Linear, and GPT-2-style Conv1D (a transposed Linear)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _llama_like(block: nn.Module) -> bool:
    """A Llama-family layer (RMSNorm, gated MLP, no experts): the one `activation_bytes` counts."""
    names = [name.rsplit(".", 1)[-1] for name, _ in block.named_modules()]
    classes = [type(m).__name__ for m in block.modules()]
    return (any(n in ("gate_proj", "gate_up_proj") for n in names) and any("RMSNorm" in c for c in classes)
            and not any(n in ("experts", "block_sparse_moe") for n in names))


def _dropout_on(config: Any, cfg: Config) -> str:
    """The model's non-zero dropout fields, with the run's model.dropout applied ('' if none)."""
    from dtrain.model import DROPOUT_FIELDS, apply_dropout

    config = copy.deepcopy(config)
    apply_dropout(config, cfg.model.dropout)
    on = {name: getattr(config, name, None) for kind in ("attention", "hidden") for name in DROPOUT_FIELDS[kind]}
    return ", ".join(f"{name}={value:g}" for name, value in on.items() if isinstance(value, float) and value > 0)


def model_shape(cfg: Config, num_labels: int | None = None, model_config: Any = None) -> ModelShape:
    """The run's model built on the meta device, with its adapters and freezing: exact counts."""
    from dtrain.finetune import freeze
    from dtrain.lm_head import chunkable
    from dtrain.model import load_model_config, transformer_blocks
    from dtrain.parallel.tensor import block_collectives, split_dims
    from dtrain.peft import apply_peft

    config = copy.deepcopy(model_config if model_config is not None else load_model_config(cfg.model))
    dims = model_dims(config)
    if cfg.model.task in SEQUENCE_HEADS:
        config.num_labels = 1 if cfg.model.task == "reward" else num_labels or 2
    peft = cfg.peft
    if peft.method == "qlora":
        # The same adapters as on the 4-bit base; quantisation changes storage, not counts.
        peft = peft.model_copy(update={"method": "lora"})
    matmul_types = _matmul_modules()
    notes = list(dims.notes)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, not the user's concern
        # peft switching fan_in_fan_out on for Conv1D layers (GPT-2): the run says so; the counts do not change
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out", category=UserWarning)
        model = build_from_config(cfg, config)
        try:
            blocks = transformer_blocks(model)
        except ValueError:  # no _no_split_modules: every parameter is counted at the root
            blocks = []
            notes.append(f"{type(model).__name__} names no transformer blocks; sharded strategies' gathered "
                         "parameters are not counted")
        # bitsandbytes quantises the Linear (and Conv1D) layers of the blocks (not the head, not embeddings).
        quantized = ({id(m.weight) for b in blocks for m in b.modules() if isinstance(m, matmul_types)}
                     if cfg.peft.method == "qlora" else set())
        model = apply_peft(model, peft, cfg.model.task)
        freeze(model, cfg.freeze)
        chunkable_head = cfg.model.task == "causal_lm" and chunkable(model) is None  # (adapters on the head: no)
        split = split_dims(model)
        collectives = block_collectives(model)
        embeddings_train = model.get_input_embeddings().weight.requires_grad
        head = model.get_output_embeddings() if cfg.model.task == "causal_lm" else None
        head_weight = getattr(head, "weight", None)
        embed_weight = model.get_input_embeddings().weight
        head_params = head_weight.numel() if head_weight is not None else 0
        separate_embeddings = embed_weight.numel() if head_weight is not embed_weight else 0
    # After peft: its LoRA factors are new tensors inside the same block modules.
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    params = [ParamInfo(tuple(p.shape), p.requires_grad, id(p) in quantized, block_of.get(id(p)), split.get(id(p)))
              for p in model.parameters()]  # shared (tied) tensors once
    matmul = trainable_matmul = 0
    for module in model.modules():
        if isinstance(module, matmul_types):  # peft's LoRA layers hold their factors as nn.Linear too
            n = module.weight.numel()
            matmul += n
            trainable_matmul += n if module.weight.requires_grad else 0
    if dropped := _dropout_on(config, cfg):
        notes.append(f"dropout is on ({dropped}): its saved masks (and, with some attention kernels, the "
                     "attention probabilities) are not counted in the activations")
    if blocks and not _llama_like(blocks[0]):
        kind = getattr(config, "model_type", None) or type(model).__name__
        notes.append(f"activations are counted for a Llama-family layer (RMSNorm, gated MLP); a {kind} layer "
                     "differs, so that column is approximate")
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if not vocab:
        vocab = model.get_input_embeddings().weight.shape[0]
    return ModelShape(dims=dims, vocab=vocab, params=params, matmul_params=matmul,
                      trainable_matmul_params=trainable_matmul, notes=notes, chunkable_head=chunkable_head,
                      tensor_plan=bool(split), tensor_collectives=collectives, embeddings_train=embeddings_train,
                      head_params=head_params, separate_embeddings=separate_embeddings)


# --------------------------------------------------------------------------------------
# Bytes per term


def nf4_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """A bitsandbytes 4-bit weight: two values per byte, plus one absmax per block of 64
    (fp32, or with double quantisation 8-bit with an fp32 absmax per 256 blocks)."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4  # + code, offset
    return math.ceil(numel / 2) + 4 * blocks


def adamw_bytes(numels: list[int], bytes_per: int) -> int:
    """torch AdamW: exp_avg and exp_avg_sq like the parameter, plus a 0-dim fp32 `step` tensor each."""
    return sum(2 * n * bytes_per + 4 for n in numels)


def adamw_8bit_bytes(numels: list[int]) -> int:
    """bitsandbytes (paged) AdamW8bit: 8-bit blockwise states for tensors of >= 4096 elements
    (1 byte each for both moments + an fp32 absmax per 256), fp32 states below that; the two
    256-entry quantisation maps are shared by all parameters."""
    total, any_8bit = 0, False
    for n in numels:
        if n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
            any_8bit = True
        else:
            total += 8 * n
    return total + (2 * 256 * 4 if any_8bit else 0)


@dataclass
class Activations:
    """Per micro-batch of `batch` x `seq` tokens."""

    saved: int  # saved for backward (the autograd graph), at the end of forward, on the device
    logits: int  # transient logits copies at the loss, on top of `saved`
    overlap: int = 0  # counted in both, never alive together: the total counts it once
    offloaded: int = 0  # saved in host memory instead (model.activation_offloading)


def activation_bytes(shape: ModelShape, batch: int, seq: int, *, mode: str = "fp32", checkpointing: bool = False,
                     mask: bool = False, attention: str = "sdpa", causal_lm: bool = True,
                     logits_chunk: int = 0, offload: bool = False, tensor: int = 1) -> Activations:
    """Bytes autograd keeps for backward for one micro-batch (Hugging Face Llama-family layer).

    `mode`: fp32 (fp32 weights, no autocast), bf16 (weights in bf16: model.dtype, DeepSpeed's
    or FSDP's bf16 parameters) or autocast (fp32 weights, bf16 autocast). Per layer, with
    t = the compute dtype's bytes (measured term by term with saved-tensor hooks on CPU):

      2 RMSNorms     x in fp32, x*rsqrt in fp32, the output as the next matmuls save it
                     (fp32: 3 x 4 bytes; bf16: 4 + 2 + 2; autocast: 4 + 4 + 2 per consuming
                     matmul, as each casts it separately), rsqrt (4 per token)
      attention      q after RoPE, k and v (kv heads; all heads when a mask makes HF repeat them),
                     the SDPA output (also o_proj's input), logsumexp (fp32 per head and token);
                     SDPA stores no score matrix, but a boolean mask is turned into a float
                     bias per call (batch x seq^2 x t per layer); eager attention stores the
                     probabilities (fp32 softmax + a t copy)
      MLP            gate, silu(gate), up, silu(gate)*up: 4 x intermediate x t

    Outside the layers: the final norm, and the log-softmax output of the loss (fp32 logits).
    With activation checkpointing each layer keeps only its input; one layer at a time is
    recomputed during backward, so one layer's full set is added.

    `logits_chunk` > 0 (dtrain.lm_head, model.logits=chunked): no logits are saved; the loss
    keeps the gradient of the head's input (hidden-size per token) and, while it computes one
    chunk, that chunk's fp32 logits, shifted logits, softmax (its gradient, in place) and, in a
    16-bit compute dtype, the 16-bit logits and gradient: chunk x vocab x (12 + 2t). With
    checkpointing, the chunk is computed (in forward, or at the start of backward) while no
    layer is being recomputed: the two are counted once, the larger (`overlap`).

    `offload` (model.activation_offloading): the decoder's saved tensors go to host memory; with
    checkpointing the layers' inputs, without it every layer's set but the one in flight.

    `tensor` > 1 (tensor parallel with sequence parallel, dtrain.parallel.tensor): each rank keeps
    its heads' share of attention and its share of the MLP's features, and the norms' tensors for
    its slice of the sequence; the fan-out projections save their input gathered (the whole
    sequence: the norm outputs they read), and outside the layers nothing is split (the final norm,
    the head and the loss run on the whole sequence on every rank).
    """
    b, s, h, f = batch, seq, shape.dims.hidden, shape.dims.intermediate
    a, dh = shape.dims.heads, shape.dims.head_dim
    tokens = b * s
    t = 4 if mode == "fp32" else 2
    residual = 2 if mode == "bf16" else 4  # the residual stream stays fp32 under autocast

    def norm(consumers: int, split: int = 1) -> int:
        # x and x*rsqrt in fp32 (bf16: the fp32 copy of x, then x*rsqrt cast back), rsqrt per
        # token, and the output as the matmuls save it: under autocast each consuming matmul
        # saves its own bf16 cast of the fp32 output (q, k, v: 3; gate, up: 2; the head: 1).
        # `split`: sequence parallel (the norm on a slice; its output gathered for the matmuls).
        inner = {"fp32": 8, "bf16": 6, "autocast": 8}[mode]
        out = 2 * consumers if mode == "autocast" else t
        return (inner * tokens * h + 4 * tokens) // split + out * tokens * h
    kv = a if mask else shape.dims.kv_heads  # HF passes enable_gqa only without a mask
    attn = tokens * (a * dh * t * 2 + 2 * kv * dh * t) + 4 * b * a * s  # q, out, k, v, logsumexp
    if attention == "eager":
        attn += b * a * s * s * (4 + (t if t != 4 else 0))
    elif mask:
        attn += b * s * s * t * tensor  # (the bias is made per call, whole, on every rank)
    mlp = 4 * tokens * f * t
    layer = norm(3, tensor) + (attn + mlp) // tensor + norm(2, tensor)
    rope = 2 * s * dh * 4  # cos and sin, shared by every layer
    head_in = norm(1)  # final norm (its output is lm_head's input)
    logits_saved = 4 * b * (s - 1) * shape.vocab if causal_lm else 0  # log_softmax output (fp32)
    if causal_lm and logits_chunk:
        logits_saved = tokens * h * residual  # the head input's gradient, computed in forward
    outside = head_in + rope + logits_saved + 8 * tokens  # + input ids
    per_layer = residual * tokens * h // tensor if checkpointing else layer
    saved, offloaded = shape.dims.layers * per_layer + outside, 0
    if offload:  # (and the decoder's final norm, which saves its input and its output)
        offloaded = head_in + (shape.dims.layers * per_layer if checkpointing else (shape.dims.layers - 1) * layer)
        saved -= offloaded
    if checkpointing:
        saved += layer  # the layer being recomputed in backward
    # At the loss: the logits in the compute dtype, their fp32 copy (when t != 4), the
    # reshaped fp32 slice cross_entropy reads; in backward a gradient of the same size.
    vocab_tokens = b * s * shape.vocab if causal_lm else 0
    logits = vocab_tokens * (t + (4 if t != 4 else 0) + 4)
    overlap = 0
    if causal_lm and logits_chunk:
        logits = min(logits_chunk, tokens) * shape.vocab * (12 + (2 * t if t != 4 else 0))
        overlap = min(logits, layer) if checkpointing else 0
    return Activations(saved=saved, logits=logits, overlap=overlap, offloaded=offloaded)


# --------------------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True)
class StrategySpec:
    """A row of the table: one parallel.strategy in one memory layout."""

    name: str
    strategy: str  # the parallel.strategy it runs as (whose capabilities are asked: QLoRA, 8-bit optimizers)
    layout: str  # replicated: every rank holds everything | sharded: FSDP2, each tensor split on dim 0 |
    #              partitioned: ZeRO, flat fp32 partitions (by `stage`)
    stage: int = 0
    offload: bool = False
    bucket_copy: bool = False  # gradients also in the all-reduce buckets (DDP's reducer)
    rank: float = 0  # how much it costs in speed (communication, offload), cheapest first
    replicate: int = 1  # sharded: parallel.mesh.replicate (HSDP: replicas of the sharded model)
    tensor: int = 1  # sharded: parallel.mesh.tensor (tensor parallel degree)
    sequence: int = 1  # sharded: parallel.mesh.sequence (sequence parallel degree)

    @property
    def overrides(self) -> str:
        """The config that runs as this row."""
        keys = [f"parallel.strategy={self.strategy}"]  # (mesh rows are all fsdp's: mesh_specs)
        keys += [f"parallel.mesh.replicate={self.replicate}"] if self.replicate > 1 else []
        keys += [f"parallel.mesh.tensor={self.tensor}"] if self.tensor > 1 else []
        keys += [f"parallel.mesh.sequence={self.sequence}"] if self.sequence > 1 else []
        return " ".join(keys)

    @property
    def meshed(self) -> bool:
        return (self.replicate, self.tensor, self.sequence) != (1, 1, 1)


STRATEGIES = [
    StrategySpec("single", "single", "replicated", rank=0),
    StrategySpec("ddp", "ddp", "replicated", bucket_copy=True, rank=1),
    StrategySpec("zero1", "deepspeed", "partitioned", 1, rank=2),
    StrategySpec("zero2", "deepspeed", "partitioned", 2, rank=3),
    StrategySpec("fsdp", "fsdp", "sharded", rank=4),
    StrategySpec("zero3", "deepspeed", "partitioned", 3, rank=5),
    StrategySpec("zero2+offload", "deepspeed", "partitioned", 2, offload=True, rank=6),
    StrategySpec("fsdp+offload", "fsdp", "sharded", offload=True, rank=7),
    StrategySpec("zero3+offload", "deepspeed", "partitioned", 3, offload=True, rank=8),
]


@dataclass
class Memory:
    strategy: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    cpu: int = 0  # offloaded to host memory
    gathered: int = 0  # of `weights`: parameters gathered for compute (FSDP, ZeRO-3), not resident shards
    note: str = ""
    overlap: int = 0  # of activations + logits: never alive together (a logits chunk, a recomputed layer)
    comm: int = 0  # bytes each device sends per optimizer step (collectives' volume: sharded_communication, ...)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits - self.overlap


@dataclass
class RunShape:
    """What the memory depends on besides the model: the run's settings and the cluster."""

    world: int = 1
    micro_batch: int = 1
    seq: int = 512
    precision: str = "fp32"  # train.precision
    dtype: str = "float32"  # model.dtype
    peft: str = "none"
    double_quant: bool = True
    optim: str = "adamw"
    checkpointing: bool = False
    mask: bool = True
    attention: str = "sdpa"
    causal_lm: bool = True
    fsdp_reshard: bool = True
    logits_chunk: int = 0  # model.logits: positions per chunk when the head may be chunked; 0: full logits
    offload_activations: bool = False  # model.activation_offloading
    accum: int = 1  # train.grad_accum_steps


def _shard_rows(shape: tuple[int, ...], world: int) -> int:
    """Elements of the largest shard (rank 0) when FSDP2 splits dim 0 over `world` ranks;
    FSDP2 pads every rank's shard to that size."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def strategy_memory(shape: ModelShape, run: RunShape, spec: StrategySpec) -> Memory:
    """Per-device bytes under `spec`, modelled on what each implementation does:

    single/ddp   every rank holds everything. Gradients in the parameters' dtype; DDP keeps a
                 second copy in its all-reduce buckets (gradient_as_bucket_view is off).
                 AdamW moments like the parameters (3P with grads freed, as measured).
    fsdp         FSDP2: each parameter split on dim 0 (shards padded to equal size): weights,
                 gradients and moments / N (1.5P per rank at N=2, as measured); plus the
                 gathered working set: the root's parameters and two blocks in the compute
                 dtype, and one block's unsharded gradients. Offload keeps the shards on CPU.
    zero1/2/3    DeepSpeed: the module in bf16 under bf16 training (else as loaded); an fp32
                 master partition / N always, also in fp32 training (it is a separate copy:
                 2.5P at ZeRO-2 and 2P at ZeRO-3 for N=2, as measured), fp32 moments / N.
                 ZeRO-1 keeps full gradients, ZeRO-2/3 a partition (plus the fp32 copy the
                 step makes, and two reduce buckets of hidden^2). ZeRO-3 partitions the
                 parameters; what it holds gathered from forward to backward (zero3_gathered)
                 is its peak: a small model whole, a large one ~stage3_max_live_parameters
                 elements (1e9 in dtrain's zero3.json). Offload moves the master,
                 moments and fp32 gradients (and at ZeRO-3 the parameters) to CPU.
    """
    N = run.world
    weight_bytes = BYTES[run.dtype]
    bf16 = run.precision == "bf16"
    qlora = run.peft == "qlora"
    infos = shape.params

    def stored(p: ParamInfo) -> int:  # bytes per element as loaded for dtrain's torch strategies
        if p.trainable and run.peft != "none":
            return 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype)
        return weight_bytes

    def weights_of(ps: list[ParamInfo], per) -> int:
        total = 0
        for p in ps:
            if p.quantized:
                total += nf4_bytes(per(p), run.double_quant)
            else:
                total += per(p) * stored(p)
        return total

    from dtrain.parallel import strategy_class

    mode = "bf16" if weight_bytes == 2 else ("autocast" if bf16 else "fp32")
    trainable = [p for p in infos if p.trainable]
    can = strategy_class(spec.strategy)
    if qlora and not can.supports_qlora:
        return Memory(spec.name, 0, 0, 0, 0, 0, note=f"QLoRA is refused with {spec.strategy} (use fsdp)")
    if run.optim != "adamw" and can.shards_optimizer_state:
        return Memory(spec.name, 0, 0, 0, 0, 0, note=f"{run.optim} is refused with {spec.strategy}")
    if bf16 and spec.layout != "replicated":
        mode = "bf16"  # ZeRO's engine casts the module to bf16; FSDP's MixedPrecisionPolicy gathers bf16
    # Sequence parallel: every tensor of a rank is for its slice of the tokens (attention's too, after
    # the exchange: all tokens of a C-th of the heads), and its attention needs no mask.
    act = activation_bytes(shape, run.micro_batch, run.seq // spec.sequence, mode=mode,
                           checkpointing=run.checkpointing, mask=run.mask and spec.sequence == 1,
                           attention=run.attention, causal_lm=run.causal_lm,
                           logits_chunk=run.logits_chunk if shape.chunkable_head else 0,
                           offload=run.offload_activations, tensor=spec.tensor)
    if mode == "autocast":
        # autocast casts each matmul weight to bf16 once per forward; backward needs the copies.
        act.saved += 2 * shape.matmul_params

    if spec.layout == "replicated":
        weights = weights_of(infos, lambda p: p.numel)
        grads = sum(p.numel * stored(p) for p in trainable)
        comm = 2 * (N - 1) * grads // N  # DDP's all-reduce of the gradients (none in one process)
        if spec.bucket_copy and N > 1:
            grads *= 2  # the reducer's flat buckets hold a second copy
        if run.optim in ("adamw_8bit", "paged_adamw_8bit"):
            opt = adamw_8bit_bytes([p.numel for p in trainable])
        else:
            opt = sum(adamw_bytes([p.numel], stored(p)) for p in trainable)
        return Memory(spec.name, weights, grads, opt, act.saved, act.logits, cpu=act.offloaded, overlap=act.overlap,
                      comm=comm)

    if spec.layout == "sharded":
        compute = 2 if bf16 else None
        T = spec.tensor
        S = N // (spec.replicate * T)  # the shard dimension: FSDP splits each (tensor-parallel) local tensor over it

        def local(p: ParamInfo) -> tuple[int, ...]:  # this rank's slice under tensor parallel
            if T == 1 or p.tp_dim is None:
                return p.shape
            return tuple(n // T if d == p.tp_dim else n for d, n in enumerate(p.shape))

        shard = lambda p: _shard_rows(local(p), S)  # noqa: E731
        whole = lambda p: math.prod(local(p))  # noqa: E731
        weights = weights_of(infos, shard)
        grads = sum(shard(p) * stored(p) for p in trainable)
        opt = sum(adamw_bytes([shard(p)], stored(p)) for p in trainable)
        blocks: dict[int | None, list[ParamInfo]] = {}
        for p in infos:
            blocks.setdefault(p.block, []).append(p)
        per_block = [weights_of(ps, whole) if compute is None else
                     sum(nf4_bytes(whole(p), run.double_quant) if p.quantized else whole(p) * compute for p in ps)
                     for k, ps in blocks.items() if k is not None]
        root = blocks.get(None, [])
        root_bytes = (weights_of(root, whole) if compute is None else sum(whole(p) * compute for p in root))
        gathered = root_bytes + 2 * max(per_block, default=0)
        if S == 1 and not spec.offload and compute in (None, weight_bytes):
            gathered = 0  # one shard, on the device, no dtype cast: the shard is the parameter itself
        block_grads = max((sum(whole(p) * 4 for p in ps if p.trainable) for k, ps in blocks.items() if k is not None),
                          default=0) if S > 1 or spec.offload else 0
        cpu = act.offloaded
        comm = sharded_communication(shape, run, spec, S, whole, compute or weight_bytes)
        if spec.offload:
            cpu, weights, grads, opt = cpu + weights + grads + opt, 0, 0, 0
        return Memory(spec.name, weights + gathered, grads + block_grads, opt, act.saved, act.logits, cpu=cpu,
                      gathered=gathered, overlap=act.overlap, comm=comm)

    # DeepSpeed ZeRO
    module_bytes = 2 if bf16 else weight_bytes
    P, Pt = shape.total, sum(p.numel for p in trainable)
    part = math.ceil(Pt / N)
    master, moments = 4 * part, 8 * part
    bucket = 2 * shape.dims.hidden * shape.dims.hidden * module_bytes  # reduce_bucket_size "auto", double-buffered
    if spec.stage == 1:
        grads = Pt * module_bytes + 4 * part
    else:
        grads = 4 * part + bucket
    gathered = 0
    if spec.stage == 3:
        # (one rank without offload holds whole parameters: nothing to gather)
        gathered = zero3_gathered(shape) * module_bytes if N > 1 or spec.offload else 0
        weights = math.ceil(P / N) * module_bytes + gathered
    else:
        weights = P * module_bytes
    opt, cpu = master + moments, act.offloaded
    # As DeepSpeed does it (counted: benchmarks/mesh_comm.py --strategies): ZeRO-1 all-reduces the
    # gradients once per step, ZeRO-2 every micro-batch (its multi-rank bucket all-reduce), and both
    # all-gather the updated partitions once per step; ZeRO-3 reduce-scatters every micro-batch's
    # gradients and gathers the parameters in its forward, and in its backward those it did not keep
    # gathered from forward to backward (zero3_gathered).
    if spec.stage < 3:
        reductions = 2 * (run.accum if spec.stage == 2 else 1)
        comm = (N - 1) * (reductions + 1) * Pt * module_bytes // N
    else:
        regathered = P - zero3_gathered(shape)
        comm = (N - 1) * run.accum * (Pt + P + regathered) * module_bytes // N
    if spec.offload:
        cpu += master + moments + 4 * part
        opt, grads = 0, (bucket if spec.stage > 1 else Pt * module_bytes)
        if spec.stage == 3:
            cpu += math.ceil(P / N) * module_bytes
            weights -= math.ceil(P / N) * module_bytes
    return Memory(spec.name, weights, grads, opt, act.saved, act.logits, cpu=cpu, gathered=gathered,
                  overlap=act.overlap, comm=comm)


# stage3_max_reuse_distance and stage3_max_live_parameters of dtrain's ds_configs/zero3.json
# (DeepSpeed's defaults): parameters used again within this many elements stay gathered; the
# prefetcher stops fetching ahead while this many are gathered.
ZERO3_MAX_REUSE_DISTANCE = 10**9
ZERO3_MAX_LIVE_PARAMETERS = 10**9


def zero3_gathered(shape: ModelShape, max_reuse_distance: int = ZERO3_MAX_REUSE_DISTANCE,
                   max_live_parameters: int = ZERO3_MAX_LIVE_PARAMETERS) -> int:
    """Elements ZeRO-3 holds gathered at the end of forward, its peak (measured with DeepSpeed's
    partitioned-parameter coordinator on tiny Llamas of 2, 4 and 8 layers: benchmarks/zero3_gathered.py).
    They are kept until backward uses them again, for two reasons, whichever keeps more:
    - stage3_max_reuse_distance: a parameter is not released when its next use comes within that
      many fetched elements. From a parameter's forward use to its backward one come twice the
      elements after it (forward, then backward), so the head stays (used again at once), then the
      blocks from the last one back up to half the distance, and the embeddings when all of that
      does: a model of under ~5e8 elements stays whole with dtrain's zero3.json.
    - the prefetcher walks the parameter trace ahead of the computation (a few parameters per fetch)
      and marks what it passes as needed later, so from about the middle of forward the blocks
      are not released either: the head and the last L/2 + 3/4 of L blocks (a fit: 1.5, 2.8 and 4.8
      blocks measured at 2, 4 and 8 layers), up to stage3_max_live_parameters gathered, where
      prefetching stops."""
    blocks = [0] * shape.dims.layers
    for p in shape.params:
        if p.block is not None and p.block < len(blocks):
            blocks[p.block] += p.numel
    head, half = shape.head_params, max_reuse_distance // 2
    kept = head + min(sum(blocks), max(0, half - head)) if max_reuse_distance > 0 else 0
    if half >= head + sum(blocks):  # (the embeddings: the first used in forward, the last in backward)
        kept += shape.separate_embeddings
    ahead = min(head + int((len(blocks) / 2 + 0.75) * max(blocks, default=0)), max_live_parameters)
    return min(shape.total, max(kept, ahead))


def sharded_communication(shape: ModelShape, run: RunShape, spec: StrategySpec, shards: int, whole: Any,
                          compute_bytes: int) -> int:
    """Bytes each device sends per optimizer step under FSDP2 over replicate x shard x tensor
    (ring collectives: an all-gather or reduce-scatter over n ranks sends (n-1)/n of the whole,
    an all-reduce twice that), as counted in real runs (benchmarks/mesh_comm.py):

      shard      every micro-batch all-gathers this rank's tensor-parallel slice of the parameters
                 (in the compute dtype) in forward, and again in backward when they are resharded
                 after forward, all but the last block's (kept gathered); once per step the
                 gradients of what trains are reduce-scattered (fp32)
      replicate  once per step, the gradient shards are all-reduced across the replicas (HSDP)
      tensor     per layer and micro-batch, sequence parallel's all-gather and reduce-scatter of the
                 activations (micro-batch x seq x hidden) around the attention and the MLP in forward;
                 in backward the two all-gathers and an all-reduce of the input's gradient per fan-out
                 layer (BlockCollectives); the final norm's input gathered once, and the first block's
                 input gradient (when the embeddings train or checkpointing makes the inputs require
                 grad; else the first attention needs none either); adapters the same at their rank.
                 Activation checkpointing recomputes a block up to the last output its backward
                 needs: both gathers and the attention's reduce-scatter, the MLP's only if an adapter
                 follows it
      sequence   per layer and micro-batch, Ulysses' all-to-alls of q, k, v and the attention
                 output in forward (of this rank's tokens: its slice and the next slice's first),
                 as many in backward, again on recompute
    """
    S, R, T = shards, spec.replicate, spec.tensor
    local = sum(whole(p) for p in shape.params)
    trainable = sum(whole(p) for p in shape.params if p.trainable)
    last_block = sum(whole(p) for p in shape.params if p.block == shape.dims.layers - 1)
    gathered = local + (local - last_block if run.fsdp_reshard else 0)
    total = (S - 1) * (run.accum * gathered * compute_bytes + trainable * 4) // S
    total += 2 * (R - 1) * (math.ceil(trainable / S) * 4) // R
    blocks = shape.tensor_collectives
    if T > 1 and blocks is not None:
        layers, tokens = shape.dims.layers, run.micro_batch * run.seq
        recompute = 1 if run.checkpointing else 0
        recomputed = recompute * (3 + blocks.mlp_fan_in_adapted)
        fan_out = blocks.attention_fan_out + blocks.mlp_fan_out
        units = layers * (4 + recomputed + 2 + 2 * fan_out) + 1
        # (dtrain.peft makes the inputs require grad under checkpointing)
        units += 1 if shape.embeddings_train or run.checkpointing else -2 * blocks.attention_fan_out
        adapter_units = layers * (2 * blocks.adapted_fan_out + (2 + recompute) * blocks.adapted_fan_in)
        moved = (units * shape.dims.hidden + adapter_units * blocks.adapter_rank) * tokens
        moved += 2 * layers * blocks.partial_gradients
        total += (T - 1) * run.accum * moved * compute_bytes // T
    C = spec.sequence
    if C > 1:  # per layer and micro-batch: q, k, v and the output exchanged in forward, their gradients in backward
        d = shape.dims.head_dim
        tokens = -(-run.seq // C) + 1  # a slice and the next one's first token (dtrain.parallel.sequence)
        exchanged = run.micro_batch * tokens * (2 * shape.dims.heads + 2 * shape.dims.kv_heads) * d
        passes = 2 + (1 if run.checkpointing else 0)
        total += (C - 1) * passes * shape.dims.layers * run.accum * exchanged * compute_bytes // C
    return total


def mesh_specs(world: int, nodes: int, shape: ModelShape) -> list[StrategySpec]:
    """The 2-D meshes worth a row: HSDP with a replica per node (multi-node); FSDP x sequence
    parallel and FSDP x tensor parallel (when dtrain has a plan) within a node, at degrees that
    divide the heads."""
    specs = []
    per_node = world // max(nodes, 1)
    if nodes > 1 and per_node > 1:  # (one GPU per node: HSDP is DDP)
        specs.append(StrategySpec(f"hsdp {nodes}x{per_node}", "fsdp", "sharded", rank=3.5, replicate=nodes))
    heads = (shape.dims.heads, shape.dims.kv_heads)
    for degree in (2, 4, 8):
        if degree <= per_node and world % degree == 0 and all(h % degree == 0 for h in heads):
            if shape.chunkable_head:  # (sequence parallel trains causal language models)
                specs.append(StrategySpec(f"fsdp+sp{degree}", "fsdp", "sharded", rank=5 + degree / 1000,
                                          sequence=degree))
            if shape.tensor_plan:
                specs.append(StrategySpec(f"fsdp+tp{degree}", "fsdp", "sharded", rank=5 + degree / 100,
                                          tensor=degree))
    return specs


def strategies_for(world: int) -> list[StrategySpec]:
    """What is worth comparing at this world size (one device: no data parallelism)."""
    from dtrain.parallel import strategy_class

    if world == 1:
        return [s for s in STRATEGIES if not strategy_class(s.strategy).multi_process or s.offload]
    return [s for s in STRATEGIES if strategy_class(s.strategy).multi_process]


# --------------------------------------------------------------------------------------
# FLOPs and time


def flops_per_token(shape: ModelShape, seq: int, peft: str = "none") -> float:
    """Model FLOPs per trained token: 6N (forward 2N, backward 4N) for the matmul weights N,
    plus 12 x layers x (heads x head_dim) x seq for the attention scores and their use
    (PaLM's accounting, non-causal). With a frozen base (LoRA, QLoRA) the backward pass
    computes no weight gradients for it: 4N + 2N_trainable. Activation checkpointing
    recomputes the forward (+2N of hardware FLOPs) but MFU counts model FLOPs only."""
    attention = 12 * shape.dims.layers * shape.dims.heads * shape.dims.head_dim * seq
    if peft == "none":
        return 6 * shape.matmul_params + attention
    return 4 * shape.matmul_params + 2 * shape.trainable_matmul_params + attention


# --------------------------------------------------------------------------------------
# The whole estimate


@dataclass
class Estimate:
    cfg_name: str
    shape: ModelShape
    run: RunShape
    gpus: int
    nodes: int
    gpu_memory: int
    rows: list[Memory]
    peft_rows: dict[str, list[Memory]] = field(default_factory=dict)  # other PEFT modes, same strategies
    flops_per_token: float = 0.0
    tokens: int | None = None
    tokens_source: str = ""
    mfu: float = 0.4
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    recommendation: list[str] = field(default_factory=list)

    @property
    def epoch_seconds(self) -> float | None:
        if not self.tokens:
            return None
        return self.tokens * self.flops_per_token / (self.run.world * self.peak_tflops * 1e12 * self.mfu)


def parse_memory(text: str) -> int:
    """'80GB', '80 GiB', '24000MB', '1.5TB' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 80GiB or 24000MB")
    value, unit = float(m.group(1)), m.group(2).lower()
    units = {"": 10**9, "g": 10**9, "gb": 10**9, "gib": GiB, "m": 10**6, "mb": 10**6, "mib": 1024**2,
             "t": 10**12, "tb": 10**12, "tib": 1024**4}
    if unit not in units:
        raise ConfigError(f"--gpu-memory {text!r}: unknown unit {m.group(2)!r}; use GB, GiB, MB, MiB, TB or TiB "
                          "(e.g. 80GB)")
    return int(value * units[unit])


def run_shape(cfg: Config, world: int, **changes: Any) -> RunShape:
    flash = cfg.model.attn_implementation == "flash_attention_2" or (
        cfg.model.attn_implementation == "auto" and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available())
    run = RunShape(world=world, micro_batch=cfg.train.micro_batch_size, seq=cfg.data.max_seq_len,
                   precision=cfg.train.precision, dtype=cfg.model.dtype, peft=cfg.peft.method,
                   double_quant=cfg.peft.double_quant, optim=cfg.optim.name,
                   checkpointing=cfg.model.gradient_checkpointing,
                   # Padded and packed batches carry a mask, unless flash-attention takes them
                   # flattened (packing) or unpadded, or sdpa_varlen takes packed ones flattened
                   # (transformers still builds one square bool mask per forward then; not counted).
                   mask=not (flash or (cfg.model.attn_implementation == "sdpa_varlen" and cfg.data.packing)),
                   attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
                   causal_lm=cfg.model.task == "causal_lm", fsdp_reshard=cfg.parallel.fsdp.reshard_after_forward,
                   logits_chunk=0 if cfg.model.logits == "full" else cfg.model.logits_chunk_tokens,
                   offload_activations=cfg.model.activation_offloading, accum=cfg.train.grad_accum_steps)
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def _fits(m: Memory, gpu_memory: int) -> bool:
    return not m.note and m.total <= USABLE_FRACTION * gpu_memory


def _peft_variant(cfg: Config, method: str) -> Config:
    return cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"method": method})})


def estimate(cfg: Config, *, gpus: int = 1, nodes: int = 1, gpu_memory: int = 80 * 10**9, mfu: float = 0.4,
             peak_tflops: float = DEFAULT_PEAK_TFLOPS, tokens: int | None = None, tokens_source: str = "",
             num_labels: int | None = None, model_config: Any = None, cfg_name: str = "",
             other_pefts: bool = True) -> Estimate:
    """The whole estimate; `other_pefts` also sizes the other PEFT modes (a meta build each)."""
    world = gpus * nodes
    shape = model_shape(cfg, num_labels, model_config)
    run = run_shape(cfg, world)
    specs = sorted(strategies_for(world) + mesh_specs(world, nodes, shape), key=lambda spec: spec.rank)
    rows = [strategy_memory(shape, run, s) for s in specs]
    peft_rows = {}
    for method in ("none", "lora", "qlora") if other_pefts else ():
        if method == cfg.peft.method or (cfg.peft.method == "dora" and method == "lora"):
            continue
        other = model_shape(_peft_variant(cfg, method), num_labels, model_config)
        peft_rows[method] = [strategy_memory(other, run_shape(cfg, world, peft=method), s) for s in specs]
    est = Estimate(cfg_name or cfg.model.path, shape, run, gpus, nodes, gpu_memory, rows, peft_rows,
                   flops_per_token(shape, run.seq, cfg.peft.method), tokens, tokens_source, mfu, peak_tflops)
    est.recommendation = recommend(cfg, est, specs, num_labels, model_config)
    return est


def recommend(cfg: Config, est: Estimate, specs: list[StrategySpec], num_labels: int | None,
              model_config: Any) -> list[str]:
    """The cheapest strategy that fits, else the changes that would make one fit."""
    fitting = [m for m in est.rows if _fits(m, est.gpu_memory)]
    cap = f"{USABLE_FRACTION * est.gpu_memory / GiB:.1f} GiB usable of {est.gpu_memory / GiB:.1f} GiB"
    if fitting:
        best = fitting[0]
        spec = next(s for s in specs if s.name == best.strategy)
        how = f" ({spec.overrides})" if spec.meshed else ""
        lines = [f"use {best.strategy}{how}: {best.total / GiB:.2f} GiB per device fits ({cap})."]
        configured = _configured_name(cfg, est.run.world)
        if configured != best.strategy and configured in [m.strategy for m in est.rows]:
            mine = next(m for m in est.rows if m.strategy == configured)
            lines.append(f"the configured strategy ({configured}) needs {mine.total / GiB:.2f} GiB"
                         + ("" if _fits(mine, est.gpu_memory) else ": it does not fit") + ".")
        return lines
    lines = [f"nothing fits ({cap}); the smallest is "
             f"{min((m for m in est.rows if not m.note), key=lambda m: m.total).strategy}. What would fit:"]
    world = est.run.world

    def first_fit(shape: ModelShape, run: RunShape, specs: list[StrategySpec] = specs) -> Memory | None:
        return next((m for m in (strategy_memory(shape, run, s) for s in specs) if _fits(m, est.gpu_memory)), None)

    if not est.run.checkpointing:
        m = first_fit(est.shape, run_shape(cfg, world, checkpointing=True))
        if m:
            lines.append(f"  - activation checkpointing (model.gradient_checkpointing=true): {m.strategy}, "
                         f"{m.total / GiB:.2f} GiB")
    if not est.run.offload_activations:
        m = first_fit(est.shape, run_shape(cfg, world, checkpointing=True, offload_activations=True))
        if m:
            lines.append(f"  - activation offloading (model.activation_offloading=true"
                         f"{'' if est.run.checkpointing else ', with checkpointing'}): {m.strategy}, "
                         f"{m.total / GiB:.2f} GiB")
    if est.run.optim not in ("adamw_8bit", "paged_adamw_8bit"):
        m = first_fit(est.shape, run_shape(cfg, world, optim="adamw_8bit"))
        if m:
            lines.append(f"  - 8-bit AdamW (optim.name=adamw_8bit or paged_adamw_8bit): {m.strategy}, "
                         f"{m.total / GiB:.2f} GiB")
    b = est.run.micro_batch
    while b > 1:
        b //= 2
        m = first_fit(est.shape, run_shape(cfg, world, micro_batch=b))
        if m:
            accum = cfg.train.grad_accum_steps * cfg.train.micro_batch_size // b
            lines.append(f"  - train.micro_batch_size={b} (grad_accum_steps={accum} keeps the batch): "
                         f"{m.strategy}, {m.total / GiB:.2f} GiB")
            break
    for method, rows in est.peft_rows.items():
        if method == "none":
            continue
        m = next((r for r in rows if _fits(r, est.gpu_memory)), None)
        if m:
            lines.append(f"  - peft.method={method}: {m.strategy}, {m.total / GiB:.2f} GiB")
    for w in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if w <= world:
            continue
        m = first_fit(est.shape, run_shape(cfg, w), strategies_for(w))
        if m:
            lines.append(f"  - {w} GPUs in all (--gpus {min(w, 8)} --nodes {max(1, w // 8)}): {m.strategy}, "
                         f"{m.total / GiB:.2f} GiB")
            break
    if len(lines) == 1:
        lines.append("  - none of activation checkpointing, a smaller micro-batch, LoRA/QLoRA or up to 512 GPUs; "
                     "shorten data.max_seq_len or choose a smaller model")
    return lines


def _configured_name(cfg: Config, world: int) -> str | None:
    """The table row the configured strategy runs as (None: a layout the table has no row for)."""
    from dtrain.parallel import strategy_class

    layout = strategy_class(cfg.parallel.strategy).memory_layout(cfg)
    mesh = cfg.parallel.mesh
    if not mesh.is_default:  # (a mesh row is named by its sizes: hsdp RxS, fsdp+tpT, fsdp+spC)
        if mesh.tensor > 1 or mesh.sequence > 1:
            if mesh.replicate > 1 or min(mesh.tensor, mesh.sequence) > 1:
                return None
            return f"fsdp+tp{mesh.tensor}" if mesh.tensor > 1 else f"fsdp+sp{mesh.sequence}"
        return f"hsdp {mesh.replicate}x{mesh.shard if mesh.shard > 0 else world // mesh.replicate}"
    return next((s.name for s in STRATEGIES if s.strategy == cfg.parallel.strategy and (s.stage, s.offload) == layout),
                None)


# --------------------------------------------------------------------------------------
# Output


def _size(n: int, unit: int) -> str:
    return f"{n / unit:,.2f}"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_estimate(est: Estimate) -> str:
    s, d, r = est.shape, est.shape.dims, est.run
    unit, unit_name = (GiB, "GiB") if max(m.total for m in est.rows) >= 2 * GiB else (1024**2, "MiB")
    trainable_pct = 100 * s.trainable / s.total
    lines = [
        f"estimate: {est.cfg_name} | peft {r.peft} | {r.precision}, weights {r.dtype} | "
        f"{est.nodes} node(s) x {est.gpus} GPU(s), {est.gpu_memory / 1e9:g} GB = {est.gpu_memory / GiB:.1f} GiB each",
        f"parameters: {s.total:,} ({s.total / 1e9:.2f} B); trainable {s.trainable:,} ({trainable_pct:.2f}%)"
        + (f"; 4-bit base {s.quantized:,}" if s.quantized else ""),
        f"model: {d.layers} layers, hidden {d.hidden}, {d.heads} heads ({d.kv_heads} KV) x {d.head_dim}, "
        f"intermediate {d.intermediate}, vocab {s.vocab}",
        *(f"  note: {note}" for note in s.notes),
        f"per device: micro-batch {r.micro_batch} x {r.seq} tokens, activation checkpointing "
        f"{'on' if r.checkpointing else 'off'}, attention {r.attention}"
        + (" with a mask (padded or packed batches)" if r.mask else " without a mask (flash-attention or sdpa_varlen on packed rows)")
        + f", optimizer {r.optim}"
        + (f"; the loss over chunks of {r.logits_chunk} positions" if s.chunkable_head and r.logits_chunk else
           "; the loss over the full logits" if r.causal_lm else "")
        + ("; activations offloaded" if r.offload_activations else ""),
        "",
        f"memory per device ({unit_name}):",
        f"  {'strategy':<15}{'weights':>10}{'grads':>10}{'optimizer':>11}{'activations':>13}{'logits':>9}"
        f"{'total':>10}{'CPU':>9}{'comm/step':>11}  fits",
    ]
    for m in est.rows:
        if m.note:
            lines.append(f"  {m.strategy:<15}  n/a: {m.note}")
            continue
        lines.append(f"  {m.strategy:<15}{_size(m.weights, unit):>10}{_size(m.gradients, unit):>10}"
                     f"{_size(m.optimizer, unit):>11}{_size(m.activations, unit):>13}{_size(m.logits, unit):>9}"
                     f"{_size(m.total, unit):>10}{_size(m.cpu, unit):>9}{_size(m.comm, unit):>11}  "
                     f"{'yes' if _fits(m, est.gpu_memory) else 'NO'}")
    lines.append(f"  (comm/step: {unit_name} each device sends per optimizer step in collectives; hsdp RxS: a "
                 "replica per node, sharded within it; fsdp+tpT / fsdp+spC: tensor / sequence parallel over "
                 "T / C GPUs of a node, FSDP over all)")
    if any(m.overlap for m in est.rows):
        lines.append("  (total: a chunk's logits and the layer recomputed in backward are never alive together: "
                     "the larger is counted)")
    if est.peft_rows:
        names = [m.strategy for m in est.rows]
        lines += ["", f"total per device ({unit_name}) with another PEFT mode:",
                  "  " + f"{'peft':<8}" + "".join(f"{n:>15}" for n in names)]
        for method, rows in est.peft_rows.items():
            cells = "".join(f"{'n/a' if m.note else _size(m.total, unit) + ('' if _fits(m, est.gpu_memory) else '!'):>15}"
                            for m in rows)
            lines.append(f"  {method:<8}{cells}")
        lines.append("  (! = does not fit)")
    lines += ["", "recommendation: " + est.recommendation[0], *est.recommendation[1:], ""]
    fpt = est.flops_per_token
    formula = "6N" if r.peft == "none" else "4N + 2N_trainable"
    lines.append(f"FLOPs per token: {fpt / 1e9:,.3f} GFLOP ({formula} + 12 x layers x hidden x seq; "
                 f"N = {s.matmul_params:,} matmul weights, seq {r.seq})")
    if est.epoch_seconds is not None:
        lines.append(f"time per epoch: {format_duration(est.epoch_seconds)} for {est.tokens:,} tokens "
                     f"({est.tokens_source}) on {r.world} GPU(s) at {est.mfu:.0%} MFU of {est.peak_tflops:g} TFLOP/s")
    else:
        lines.append("time per epoch: give --tokens N (no token count from the data stage)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Command line


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-memory", default="80GB",
                        help="memory of one GPU: 80GB (10^9 bytes), 80GiB, 24000MB ... (default 80GB)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the epoch time (default 0.4)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"peak TFLOP/s of one GPU (default {DEFAULT_PEAK_TFLOPS:g}: H100 SXM dense bf16)")
    parser.add_argument("--tokens", type=int, help="training tokens per epoch (default: counted by the data stage)")


def data_tokens(cfg: Config) -> tuple[int | None, str]:
    """Training tokens per epoch from the data stage (its cache), or None if the data cannot be read."""
    try:
        from dtrain.data import prepare_data
        from dtrain.model import load_tokenizer

        data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed)
        tokens = sum(len(ids) for ids in data.train["input_ids"])
        return tokens, f"the data stage: {len(data.train):,} training {'rows' if data.packed else 'examples'}"
    except Exception as exc:  # the estimate stands without it
        return None, f"data not read: {exc}"


def run_estimate(args: argparse.Namespace) -> int:
    try:
        # The command's own arguments first: a typo there fails in a second, before the model is read.
        gpu_memory = parse_memory(args.gpu_memory)
        if args.gpus < 1 or args.nodes < 1:
            raise ConfigError("--gpus and --nodes must be at least 1")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu}: expected a fraction in (0, 1], e.g. 0.4")
        cfg = load_and_check(args)
        tokens, source = (args.tokens, "--tokens") if args.tokens else data_tokens(cfg)
        est = estimate(cfg, gpus=args.gpus, nodes=args.nodes, gpu_memory=gpu_memory, mfu=args.mfu,
                       peak_tflops=args.peak_tflops, tokens=tokens, tokens_source=source, cfg_name=args.config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_estimate(est))
    if tokens is None:
        print(f"  ({source})")
    return 0


def dry_run_lines(cfg: Config, model_config: Any, num_labels: int | None, gpus: int | None, nodes: int) -> list[str]:
    """The estimate for the configured cluster shape, for the dry run's summary: the memory
    table and recommendation, FLOPs per token and the time of one optimizer step."""
    if gpus is None:  # one process unless told (dtrain train --dry-run --nproc N --nnodes M)
        from dtrain.parallel import strategy_class

        gpus = max(1, torch.cuda.device_count()) if strategy_class(cfg.parallel.strategy).multi_process else 1
    if torch.cuda.is_available():
        memory, where = torch.cuda.get_device_properties(0).total_memory, "this machine's GPU"
    else:
        memory, where = 80 * 10**9, "assumed; no GPU here"
    est = estimate(cfg, gpus=gpus, nodes=nodes, gpu_memory=memory, num_labels=num_labels,
                   model_config=model_config, cfg_name=cfg.model.path, other_pefts=False)  # (kept quick)
    step_tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.max_seq_len * est.run.world
    step_s = step_tokens * est.flops_per_token / (est.run.world * est.peak_tflops * 1e12 * est.mfu)
    text = format_estimate(est).split("\n")
    text = [line for line in text if not line.startswith("time per epoch")]
    text.append(f"time per optimizer step: {format_duration(step_s)} for up to {step_tokens:,} tokens at "
                f"{est.mfu:.0%} MFU of {est.peak_tflops:g} TFLOP/s per GPU (GPU memory: {where}; "
                "`dtrain estimate` gives the epoch time from the data)")
    return text


def load_and_check(args: argparse.Namespace) -> Config:
    from dtrain.config import load_config
    from dtrain.model import check_model_path

    cfg = load_config(args.config, args.overrides)
    check_model_path(cfg.model)
    return cfg
