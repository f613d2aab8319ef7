"""The training recipe: config -> data -> model (+ peft) -> strategy -> loop -> checkpoints.

    python -m dtrain.train CONFIG [key=value ...] [--resume auto|PATH] [--dry-run]
    torchrun --nproc_per_node N -m dtrain.train CONFIG ...     # N processes
    dtrain train CONFIG --nproc N ...                          # the same, torchrun started for you

`train(cfg)` is the whole recipe, top to bottom; the strategy (parallel.strategy) is the
only part that knows how many processes there are.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.config import Config, ConfigError, load_config
from dtrain.data import BatchIterator, prepare_data
from dtrain.data.report import write_report
from dtrain.diagnose import write_learning_report
from dtrain.distill import load_teacher
from dtrain.evaluation import describe, evaluate
from dtrain.finetune import freeze
from dtrain.loss import autocast, count_targets, loss_and_counts, real_tokens, to_device, uses_varlen_attention
from dtrain.launch import PREEMPTED_EXIT_CODE
from dtrain.model import (apply_dropout, compile_blocks, count_parameters, load_model, load_model_config,
                          load_tokenizer, quantization_config)
from dtrain.optim import build_optimizer, build_scheduler, scaled_lr
from dtrain.parallel import Strategy, build_strategy
from dtrain.peft import apply_peft
from dtrain.presets import is_preset
from dtrain.tracking import Tracker

log = logging.getLogger("dtrain")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class Preempted(RuntimeError):
    """The job was told to stop (SIGTERM, SIGUSR1, SIGUSR2); a checkpoint of this step is written."""


class PreemptionWatch:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM and cloud schedulers send before they stop a job)
    only set a flag; the ranks agree on it at the next step boundary, so that every rank saves
    the same step. A second signal, during that save say, changes nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # (Ray runs training in a thread)
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, strategy: Strategy) -> bool:
        flag = torch.tensor(1.0 if self.received else 0.0, device=strategy.device)
        return strategy.all_reduce_max(flag).item() > 0


@dataclass
class TrainState:
    """Everything about the loop's progress a checkpoint must restore (besides model/optim/data/RNG)."""

    step: int = 0
    consecutive_bad_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    stop_reason: str | None = None  # set when the run ended early (a resumed run then trains no further)


@dataclass
class RunResult:
    output_dir: str
    step: int
    stop_reason: str  # max_steps | early_stopping
    train_losses: list[float] = field(default_factory=list)  # per optimizer step, this process only
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    state_bytes: dict[str, int] = field(default_factory=dict)  # this rank's parameter / optimizer memory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Loss


# --------------------------------------------------------------------------------------
# Run directory


def _prepare_output_dir(cfg: Config, resuming: bool) -> Path:
    out = Path(cfg.output_dir)
    if not resuming and ckpt.list_checkpoints(ckpt.checkpoint_root(out)):
        raise ConfigError(
            f"output_dir {out} already holds checkpoints of another run: resume it with --resume auto, "
            "or choose a new output_dir (nothing was overwritten)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop log lines written after `step` (they will be produced again)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed process
            continue
        if record["step"] <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an older `dst` is removed only afterwards."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_preset_base(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """A preset's random base exists nowhere else: save it (before LoRA wraps it) so the
    adapter in final/ can be reloaded onto it."""
    base_dir, tmp = out / "base_model", out / ".base_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, base_dir)
    return base_dir


def save_final_model(model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer: Any, cfg: Config,
                     out: Path) -> Path:
    """save_pretrained the full model, or for LoRA the adapter (pointing at its base).

    `state_dict` holds the full tensors gathered by the strategy (sharded strategies keep
    only a piece of each parameter in `model` itself)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.peft.method != "none":
        base = (out / "base_model").resolve() if is_preset(cfg.model.path) else cfg.model.path
        model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, final)
    return final


def write_worst_examples(path: Path, examples: list[dict[str, Any]]) -> None:
    """The validation examples with the highest loss, as the model saw and answered them."""
    lines = ["# Validation examples with the highest loss", "",
             "`predicted`: the model's most likely token at each position of the expected output "
             "(teacher-forced), or its class.", ""]
    for ex in examples:
        lines += [f"## example {ex['index']} (loss {ex['loss']})", "", "input:", "", "```", ex["input"], "```", "",
                  "expected:", "", "```", ex["expected"], "```", "", "predicted:", "", "```", ex["predicted"], "```", ""]
    path.write_text("\n".join(lines))


