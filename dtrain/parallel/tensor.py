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

A fan-out layer that concatenates several projections (Phi-3's qkv_proj is [all q | all k | all v],
gate_up_proj [gate | up]) would be cut across the wrong rows by a plain split. Its rows are put in
the order [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] first, so that each rank's contiguous share holds its
share of every part and the model's own forward, told the local head counts, splits it as usual.
That order depends on the degree: the strategy writes and reads checkpoints, and hands out full
weights, in the order of the model's weights file (`file_order`, `model_order`), so a checkpoint of
any mesh loads into any other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

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
    # fan-out layers that concatenate several projections -> the parts' sizes, in output features
    fused: Callable[[Any], dict[str, tuple[int, ...]]] | None = None
    reads_head_counts: tuple[str, ...] = ()  # in a block: attention that sizes its split by the config's head counts


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


def _phi3_parts(config: Any) -> dict[str, tuple[int, ...]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return {"self_attn.qkv_proj": (config.num_attention_heads * head_dim, kv, kv),
            "mlp.gate_up_proj": (config.intermediate_size, config.intermediate_size)}


# Phi-3 fuses q, k and v into one projection laid out part by part, and gate and up likewise; its
# attention finds where k starts from config.num_attention_heads.
PHI3 = TensorPlan(
    blocks="layers", final_norm="norm", norms=("input_layernorm", "post_attention_layernorm"),
    mixers={"self_attn": "hidden_states", "mlp": "0"},
    fan_out=("self_attn.qkv_proj", "mlp.gate_up_proj"), fan_in=("self_attn.o_proj", "mlp.down_proj"),
    fused=_phi3_parts, reads_head_counts=("self_attn",))

# model_type -> plan
PLANS: dict[str, TensorPlan] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt_neox": GPT_NEOX,
                                "phi3": PHI3}


def plan_for(config: Any, degree: int) -> TensorPlan:
    """The plan for this model config at this degree; ConfigError (naming the key and the fix) if the
    architecture has none or its heads do not divide."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PLANS:
        raise ConfigError(f"parallel.mesh.tensor={degree}: no tensor-parallel plan for model type {model_type!r} "
                         f"(dtrain has plans for {', '.join(sorted(PLANS))}); set parallel.mesh.tensor=1 and "
                         "shard with FSDP only")
    check_heads_divide(config, "tensor", degree, "each tensor-parallel rank computes whole heads")
    plan = PLANS[model_type]
    for layer, parts in (plan.fused(config) if plan.fused else {}).items():
        if any(size % degree for size in parts):
            raise ConfigError(f"parallel.mesh.tensor={degree} does not divide {layer}'s parts {list(parts)}: each "
                              f"rank takes an equal share of every part; choose a degree that divides them")
    return plan


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


@dataclass(frozen=True)
class BlockCollectives:
    """What one decoder block's split layers make tensor parallel communicate, beyond sequence
    parallel's all-gather and reduce-scatter of the activations around each sub-layer (what
    `dtrain estimate` counts): in backward, the gradient of every fan-out layer's input is
    all-reduced (one per layer: q, k and v separately); an adapter on a fan-out layer does the same
    with its (tokens x rank) activations, one on a fan-in layer reduce-scatters them in forward and
    gathers them in backward; and the gradients of the weights every rank holds whole inside the
    block (the norms, a fan-in adapter's B) are all-reduced."""

    attention_fan_out: int
    mlp_fan_out: int
    adapted_fan_out: int
    adapted_fan_in: int
    adapter_rank: int
    partial_gradients: int  # elements
    mlp_fan_in_adapted: bool  # (then a recomputed block runs to its very end: the adapter's input is saved)


def block_collectives(model: nn.Module) -> BlockCollectives | None:
    """The first decoder block's BlockCollectives (None for an architecture without a plan)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = PLANS.get(getattr(hf.config, "model_type", None))
    if plan is None:
        return None
    block = getattr(hf, hf.base_model_prefix).get_submodule(plan.blocks)[0]
    attention = next(iter(plan.mixers))
    adapted_out = [block.get_submodule(n) for n in plan.fan_out if hasattr(block.get_submodule(n), "lora_A")]
    adapted_in = [block.get_submodule(n) for n in plan.fan_in if hasattr(block.get_submodule(n), "lora_A")]
    rank = max((a.weight.shape[0] for layer in adapted_out + adapted_in for a in layer.lora_A.values()), default=0)
    whole = [p for n in plan.norms for p in block.get_submodule(n).parameters()]
    whole += [b.weight for layer in adapted_in for b in layer.lora_B.values()]
    attention_fan_out = sum(name.split(".")[0] == attention for name in plan.fan_out)
    mlp_fan_in_adapted = any(hasattr(block.get_submodule(name), "lora_A") for name in plan.fan_in
                             if name.split(".")[0] != attention)
    return BlockCollectives(attention_fan_out, len(plan.fan_out) - attention_fan_out, len(adapted_out),
                            len(adapted_in), rank, sum(p.numel() for p in whole if p.requires_grad),
                            mlp_fan_in_adapted)


def apply_tp(model: nn.Module, tp_mesh: Any) -> dict[str, torch.Tensor]:
    """Split `model`'s decoder blocks over `tp_mesh` (in place; before FSDP, after LoRA and
    activation checkpointing are set up). Parameters keep their requires_grad.

    Returns the parameters now held in another row order than the model's (fused projections),
    by name: row i of the held one is row `order[i]` of the model's."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    degree = tp_mesh.size()
    plan = plan_for(hf.config, degree)
    decoder = getattr(hf, hf.base_model_prefix)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    blocks = decoder.get_submodule(plan.blocks)
    reordered = _interleave_fused_parts(model, blocks, plan, degree) if plan.fused else {}
    if plan.reads_head_counts:
        local = copy.copy(hf.config)  # (the model's own config keeps the whole counts: it is what gets saved)
        local.num_attention_heads = hf.config.num_attention_heads // degree
        local.num_key_value_heads = hf.config.num_key_value_heads // degree
        for block in blocks:
            for name in plan.reads_head_counts:
                attention = block.get_submodule(name)
                attention.config, attention.num_key_value_heads = local, local.num_key_value_heads
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
    return reordered


