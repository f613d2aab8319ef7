"""`dtrain train CONFIG --dry-run`: the check to run before queueing a cluster job.

Same config, world size 1, minutes at most, never the full weights:
  1. validate the config and every path it names;
  2. count parameters at full scale on the meta device (no memory);
  3. build the configured architecture shrunk in depth and width (vocabulary, attention
     layout and PEFT target modules kept) with random weights, saved as a local model dir;
  4. prepare a sample of the data and run a few optimizer steps through the real
     training code path, then save a checkpoint, reload it and train one more step;
  5. print a summary ending in PASS or FAIL (exit code 0 or 1).
One checklist, a line per check as it completes: what the inner steps print themselves (the
training run's announcement, logs and report) is captured, and shown only as a check's
warnings, or under a FAIL line as the last lines the failed step wrote.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import PretrainedConfig

from dtrain import checkpoint as ckpt
from dtrain.estimate import build_from_config, dim_field, model_dims
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
    module names (so PEFT targets still match) are kept. Each dimension is set under the name
    the architecture's config gives it (GPT-2's n_layer, n_head, n_embd, n_inner ...).
    """
    small = copy.deepcopy(config)
    text = small.get_text_config()  # a multimodal model's language model; the config itself otherwise
    dims = model_dims(config)
    group = max(1, dims.heads // dims.kv_heads)
    small_kv = min(dims.kv_heads, 2)
    heads = small_kv * group
    hidden = heads * HEAD_DIM
    setattr(text, dim_field(text, "heads"), heads)
    if (kv := dim_field(text, "kv_heads")) is not None:
        setattr(text, kv, small_kv)
    setattr(text, dim_field(text, "hidden"), hidden)
    if hasattr(text, "head_dim") and not isinstance(getattr(type(text), "head_dim", None), property):
        text.head_dim = HEAD_DIM  # (Falcon derives it from the hidden size: a read-only property)
    if getattr(text, "d_kv", None):  # T5
        text.d_kv = HEAD_DIM
    if getattr(text, "rotary_dim", None):  # GPT-J, CodeGen: the rotated part of each head, in dimensions
        text.rotary_dim = max(2, text.rotary_dim * HEAD_DIM // dims.head_dim // 2 * 2)
    # The MLP keeps its ratio to the hidden size; a null width (GPT-2's n_inner) is the
    # architecture's default of 4 x hidden, which follows the new hidden size by itself.
    if (name := dim_field(text, "intermediate")) is not None and getattr(text, name) is not None:
        ratio = getattr(text, name) / dims.hidden
        setattr(text, name, int(math.ceil(ratio * hidden / 8) * 8))
    layers = min(dims.layers, 2)
    setattr(text, dim_field(text, "layers"), layers)
    if getattr(text, "num_decoder_layers", None):  # encoder-decoder (T5): the decoder's depth too
        text.num_decoder_layers = min(text.num_decoder_layers, 2)
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    return small


def full_scale_counts(cfg: Config, config: PretrainedConfig, num_labels: int | None) -> tuple[int, int]:
    """(trainable, total) parameters of the full model, built on the meta device."""
    config = copy.deepcopy(config)
    if num_labels:
        config.num_labels = num_labels
    with torch.device("meta"):
        model = build_from_config(cfg, config)
        model = apply_peft(model, cfg.peft, cfg.model.task)
    return count_parameters(model)


def dry_run_config(cfg: Config, model_dir: Path, out_dir: Path, on_cpu: bool) -> Config:
    """The user's config with a shrunk model, a data sample and a short schedule.

    On a CPU, bf16 runs in fp32: CPU bf16 backward kernels are ~30x slower than fp32
    (measured on the 8B preset's shrunk model), and the check is about code paths, not numerics.
    """
    from dtrain.objectives import objective_class

    t = cfg.train
    group = objective_class(cfg).micro_batch_multiple(cfg)  # (GRPO: a prompt's completions, at least)
    model_update: dict = {"path": str(model_dir), "tokenizer": None}
    train_update: dict = {}
    if on_cpu:
        model_update["dtype"] = "float32"
        train_update["precision"] = "fp32"
    update = {
        "model": cfg.model.model_copy(update=model_update),
        "data": cfg.data.model_copy(update={"max_seq_len": min(cfg.data.max_seq_len, 512), "num_proc": 1}),
        "train": t.model_copy(update={
            "max_steps": DRY_STEPS, "epochs": None, "micro_batch_size": max(group, min(t.micro_batch_size, 2) // group * group),
            "grad_accum_steps": min(t.grad_accum_steps, 2), "log_every": 1, **train_update,
        }),
        "eval": cfg.eval.model_copy(update={"every_steps": None, "max_batches": 1,
                                            "early_stopping": cfg.eval.early_stopping.model_copy(update={"patience": None})}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": DRY_STEPS - 1, "keep_last": 2, "resume": None}),
        "logging": cfg.logging.model_copy(update={"tensorboard": False, "wandb": False, "progress_bar": False}),
        "output_dir": str(out_dir),
        # One process: the mesh's layout is checked apart (check_mesh), its code path needs its world.
        "parallel": cfg.parallel.model_copy(update={"mesh": type(cfg.parallel.mesh)()}),
    }
    return cfg.model_copy(update=update)


def check_mesh(cfg: Config, full_config: PretrainedConfig) -> str:
    """parallel.mesh's layout, and (tensor parallel) that the architecture has a plan and its heads
    divide by the degree."""
    from dtrain.parallel.mesh import check_heads_divide
    from dtrain.parallel.sequence import SPLIT_BY_HEADS
    from dtrain.parallel.tensor import plan_for

    mesh = cfg.parallel.mesh
    config = getattr(full_config, "text_config", None) or full_config
    if mesh.tensor > 1:
        plan_for(config, mesh.tensor)
    if mesh.sequence > 1:
        check_heads_divide(config, "sequence", mesh.sequence, SPLIT_BY_HEADS)
    shard = "the rest" if mesh.shard == -1 else str(mesh.shard)
    fixed = mesh.replicate * mesh.tensor * mesh.sequence * max(mesh.shard, 1)
    count = f"{fixed} processes" if mesh.shard != -1 else f"a multiple of {fixed} processes"
    return (f"replicate {mesh.replicate} x shard {shard} x sequence {mesh.sequence} x tensor {mesh.tensor} "
            f"({count})")


def command_started() -> float:
    """When the command began, on the time.perf_counter() clock: the start of this process when
    it was started as the dry run (`dtrain train CONFIG --dry-run`), whose imports of torch and
    transformers are most of a short dry run's time; else (dry_run called as a function) now."""
    now = time.perf_counter()
    if "--dry-run" not in sys.argv[1:]:
        return now
    age = _process_age()
    return now - age if age is not None else now


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc; elsewhere psutil, if installed)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (after the command name, which may hold spaces)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start, in ticks since boot
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no psutil, or it cannot tell: the clock starts at the call
        return None


class Captured:
    """What a step wrote while captured: its lines, progress bars at their last state."""

    def __init__(self) -> None:
        self.text = ""

    @property
    def lines(self) -> list[str]:
        lines = (line.split("\r")[-1].rstrip() for line in self.text.split("\n"))
        return [line for line in lines if line.strip()]


@contextlib.contextmanager
def captured():
    """Send what the inner steps write to a temporary file instead of the terminal, so that the
    dry run prints one checklist: the inner training run announces itself, logs and reports like
    a real run. Both the Python streams (print, tqdm, warnings) and file descriptors 1 and 2
    (logging handlers holding the original streams, DeepSpeed, C libraries) are redirected."""
    result = Captured()
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            _flush(stream)
        saved = []
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:  # no such descriptor (a detached process): nothing to redirect
                pass
        # (the same open file as the descriptors: one offset, so writes never overlap)
        text = open(os.dup(sink.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
        # Logging handlers writing to a stream that is no descriptor (a caller's own sys.stderr)
        handlers = [h for h in _stream_handlers() if h.stream in (sys.stdout, sys.stderr)
                    and h.stream not in (sys.__stdout__, sys.__stderr__)]
        streams = [h.setStream(text) for h in handlers]
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield result
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            for stream in (text, sys.__stdout__, sys.__stderr__):
                _flush(stream)
            for fd, copy_fd in saved:
                os.dup2(copy_fd, fd)
                os.close(copy_fd)
            text.close()
            sink.seek(0)
            result.text = sink.read().decode("utf-8", errors="replace")


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]  # (not files, not pytest's)


def _flush(stream) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):  # closed or detached
        pass


FAIL_TAIL = 15  # lines of a failed step's own output shown under its FAIL line


def dry_run(cfg: Config, gpus: int | None = None, nodes: int = 1, started: float | None = None) -> int:
    """`gpus` x `nodes`: the cluster shape the memory estimate is for (the run itself is one process).
    `started`: when the command began (time.perf_counter()); by default see `command_started`."""
    started = command_started() if started is None else started
    from dtrain.data import prepare_data
    from dtrain.train import train

    ok, first_failure = True, ""

    def say(line: str) -> None:  # one checklist, printed as it goes (a dry run takes a minute or more)
        print(line, flush=True)

    def check(name: str, fn):
        nonlocal ok, first_failure
        if not ok:
            return None
        failed, trace = None, ""
        with captured() as inner:
            try:
                value = fn()
            except Exception as exc:  # every failure becomes a FAIL line with the reason
                failed = exc
                if os.environ.get("DTRAIN_DEBUG") == "1":  # (--debug: where it failed)
                    trace = traceback.format_exc().strip()
        if failed is None:
            say(f"  [ok]   {name}")
            # The inner run's own warnings (dtrain's "warning: ..." lines) concern the real run too.
            for line in inner.lines:
                if line.startswith("warning: "):
                    say(f"         {line}")
            return value
        ok, first_failure = False, f"{name}: {failed}"
        say(f"  [FAIL] {name}: {failed}")
        if inner.lines:
            say(f"         its output (last {min(FAIL_TAIL, len(inner.lines))} lines):")
            for line in inner.lines[-FAIL_TAIL:]:
                say(f"           | {line}")
        if trace:
            say("         " + trace.replace("\n", "\n         "))
        return None

    say(f"dry run: {cfg.model.path}, strategy {cfg.parallel.strategy}, peft {cfg.peft.method}")
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
    if full_config is not None and not cfg.parallel.mesh.is_default:
        layout = check("parallel.mesh against the model", lambda: check_mesh(cfg, full_config))
        if layout:
            say(f"         mesh: {layout}")

    with scratch as tmp:
        model_dir, out_dir = Path(tmp) / "model", Path(tmp) / "run"

        def build_small() -> int:
            small = shrink(full_config)
            if num_labels:
                small.num_labels = num_labels
            torch.manual_seed(cfg.seed)
            model = build_from_config(cfg, small)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            return count_parameters(model)[1]

        small_params = check("build shrunk model (2 layers, head_dim 16, same vocab and attention layout)", build_small)
        on_cpu = pick_device(cfg.parallel.device).type == "cpu"
        if ok and on_cpu and (cfg.train.precision != "fp32" or cfg.model.dtype != "float32"):
            say("  [note] on CPU the dry run trains in fp32 (CPU bf16 kernels are too slow to be useful here)")
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
    if counts:
        trainable, total = counts
        say(f"  parameters (full scale):      {total:,} ({total / 1e9:.2f} B)")
        say(f"  trainable (full scale):       {trainable:,} ({100 * trainable / total:.2f}%)")
    if small_params:
        say(f"  parameters (dry-run model):   {small_params:,}")
    tokens = t.micro_batch_size * t.grad_accum_steps * cfg.data.max_seq_len
    say(f"  tokens per optimizer step:    up to {tokens:,} per process "
        f"({t.micro_batch_size} x {t.grad_accum_steps} accumulation x {cfg.data.max_seq_len} tokens)")
    if full_config is not None:
        from dtrain.estimate import dry_run_lines

        try:
            with captured():  # (warnings of the meta-device builds: the checks above have shown the real ones)
                estimate = dry_run_lines(cfg, full_config, num_labels, gpus, nodes)
            say("\n".join("  " + line if line else "" for line in ["", *estimate, ""]))
        except Exception as exc:  # the estimate informs; it is not one of the checks
            say(f"  (no memory estimate: {exc})")
    say(f"  elapsed:                      {time.perf_counter() - started:.1f} s (since the command started)")
    say("PASS" if ok else "FAIL")
    if not ok:
        print(f"error: the dry run failed at {first_failure}", file=sys.stderr)
    return 0 if ok else 1


def _all_finite(losses: list[float]) -> None:
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"losses {losses}")
