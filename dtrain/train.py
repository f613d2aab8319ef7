"""The training recipe, read top to bottom: setup, one step, the loop.

    setup(cfg) -> Run            everything a run needs, built once: the strategy (and its process
                                 group), tokenizer, data, model (+ peft, freezing), objective (+ its
                                 frozen models), optimizer, schedule, batches, checkpointer, tracker
    train_step(run, micro) -> StepOutput
                                 one optimizer step over the micro-batches
    train(cfg) -> RunResult      the loop: step, log, evaluate, stop early, checkpoint, report

    python -m dtrain.train CONFIG [key=value ...] [--resume auto|PATH] [--dry-run]   (see dtrain/cli.py)

The strategy (parallel.strategy) is the only part that knows how many processes there are;
the objective (train.objective) the only part that knows what the loss is. The loop branches
on neither.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.attention import uses_varlen_attention
from dtrain.data import BatchIterator, PreparedData, prepare_data
from dtrain.data.loader import real_tokens, to_device
from dtrain.data.report import write_report
from dtrain.diagnose import write_learning_report
from dtrain.evaluation import describe, evaluate
from dtrain.finetune import freeze
from dtrain.lm_head import chunked_head
from dtrain.model import (apply_dropout, compile_blocks, count_parameters, load_frozen_model, load_model,
                          load_model_config, load_tokenizer, position_limit, quantization_config,
                          quiet_progress_bars)
from dtrain.objectives import Objective, build_objective, objective_class, objective_name
from dtrain.optim import build_optimizer, build_scheduler, scaled_lr
from dtrain.outputs import check_output_dir, save_final_model, save_preset_base, write_config, write_worst_examples
from dtrain.parallel import Strategy, build_strategy
from dtrain.parallel.collectives import Collectives
from dtrain.peft import apply_peft
from dtrain.precision import autocast
from dtrain.presets import is_preset
from dtrain.schema import Config, ConfigError
from dtrain.tracking import Tracker, truncate_metrics
from dtrain.train_state import EarlyStopping, TrainState


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""

    on_every_rank = True  # the step's loss is summed over the ranks: every rank stops at the same step


class Preempted(RuntimeError):
    """The job was told to stop (SIGTERM, SIGUSR1, SIGUSR2, checkpoint.stop_file); a checkpoint of
    this step is written."""

    on_every_rank = True  # the ranks agree on the signal at a step boundary

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class RunResult:
    output_dir: str
    step: int
    stop_reason: str  # max_steps | early_stopping
    train_losses: list[float] = field(default_factory=list)  # per optimizer step, this process only
    final_metrics: dict[str, Any] = field(default_factory=dict)
    best_step: int | None = None
    state_bytes: dict[str, int] = field(default_factory=dict)  # this rank's parameter / optimizer memory
    train_seconds: float = 0.0  # the optimizer steps' time in this process (no setup, evaluation or saving)


@dataclass
class Run:
    """Everything `setup` built. As a context manager it ends them on the way out, whatever the
    way: the tracker closed, the checkpoint in flight completed, the process group left."""

    cfg: Config
    strategy: Strategy
    tokenizer: Any
    data: PreparedData
    objective: Objective
    model: nn.Module  # as the strategy wrapped it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: BatchIterator
    state: TrainState
    early_stopping: EarlyStopping
    checkpointer: ckpt.Checkpointer
    tracker: Tracker
    total_steps: int
    out: Path
    resources: contextlib.ExitStack = field(repr=False)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool | None:
        if getattr(exc, "on_every_rank", False):
            # A preemption or the NaN guard, raised from inside a step: its traceback's finished
            # frames hold the model too (the locals of train_step); nobody debugs them.
            traceback.clear_frames(tb)
        return self.resources.__exit__(exc_type, exc, tb)

    def release(self) -> None:
        """Let go of the wrapped model, its optimizer and the frozen models: the strategy destroys
        the process group next, and nothing may hold it then. (DDP's reducer, freed after the
        group was destroyed, frees the gloo group itself from a destructor that holds the GIL,
        which can hang the process for good: pytorch/pytorch#56297.) The run is spent after this."""
        self.checkpointer.release()
        self.model = self.optimizer = self.scheduler = self.objective = None  # type: ignore[assignment]


@dataclass
class StepOutput:
    loss: float  # the global step's loss, normalised over all its targets
    grad_norm: float
    lr: float  # the LR this step used
    applied: bool  # False: a NaN/inf loss or gradient, the update was skipped
    tokens: int  # this rank's non-padding tokens
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's step metrics (rewards, ...)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Setup


def build_model(cfg: Config, tokenizer: Any, label_names: list[str] | None, strategy: Strategy, out: Path,
                resuming: bool = False) -> nn.Module:
    """The plain model with its adapters (not yet moved, sharded or wrapped).

    Every rank builds the same weights (same seed, or the same files). A preset with
    adapters has its random base saved first, so that the adapter can be reloaded onto it;
    QLoRA then loads that base (or model.path) quantised to 4 bits."""
    quantized = cfg.peft.method == "qlora"
    base: str | Path = cfg.model.path
    if not quantized or is_preset(cfg.model.path):
        model = load_model(cfg.model, tokenizer, label_names=label_names, seed=cfg.seed, device=strategy.device)
        if cfg.peft.method != "none" and is_preset(cfg.model.path):
            # A resumed run keeps the base its first attempt wrote (the checkpoint's compatibility
            # check, later, makes sure it is the same model): nothing of the run changes before that.
            if strategy.comm.is_main and not (resuming and (out / "base_model").is_dir()):
                save_preset_base(model, tokenizer, out)
            strategy.comm.barrier()
            base = out / "base_model"
    if quantized:
        quantization = quantization_config(cfg.peft, cfg.train.precision, sharded=strategy.shards_parameters)
        model = load_model(cfg.model, tokenizer, label_names=label_names, seed=cfg.seed, device=strategy.device,
                           path=str(base), quantization=quantization)
    limit, longest = position_limit(model), objective_class(cfg).sequence_length(cfg)
    if limit is not None and longest > limit:
        extra = longest - cfg.data.max_seq_len  # (GRPO: the completions' tokens, after a prompt)
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len}" + (f" + {extra} generated tokens" if extra else "")
                          + f" is longer than the {limit} positions {cfg.model.path} has embeddings for; set "
                          f"data.max_seq_len to {limit - extra} or less")
    model = apply_peft(model, cfg.peft, cfg.model.task, cfg.model.gradient_checkpointing)
    if cfg.model.logits == "chunked" and chunked_head(model) is None:
        raise ConfigError("model.logits=chunked: the LM head (lm_head) carries an adapter, which adds to its logits, "
                          "so they cannot be chunked; take lm_head out of peft.target_modules, or set model.logits=auto")
    freeze(model, cfg.freeze)
    if cfg.model.compile:
        compile_blocks(model)
    return model


