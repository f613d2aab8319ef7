"""Sequence parallel for long context, DeepSpeed-Ulysses style, over the mesh's "sp" dimension.

Each of the C ranks of a sequence-parallel group holds the whole model (FSDP shards it over the
data and sequence dimensions together) and runs it on one C-th of every sequence. Only attention
needs the whole sequence: before it, an all-to-all trades tokens for heads (each rank then holds
every token of H / C heads), attention runs causal over the whole sequence, and a second
all-to-all trades back. Everything else (embeddings, norms, MLP, the chunked loss) is per token.

How a batch is cut (`split_batch`): padded to a multiple of C, each rank takes its slice plus the
first token of the next one, so that the loss's shift (position t predicts token t + 1) pairs
every position of the slice with its true next token and the slices' targets tile the sequence
exactly. Attention drops that extra token before the exchange (no other token sees it) and gives
it a zero output: its logit is the one the shift discards. Positions are the global ones (rotary
embeddings), and packed rows keep their example boundaries: attention reads them from the whole
sequence's position ids (flattened packing restarts them at 0 for each example), so examples
never attend across a boundary, wherever the slices fall.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.parallel.mesh import check_heads_divide

NAME = "ulysses"
SPLIT_BY_HEADS = "attention is split by heads across the sequence-parallel ranks"
_group: dict[str, Any] = {}  # the sequence-parallel process group (one per process)


def _exchange(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """all_to_all along dim 0 (chunk i goes to rank i; chunk j of the result came from rank j), with autograd."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(tensor.contiguous(), None, None, group))


def tokens_to_heads(x: torch.Tensor, group: Any, degree: int) -> torch.Tensor:
    """[batch, heads, tokens / C, dim] (my tokens, every head) -> [batch, heads / C, tokens, dim]."""
    b, h, s, d = x.shape
    out = _exchange(x.reshape(b, degree, h // degree, s, d).transpose(0, 1), group)  # [C: source = token slice]
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // degree, degree * s, d)


def heads_to_tokens(x: torch.Tensor, group: Any, degree: int) -> torch.Tensor:
    """[batch, tokens, heads / C, dim] (every token, my heads) -> [batch, tokens / C, heads, dim]."""
    b, s, h, d = x.shape
    out = _exchange(x.reshape(b, degree, s // degree, h, d).transpose(0, 1), group)  # [C: source = head group]
    return out.permute(1, 2, 0, 3, 4).reshape(b, s // degree, degree * h, d)


_positions_cache: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)


def _whole_positions(position_ids: torch.Tensor, group: Any, degree: int) -> torch.Tensor:
    """The whole sequence's position ids from each rank's slice (without its extra token); once
    per forward (every layer is handed the same tensor)."""
    global _positions_cache
    if _positions_cache[0] is not position_ids:
        import torch.distributed as dist

        mine = position_ids[:, :-1].contiguous()
        parts = [torch.empty_like(mine) for _ in range(degree)]
        dist.all_gather(parts, mine, group=group)
        _positions_cache = (position_ids, torch.cat(parts, dim=1))
    return _positions_cache[1]


def ulysses_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query/key/value: [batch, heads, slice + 1, head_dim] -> output [batch, slice + 1, heads, head_dim]."""
    from dtrain.attention import sdpa_varlen_attention_forward, varlen_kwargs

    group, degree = _group["group"], _group["degree"]
    q, k, v = (tokens_to_heads(t[:, :, :-1], group, degree) for t in (query, key, value))
    positions = kwargs.get("position_ids")
    whole = _whole_positions(positions, group, degree) if positions is not None else None
    if whole is not None and whole.shape[0] == 1 and bool((whole[0, 1:] == 0).any()):
        # A flattened packed row: causal within each example (the varlen path, per example).
        out, _ = sdpa_varlen_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                               **varlen_kwargs(whole))
    else:  # right-padded rows: causal attention never lets a real token see the padding after it
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
        out = out.transpose(1, 2)
    out = heads_to_tokens(out, group, degree)
    return F.pad(out, (0, 0, 0, 0, 0, 1)), None  # (the extra token: a zero output, never seen)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, ulysses_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, lambda *args, **kwargs: None)  # (causal inside; no mask built)


def apply_sp(model: nn.Module, sp_mesh: Any) -> nn.Module:
    """Run `model`'s attention sequence-parallel over `sp_mesh` (in place)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf.config, "text_config", None) or hf.config
    degree = sp_mesh.size()
    check_heads_divide(config, "sequence", degree, SPLIT_BY_HEADS)
    register()
    _group.update(group=sp_mesh.get_group(), degree=degree)
    hf.set_attn_implementation(NAME)
    return model


def split_batch(batch: dict[str, torch.Tensor], rank: int, degree: int, pad_id: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every per-token tensor of `batch` (see the module's docstring); other
    entries are kept. The attention mask of padded rows is dropped (attention is causal)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() != 2:  # (ulysses asks for packed rows flattened: uses_varlen_attention)
        raise RuntimeError("sequence parallel takes padded rows or flattened packed rows, not a block-diagonal mask")
    ids = batch["input_ids"]
    b, length = ids.shape
    padded = -(-length // degree) * degree
    width = padded // degree
    start, stop = rank * width, rank * width + width + 1  # (+1: the next slice's first token)
    if "position_ids" in batch:
        positions = batch["position_ids"]
        extra = torch.arange(padded + 1 - length, device=ids.device).expand(b, -1)  # (a sequence of its own)
        positions = torch.cat([positions, extra.to(positions.dtype)], dim=1)
    else:
        positions = torch.arange(padded + 1, device=ids.device).expand(b, -1)
    out = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key, value in out.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == length and key != "position_ids":
            fill = IGNORE_INDEX if "labels" in key else pad_id
            out[key] = F.pad(value, (0, padded + 1 - length), value=fill)[:, start:stop]
    out["position_ids"] = positions[:, start:stop]
    return out


def gather_tokens(scored: dict[str, torch.Tensor], group: Any, degree: int, length: int) -> dict[str, torch.Tensor]:
    """Per-position outputs of the slices' shifted predictions ([batch, slice] each) put back
    together into the whole sequence's ([batch, length - 1])."""
    import torch.distributed as dist

    out = dict(scored)
    for key, value in scored.items():
        if torch.is_tensor(value) and value.dim() == 2:
            parts = [torch.empty_like(value) for _ in range(degree)]
            dist.all_gather(parts, value.contiguous(), group=group)
            out[key] = torch.cat(parts, dim=1)[:, :length - 1]
    return out
