"""Tensor parallel with sequence parallel, applied to a plain Hugging Face model over the mesh's
"tp" dimension (torchtitan's `apply_tp`, Megatron's layout).

Inside each decoder block, the projections that fan out (q, k, v, gate, up) are split by output
features and those that fan in (o, down) by input features, so each rank computes its share of
the attention heads and of the MLP, and one reduce-scatter per sub-layer brings the result back.
Between the sub-layers the residual stream is split along the sequence (sequence parallel): the
norms run on a slice of the tokens and activations are not replicated; attention and the MLP
gather the full sequence first. The embeddings, the final norm and the LM head stay whole on every
tensor-parallel rank (FSDP shards them over the data dimensions): the chunked loss reads the head
as it is, tied embeddings stay tied, and the loss is computed identically on the ranks that share a
batch.

LoRA adapters are split with their base layer: a fan-out layer's B by output features (A sees the
whole input), a fan-in layer's A by input features (B runs on the sequence slice). Which modules
play which role is declared per architecture in PLANS; an architecture without a plan is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtrain.parallel.mesh import check_heads_divide
from dtrain.schema import ConfigError


@dataclass(frozen=True)
class TensorPlan:
    """Where an architecture keeps what tensor parallelism splits, by module name."""

    blocks: str  # the ModuleList of decoder blocks, in the base model
    final_norm: str  # in the base model
    norms: tuple[str, ...]  # in a block: run on a slice of the sequence
    mixers: dict[str, str]  # in a block: attention and MLP -> how they get their input ("hidden_states" kwarg, or "0")
    fan_out: tuple[str, ...]  # split by output features
    fan_in: tuple[str, ...]  # split by input features


LLAMA = TensorPlan(
    blocks="layers", final_norm="norm", norms=("input_layernorm", "post_attention_layernorm"),
    mixers={"self_attn": "hidden_states", "mlp": "0"},
    fan_out=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    fan_in=("self_attn.o_proj", "mlp.down_proj"))
# GPT-NeoX fuses q, k and v into one projection laid out head by head ([heads, 3 x head_dim]),
# so a split by output features is a split by heads, as for the separate projections.
GPT_NEOX = TensorPlan(
    blocks="layers", final_norm="final_layer_norm", norms=("input_layernorm", "post_attention_layernorm"),
    mixers={"attention": "0", "mlp": "0"},
    fan_out=("attention.query_key_value", "mlp.dense_h_to_4h"), fan_in=("attention.dense", "mlp.dense_4h_to_h"))

# model_type -> plan. Phi-3 is absent on purpose: its fused qkv_proj is [all q | all k | all v] and
# gate_up_proj [gate | up], which a split by output features would cut across the wrong rows.
PLANS: dict[str, TensorPlan] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt_neox": GPT_NEOX}


def plan_for(config: Any, degree: int) -> TensorPlan:
    """The plan for this model config at this degree; ConfigError (naming the key and the fix) if the
    architecture has none or its heads do not divide."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PLANS:
        raise ConfigError(f"parallel.mesh.tensor={degree}: no tensor-parallel plan for model type {model_type!r} "
                         f"(dtrain has plans for {', '.join(sorted(PLANS))}); set parallel.mesh.tensor=1 and "
                         "shard with FSDP only")
    check_heads_divide(config, "tensor", degree, "each tensor-parallel rank computes whole heads")
    return PLANS[model_type]