def build_model(cfg: Config, tokenizer: Any, num_labels: int | None, strategy: Strategy, out: Path) -> nn.Module:
    """The plain model with its adapters (not yet moved, sharded or wrapped).

    Every rank builds the same weights (same seed, or the same files). A preset with
    adapters has its random base saved first, so that the adapter can be reloaded onto it;
    QLoRA then loads that base (or model.path) quantised to 4 bits."""
    quantized = cfg.peft.method == "qlora"
    base: str | Path = cfg.model.path
    if not quantized or is_preset(cfg.model.path):
        model = load_model(cfg.model, tokenizer, num_labels=num_labels, seed=cfg.seed, device=strategy.device)
        if cfg.peft.method != "none" and is_preset(cfg.model.path):
            if strategy.is_main:
                save_preset_base(model, tokenizer, out)
            strategy.barrier()
            base = out / "base_model"
    if quantized:
        model = load_model(cfg.model, tokenizer, num_labels=num_labels, seed=cfg.seed, device=strategy.device,
                           path=str(base), quantization=quantization_config(cfg.peft, cfg.train.precision, cfg.parallel.strategy))
    model = apply_peft(model, cfg.peft, cfg.model.task, cfg.model.gradient_checkpointing)
    freeze(model, cfg.freeze)
    if cfg.model.compile:
        compile_blocks(model)
    return model


# --------------------------------------------------------------------------------------
# The recipe


Reporter = Callable[[int, dict[str, float], "Path | None"], None]


