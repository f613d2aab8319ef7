"""The command line, all of it: `dtrain train | estimate | data prepare | config show | eval | report |
export | checkpoint consolidate | generate`, and `python -m dtrain.train` (the same as `dtrain train`).

Argument parsing lives here only; the commands call the core (dtrain.train.train and friends),
and turn its errors into one line on stderr and an exit code: 2 for a bad config or input, 1 for
a failed run, 75 (PREEMPTED_EXIT_CODE) for a run that saved a checkpoint and wants to be requeued.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from dtrain.config import ConfigError, load_config
from dtrain.launch import PREEMPTED_EXIT_CODE, preempted_exit_code


# --------------------------------------------------------------------------------------
# dtrain train / python -m dtrain.train


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


class SignalledBeforeTraining(BaseException):
    """A preemption signal came while the run was still being set up (imports, data, model).
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way may take it for
    an error of what it interrupted."""


class _StopNow:
    """The handler of the preemption signals before the loop: raises SignalledBeforeTraining where
    the signal lands. An exception raised by a signal handler can be lost on the way (seen here: one
    landing while a module imported during data preparation was being compiled never reached the
    command, and the run went on), so the signal is kept too, and the loop's watch asks for it
    when it takes over (`raise_pending`, before anything is written to the run directory)."""

    def __init__(self) -> None:
        self.pending: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.pending = signal.Signals(signum).name
        raise SignalledBeforeTraining(self.pending)

    def raise_pending(self) -> None:
        if self.pending is not None:
            raise SignalledBeforeTraining(self.pending)


@contextlib.contextmanager
def _preemption_before_the_loop():
    """Until the training loop's own watch takes over (it saves a checkpoint at the next step),
    SIGTERM, SIGUSR1 and SIGUSR2 end the command at once: there is nothing to save yet, and a
    scheduler should see the documented exit code, not a process killed by the signal."""
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    stop_now = _StopNow()
    previous = {sig: signal.signal(sig, stop_now) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rank_prefix() -> str:
    """Which rank speaks, in a multi-process run (torchrun sets RANK and WORLD_SIZE)."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _train(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc < 1:
        print(f"error: --nproc {args.nproc}: the number of processes per node must be at least 1", file=sys.stderr)
        return 2
    if args.nproc and not args.dry_run:  # (a dry run is one process; --nproc shapes its estimate)
        try:  # a bad config fails here, before any process starts
            load_config(args.config, args.overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from dtrain.launch import launch_training

        return launch_training(args)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:  # first: a bad config fails in a second, before torch and transformers are imported
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return 2
    with _preemption_before_the_loop():
        try:
            return _run_training(cfg, args)
        except SignalledBeforeTraining as exc:
            print(f"{_rank_prefix()}preempted: {exc} arrived before the first training step (while importing, "
                  "preparing data or loading the model), so there was nothing to save. "
                  f"Run the same command again (exit code {PREEMPTED_EXIT_CODE} asks the scheduler for a requeue)",
                  file=sys.stderr)
            return preempted_exit_code()


def _run_training(cfg: Any, args: argparse.Namespace) -> int:
    import torch

    from dtrain.checkpoint import CheckpointError
    from dtrain.safe_load import UnsafeCheckpointError
    from dtrain.train import NonFiniteLossError, Preempted, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed; say CPU is meant
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format=f"{_rank_prefix()}%(levelname)s %(name)s: %(message)s")
    try:
        if args.dry_run:
            from dtrain.dryrun import dry_run

            return dry_run(cfg, gpus=args.nproc, nodes=int(args.nnodes))
        result = train(cfg)
    except Preempted as exc:
        if main_rank:
            print(f"preempted: {exc}", file=sys.stderr)
        return preempted_exit_code()
    except (ConfigError, NonFiniteLossError, CheckpointError, UnsafeCheckpointError, ValueError) as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
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


def train_main(argv: list[str] | None = None) -> int:
    """`python -m dtrain.train ...`: the same as `dtrain train ...`."""
    parser = argparse.ArgumentParser(prog="python -m dtrain.train", parents=[DEBUG_FLAG],
                                     description="Train or fine-tune a model from one YAML config.")
    add_train_arguments(parser)
    return run_command(_train, parse_with_overrides(parser, argv))


# Every command takes it: the traceback of an unexpected failure, instead of one line.
DEBUG_FLAG = argparse.ArgumentParser(add_help=False)
DEBUG_FLAG.add_argument("--debug", action="store_true",
                        help="on an unexpected failure, show the traceback (also: DTRAIN_DEBUG=1)")


