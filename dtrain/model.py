"""Load the tokenizer and the model: a local Hugging Face directory or a built-in preset."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from dtrain import activation_offload, attention, lm_head, presets  # (importing attention registers sdpa_varlen)
from dtrain.schema import SEQUENCE_HEADS, ConfigError, DropoutConfig, ModelConfig, PeftConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(cfg: ModelConfig, key: str = "model.path") -> None:
    """Fail early, naming the key (`key`: the one that gave cfg.path), if the model directory or
    model.tokenizer cannot be loaded."""
    if not presets.is_preset(cfg.path):
        path = Path(cfg.path)
        if not path.is_dir():
            hint = ""
            if path.name == "final":  # another run's output, e.g. examples/tiny_dpo.yaml's SFT model
                hint = f"; a run writes {path} when it finishes: train the run whose output_dir is {path.parent} first"
            raise ConfigError(
                f"{key}: {cfg.path!r} is neither a local model directory nor a preset "
                f"({', '.join(presets.PRESETS)}){hint}"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {cfg.path!r} has no config.json (is it a Hugging Face model directory?)")
        _check_config_json(path / "config.json", cfg.trust_remote_code, key)
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: {cfg.tokenizer!r} is not a directory")


def _check_config_json(path: Path, trust_remote_code: bool, key: str) -> None:
    """config.json is JSON, and names an architecture this transformers knows (or ships its code)."""
    import json

    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{key}: {path}{where} is not valid JSON ({exc}); the model directory is damaged "
                          "(an interrupted download or copy?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(f"{key}: {path} has no model_type; is it a Hugging Face model's config.json?")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in data):
        import transformers

        hint = (" (it ships its own code: set model.trust_remote_code=true if you trust it)" if "auto_map" in data
                else "; a newer transformers may know it")
        raise ConfigError(f"{key}: {path} says model_type {model_type!r}, an architecture transformers "
                          f"{transformers.__version__} does not know{hint}")
    # Its fields as transformers checks them (e.g. a hidden size the heads do not divide), before
    # the tokenizer, which reads config.json too, reports it as its own failure.
    with _loading(key, str(path.parent), "model config", f"fix {path}"):
        AutoConfig.from_pretrained(path.parent, local_files_only=True, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _loading(key: str, path: str, what: str, fix: str):
    """A library's failure to load `what` from `path`, as a ConfigError naming the key."""
    from huggingface_hub.errors import StrictDataclassError  # (a config field transformers refuses)
    from safetensors import SafetensorError  # (a truncated or damaged .safetensors file)

    try:
        yield
    except (ConfigError, torch.OutOfMemoryError):  # (running out of memory is no damaged directory)
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, StrictDataclassError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = "; ".join(lines[:2]) if isinstance(exc, StrictDataclassError) else (lines[0] if lines else
                                                                                     type(exc).__name__)
        if "ignore_mismatched_sizes" in reason:  # (transformers printed which tensors, above)
            reason, fix = ("its weights do not fit its config.json: tensors of other sizes (see the load "
                           "report above)", "use the config.json the weights were saved with")
        raise ConfigError(f"{key}: cannot load the {what} from {path}: {reason}; {fix}") from None


def load_tokenizer(cfg: ModelConfig, key: str = "model.path") -> PreTrainedTokenizerBase:
    check_model_path(cfg, key)
    if cfg.tokenizer is None and presets.is_preset(cfg.path):
        tokenizer = presets.preset_tokenizer(cfg.path)
    else:
        source = cfg.tokenizer or cfg.path
        key = "model.tokenizer" if cfg.tokenizer else key
        with _loading(key, source, "tokenizer", "the directory needs tokenizer files (tokenizer.json or "
                      "tokenizer_config.json + vocabulary); or set model.tokenizer to a directory that has them"):
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                      trust_remote_code=cfg.trust_remote_code)
        if isinstance(tokenizer, bool) or not hasattr(tokenizer, "pad_token_id"):
            raise ConfigError(f"{key}: {source} holds no tokenizer; set model.tokenizer to a directory that has one")
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels -100, attention mask 0).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    check_model_path(cfg)
    if presets.is_preset(cfg.path):
        return presets.preset_config(cfg.path)
    with _loading("model.path", cfg.path, "model config", "check config.json"):
        return AutoConfig.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)