def train(cfg: Config, *, rows_per_file: int | None = None, report: Reporter | None = None) -> RunResult:
    """Train as `cfg` says. `report(step, metrics, checkpoint)`, if given, is called on every rank
    after each evaluation and each newly completed checkpoint (else None): how an outer system
    such as Ray Train or Tune follows the run without the core knowing about it."""
    strategy = build_strategy(cfg)
    seed_everything(cfg.seed)
    task, tcfg = cfg.model.task, cfg.train
    # The main rank looks for the checkpoint (verifying checksums) and tells the others.
    resume_path = strategy.broadcast_object(_resume_path(cfg) if strategy.is_main else None)
    out = _prepare_output_dir(cfg, resuming=resume_path is not None) if strategy.is_main else Path(cfg.output_dir)

    # Data and model.
    tokenizer = load_tokenizer(cfg.model)
    # The main rank prepares (or finds) the cached data; the others then read the same cache.
    if strategy.is_main:
        data = prepare_data(cfg.data, tokenizer, cfg.seed, rows_per_file=rows_per_file)
    strategy.barrier()
    if not strategy.is_main:
        data = prepare_data(cfg.data, tokenizer, cfg.seed, rows_per_file=rows_per_file)
    if strategy.is_main:
        write_report(data, tokenizer, out, batch_size=tcfg.micro_batch_size, max_seq_len=cfg.data.max_seq_len,
                     seed=cfg.seed)
    if cfg.eval.early_stopping.patience and not data.validation:
        raise ConfigError("eval.early_stopping.patience is set but there is no validation data "
                          "(give data.validation or a data.val_ratio > 0)")
    num_labels = len(data.label_names) if data.label_names else None
    model = build_model(cfg, tokenizer, num_labels, strategy, out)
    trainable, total = count_parameters(model)
    if resume_path is not None:  # before wrapping: DeepSpeed converts a checkpoint of another world size
        strategy.prepare_resume(resume_path, ckpt.read_manifest(resume_path))
    # The LR the optimizer uses: optim.lr, or scaled to this run's tokens per global batch (its capacity).
    tokens_per_batch = tcfg.micro_batch_size * tcfg.grad_accum_steps * strategy.world_size * cfg.data.max_seq_len
    optim_cfg = cfg.optim.model_copy(update={"lr": scaled_lr(cfg.optim, tokens_per_batch)})
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, optim_cfg))
    model.train()
    teacher = load_teacher(cfg, tokenizer, num_labels, strategy) if cfg.distill.teacher else None

    batches = BatchIterator(data.train, tcfg.micro_batch_size, tokenizer.pad_token_id, shuffle=cfg.data.shuffle,
                            seed=cfg.seed, rank=strategy.rank, world_size=strategy.world_size,
                            group_by_length=cfg.data.group_by_length and not data.packed,
                            flatten_packed=uses_varlen_attention(strategy.unwrap(model)))
    class_weights = (torch.tensor(data.class_weights, device=strategy.device)
                     if data.class_weights is not None else None)
    steps_per_epoch = max(1, batches.batches_per_epoch // tcfg.grad_accum_steps)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * batches.batches_per_epoch / tcfg.grad_accum_steps))
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    state = TrainState()
    # Dropout and other run-time randomness: distinct per rank, reproducible per seed.
    seed_everything(cfg.seed + 1 + strategy.rank)

    # Resume: model, optimizer and this rank's RNG come back inside load_checkpoint.
    if resume_path is not None:
        saved = ckpt.load_checkpoint(resume_path, strategy=strategy, model=model, optimizer=optimizer, cfg=cfg)
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["data"])  # also across a change of world size
        state = TrainState(**saved["train_state"])
    if strategy.is_main:
        # Lines logged after the checkpoint (or, starting afresh, by an attempt that died before
        # its first checkpoint) are about to be produced again.
        _truncate_metrics(out, state.step)

    tracker = Tracker(cfg, enabled=strategy.is_main, total_steps=total_steps, initial_step=state.step)
    tracker.message(
        f"dtrain: {cfg.model.path} ({task}), {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%), strategy {strategy.name} x{strategy.world_size} on {strategy.device}"
    )
    tracker.message(data.summary())
    if cfg.optim.lr_scaling != "none":
        tracker.message(f"lr {optim_cfg.lr:.4g} = optim.lr {cfg.optim.lr:.4g} x sqrt({tokens_per_batch} tokens per batch / "
                        f"{cfg.optim.lr_reference_tokens} reference) (optim.lr_scaling={cfg.optim.lr_scaling})")
    for note in apply_dropout(load_model_config(cfg.model), cfg.model.dropout):  # requests the model cannot take
        tracker.message(f"warning: {note}")
    if teacher is not None:
        tracker.message(f"distilling from {cfg.distill.teacher} (alpha {cfg.distill.alpha}, T {cfg.distill.temperature})")
    tracker.message(f"{total_steps} steps ({steps_per_epoch} per epoch), global batch "
                    f"{tcfg.micro_batch_size * tcfg.grad_accum_steps * strategy.world_size} "
                    f"{'packed sequences' if data.packed else 'examples'}"
                    + (f"; resumed from {resume_path} at step {state.step}" if resume_path else ""))

    result = RunResult(str(out), state.step, "max_steps")
    eval_metrics: dict[str, float] = {}
    eval_step = None  # the step eval_metrics were measured at
    worst: list = []  # the highest-loss validation examples, from the last evaluation
    t_last, tokens_since = time.perf_counter(), 0

    writer = ckpt.CheckpointWriter(cfg, strategy)
    reported_checkpoint = None
    with PreemptionWatch() as preemption:
        while state.step < total_steps and state.stop_reason is None:
            # One optimizer step: gather its micro-batches first so the loss can be
            # normalised by the number of target tokens in the whole (global) step.
            micro = [to_device(next(batches), strategy.device) for _ in range(tcfg.grad_accum_steps)]
            local_targets = sum(count_targets(b, task) for b in micro)
            global_targets = strategy.all_reduce_sum(torch.tensor(float(local_targets), device=strategy.device)).item()
            step_loss = torch.zeros((), device=strategy.device)
            step_tokens = sum(real_tokens(b, tokenizer.pad_token_id) for b in micro)
            tokens_since += step_tokens
            for i, batch in enumerate(micro):
                with strategy.gradient_sync(model, enabled=i == len(micro) - 1):
                    with autocast(tcfg.precision, strategy.device):
                        loss_sum, _, _ = loss_and_counts(model, batch, task, class_weights, teacher=teacher,
                                                         label_smoothing=tcfg.label_smoothing, distill=cfg.distill)
                        # Ranks' gradients are averaged by the strategy; x world_size makes it a global sum.
                        loss = loss_sum * (strategy.world_size / max(global_targets, 1.0))
                    strategy.backward(model, loss)
                step_loss += loss.detach() / strategy.world_size
            step_loss = strategy.all_reduce_sum(step_loss)
            lr = scheduler.get_last_lr()[0]
            # Clip and step; an update whose loss or gradient is NaN/inf is skipped, never applied.
            grad_norm, good = strategy.optimizer_step(model, optimizer, cfg.optim.grad_clip,
                                                      skip=not bool(torch.isfinite(step_loss)), l1=cfg.optim.l1)
            if good:
                state.consecutive_bad_steps = 0
                result.train_losses.append(step_loss.item())
            else:
                state.consecutive_bad_steps += 1
                tracker.message(f"step {state.step + 1}: non-finite loss {step_loss.item()} / grad norm "
                                f"{grad_norm}; update skipped ({state.consecutive_bad_steps}/{tcfg.max_bad_steps})")
                if state.consecutive_bad_steps >= tcfg.max_bad_steps:
                    writer.wait()
                    tracker.close()
                    raise NonFiniteLossError(
                        f"loss or gradient was NaN/inf for {state.consecutive_bad_steps} consecutive steps (up to step "
                        f"{state.step + 1}); stopped without saving. Lower optim.lr, enable optim.grad_clip, or check "
                        "the data; train.max_bad_steps sets the limit. The last good checkpoint is untouched."
                    )
            scheduler.step()
            state.step += 1
            state.tokens_seen += step_tokens
            if not good and state.step < total_steps:
                continue  # nothing to log or save for a skipped update, unless the run ends here

            # Log, evaluate, stop early, checkpoint.
            last = state.step == total_steps
            if good and (state.step % tcfg.log_every == 0 or last):
                elapsed = time.perf_counter() - t_last
                tokens = strategy.all_reduce_sum(torch.tensor(float(tokens_since), device=strategy.device)).item()
                tps = tokens / max(elapsed, 1e-9)
                tracker.log(state.step, {"epoch": round(batches.epoch_progress, 4), "loss": step_loss.item(), "lr": lr,
                                         "grad_norm": grad_norm, "tokens_per_s": tps})
                tracker.progress(state.step, step_loss.item(), lr, tps)
                t_last, tokens_since = time.perf_counter(), 0
            elif strategy.is_main and tracker.bar is not None:
                tracker.bar.update(state.step - tracker.bar.n)

            stop = False
            if data.validation and ((cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0) or last):
                eval_metrics, worst = evaluate(model, data.validation, cfg, strategy, tokenizer, num_labels=num_labels,
                                               worst=cfg.eval.worst_examples if last else 0,
                                               generation=cfg.eval.generation.enabled)
                eval_step = state.step
                tracker.log(state.step, eval_metrics)
                tracker.message(f"step {state.step}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in eval_metrics.items() if isinstance(v, float)))
                stop = _update_early_stopping(state, eval_metrics[f"eval_{cfg.eval.metric}"], cfg)
                if stop:
                    state.stop_reason = "early_stopping"
                    tracker.message(f"early stopping at step {state.step}: eval_{cfg.eval.metric} has not improved for "
                                    f"{state.evals_without_improvement} evaluations (best {state.best_metric:.4f} at step "
                                    f"{state.best_step})")

            # The ranks agree on a preemption signal at this step boundary: all save this step.
            preempted = preemption.requested(strategy)
            every = cfg.checkpoint.every_steps
            if (every and state.step % every == 0) or last or stop or preempted:
                evaluated = eval_metrics[f"eval_{cfg.eval.metric}"] if eval_step == state.step else None
                writer.save(state.step, model, optimizer, trainer_state={
                    "scheduler": scheduler.state_dict(), "data": batches.state_dict(), "train_state": asdict(state)},
                    metric=evaluated)
            if report is not None and (eval_step == state.step or writer.last != reported_checkpoint):
                metrics = {"step": state.step, "loss": step_loss.item(),
                           **(eval_metrics if eval_step == state.step else {})}
                report(state.step, metrics, writer.last if writer.last != reported_checkpoint else None)
                reported_checkpoint = writer.last
            if preempted:
                path = writer.wait()
                tracker.close()
                raise Preempted(f"stopped at step {state.step} on {preemption.received}: checkpoint {path} written; "
                                f"resume with --resume auto (exit code {PREEMPTED_EXIT_CODE} asks for a requeue)")
            if stop:
                break
    writer.wait()

    # Collective: gathers shards onto the main rank (for an adapter, only what it saves).
    final_state = strategy.full_state_dict(model, trainable_only=cfg.peft.method != "none")
    if strategy.is_main:
        final = save_final_model(strategy.unwrap(model), final_state, tokenizer, cfg, out)
        tracker.message(f"final model saved to {final}")
        if worst:
            write_worst_examples(out / "worst_examples.md", [describe(ex, tokenizer, data.label_names) for ex in worst])
        tracker.message(write_learning_report(out, cfg.eval.metric, cfg.eval.mode).strip())
    tracker.close()
    strategy.barrier()
    result.step, result.final_metrics, result.best_step = state.step, eval_metrics, state.best_step
    result.stop_reason = state.stop_reason or "max_steps"
    result.state_bytes = strategy.state_bytes(model, optimizer)
    return result


def _update_early_stopping(state: TrainState, value: float, cfg: Config) -> bool:
    es = cfg.eval.early_stopping
    sign = 1.0 if cfg.eval.mode == "min" else -1.0
    if state.best_metric is None or sign * (state.best_metric - value) > es.min_delta:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    return es.patience is not None and state.evals_without_improvement >= es.patience


def _resume_path(cfg: Config) -> Path | None:
    spec = cfg.checkpoint.resume
    if spec is None:
        return None
    if spec == "auto":
        found = ckpt.find_resumable(cfg.output_dir)
        if found is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from scratch", cfg.output_dir)
        return found
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {spec} is not a checkpoint directory")
    return path


# --------------------------------------------------------------------------------------
# Command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 train.max_steps=50")
    parser.add_argument("--resume", metavar="auto|PATH", help="resume from the newest checkpoint (auto) or PATH")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build a shrunk model, run a few steps, save and reload a checkpoint")
    launch = parser.add_argument_group("multi-process launch (dtrain starts torchrun for you)")
    launch.add_argument("--nproc", type=int, metavar="N", help="processes (devices) per node")
    launch.add_argument("--nnodes", default="1", metavar="M", help="number of nodes (default 1)")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="multi-node: the c10d rendezvous address, the same on every node")
    launch.add_argument("--rdzv-id", default="dtrain", help="multi-node: a job id shared by the nodes")