def run_command(command: Any, args: argparse.Namespace) -> int:
    """Run one command. It reports the failures it expects itself; anything else still ends in
    one `error:` line naming what failed, with exit code 2 for a bad config and 1 otherwise, and
    the traceback only with --debug or DTRAIN_DEBUG=1 (which torchrun's workers inherit)."""
    if getattr(args, "debug", False):
        os.environ["DTRAIN_DEBUG"] = "1"
    try:
        return command(args)
    except ConfigError as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence; --debug re-raises
        if os.environ.get("DTRAIN_DEBUG") == "1":
            raise
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        print(f"{_rank_prefix()}error: {type(exc).__name__}: {lines[0] if lines else 'no message'}\n"
              "  (an unexpected failure: rerun with --debug, or DTRAIN_DEBUG=1, for the traceback)", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------
# The other commands


def _config_show(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    """Build (or find) the cached, tokenized dataset and write the data report."""
    from pathlib import Path

    from dtrain.data import DataError, prepare_data
    from dtrain.data.report import write_report
    from dtrain.model import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"data.on_error={args.on_error}"] if args.on_error else [])
    try:
        cfg = load_config(args.config, overrides)
        report_dir = Path(args.report_dir or cfg.output_dir)
        if report_dir.exists() and not report_dir.is_dir():
            raise ConfigError(f"{'--report-dir' if args.report_dir else 'output_dir'} {report_dir} is a file, not a "
                              "directory: choose another")
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_data(cfg.data, tokenizer, cfg.seed, use_cache=not args.rebuild)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    report = write_report(data, tokenizer, report_dir, batch_size=cfg.train.micro_batch_size,
                          max_seq_len=cfg.data.max_seq_len, seed=cfg.seed)
    print(data.summary())
    for step, rows, drops in data.steps:
        dropped = ", ".join(f"{n} {r}" for r, n in drops.items() if n)
        print(f"  {step:<24} {rows:>9} rows" + (f"   (dropped {dropped})" if dropped else ""))
    print(f"cache:  {data.cache_path}\nreport: {report}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dtrain.checkpoint import CheckpointError
    from dtrain.safe_load import UnsafeCheckpointError
    from dtrain.export import export

    source = Path(getattr(args, "checkpoint", None) or args.source)
    if getattr(args, "checkpoint", None) and not (source / "manifest.json").is_file():
        print(f"error: {source} is not a checkpoint directory (no manifest.json)", file=sys.stderr)
        return 2
    try:
        out = export(source, Path(args.out), adapter_only=getattr(args, "adapter_only", False))
    except (CheckpointError, UnsafeCheckpointError, ConfigError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dtrain.export import generate

    model = Path(args.model)
    if not (model / "config.json").is_file() and (model / "final" / "config.json").is_file():
        model = model / "final"  # a run directory: its trained model
    if not (model / "config.json").is_file():
        print(f"error: {args.model} is not a model directory (no config.json) nor a run directory with a final/ "
              "model; give an exported model or a finished run", file=sys.stderr)
        return 2
    print(generate(model, args.prompt, template=args.template, max_new_tokens=args.max_new_tokens))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a run's model (or any model directory) on the test split of CONFIG's data."""
    from pathlib import Path

    from dtrain.checkpoint import CheckpointError
    from dtrain.safe_load import UnsafeCheckpointError
    from dtrain.data import DataError, prepare_data
    from dtrain.evaluation import describe, evaluate
    from dtrain.export import load_trained
    from dtrain.model import load_frozen_model
    from dtrain.objectives import build_objective, objective_class
    from dtrain.parallel.single import SingleDevice
    from dtrain.schema import SEQUENCE_HEADS

    source = Path(args.source)
    if not any((source / name).is_file() for name in ("config.yaml", "manifest.json", "config.json")):
        print(f"error: {source} is not a run directory, checkpoint or model directory (no config.yaml, manifest.json "
              "or config.json in it)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.preference.precompute_reference:  # (the stored values are of the training data: the reference runs)
            cfg = cfg.model_copy(update={"preference": cfg.preference.model_copy(
                update={"precompute_reference": False})})
        if (source / "config.yaml").is_file() or (source / "manifest.json").is_file():
            model, tokenizer, _, _ = load_trained(source)
        else:  # a plain Hugging Face model directory
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

            model_cls = AutoModelForSequenceClassification if cfg.model.task in SEQUENCE_HEADS else AutoModelForCausalLM
            model = model_cls.from_pretrained(source, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        data = prepare_data(cfg.data, tokenizer, cfg.seed)
        if not len(data.test):
            raise ValueError("the data has no test split: give data.test sources or a data.test_ratio > 0")
        strategy = SingleDevice(cfg.parallel)
        # The frozen models the metrics need (a preference objective's reference; a teacher adds nothing to them).
        frozen = {key: strategy.wrap_frozen(load_frozen_model(spec, key, tokenizer, num_labels=None, seed=cfg.seed,
                                                              device=strategy.device))
                  for key, spec in objective_class(cfg).frozen_models(cfg).items()
                  if objective_class(cfg).evaluates_with_frozen}
        objective = build_objective(cfg, data, frozen=frozen, tokenizer=tokenizer)
        metrics, worst = evaluate(model.to(strategy.device), data.test, objective, cfg, strategy.comm, tokenizer,
                                  worst=cfg.eval.worst_examples)
    except (ConfigError, CheckpointError, UnsafeCheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    result = {"source": str(source), "split": "test", "examples": metrics["eval_examples"],  # (those scored)
              **{k.replace("eval_", "test_", 1): v for k, v in metrics.items()},
              "worst_examples": [describe(ex, tokenizer, data.label_names) for ex in worst]}
    from dtrain.checkpoint import write_text_atomic

    out = Path(args.out) if args.out else (source / "eval.json")
    if args.out and (out.is_dir() or args.out.endswith(os.sep) or not out.suffix):
        out = out / "eval.json"  # --out DIR, as the README writes it
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
    print(f"written to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dtrain.diagnose import write_learning_report
    from dtrain.tracking import METRICS_FILE

    run = Path(args.run)
    if not (run / METRICS_FILE).is_file():
        print(f"error: {run} has no {METRICS_FILE} (is it a dtrain run directory?)", file=sys.stderr)
        return 2
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    print(write_learning_report(run, cfg.eval.metric if cfg else "loss", cfg.eval.mode if cfg else "min"), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="Fine-tune and train language models from one YAML file.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[DEBUG_FLAG], help="train or fine-tune a model (same as python -m dtrain.train)")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    from dtrain.estimate import add_estimate_arguments, run_estimate

    estimate = commands.add_parser("estimate", parents=[DEBUG_FLAG], help="parameters, memory per device for each strategy, FLOPs and "
                                   "time per epoch; which strategy fits")
    add_estimate_arguments(estimate)
    estimate.set_defaults(func=run_estimate)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", parents=[DEBUG_FLAG], help="print the fully resolved config, defaults included")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_config_show)

    data = commands.add_parser("data", help="prepare data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser(
        "prepare", parents=[DEBUG_FLAG], help="clean, dedup, split, tokenize and pack into the cache; write data_report.md")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*")
    prepare.add_argument("--on-error", choices=["fail", "skip"], help="malformed rows: fail (default) or skip and count")
    prepare.add_argument("--rebuild", action="store_true", help="ignore an existing cache entry")
    prepare.add_argument("--report-dir", help="where data_report.md goes (default: output_dir)")
    prepare.set_defaults(func=_data_prepare)

    export = commands.add_parser("export", parents=[DEBUG_FLAG], help="a run or checkpoint as a plain Hugging Face model (adapters merged)")
    export.add_argument("source", help="run directory (its final/ model) or a checkpoint directory")
    export.add_argument("--out", required=True, help="new directory for the model")
    export.add_argument("--adapter-only", action="store_true", help="write the LoRA/DoRA adapter alone, unmerged")
    export.set_defaults(func=_export)

    checkpoint = commands.add_parser("checkpoint", help="work with checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_commands.add_parser(
        "consolidate", parents=[DEBUG_FLAG], help="reassemble a sharded checkpoint (any strategy, any world size) into one full model")
    consolidate.add_argument("checkpoint", help="a checkpoint directory (output_dir/checkpoints/step_N)")
    consolidate.add_argument("--out", required=True, help="new directory for the model")
    consolidate.set_defaults(func=_export)

    evaluation = commands.add_parser("eval", parents=[DEBUG_FLAG], help="evaluate a run or a model directory on the test split; writes eval.json")
    evaluation.add_argument("source", help="run directory, checkpoint, or Hugging Face model directory")
    evaluation.add_argument("config", help="YAML config whose data (test split) and eval settings to use")
    evaluation.add_argument("overrides", nargs="*")
    evaluation.add_argument("--out", metavar="DIR|FILE.json",
                            help="where eval.json goes: a directory, or a file name (default: inside SOURCE)")
    evaluation.set_defaults(func=_eval)

    report = commands.add_parser("report", parents=[DEBUG_FLAG], help="learning curves and a written diagnosis of a run")
    report.add_argument("run", help="run directory")
    report.set_defaults(func=_report)

    gen = commands.add_parser("generate", parents=[DEBUG_FLAG], help="greedy generation from a model directory, for a quick look")
    gen.add_argument("model", help="an exported model directory (or a run's final/)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--template", choices=["none", "alpaca", "chat"], default="none",
                     help="wrap the prompt as the model was trained to see it")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