def interleaved_rows(parts: tuple[int, ...], degree: int) -> torch.Tensor:
    """The row order [part 0's share 0, part 1's share 0, ... | part 0's share 1, ...] of a fused
    projection whose output concatenates `parts`: rank r's contiguous share of it holds its share of
    every part."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    return torch.cat([torch.arange(start + rank * size // degree, start + (rank + 1) * size // degree)
                      for rank in range(degree) for start, size in zip(starts, parts)])


def _interleave_fused_parts(model: nn.Module, blocks: nn.Module, plan: TensorPlan,
                            degree: int) -> dict[str, torch.Tensor]:
    """Put the rows of every fused fan-out layer (weight, bias, LoRA B) in `interleaved_rows` order."""
    names = {id(p): name for name, p in model.named_parameters()}
    reordered: dict[str, torch.Tensor] = {}
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer_name, parts in plan.fused(hf.config).items():
        order = interleaved_rows(parts, degree)
        for block in blocks:
            layer = block.get_submodule(layer_name)
            base = getattr(layer, "base_layer", layer)
            held = [base.weight, base.bias, *(b.weight for b in getattr(layer, "lora_B", {}).values())]
            with torch.no_grad():
                for p in held:
                    if p is not None:
                        p.copy_(p[order])
                        reordered[names[id(p)]] = order
    return reordered


def file_order(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`t`, held with its rows in `order`, back in the model's own row order (a DTensor is gathered
    and laid out again as it was: every rank calls this, in the same order)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(file_order(t.full_tensor(), order), t.device_mesh, t.placements, src_data_rank=None)
    out = torch.empty_like(t)
    out[order.to(t.device)] = t
    return out


def model_order(t: torch.Tensor, order: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`, in the model's own row order, with its rows in `order` and laid out as `like`."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        full = t.full_tensor()[order.to(t.device)]
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return t[order.to(t.device)]


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
