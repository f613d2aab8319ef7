"""The training recipe: config -> data -> model (+ peft) -> strategy -> loop -> checkpoints.

    python -m dtrain.train CONFIG [key=value ...] [--resume auto|PATH] [--dry-run]

is the same command as `dtrain train`. `train(cfg)` is the whole recipe, top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.config import Config, ConfigError, load_config
from dtrain.data import IGNORE_INDEX, BatchIterator, PreparedData, prepare_data
from dtrain.data.loader import eval_batches
from dtrain.data.report import write_report
from dtrain.model import count_parameters, load_model, load_tokenizer
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.parallel import Strategy, build_strategy
from dtrain.peft import apply_peft
from dtrain.presets import is_preset
from dtrain.tracking import Tracker

log = logging.getLogger("dtrain")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Loss


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def loss_and_counts(model: nn.Module, batch: dict[str, torch.Tensor], task: str,
                    class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """(summed loss, number of loss targets, number of correct predictions) for one micro-batch.

    The loss is a *sum* so that the caller can normalise by the number of targets in the
    whole optimizer step: k micro-batches of any lengths then give exactly the gradient
    of one batch k times larger.
    """
    # Packed batches add position_ids (restarting per example) and a block-diagonal mask.
    logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits.float()
    labels = batch["labels"]
    if task == "causal_lm":
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    targets = labels != IGNORE_INDEX
    # Class weights (data.balance=class_weights) scale each example's loss; the sum is
    # still normalised by the number of examples, so weights near 1 keep the usual scale.
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum", weight=class_weights)
    correct = ((logits.argmax(-1) == labels) & targets).sum().item()
    return loss, int(targets.sum().item()), int(correct)


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Non-padding tokens of a batch (packed batches carry a 4-D mask, so count from the ids)."""
    mask = batch["attention_mask"]
    if mask.dim() == 2:
        return int(mask.sum().item())
    return int((batch["input_ids"] != pad_id).sum().item())


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum().item())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: PreparedData, cfg: Config, strategy: Strategy, pad_id: int) -> dict[str, float]:
    """Loss (mean over all target tokens), perplexity, and accuracy for classification."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
    batches = eval_batches(data.validation, cfg.eval.batch_size or cfg.train.micro_batch_size, pad_id,
                           rank=strategy.rank, world_size=strategy.world_size, max_batches=cfg.eval.max_batches)
    for batch in batches:
        with _autocast(cfg, strategy.device):
            loss, n, correct = loss_and_counts(model, _to(batch, strategy.device), cfg.model.task)
        totals += torch.tensor([loss.item(), n, correct], dtype=torch.float64)
    totals = strategy.all_reduce_sum(totals.to(strategy.device)).cpu()
    model.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    metrics = {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf}
    if cfg.model.task == "classification":
        metrics["eval_accuracy"] = (totals[2] / totals[1].clamp(min=1)).item()
    return metrics


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
    """On resume, drop log lines written after the checkpoint (they will be produced again)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
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