def setup(cfg: Config, *, rows_per_file: int | None = None) -> Run:
    """Build the run `cfg` describes, resumed from its checkpoint when checkpoint.resume says so."""
    if cfg.checkpoint.stop_file and Path(cfg.checkpoint.stop_file).exists():
        # (the request a stopped run answered: rerun as it is, the job would stop again at once, and again)
        raise ConfigError(f"checkpoint.stop_file={cfg.checkpoint.stop_file} exists, so the run would save and stop "
                          "after its first step: remove the file to run")
    with contextlib.ExitStack() as resources:  # if setup fails, what it built so far is ended
        resources.enter_context(collecting_only_what_the_run_makes())
        strategy = resources.enter_context(build_strategy(cfg))
        built: list[Run] = []
        resources.callback(_release, built)  # (after the checkpointer and the tracker, before the strategy)
        comm, tcfg = strategy.comm, cfg.train
        if not comm.is_main or not sys.stderr.isatty():
            quiet_progress_bars()  # one process speaks; a log file gets lines, not bars
        seed_everything(cfg.seed)
        resume = ckpt.resume_path(cfg, comm)
        out = check_output_dir(cfg, resuming=resume is not None) if comm.is_main else Path(cfg.output_dir)

        # Data: the main rank prepares (or finds) the cached data; the others then read that cache.
        tokenizer = load_tokenizer(cfg.model)
        data = comm.main_first(lambda: prepare_data(cfg.data, tokenizer, cfg.seed, rows_per_file=rows_per_file))
        if cfg.eval.early_stopping.patience and not data.validation:
            raise ConfigError("eval.early_stopping.patience is set but there is no validation data "
                              "(give data.validation or a data.val_ratio > 0)")
        num_labels = len(data.label_names) if data.label_names else None

        # Model, sharded or wrapped with its optimizer; the objective and the frozen models it needs.
        model = build_model(cfg, tokenizer, data.label_names, strategy, out, resuming=resume is not None)
        trainable, total = count_parameters(model)
        if resume is not None:  # before wrapping: DeepSpeed converts a checkpoint of another world size
            strategy.prepare_resume(resume, ckpt.read_manifest(resume))
        # The LR the optimizer uses: optim.lr, or scaled to this run's tokens per global batch (its capacity).
        tokens_per_batch = tcfg.micro_batch_size * tcfg.grad_accum_steps * strategy.dims.dp_size * cfg.data.max_seq_len
        optim_cfg = cfg.optim.model_copy(update={"lr": scaled_lr(cfg.optim, tokens_per_batch)})
        model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, optim_cfg))
        model.train()
        frozen = {key: strategy.wrap_frozen(load_frozen_model(spec, key, tokenizer, num_labels=num_labels,
                                                              seed=cfg.seed, device=strategy.device))
                  for key, spec in objective_class(cfg).frozen_models(cfg).items()}
        objective = build_objective(cfg, data, frozen, comm=comm, tokenizer=tokenizer)
        data = objective.prepare(data, model, strategy, tokenizer.pad_token_id)  # (before a resume restores weights)

        # Batches, schedule and the state a checkpoint restores.
        batches = objective.training_batches(BatchIterator(
            data.train, objective.micro_batch_rows(cfg), tokenizer.pad_token_id, shuffle=cfg.data.shuffle, seed=cfg.seed,
            rank=comm.data_rank, world_size=comm.data_size, group_by_length=cfg.data.group_by_length and not data.packed,
            flatten_packed=uses_varlen_attention(strategy.unwrap(model)), pack=cfg.data.packing))
        total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * batches.batches_per_epoch / tcfg.grad_accum_steps))
        scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
        state = TrainState()
        # Dropout and other run-time randomness: distinct per slice of the data, reproducible per
        # seed (ranks that share a batch, tensor or sequence parallel, draw the same numbers).
        seed_everything(cfg.seed + 1 + comm.data_rank)
        checkpointer = resources.enter_context(ckpt.Checkpointer(
            cfg, strategy, model, optimizer, {"scheduler": scheduler, "data": batches, "train_state": state}))
        if resume is not None:
            checkpointer.restore(resume)  # also this rank's RNG, and the data position at any world size
        if comm.is_main:
            # Every check has passed (data, model, checkpoint): only now is the run directory written to.
            write_config(cfg, out)
            write_report(data, tokenizer, out, batch_size=tcfg.micro_batch_size, max_seq_len=cfg.data.max_seq_len,
                         seed=cfg.seed)
            # Lines logged after the checkpoint (or, starting afresh, by an attempt that died before
            # its first checkpoint) are about to be produced again.
            truncate_metrics(out, state.step)
        tracker = resources.enter_context(Tracker(cfg, enabled=comm.is_main, total_steps=total_steps,
                                                  initial_step=state.step))
        run = Run(cfg, strategy, tokenizer, data, objective, model, optimizer, scheduler, batches, state,
                  EarlyStopping.from_config(cfg), checkpointer, tracker, total_steps, out,
                  resources=resources.pop_all())
        built.append(run)
    _announce(run, trainable, total, optim_cfg.lr, tokens_per_batch, resume)
    return run


