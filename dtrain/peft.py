"""Parameter-efficient fine-tuning through the peft library: LoRA, DoRA and QLoRA.

QLoRA is LoRA on a base whose linear weights are stored in 4 bits (bitsandbytes NF4/FP4,
loaded by `dtrain.model.load_model`); here it only adds peft's k-bit preparation.

Which modules the adapter targets (`peft.target_modules`) can only be checked against the model:
`check_target_modules` does so before peft is asked, and whatever peft still refuses is re-raised
as a ConfigError naming the `peft.*` keys.
"""

from __future__ import annotations

import warnings

from torch import nn

from dtrain.schema import SEQUENCE_HEADS, ConfigError, PeftConfig


def _is_linear(module: nn.Module) -> bool:
    # (bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 style models use Conv1D)
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The leaf names of the model's linear layers, in model order (q_proj, k_proj, ..., lm_head):
    what `peft.target_modules` can name."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and _is_linear(module):
            names.setdefault(name.rsplit(".", 1)[-1], None)
    return list(names)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full module name, or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def _candidates(model: nn.Module) -> str:
    names = linear_leaf_names(model)
    return (f"the model's linear layers are {', '.join(names)}" if names else "the model has no linear layers")


def check_target_modules(model: nn.Module, cfg: PeftConfig) -> None:
    """Every name in peft.target_modules must match a module of `model` (peft itself fails only
    when none does, and silently drops the others: a typo would leave those layers untrained)."""
    if cfg.method == "none" or cfg.target_modules == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in cfg.target_modules if not any(_matches(name, t) for name in module_names)]
    if missing:
        raise ConfigError(
            f"peft.target_modules={list(cfg.target_modules)}: the model has no module named "
            f"{', '.join(repr(m) for m in missing)}; {_candidates(model)}. Give some of those "
            "(e.g. peft.target_modules=[q_proj,v_proj]), or peft.target_modules=all-linear")


def _unsupported_targets(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """Targets that name modules other than linear layers / embeddings (what peft refuses)."""
    if cfg.target_modules == "all-linear":
        return []
    out = []
    for target in cfg.target_modules:
        found = [(name, m) for name, m in model.named_modules() if name and _matches(name, target)]
        odd = [(name, m) for name, m in found if not (_is_linear(m) or isinstance(m, nn.Embedding))]
        if odd:
            name, module = odd[0]
            out.append(f"{target!r} is a {type(module).__name__} ({name})")
    return out


def apply_peft(model: nn.Module, cfg: PeftConfig, task: str, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap `model` with (Do)LoRA adapters; only the adapters (and a classification head) train."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    check_target_modules(model, cfg)
    try:
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora",
            task_type=TaskType.SEQ_CLS if task in SEQUENCE_HEADS else TaskType.CAUSAL_LM,
        )
    except ValueError as exc:  # (the schema's constraints cover peft's; this is a safety net)
        raise ConfigError(f"peft.*: peft refuses the adapter config (peft.method={cfg.method}, peft.r={cfg.r}, "
                          f"peft.alpha={cfg.alpha}, peft.dropout={cfg.dropout}): {_first_line(exc)}") from None
    # QLoRA: not peft's prepare_model_for_kbit_training, which upcasts every weight that is not
    # 4-bit to fp32: for an 8B Llama the embeddings and the LM head alone would grow from 2 GiB
    # to 4 GiB. They stay in model.dtype (as torchtune keeps them); the loss is computed in fp32
    # all the same (dtrain.lm_head), and get_peft_model freezes the base.
    if gradient_checkpointing:
        # With checkpointing and frozen embeddings, inputs must require grad or no grad flows.
        model.enable_input_require_grads()
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: a warning
            # about peft's code, not the user's, on every adapter run.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as exc:  # peft's checks of the targets against the model (NoMatchingPeftModuleError too)
        unsupported = _unsupported_targets(model, cfg)
        if unsupported:
            raise ConfigError(
                f"peft.target_modules={list(cfg.target_modules)}: {'; '.join(unsupported)}, which "
                f"peft.method={cfg.method} cannot adapt (it adapts linear layers, embeddings and convolutions); "
                f"{_candidates(model)}. Name those, or give peft.target_modules=all-linear") from None
        shown = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
        raise ConfigError(f"peft.target_modules={shown} (peft.method={cfg.method}): peft cannot build the adapter: "
                          f"{_first_line(exc)}; {_candidates(model)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
