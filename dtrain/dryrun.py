"""`dtrain train CONFIG --dry-run`: the check to run before queueing a cluster job.

Same config, world size 1, minutes at most, never the full weights:
  1. validate the config and every path it names;
  2. count parameters at full scale on the meta device (no memory);
  3. build the configured architecture shrunk in depth and width (vocabulary, attention
     layout and PEFT target modules kept) with random weights, saved as a local model dir;
  4. prepare a sample of the data and run a few optimizer steps through the real
     training code path, then save a checkpoint, reload it and train one more step;
  5. print a summary ending in PASS or FAIL (exit code 0 or 1).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from dtrain import checkpoint as ckpt
from dtrain.schema import Config
from dtrain.data import check_sources
from dtrain.model import count_parameters, load_model_config, load_tokenizer
from dtrain.parallel.single import pick_device
from dtrain.peft import apply_peft

DRY_STEPS = 3
SAMPLE_ROWS = 64
HEAD_DIM = 16


def shrink(config: PretrainedConfig) -> PretrainedConfig:
    """Same architecture at toy size: 2 layers, head_dim 16, at most 2 KV heads.

    The vocabulary, the grouped-query ratio (heads per KV head), tied embeddings and the
    module names (so PEFT targets still match) are kept.
    """
    small = copy.deepcopy(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    group = max(1, heads // kv_heads)
    small_kv = min(kv_heads, 2)
    small.num_attention_heads = small_kv * group
    if hasattr(config, "num_key_value_heads"):
        small.num_key_value_heads = small_kv
    small.hidden_size = small.num_attention_heads * HEAD_DIM
    if hasattr(config, "head_dim"):
        small.head_dim = HEAD_DIM
    ratio = config.intermediate_size / config.hidden_size
    small.intermediate_size = int(math.ceil(ratio * small.hidden_size / 8) * 8)
    small.num_hidden_layers = min(config.num_hidden_layers, 2)
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[: small.num_hidden_layers]
    return small


def full_scale_counts(cfg: Config, config: PretrainedConfig, num_labels: int | None) -> tuple[int, int]:
    """(trainable, total) parameters of the full model, built on the meta device."""
    model_cls = AutoModelForSequenceClassification if cfg.model.task == "classification" else AutoModelForCausalLM
    config = copy.deepcopy(config)
    if num_labels:
        config.num_labels = num_labels
    with torch.device("meta"):
        model = model_cls.from_config(config)
        model = apply_peft(model, cfg.peft, cfg.model.task)
    return count_parameters(model)


def dry_run_config(cfg: Config, model_dir: Path, out_dir: Path, on_cpu: bool) -> Config:
    """The user's config with a shrunk model, a data sample and a short schedule.

    On a CPU, bf16 runs in fp32: CPU bf16 backward kernels are ~30x slower than fp32
    (measured on the 8B preset's shrunk model), and the check is about code paths, not numerics.
    """
    t = cfg.train
    model_update: dict = {"path": str(model_dir), "tokenizer": None}
    train_update: dict = {}
    if on_cpu:
        model_update["dtype"] = "float32"
        train_update["precision"] = "fp32"
    update = {
        "model": cfg.model.model_copy(update=model_update),
        "data": cfg.data.model_copy(update={"max_seq_len": min(cfg.data.max_seq_len, 512), "num_proc": 1}),
        "train": t.model_copy(update={
            "max_steps": DRY_STEPS, "epochs": None, "micro_batch_size": min(t.micro_batch_size, 2),
            "grad_accum_steps": min(t.grad_accum_steps, 2), "log_every": 1, **train_update,
        }),
        "eval": cfg.eval.model_copy(update={"every_steps": None, "max_batches": 1,
                                            "early_stopping": cfg.eval.early_stopping.model_copy(update={"patience": None})}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": DRY_STEPS - 1, "keep_last": 2, "resume": None}),
        "logging": cfg.logging.model_copy(update={"tensorboard": False, "wandb": False, "progress_bar": False}),
        "output_dir": str(out_dir),
    }
    return cfg.model_copy(update=update)


def dry_run(cfg: Config, gpus: int | None = None, nodes: int = 1) -> int:
    """`gpus` x `nodes`: the cluster shape the memory estimate is for (the run itself is one process)."""
    from dtrain.data import prepare_data
    from dtrain.train import train

    started = time.perf_counter()
    lines: list[str] = []
    ok = True

    def check(name: str, fn):
        nonlocal ok
        if not ok:
            return None
        try:
            value = fn()
            lines.append(f"  [ok]   {name}")
            return value
        except Exception as exc:  # every failure becomes a FAIL line with the reason
            ok = False
            lines.append(f"  [FAIL] {name}: {exc}")
            if not isinstance(exc, (ValueError, OSError)):
                lines.append("         " + traceback.format_exc().strip().replace("\n", "\n         "))
            return None

    print(f"dry run: {cfg.model.path}, strategy {cfg.parallel.strategy}, peft {cfg.peft.method}", flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="dtrain-dry-run-")
    # Everything the dry run writes, the prepared-data cache included, stays in scratch.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": str(Path(scratch.name) / "cache")})})
    full_config = check("config and model.path", lambda: load_model_config(cfg.model))
    tokenizer = check("tokenizer", lambda: load_tokenizer(cfg.model))
    check("data paths", lambda: check_sources(cfg.data))
    sample = check(f"data sample ({SAMPLE_ROWS} rows per file)",
                   lambda: prepare_data(cfg.data, tokenizer, cfg.seed, rows_per_file=SAMPLE_ROWS))
    num_labels = len(sample.label_names) if sample and sample.label_names else None
    counts = check("full-scale parameter count (meta device)", lambda: full_scale_counts(cfg, full_config, num_labels))

    with scratch as tmp:
        model_dir, out_dir = Path(tmp) / "model", Path(tmp) / "run"

        def build_small() -> int:
            model_cls = AutoModelForSequenceClassification if cfg.model.task == "classification" else AutoModelForCausalLM
            small = shrink(full_config)
            if num_labels:
                small.num_labels = num_labels
            torch.manual_seed(cfg.seed)
            model = model_cls.from_config(small)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            return count_parameters(model)[1]

        small_params = check("build shrunk model (2 layers, head_dim 16, same vocab and attention layout)", build_small)
        on_cpu = pick_device(cfg.parallel.device).type == "cpu"
        if on_cpu and (cfg.train.precision != "fp32" or cfg.model.dtype != "float32"):
            lines.append("  [note] on CPU the dry run trains in fp32 (CPU bf16 kernels are too slow to be useful here)")
        small_cfg = dry_run_config(cfg, model_dir, out_dir, on_cpu) if ok else None
        result = check(f"train {DRY_STEPS} steps through strategy '{cfg.parallel.strategy}'",
                       lambda: train(small_cfg, rows_per_file=SAMPLE_ROWS))
        check("losses finite", lambda: _all_finite(result.train_losses))

        def reload_and_continue() -> None:
            saved = ckpt.find_resumable(out_dir)
            if saved is None:
                raise RuntimeError("no complete checkpoint was written")
            problem = ckpt.verify(saved)
            if problem is not None:
                raise RuntimeError(f"checkpoint {saved}: {problem}")
            resumed = small_cfg.model_copy(update={
                "train": small_cfg.train.model_copy(update={"max_steps": DRY_STEPS + 1}),
                "checkpoint": small_cfg.checkpoint.model_copy(update={"resume": "auto"}),
            })
            again = train(resumed, rows_per_file=SAMPLE_ROWS)
            if again.step != DRY_STEPS + 1 or len(again.train_losses) != 1:
                raise RuntimeError(f"resume ran steps {again.step - len(again.train_losses)}..{again.step}")

        check("save, verify and reload a checkpoint, then resume one step", reload_and_continue)

    t = cfg.train
    print("\n".join(lines))
    if counts:
        trainable, total = counts
        print(f"  parameters (full scale):      {total:,} ({total / 1e9:.2f} B)")
        print(f"  trainable (full scale):       {trainable:,} ({100 * trainable / total:.2f}%)")
    if small_params:
        print(f"  parameters (dry-run model):   {small_params:,}")
    tokens = t.micro_batch_size * t.grad_accum_steps * cfg.data.max_seq_len
    print(f"  tokens per optimizer step:    up to {tokens:,} per process "
          f"({t.micro_batch_size} x {t.grad_accum_steps} accumulation x {cfg.data.max_seq_len} tokens)")
    if full_config is not None:
        from dtrain.estimate import dry_run_lines

        try:
            print("\n".join("  " + line if line else "" for line in
                            ["", *dry_run_lines(cfg, full_config, num_labels, gpus, nodes), ""]))
        except Exception as exc:  # the estimate informs; it is not one of the checks
            print(f"  (no memory estimate: {exc})")
    print(f"  elapsed:                      {time.perf_counter() - started:.1f} s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _all_finite(losses: list[float]) -> None:
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"losses {losses}")