# Config fields each architecture family uses for each kind of dropout.
DROPOUT_FIELDS = {
    "attention": ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"),
    "hidden": ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout"),
    "classifier": ("classifier_dropout", "summary_first_dropout"),
}


def apply_dropout(config: PretrainedConfig, cfg: DropoutConfig) -> list[str]:
    """Set each requested dropout on every config field the architecture has for it (before
    the model is built). Returns a warning per request the architecture has no field for."""
    warnings = []
    for kind, value in cfg.model_dump().items():
        if value is None:
            continue
        fields = [name for name in DROPOUT_FIELDS[kind] if hasattr(config, name)]
        if not fields:
            warnings.append(f"model.dropout.{kind}={value}: {config.model_type} models have no {kind} dropout "
                            f"(none of {', '.join(DROPOUT_FIELDS[kind])} in their config); ignored")
        for name in fields:
            setattr(config, name, value)
    return warnings


def attention_implementation(requested: str, device: torch.device) -> str:
    """`auto`: flash-attention 2 on CUDA when the flash-attn package is installed; `sdpa_varlen`
    (dtrain/attention.py) on CPU: both run a flattened packed row one example at a time instead of
    a full attention under a block-diagonal mask. On CUDA without flash-attn, plain SDPA: for a
    flattened row transformers still builds one (tokens in the micro-batch)^2 mask, ~1 GB at
    8 x 4096 tokens, which sdpa_varlen ignores but cannot avoid (ask for it explicitly if that fits)."""
    if requested != "auto":
        if requested == "flash_attention_2" and device.type != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa or auto")
        return requested
    from transformers.utils import is_flash_attn_2_available

    if device.type == "cuda":
        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    return attention.NAME


def quantization_config(peft: PeftConfig, precision: str, sharded: bool) -> Any:
    """bitsandbytes 4-bit settings for QLoRA (`sharded`: the strategy shards the parameters)."""
    from transformers import BitsAndBytesConfig

    compute = peft.compute_dtype if peft.compute_dtype != "auto" else (
        "bfloat16" if precision == "bf16" else "float32")
    # Sharding flattens and splits parameters by dtype: packed 4-bit data stored as bf16
    # shards like any other weight (its quantisation constants stay on the module).
    storage = peft.quant_storage if peft.quant_storage != "auto" else (
        "bfloat16" if sharded else "uint8")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft.quant_type,
                              bnb_4bit_use_double_quant=peft.double_quant, bnb_4bit_compute_dtype=DTYPES[compute],
                              bnb_4bit_quant_storage=DTYPES.get(storage, torch.uint8))


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, num_labels: int | None = None, seed: int = 0,
    device: torch.device = torch.device("cpu"), path: str | None = None, quantization: Any = None,
    label_names: list[str] | None = None, key: str = "model.path",
) -> nn.Module:
    """Build a preset with random weights or `from_pretrained` a local directory
    (`path` overrides cfg.path: a preset's saved base, for QLoRA). A classifier has `num_labels`
    classes, or is given their names (`label_names`, kept as its config's id2label).

    The seed is set right before construction so that randomly initialised weights
    (a preset, a new classification head) are the same in every run and on every rank.
    With `quantization` (QLoRA) the linear weights are quantised to 4 bits on `device`.
    """
    check_model_path(cfg, key)
    torch.manual_seed(seed)
    model_cls = AutoModelForSequenceClassification if cfg.task in SEQUENCE_HEADS else AutoModelForCausalLM
    attn = attention_implementation(cfg.attn_implementation, device)
    path = path or cfg.path
    if presets.is_preset(path):
        if quantization is not None:
            raise ValueError("a preset is quantised from its saved base directory (pass path=)")
        config = presets.preset_config(path)
    else:
        with _loading(key, str(path), "model config", "check config.json"):
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    if cfg.task == "classification" and label_names:  # saved with the model: its classes by name
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    elif cfg.task == "classification":
        config.num_labels = num_labels
    elif cfg.task == "reward":  # one scalar: how good the whole sequence is
        config.num_labels = 1
    apply_dropout(config, cfg.dropout)  # (train() reports the overrides a model has no field for)
    config._attn_implementation = attn
    if presets.is_preset(path):
        model = model_cls.from_config(config, dtype=DTYPES[cfg.dtype], attn_implementation=attn)
    else:
        extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
        with _loading(key, str(path), "weights", "the directory needs model.safetensors (or sharded "
                      "*.safetensors with their index); re-download or re-export the model"):
            model = model_cls.from_pretrained(path, config=config, dtype=DTYPES[cfg.dtype], attn_implementation=attn,
                                              local_files_only=True, trust_remote_code=cfg.trust_remote_code, **extra)
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:  # (an id past the embeddings fails only when the data first holds it)
        raise ConfigError(f"{key}: the tokenizer has {len(tokenizer)} tokens but the model at {path} embeds only "
                          f"{embeddings}: use the tokenizer the model was trained with (model.tokenizer), or a "
                          "model whose embeddings were resized to it")
    if quantization is not None:
        keep_4bit_training_kernel(model)
    if cfg.task in SEQUENCE_HEADS:
        # Sequence-classification heads pool the last non-pad token: they must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    apply_memory_options(model, cfg, device, path)
    return model