@contextlib.contextmanager
def collecting_only_what_the_run_makes() -> Any:
    """The objects alive before the run (the imported libraries: ~10^6 in a process with torch,
    transformers and DeepSpeed) kept out of the garbage collector's scans while it lasts, so that
    its collections, automatic ones and the one that frees the wrapped model at the end, scan what
    the run made (a full collection costs ~0.3 s here otherwise, every time). Left alone when the
    process has frozen objects of its own (gc.freeze before a fork)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _release(built: list[Run]) -> None:
    for run in built:
        wrapped = weakref.ref(run.model)
        run.release()
        # A wrapped module sits in reference cycles (its hooks refer to it): collect it now, not
        # whenever a collection happens to come (of the run's objects only: see collecting_only_what_the_run_makes).
        if run.strategy.multi_process and wrapped() is not None:
            gc.collect()


def _announce(run: Run, trainable: int, total: int, lr: float, tokens_per_batch: int, resume: Path | None) -> None:
    cfg, strategy, tracker = run.cfg, run.strategy, run.tracker
    tracker.message(
        f"dtrain: {cfg.model.path} ({cfg.model.task}), {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%), strategy {strategy.name} x{strategy.comm.world_size} on {strategy.device}"
        + (f", mesh {strategy.dims.describe()}" if len(strategy.dims.sizes) > 1 else "")
    )
    tracker.message(run.data.summary())
    if cfg.optim.lr_scaling != "none":
        tracker.message(f"lr {lr:.4g} = optim.lr {cfg.optim.lr:.4g} x sqrt({tokens_per_batch} tokens per batch / "
                        f"{cfg.optim.lr_reference_tokens} reference) (optim.lr_scaling={cfg.optim.lr_scaling})")
    for note in apply_dropout(load_model_config(cfg.model), cfg.model.dropout):  # requests the model cannot take
        tracker.message(f"warning: {note}")
    if objective_name(cfg) != cfg.model.task:
        tracker.message(f"objective {objective_name(cfg)}" + (
            f": distilling from {cfg.distill.teacher} (alpha {cfg.distill.alpha}, T {cfg.distill.temperature})"
            if cfg.distill.teacher else ""))
    t = cfg.train
    tracker.message(f"{run.total_steps} steps ({max(1, run.batches.batches_per_epoch // t.grad_accum_steps)} per "
                    f"epoch), global batch {t.micro_batch_size * t.grad_accum_steps * strategy.dims.dp_size} "
                    f"{'packed sequences' if run.data.packed else 'examples'}"
                    + (f"; resumed from {resume} at step {run.state.step}" if resume else ""))


# --------------------------------------------------------------------------------------
# One optimizer step


def train_step(run: Run, micro_batches: list[dict[str, torch.Tensor]]) -> StepOutput:
    """Forward and backward over the micro-batches, clip, and step the optimizer and the schedule.

    Every micro-batch's summed loss (each term of it) is divided by the objective's count of
    what it sums over in the whole global step (all micro-batches, all ranks), so that
    accumulation of any lengths gives exactly the gradient of one large batch. An update whose
    loss or gradient is NaN/inf is skipped, never applied; train.max_bad_steps of them in a row
    stop the run. The objective's statistics of the step come back as its metrics."""
    cfg, strategy, state, comm = run.cfg, run.strategy, run.state, run.strategy.comm
    micro = [comm.split_batch(to_device(batch, comm.device)) for batch in micro_batches]
    counts = step_totals(comm, [run.objective.counts(batch) for batch in micro])
    step_loss, stats = torch.zeros((), device=comm.device), []
    for i, batch in enumerate(micro):
        with strategy.gradient_sync(run.model, enabled=i == len(micro) - 1):
            with autocast(cfg.train.precision, comm.device):
                terms = run.objective.loss_terms(run.model, batch)
                # The strategy averages gradients over the ranks that compute distinct sums; x their
                # number makes it a global sum.
                loss = sum(terms.sums[key] * (comm.distinct_ranks / max(counts[key], 1.0)) for key in terms.sums)
            strategy.backward(run.model, loss)
        step_loss += loss.detach() / comm.distinct_ranks
        stats.append({key: value.detach() for key, value in terms.stats.items()})
    totals = step_totals(comm, [{"": step_loss}, *stats])  # ("": the step's loss, apart from the statistics)
    loss, metrics = totals.pop(""), run.objective.step_metrics(totals)
    lr = run.scheduler.get_last_lr()[0]
    grad_norm, applied = strategy.optimizer_step(run.model, run.optimizer, cfg.optim.grad_clip,
                                                 skip=not math.isfinite(loss), l1=cfg.optim.l1)
    state.consecutive_bad_steps = 0 if applied else state.consecutive_bad_steps + 1
    if not applied:
        run.tracker.message(f"step {state.step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                            f"({state.consecutive_bad_steps}/{cfg.train.max_bad_steps})")
        if state.consecutive_bad_steps >= cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"loss or gradient was NaN/inf for {state.consecutive_bad_steps} consecutive steps (up to step "
                f"{state.step + 1}); stopped without saving. Lower optim.lr, enable optim.grad_clip, or check "
                "the data; train.max_bad_steps sets the limit. The last good checkpoint is untouched.")
    run.scheduler.step()
    state.step += 1
    tokens = sum(real_tokens(batch, run.tokenizer.pad_token_id) for batch in micro)
    state.tokens_seen += tokens
    return StepOutput(loss, grad_norm, lr, applied, tokens, metrics)