def save_final_model(model: nn.Module, tokenizer: Any, cfg: Config, out: Path) -> Path:
    """save_pretrained the full model, or for LoRA the adapter (pointing at its base)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.peft.method != "none":
        base = (out / "base_model").resolve() if is_preset(cfg.model.path) else cfg.model.path
        model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, final)
    return final


# --------------------------------------------------------------------------------------
# The recipe


def train(cfg: Config, *, rows_per_file: int | None = None) -> RunResult:
    strategy = build_strategy(cfg.parallel)
    seed_everything(cfg.seed)
    task, tcfg = cfg.model.task, cfg.train
    resume_path = _resume_path(cfg)
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
    model = load_model(cfg.model, tokenizer, num_labels=num_labels, seed=cfg.seed)
    if cfg.peft.method != "none" and is_preset(cfg.model.path) and strategy.is_main:
        save_preset_base(model, tokenizer, out)
    model = apply_peft(model, cfg.peft, task, cfg.model.gradient_checkpointing)
    trainable, total = count_parameters(model)
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    model.train()

    batches = BatchIterator(data.train, tcfg.micro_batch_size, tokenizer.pad_token_id, shuffle=cfg.data.shuffle,
                            seed=cfg.seed, rank=strategy.rank, world_size=strategy.world_size,
                            group_by_length=cfg.data.group_by_length and not data.packed)
    class_weights = (torch.tensor(data.class_weights, device=strategy.device)
                     if data.class_weights is not None else None)
    steps_per_epoch = max(1, batches.batches_per_epoch // tcfg.grad_accum_steps)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * batches.batches_per_epoch / tcfg.grad_accum_steps))
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    state = TrainState()
    # Dropout and other run-time randomness: distinct per rank, reproducible per seed.
    seed_everything(cfg.seed + 1 + strategy.rank)

    # Resume.
    if resume_path is not None:
        model_state, optim_state, saved = ckpt.load_checkpoint(resume_path)
        strategy.load_trainable_state_dict(model, model_state)
        strategy.load_optimizer_state_dict(model, optimizer, optim_state)
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["data"])
        state = TrainState(**saved["train_state"])
        ckpt.set_rng_state(saved["rng"][strategy.rank])
        if strategy.is_main:
            _truncate_metrics(out, state.step)

    tracker = Tracker(cfg, enabled=strategy.is_main, total_steps=total_steps, initial_step=state.step)
    tracker.message(
        f"dtrain: {cfg.model.path} ({task}), {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%), strategy {strategy.name} x{strategy.world_size} on {strategy.device}"
    )
    tracker.message(data.summary())
    tracker.message(f"{total_steps} steps ({steps_per_epoch} per epoch), global batch "
                    f"{tcfg.micro_batch_size * tcfg.grad_accum_steps * strategy.world_size} "
                    f"{'packed sequences' if data.packed else 'examples'}"
                    + (f"; resumed from {resume_path} at step {state.step}" if resume_path else ""))

    result = RunResult(str(out), state.step, "max_steps")
    eval_metrics: dict[str, float] = {}
    t_last, tokens_since = time.perf_counter(), 0

    while state.step < total_steps and state.stop_reason is None:
        # One optimizer step: gather its micro-batches first so the loss can be
        # normalised by the number of target tokens in the whole (global) step.
        micro = [_to(next(batches), strategy.device) for _ in range(tcfg.grad_accum_steps)]
        local_targets = sum(count_targets(b, task) for b in micro)
        global_targets = strategy.all_reduce_sum(torch.tensor(float(local_targets), device=strategy.device)).item()
        step_loss = torch.zeros((), device=strategy.device)
        step_tokens = sum(real_tokens(b, tokenizer.pad_token_id) for b in micro)
        tokens_since += step_tokens
        for i, batch in enumerate(micro):
            with strategy.gradient_sync(model, enabled=i == len(micro) - 1), _autocast(cfg, strategy.device):
                loss_sum, _, _ = loss_and_counts(model, batch, task, class_weights)
                # Ranks' gradients are averaged by the strategy; x world_size makes it a global sum.
                loss = loss_sum * (strategy.world_size / max(global_targets, 1.0))
            strategy.backward(loss)
            step_loss += loss.detach() / strategy.world_size
        step_loss = strategy.all_reduce_sum(step_loss)
        grad_norm = strategy.clip_grad_norm(model, cfg.optim.grad_clip)

        good = bool(torch.isfinite(step_loss) and torch.isfinite(grad_norm))
        if good:
            state.consecutive_bad_steps = 0
            lr = scheduler.get_last_lr()[0]
            strategy.optimizer_step(optimizer)
            result.train_losses.append(step_loss.item())
        else:
            # Skip the update so NaN/inf never reaches the weights; stop if it persists.
            state.consecutive_bad_steps += 1
            tracker.message(f"step {state.step + 1}: non-finite loss {step_loss.item()} / grad norm "
                            f"{grad_norm.item()}; update skipped ({state.consecutive_bad_steps}/{tcfg.max_bad_steps})")
            if state.consecutive_bad_steps >= tcfg.max_bad_steps:
                tracker.close()
                raise NonFiniteLossError(
                    f"loss or gradient was NaN/inf for {state.consecutive_bad_steps} consecutive steps (up to step "
                    f"{state.step + 1}); stopped without saving. Lower optim.lr, enable optim.grad_clip, or check "
                    "the data; train.max_bad_steps sets the limit. The last good checkpoint is untouched."
                )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += step_tokens
        if not good and state.step < total_steps:
            continue  # nothing to log or save for a skipped update, unless the run ends here

        # Log, evaluate, stop early, checkpoint.
        last = state.step == total_steps
        if good and (state.step % tcfg.log_every == 0 or last):
            elapsed = time.perf_counter() - t_last
            tps = tokens_since * strategy.world_size / max(elapsed, 1e-9)
            tracker.log(state.step, {"epoch": round(batches.epoch_progress, 4), "loss": step_loss.item(), "lr": lr,
                                     "grad_norm": grad_norm.item(), "tokens_per_s": tps})
            tracker.progress(state.step, step_loss.item(), lr, tps)
            t_last, tokens_since = time.perf_counter(), 0
        elif strategy.is_main and tracker.bar is not None:
            tracker.bar.update(state.step - tracker.bar.n)

        stop = False
        if data.validation and ((cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0) or last):
            eval_metrics = evaluate(model, data, cfg, strategy, tokenizer.pad_token_id)
            tracker.log(state.step, eval_metrics)
            tracker.message(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
            stop = _update_early_stopping(state, eval_metrics[f"eval_{cfg.eval.metric}"], cfg)
            if stop:
                state.stop_reason = "early_stopping"
                tracker.message(f"early stopping at step {state.step}: eval_{cfg.eval.metric} has not improved for "
                                f"{state.evals_without_improvement} evaluations (best {state.best_metric:.4f} at step "
                                f"{state.best_step})")

        every = cfg.checkpoint.every_steps
        if (every and state.step % every == 0) or last or stop:
            save_training_checkpoint(cfg, strategy, model, optimizer, scheduler, batches, state)
        if stop:
            break

    if strategy.is_main:
        final = save_final_model(strategy.unwrap(model), tokenizer, cfg, out)
        tracker.message(f"final model saved to {final}")
    tracker.close()
    strategy.barrier()
    result.step, result.final_metrics, result.best_step = state.step, eval_metrics, state.best_step
    result.stop_reason = state.stop_reason or "max_steps"
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


def save_training_checkpoint(cfg: Config, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any, batches: BatchIterator, state: TrainState) -> None:
    model_state = strategy.trainable_state_dict(model)
    optim_state = strategy.optimizer_state_dict(model, optimizer)
    rng = [ckpt.rng_state()]  # one entry per rank (gathered by distributed strategies)
    if strategy.is_main:
        ckpt.save_checkpoint(
            ckpt.checkpoint_root(cfg.output_dir), state.step, model_state=model_state, optimizer_state=optim_state,
            trainer_state={"scheduler": scheduler.state_dict(), "data": batches.state_dict(),
                           "train_state": asdict(state), "rng": rng, "config_fingerprint": cfg.fingerprint()},
            keep_last=cfg.checkpoint.keep_last,
        )
    strategy.barrier()


# --------------------------------------------------------------------------------------
# Command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 train.max_steps=50")
    parser.add_argument("--resume", metavar="auto|PATH", help="resume from the newest checkpoint (auto) or PATH")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build a shrunk model, run a few steps, save and reload a checkpoint")


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from dtrain.dryrun import dry_run

            return dry_run(cfg)
        result = train(cfg)
    except (ConfigError, NonFiniteLossError, ckpt.CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    summary = {"step": result.step, "stop_reason": result.stop_reason, **result.final_metrics}
    print("done: " + json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