def split_dims(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> the dimension tensor parallel splits it along, for the parameters it splits
    ({} for an architecture without a plan): what `dtrain estimate` divides by the degree."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = PLANS.get(getattr(hf.config, "model_type", None))
    if plan is None:
        return {}
    dims: dict[int, int] = {}
    for block in getattr(hf, hf.base_model_prefix).get_submodule(plan.blocks):
        for names, dim, adapter in ((plan.fan_out, 0, "lora_B"), (plan.fan_in, 1, "lora_A")):
            for name in names:
                layer = block.get_submodule(name)
                base = getattr(layer, "base_layer", layer)
                dims[id(base.weight)] = dim
                if dim == 0 and base.bias is not None:  # (a fan-in layer's bias is added once, whole)
                    dims[id(base.bias)] = 0
                for factor in getattr(layer, adapter, {}).values():
                    dims[id(factor.weight)] = dim
    return dims


def apply_tp(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """Split `model`'s decoder blocks over `tp_mesh` (in place; before FSDP, after LoRA and
    activation checkpointing are set up). Parameters keep their requires_grad."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = plan_for(hf.config, tp_mesh.size())
    decoder = getattr(hf, hf.base_model_prefix)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    blocks = decoder.get_submodule(plan.blocks)
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block, plan))
    # The residual stream enters the first block whole and is split along the sequence; it leaves
    # the last one split and is gathered for the final norm and the head.
    parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
    parallelize_module(decoder.get_submodule(plan.final_norm), tp_mesh, PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    pad_sequences_to_multiple(decoder, tp_mesh.size())
    # parallelize_module re-creates the parameters it distributes as trainable ones.
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


def block_plan(block: nn.Module, plan: TensorPlan) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    styles: dict[str, Any] = {norm: SequenceParallel(use_local_output=True) for norm in plan.norms}
    for name, arg in plan.mixers.items():
        if arg == "0":
            styles[name] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                              use_local_output=True)
        else:
            styles[name] = PrepareModuleInput(input_kwarg_layouts={arg: Shard(1)},
                                              desired_input_kwarg_layouts={arg: Replicate()}, use_local_output=True)
    for name in plan.fan_out:
        layer = block.get_submodule(name)
        if hasattr(layer, "base_layer"):  # a LoRA layer: A sees the whole input, B is split like the base
            _check_adapter(name, layer)
            styles[f"{name}.base_layer"] = ColwiseParallel()
            styles.update({f"{name}.lora_B.{adapter}": ColwiseParallel() for adapter in layer.lora_B})
        else:
            styles[name] = ColwiseParallel()
    for name in plan.fan_in:
        layer = block.get_submodule(name)
        if hasattr(layer, "base_layer"):  # A split like the base, B on the sequence slice of its output
            _check_adapter(name, layer)
            styles[f"{name}.base_layer"] = RowwiseParallel(output_layouts=Shard(1))
            styles.update({f"{name}.lora_A.{adapter}": RowwiseParallel(output_layouts=Shard(1))
                           for adapter in layer.lora_A})
            styles.update({f"{name}.lora_B.{adapter}": SequenceParallel(use_local_output=True)
                           for adapter in layer.lora_B})
        else:
            styles[name] = RowwiseParallel(output_layouts=Shard(1))
    return styles


def _check_adapter(name: str, layer: nn.Module) -> None:
    if getattr(layer, "lora_magnitude_vector", None):
        raise ValueError(f"peft.method=dora with parallel.mesh.tensor > 1 is not supported ({name}: DoRA's "
                         "magnitude is a norm over the whole weight); use peft.method=lora, or tensor 1")
    if not isinstance(layer.base_layer, nn.Linear):
        raise ValueError(f"{name} is a {type(layer.base_layer).__name__}, not a plain linear layer: tensor parallel "
                         "splits only those (peft.method=qlora needs parallel.mesh.tensor=1)")


def pad_sequences_to_multiple(decoder: nn.Module, multiple: int) -> None:
    """Sequence parallel splits the tokens evenly: pad every batch to a multiple of the degree on the
    way in (masked, after the real tokens, which causal attention never lets them see) and cut the
    padding off the hidden states on the way out."""

    def pad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if source is None and args:
            source = args[0]
            args, kwargs = args[1:], {**kwargs, "input_ids": source}
        length = source.shape[1]
        extra = -length % multiple
        module._dtrain_length = length
        if not extra:
            return args, kwargs
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise RuntimeError("tensor parallel cannot decode with a KV cache one token at a time (sequence "
                               "parallel splits the tokens); generate with parallel.mesh.tensor=1")
        kwargs = dict(kwargs)
        for key, value in list(kwargs.items()):
            if torch.is_tensor(value):
                kwargs[key] = _padded(key, value, length, extra)
        return args, kwargs

    def cut(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        length = module._dtrain_length
        if output.last_hidden_state.shape[1] != length:
            output.last_hidden_state = output.last_hidden_state[:, :length]
        return output

    decoder.register_forward_pre_hook(pad, with_kwargs=True)
    decoder.register_forward_hook(cut, with_kwargs=True)


def _padded(key: str, value: torch.Tensor, length: int, extra: int) -> torch.Tensor:
    import torch.nn.functional as F

    if key == "attention_mask" and value.dim() == 4:  # a block-diagonal mask: padding sees itself only
        boolean = value.dtype == torch.bool
        hidden, seen = (False, True) if boolean else (torch.finfo(value.dtype).min, 0.0)  # (or an additive one)
        out = F.pad(value, (0, extra, 0, extra), value=hidden)
        idx = torch.arange(length, length + extra, device=value.device)
        out[..., idx, idx] = seen
        return out
    if value.dim() < 2 or value.shape[1] != length:
        return value
    if key == "position_ids":  # the padding is a sequence of its own
        tail = torch.arange(extra, device=value.device, dtype=value.dtype).expand(value.shape[0], extra)
        return torch.cat([value, tail], dim=1)
    if key == "inputs_embeds":
        return F.pad(value, (0, 0, 0, extra))
    return F.pad(value, (0, extra), value=0)  # input_ids (any id: never attended to), attention_mask 0
