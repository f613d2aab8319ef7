"""`sdpa_varlen`: PyTorch SDPA that runs a flattened packed row one example at a time.

A packed row under a block-diagonal mask costs SDPA a full L x L attention, though its
examples only need the sum of their own squares. Given the example boundaries of a
flattened row (one row, no padding: `collate_flattened`), this attention runs causal SDPA on
each example's slice and concatenates the outputs: the same numbers as the masked row,
with only the work the examples need.

The boundaries come as the `cu_seq_lens_q` / `cu_seq_lens_k` keyword arguments, the same
ones transformers' flash-attention variable-length path takes (dtrain's loss passes them
for flattened batches, computed once per forward). Anything else (padded batches, a KV cache
in generation, sliding-window layers, no boundaries given) goes to transformers' own
`sdpa_attention_forward` with transformers' own SDPA mask, unchanged.

Shared prefixes (GRPO's groups, `shared_prefix_kwargs`): a row laid out as groups of
[prefix | segment 1 | segment 2 | ...], where every segment sees its group's prefix and itself
(causally) but not the other segments. The prefix's keys and values are computed once and
read by each segment, and their gradients summed over the segments: a prompt with 8
completions costs one prompt, not 8. Passed as the `shared_prefix` keyword argument, which only
this attention reads (the layout is built only for models that use it: `shares_prefixes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"

# Keyword arguments the per-example path does not implement: with any of them set, fall back.
_UNSUPPORTED = ("sliding_window", "softcap", "position_bias", "s_aux")


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths [0, n1, n1 + n2, ..., total] (int32) of a flattened row whose
    position_ids restart at 0 for each example (shape [1, total])."""
    starts = (position_ids[0] == 0).nonzero().flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    return torch.cat([starts, total]).to(torch.int32)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The variable-length keyword arguments for a flattened row (flash-attention's names)."""
    cu = cu_seq_lens(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# The boundaries as Python ints, converted once per forward (every layer gets the same tensor).
_bounds_cache: tuple[torch.Tensor | None, list[int]] = (None, [])


def _bounds(cu: torch.Tensor) -> list[int]:
    global _bounds_cache
    if _bounds_cache[0] is not cu:
        _bounds_cache = (cu, cu.tolist())
    return _bounds_cache[1]


def _segments(module, query, key, kwargs, is_causal) -> list[int] | None:
    """The example boundaries when the per-example path applies, else None (fall back)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1:
        return None
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED):
        return None
    if is_causal is False or not getattr(module, "is_causal", True):
        return None
    bounds = _bounds(cu_q)
    # Same boundaries for queries and keys, covering the whole row: no cache, no padding.
    if (cu_k is not cu_q and _bounds(cu_k) != bounds) or bounds[0] != 0 \
            or bounds[-1] != query.shape[2] or key.shape[2] != query.shape[2]:
        return None
    return bounds


def sdpa_varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs
                                  ) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, heads, total, head_dim] -> output [1, total, heads, head_dim]."""
    if kwargs.get("shared_prefix") is not None:
        return _shared_prefix_attention(module, query, key, value, kwargs, dropout, scaling), None
    bounds = _segments(module, query, key, kwargs, is_causal)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups, gqa = getattr(module, "num_key_value_groups", 1), {}
    if groups > 1:  # GQA as transformers' SDPA does it without a mask: the same kernels, the same numbers
        if use_gqa_in_sdpa(None, key, value):
            gqa = {"enable_gqa": True}
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = {b - a for a, b in zip(bounds[:-1], bounds[1:])}
    if len(lengths) == 1:  # all examples equally long: one call on views, no copies in or out
        n = lengths.pop()
        q, k, v = (t.transpose(1, 2).reshape(-1, n, t.shape[1], t.shape[3]).transpose(1, 2)
                   for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
        return out.transpose(1, 2).reshape(1, -1, out.shape[1], out.shape[3]), None
    pieces = {}
    for width, group in _groups(bounds):
        # Right-padded to the group's longest, causal needs no mask: a real query only sees the
        # keys before it, all real; the padded queries' outputs are dropped.
        q, k, v = (_right_padded(t, group, width) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
        pieces.update(zip((a for a, _ in group), _unpadded(out, group)))
    return torch.cat([pieces[a] for a in bounds[:-1]], dim=2).transpose(1, 2).contiguous(), None


def _right_padded(t: torch.Tensor, spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """The slices `spans` of the row `t` ([1, heads, total, dim]) as one batch, each right-padded to
    `width` (a single span as wide as that: a view, no copy)."""
    if len(spans) == 1 and spans[0][1] - spans[0][0] == width:
        return t[:, :, spans[0][0]:spans[0][1]]
    return torch.cat([F.pad(t[:, :, a:b], (0, 0, 0, width - (b - a))) for a, b in spans])


def _unpadded(out: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each span's rows of a `_right_padded` batch's output, without the padding ([1, heads, length, dim])."""
    return [out[i:i + 1, :, :b - a] for i, (a, b) in enumerate(spans)]


# Examples up to this long go into one call whatever their lengths: below it a call's fixed
# cost outweighs the padding (CPU, measured). Longer ones share a call within 20% of length.
SHORT = 256


def _groups(bounds: list[int]) -> list[tuple[int, list[tuple[int, int]]]]:
    """The examples (start, end) in groups run as one batched SDPA call, with each group's width."""
    groups: list[tuple[int, list[tuple[int, int]]]] = []
    for a, b in sorted(zip(bounds[:-1], bounds[1:]), key=lambda s: s[0] - s[1]):  # longest first
        if groups and (groups[-1][0] <= SHORT or 5 * (b - a) >= 4 * groups[-1][0]):
            groups[-1][1].append((a, b))
        else:
            groups.append((b - a, [(a, b)]))
    return groups


def shared_prefix_kwargs(lengths: torch.Tensor) -> dict:
    """The keyword argument of a shared-prefix row, from its groups' lengths (one row per group:
    the prefix's length, then each segment's): ((start, prefix, (segment, ...)), ...)."""
    groups, start = [], 0
    for prefix, *segments in lengths.tolist():
        groups.append((start, prefix, tuple(segments)))
        start += prefix + sum(segments)
    return {"shared_prefix": tuple(groups)}


def _shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             kwargs: dict, dropout: float, scaling: float | None) -> torch.Tensor:
    """Each group's prefix under causal attention, then its segments batched (right-padded to the
    longest), each query i of a segment seeing the prefix and the segment's keys up to i."""
    groups = kwargs["shared_prefix"]
    total = groups[-1][0] + groups[-1][1] + sum(groups[-1][2]) if groups else 0
    # (no silent fallback: any other attention would let the segments see each other, wrong numbers)
    if query.shape[0] != 1 or total != query.shape[2] or key.shape[2] != query.shape[2]:
        raise ValueError(f"shared_prefix describes {total} positions of one row; the attention got "
                         f"{query.shape[0]} x {query.shape[2]} queries and {key.shape[2]} keys")
    window, longest = kwargs.get("sliding_window"), max((p + max(s) for _, p, s in groups), default=0)
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED if name != "sliding_window") or (
            window is not None and window < longest):
        raise ValueError("shared_prefix rows take plain causal attention: this layer has a sliding window "
                         "shorter than a group's sequences, soft-capping or a position bias (see shares_prefixes)")
    groups_kv = getattr(module, "num_key_value_groups", 1)
    if groups_kv > 1:  # (SDPA's GQA takes no mask on every device: repeat, as transformers' SDPA does then)
        key, value = repeat_kv(key, groups_kv), repeat_kv(value, groups_kv)
    pieces = []
    for start, prefix, segments in groups:
        if prefix:
            q, k, v = (t[:, :, start:start + prefix] for t in (query, key, value))
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True))
        width, bounds = max(segments), [start + prefix]
        for length in segments:
            bounds.append(bounds[-1] + length)
        spans = list(zip(bounds, bounds[1:]))
        q, k, v = (_right_padded(t, spans, width) for t in (query, key, value))
        if prefix:  # every segment's keys and values: the prefix's (one tensor, expanded), then its own
            k, v = (torch.cat([t[:, :, start:start + prefix].expand(len(segments), -1, -1, -1), own], dim=2)
                    for t, own in ((key, k), (value, v)))
        # query i sees keys 0 .. prefix + i (a padded query sees real keys too: no empty row, no NaN)
        mask = torch.ones(width, prefix + width, dtype=torch.bool, device=query.device).tril(diagonal=prefix)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        pieces.extend(_unpadded(out, spans))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


def register() -> None:
    """Register the attention and its mask (transformers' SDPA mask, for the fallback path)."""
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


register()


def uses_varlen_attention(model: torch.nn.Module) -> bool:
    """Flash-attention 2, sdpa_varlen and sequence parallel's attention (ulysses) take packed
    examples as one flattened, padding-free sequence (`model`: the plain model, not a strategy's wrapper)."""
    return getattr(model.config, "_attn_implementation", None) in ("flash_attention_2", NAME, "ulysses")


def shares_prefixes(model: torch.nn.Module, length: int) -> bool:
    """Whether `model` (plain, not a strategy's wrapper) reads shared-prefix rows
    (`shared_prefix_kwargs`) of sequences up to `length` tokens: it attends with sdpa_varlen, with
    no soft-capping and no sliding window shorter than that."""
    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (getattr(config, "_attn_implementation", None) == NAME and (window is None or window >= length)
            and getattr(config, "attn_logit_softcapping", None) is None)