def step_totals(comm: Collectives, parts: list[dict[str, Any]]) -> dict[str, float]:
    """Each key's sum over `parts` (this rank's micro-batches) and over the slices of the data, in
    one all-reduce."""
    keys = sorted({key for part in parts for key in part})
    if not keys:
        return {}
    local = torch.zeros(len(keys), dtype=torch.float64, device=comm.device)
    for part in parts:
        for i, key in enumerate(keys):
            if key in part:
                local[i] += torch.as_tensor(part[key], dtype=torch.float64, device=comm.device)
    return dict(zip(keys, comm.data_sum(local).tolist()))


# --------------------------------------------------------------------------------------
# The loop


Reporter = Callable[[int, dict[str, Any], "Path | None"], None]


def train(cfg: Config, *, rows_per_file: int | None = None, report: Reporter | None = None) -> RunResult:
    """Train as `cfg` says. `report(step, metrics, checkpoint)`, if given, is called on every rank
    after each evaluation and each newly completed checkpoint (else None): how an outer system
    such as Ray Train or Tune follows the run without the core knowing about it."""
    with setup(cfg, rows_per_file=rows_per_file) as run:
        state, checkpointer, tracker = run.state, run.checkpointer, run.tracker
        result = RunResult(str(run.out), state.step, "max_steps")
        metrics: dict[str, Any] = {}
        evaluated_at, worst, reported = None, [], None  # the step `metrics` are from; the last checkpoint reported
        seconds, tokens = 0.0, 0  # training time (no evaluation, no saving) and tokens since the last log
        while state.step < run.total_steps and state.stop_reason is None:
            started = time.perf_counter()
            step = train_step(run, [next(run.batches) for _ in range(cfg.train.grad_accum_steps)])
            seconds, tokens = seconds + time.perf_counter() - started, tokens + step.tokens
            result.train_seconds += time.perf_counter() - started
            last = state.step == run.total_steps
            if not step.applied and not last:
                continue  # nothing to log or save for a skipped update, unless the run ends here

            if step.applied:
                result.train_losses.append(step.loss)
            # The first step too: the loss a run starts from.
            if step.applied and (state.step % cfg.train.log_every == 0 or last or state.step == 1):
                total = run.strategy.comm.data_sum(torch.tensor(float(tokens), device=run.strategy.device))
                rate = total.item() / max(seconds, 1e-9)
                tracker.log(state.step, {"epoch": round(run.batches.epoch_progress, 4), "loss": step.loss,
                                         **step.metrics, "lr": step.lr, "grad_norm": step.grad_norm,
                                         "tokens_per_s": rate})
                tracker.progress(state.step, step.loss, step.lr, rate)
                seconds, tokens = 0.0, 0
            else:
                tracker.advance(state.step)

            every = cfg.eval.every_steps
            if run.data.validation and ((every and state.step % every == 0) or last):
                started = time.perf_counter()
                metrics, worst = evaluate_run(run, worst=cfg.eval.worst_examples if last else 0)
                evaluated_at = state.step
                tracker.log(state.step, {**metrics, "eval_seconds": round(time.perf_counter() - started, 3)})
                tracker.message(f"step {state.step}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
                if run.early_stopping.update(state, metrics[f"eval_{cfg.eval.metric}"]):
                    state.stop_reason = "early_stopping"
                    tracker.message(f"early stopping at step {state.step}: eval_{cfg.eval.metric} has not improved "
                                    f"for {state.evals_without_improvement} evaluations (best {state.best_metric:.4f} "
                                    f"at step {state.best_step})")

            evaluated = metrics[f"eval_{cfg.eval.metric}"] if evaluated_at == state.step else None
            started = time.perf_counter()
            if checkpointer.step_done(state.step, final=last or state.stop_reason is not None, metric=evaluated):
                tracker.log(state.step, {"checkpoint_seconds": round(time.perf_counter() - started, 3)})
            if report is not None and (evaluated_at == state.step or checkpointer.last != reported):
                report(state.step, {"step": state.step, "loss": step.loss,
                                    **(metrics if evaluated_at == state.step else {})},
                       checkpointer.last if checkpointer.last != reported else None)
                reported = checkpointer.last
            if checkpointer.preempted_by:
                raise Preempted(f"stopped at step {state.step} on {checkpointer.preempted_by}: checkpoint "
                                f"{checkpointer.last} written; resume with --resume auto (exit code 75 asks "
                                "for a requeue)", state.step)
        return finish(run, result, metrics, worst)


def evaluate_run(run: Run, worst: int = 0) -> tuple[dict[str, Any], list]:
    """The objective's metrics on the validation split (collective), and the `worst` examples."""
    return evaluate(run.model, run.data.validation, run.objective, run.cfg, run.strategy.comm, run.tokenizer,
                    generator=run.strategy.unwrap(run.model), collective_forward=run.strategy.collective_forward,
                    generating=run.strategy.generating, worst=worst)


def finish(run: Run, result: RunResult, metrics: dict[str, Any], worst: list) -> RunResult:
    """The final model (gathered onto the main rank), the worst examples and the learning report."""
    cfg, strategy, comm = run.cfg, run.strategy, run.strategy.comm
    run.checkpointer.wait()
    # Collective: gathers shards onto the main rank (for an adapter, only what it saves).
    final_state = strategy.full_state_dict(run.model, trainable_only=cfg.peft.method != "none")
    if comm.is_main:
        final = save_final_model(strategy.unwrap(run.model), final_state, run.tokenizer, cfg, run.out)
        run.tracker.message(f"final model saved to {final}")
        if worst:
            write_worst_examples(run.out / "worst_examples.md",
                                 [describe(ex, run.tokenizer, run.data.label_names) for ex in worst])
        run.tracker.message(write_learning_report(run.out, cfg.eval.metric, cfg.eval.mode).strip())
    run.tracker.close()
    comm.barrier()
    result.step, result.final_metrics, result.best_step = run.state.step, metrics, run.state.best_step
    result.stop_reason = run.state.stop_reason or "max_steps"
    result.state_bytes = strategy.state_bytes(run.model, run.optimizer)
    return result


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from dtrain.cli import train_main

    # record: an unexpected exception on any rank reaches torchrun's summary with its rank.
    sys.exit(record(train_main)())
