"""`dtrain` command line: train, data prepare, config show, export, checkpoint consolidate, generate."""

from __future__ import annotations

import argparse
import sys

from dtrain.config import ConfigError, load_config
from dtrain.train import add_train_arguments, parse_with_overrides, run_from_args


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
    import logging
    from pathlib import Path

    from dtrain.data import DataError, prepare_data
    from dtrain.data.report import write_report
    from dtrain.model import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"data.on_error={args.on_error}"] if args.on_error else [])
    try:
        cfg = load_config(args.config, overrides)
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_data(cfg.data, tokenizer, cfg.seed, use_cache=not args.rebuild)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    report = write_report(data, tokenizer, Path(args.report_dir or cfg.output_dir), batch_size=cfg.train.micro_batch_size,
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
    from dtrain.export import export

    source = Path(getattr(args, "checkpoint", None) or args.source)
    if getattr(args, "checkpoint", None) and not (source / "manifest.json").is_file():
        print(f"error: {source} is not a checkpoint directory (no manifest.json)", file=sys.stderr)
        return 2
    try:
        out = export(source, Path(args.out), adapter_only=getattr(args, "adapter_only", False))
    except (CheckpointError, ConfigError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dtrain.export import generate

    print(generate(Path(args.model), args.prompt, template=args.template, max_new_tokens=args.max_new_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="Fine-tune and train language models from one YAML file.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train or fine-tune a model (same as python -m dtrain.train)")
    add_train_arguments(train)
    train.set_defaults(func=run_from_args)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the fully resolved config, defaults included")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_config_show)

    data = commands.add_parser("data", help="prepare data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser(
        "prepare", help="clean, dedup, split, tokenize and pack into the cache; write data_report.md")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*")
    prepare.add_argument("--on-error", choices=["fail", "skip"], help="malformed rows: fail (default) or skip and count")
    prepare.add_argument("--rebuild", action="store_true", help="ignore an existing cache entry")
    prepare.add_argument("--report-dir", help="where data_report.md goes (default: output_dir)")
    prepare.set_defaults(func=_data_prepare)

    export = commands.add_parser("export", help="a run or checkpoint as a plain Hugging Face model (adapters merged)")
    export.add_argument("source", help="run directory (its final/ model) or a checkpoint directory")
    export.add_argument("--out", required=True, help="new directory for the model")
    export.add_argument("--adapter-only", action="store_true", help="write the LoRA/DoRA adapter alone, unmerged")
    export.set_defaults(func=_export)

    checkpoint = commands.add_parser("checkpoint", help="work with checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_commands.add_parser(
        "consolidate", help="reassemble a sharded checkpoint (any strategy, any world size) into one full model")
    consolidate.add_argument("checkpoint", help="a checkpoint directory (output_dir/checkpoints/step_N)")
    consolidate.add_argument("--out", required=True, help="new directory for the model")
    consolidate.set_defaults(func=_export)

    gen = commands.add_parser("generate", help="greedy generation from a model directory, for a quick look")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
