"""Partial fine-tuning: frozen parameters, and each parameter's depth (for layer-wise LR decay).

Blocks are found by module membership (`transformer_blocks`), not by parsing names, so the
same code serves every Hugging Face decoder, with or without peft around it.
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn
from dtrain.schema import ConfigError, FreezeConfig
from dtrain.model import transformer_blocks

def head_parameters(model: nn.Module) -> set[int]:
    """The output head: lm_head, or a classification head (score / classifier)."""
    ids = {id(p) for name, p in model.named_parameters()
           if any(f".{head}." in f".{name}" for head in ("score", "classifier"))}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        ids |= {id(p) for p in output.parameters()}
    return ids


def freeze(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Turn off requires_grad as `cfg` says; returns the names of the parameters it froze."""
    frozen: set[int] = set()
    if cfg.embeddings:
        frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    blocks = transformer_blocks(model) if cfg.layers else []
    if cfg.layers > len(blocks):
        raise ConfigError(f"freeze.layers={cfg.layers}, but the model has {len(blocks)} transformer blocks")
    for block in blocks[:cfg.layers]:
        frozen |= {id(p) for p in block.parameters()}
    named = list(model.named_parameters())
    frozen |= {id(p) for name, p in named if any(fnmatch(name, pattern) for pattern in cfg.patterns)}
    if cfg.head_only:
        head = head_parameters(model)
        frozen |= {id(p) for _, p in named if id(p) not in head}
    names = []
    for name, p in named:
        if id(p) in frozen and p.requires_grad:
            p.requires_grad_(False)
            names.append(name)
    if not any(p.requires_grad for _, p in named):
        raise ConfigError("freeze.* leaves no parameter to train; freeze less")
    return names


def parameter_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """Depth of every parameter for layer-wise LR decay: 0 for the input embeddings, i + 1 for
    block i, L + 1 for the rest (final norm, head). Returns (depth by id(param), L)."""
    blocks = transformer_blocks(model)
    # The Hugging Face model itself, inside any wrapper (DDP, peft).
    hf_model = next(m for m in model.modules() if hasattr(m, "get_input_embeddings"))
    depth = {id(p): 0 for p in hf_model.get_input_embeddings().parameters()}
    for i, block in enumerate(blocks):
        depth.update({id(p): i + 1 for p in block.parameters()})
    return depth, len(blocks)