def apply_memory_options(model: nn.Module, cfg: ModelConfig, device: torch.device, path: str) -> None:
    """What model.gradient_checkpointing, model.activation_offloading and model.logits ask of a
    loaded model (`path`: where it came from, for the messages)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.activation_offloading:
        activation_offload.enable(model, device)
    if cfg.task == "causal_lm" and cfg.logits != "full":
        why_not = lm_head.chunkable(model)
        if why_not is not None and cfg.logits == "chunked":
            raise ConfigError(f"model.logits=chunked: the LM head of {path} cannot be chunked: {why_not}; "
                              "set model.logits=auto (or full)")
        lm_head.install(model, cfg.logits_chunk_tokens)


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned position table takes (GPT-2's n_positions, OPT,
    BERT: longer ones fail with an index error at the first long batch); None for a model without
    one (rotary positions)."""
    tokens = model.get_input_embeddings()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and module is not tokens and ("position" in leaf or leaf == "wpe"):
            return getattr(model.config, "max_position_embeddings", None) or module.num_embeddings
    return None


def load_frozen_model(cfg: ModelConfig, key: str, tokenizer: PreTrainedTokenizerBase, *, num_labels: int | None,
                      seed: int, device: torch.device) -> nn.Module:
    """A model an objective runs beside the trained one without training it (a teacher, a reference),
    named by config key `key`. It reads the same batches, so it must have the same vocabulary."""
    other = load_tokenizer(cfg, key)
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError(f"{key}={cfg.path} has another tokenizer than the student ({len(other.get_vocab())} vs "
                          f"{len(tokenizer.get_vocab())} tokens, or other ids); its predictions are compared token "
                          "by token with the trained model's, which needs the same vocabulary")
    return load_model(cfg, tokenizer, num_labels=num_labels, seed=seed, device=device, key=key)


def keep_4bit_training_kernel(model: nn.Module) -> None:
    """Make bitsandbytes' 4-bit layers compute with one kernel, in training and evaluation.

    On CPUs with avx512-bf16, a 4-bit layer's first inference forward re-lays out its weight
    for a faster bf16 kernel, and every later forward, training included, then computes
    differently (~1e-3 on the logits). Evaluation would no longer measure the function being
    trained, and a resumed run would not match an uninterrupted one."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it lists in `_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    # By the class or a base class: FSDP2 turns a sharded block into a subclass of its own.
    blocks = [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (no _no_split_modules); "
                         "fsdp and model.compile need a Hugging Face transformer model")
    return blocks


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (as torchtitan does): one compiled
    graph reused by every layer, and the wrappers around the blocks stay plain modules."""
    for block in transformer_blocks(model):
        block.compile()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def quiet_progress_bars() -> None:
    """No "Loading weights" bars from transformers (for ranks other than the main one)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
