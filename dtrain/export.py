"""From a run or a checkpoint to a plain Hugging Face model directory, and a quick look at it.

    dtrain export RUN_OR_CHECKPOINT --out DIR [--adapter-only]
    dtrain checkpoint consolidate CHECKPOINT --out DIR
    dtrain generate MODEL_DIR --prompt "..." [--template alpaca|chat] [--max-new-tokens N]

A run directory exports its final/ model (or, for a run that did not finish, its newest
complete checkpoint); a checkpoint directory of any strategy (torch.distributed shards or
DeepSpeed ZeRO partitions, at any world size) is reassembled in one process. LoRA and DoRA
adapters are merged into the base weights; a QLoRA adapter is merged into the de-quantised
4-bit base, which is the function it was trained with (the original weights are not). The
result loads with `AutoModelForCausalLM.from_pretrained` (or the sequence-classification
class) and needs neither dtrain nor peft.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.schema import SEQUENCE_HEADS, Config, ConfigError
from dtrain.model import load_model, load_tokenizer, quantization_config
from dtrain.peft import apply_peft
from dtrain.presets import is_preset


def _config(data: dict[str, Any], where: str) -> Config:
    """The run's config, for rebuilding its model in this one process: the strategy and the
    compile switch of the run do not matter here (and its DeepSpeed file may be elsewhere)."""
    data = dict(data)
    data["parallel"] = {}
    data["model"] = {**data.get("model", {}), "compile": False}
    try:
        return Config.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"{where}: the saved config is not valid here: {exc}") from None


def resolve_source(source: Path) -> tuple[Config, Path, Path]:
    """(the run's config, the run directory, where the trained weights are: a checkpoint or final/)."""
    if (source / ckpt.MANIFEST_FILE).is_file():
        problem = ckpt.verify(source)
        if problem is not None:
            raise ckpt.CheckpointError(f"checkpoint {source} is not usable: {problem}")
        return _config(ckpt.read_manifest(source)["config"], str(source / ckpt.MANIFEST_FILE)), source.parent.parent, source
    if (source / "config.yaml").is_file():
        cfg = _config(yaml.safe_load((source / "config.yaml").read_text()), str(source / "config.yaml"))
        if (source / "final").is_dir():
            return cfg, source, source / "final"
        found = ckpt.find_resumable(source)
        if found is None:
            raise ckpt.CheckpointError(f"run {source} has neither final/ nor a complete checkpoint")
        return cfg, source, found
    raise ValueError(f"{source} is neither a dtrain run directory (config.yaml) nor a checkpoint (manifest.json)")


def _num_labels(weights: dict[str, torch.Tensor]) -> int | None:
    """Classes of a sequence-classification head, from its weight's shape."""
    heads = [t for name, t in weights.items() if ".score." in f".{name}" and name.endswith("weight")]
    return heads[0].shape[0] if heads else None


def base_model(cfg: Config, run_dir: Path, tokenizer: Any, num_labels: int | None) -> nn.Module:
    """The base the run trained on, in full precision (for QLoRA: the 4-bit base, de-quantised)."""
    path = str(run_dir / "base_model") if is_preset(cfg.model.path) and cfg.peft.method != "none" else None
    if cfg.peft.method == "qlora":
        model = load_model(cfg.model, tokenizer, num_labels=num_labels, seed=cfg.seed, path=path or cfg.model.path,
                           quantization=quantization_config(cfg.peft, cfg.train.precision, sharded=False))
        return model.dequantize()
    return load_model(cfg.model, tokenizer, num_labels=num_labels, seed=cfg.seed, path=path)


def load_trained(source: Path) -> tuple[nn.Module, Any, Config, Path]:
    """The trained model (a peft model for adapter runs) with its tokenizer, config and run dir."""
    from safetensors.torch import load_file

    cfg, run_dir, where = resolve_source(source)
    tokenizer = load_tokenizer(cfg.model)
    # Adapters are rebuilt as LoRA/DoRA on the (de-quantised) base: the same modules and names.
    peft_cfg = cfg.peft.model_copy(update={"method": "lora"}) if cfg.peft.method == "qlora" else cfg.peft
    if where.name == "final":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if not (where / "adapter_config.json").is_file():
            model_cls = AutoModelForSequenceClassification if cfg.model.task in SEQUENCE_HEADS else AutoModelForCausalLM
            return model_cls.from_pretrained(where, local_files_only=True), tokenizer, cfg, run_dir
        labels = _num_labels(load_file(where / "adapter_model.safetensors"))
        model = PeftModel.from_pretrained(base_model(cfg, run_dir, tokenizer, labels), where)
        return model, tokenizer, cfg, run_dir
    weights = ckpt.read_model_state(where)
    model = apply_peft(base_model(cfg, run_dir, tokenizer, _num_labels(weights)), peft_cfg, cfg.model.task)
    loaded = model.load_state_dict(weights, strict=False)
    if loaded.unexpected_keys:
        raise ckpt.CheckpointError(f"checkpoint {where} holds weights the model has not: {loaded.unexpected_keys[:5]}")
    # A full fine-tune must provide every parameter (a tied one, like lm_head, once).
    missing = sorted({name for name, _ in model.named_parameters()} - weights.keys())
    if cfg.peft.method == "none" and missing:
        raise ckpt.CheckpointError(f"checkpoint {where} lacks weights of the model: {missing[:5]}")
    return model, tokenizer, cfg, run_dir


def export(source: Path, out: Path, *, adapter_only: bool = False) -> Path:
    """Write a plain Hugging Face directory (safetensors + config + tokenizer) to `out`."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; nothing was written (choose another directory)")
    model, tokenizer, cfg, run_dir = load_trained(source)
    is_adapter = cfg.peft.method != "none"
    if adapter_only and not is_adapter:
        raise ValueError(f"{source} is a full fine-tune (peft.method=none): there is no adapter to export alone")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_only:
        base = (run_dir / "base_model").resolve() if is_preset(cfg.model.path) else cfg.model.path
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(tmp)
    else:
        if is_adapter:
            model = model.merge_and_unload()  # W + (alpha / r) B A, into the base's own layers
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.rename(tmp, out)
    return out


def generate(model_dir: Path, prompt: str, *, template: str = "none", max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` by an exported (or final/) model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtrain.data.formats import alpaca_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if template == "alpaca":
        prompt = alpaca_prompt(prompt, None)
    elif template == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