def _rank_prefix() -> str:
    """Which rank speaks, in a multi-process run (torchrun sets RANK and WORLD_SIZE)."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def run_from_args(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", None) and not args.dry_run:  # (a dry run is one process; --nproc shapes its estimate)
        try:  # a bad config fails here, before any process starts
            load_config(args.config, args.overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from dtrain.launch import launch_training

        return launch_training(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed; say CPU is meant
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format=f"{_rank_prefix()}%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from dtrain.dryrun import dry_run

            return dry_run(cfg, gpus=getattr(args, "nproc", None), nodes=int(getattr(args, "nnodes", 1)))
        result = train(cfg)
    except Preempted as exc:
        if main_rank:
            print(f"preempted: {exc}", file=sys.stderr)
        from dtrain.parallel.distributed import destroy_process_group

        destroy_process_group()
        return PREEMPTED_EXIT_CODE
    except (ConfigError, NonFiniteLossError, ckpt.CheckpointError, ValueError) as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    from dtrain.parallel.distributed import destroy_process_group

    destroy_process_group()
    if main_rank:
        summary = {"step": result.step, "stop_reason": result.stop_reason, **result.final_metrics}
        print("done: " + json.dumps(summary))
    return 0


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, also taking `key=value` overrides written after an option
    (`CONFIG --nproc 2 optim.lr=1e-3`), which argparse alone leaves unparsed."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_from_args(parse_with_overrides(parser, argv))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: an unexpected exception on any rank reaches torchrun's summary with its rank.
    sys.exit(record(main)())
