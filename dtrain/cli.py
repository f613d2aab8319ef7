"""`dtrain` command line: train, data prepare, config show."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
