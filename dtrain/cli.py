"""`dtrain` command line: train, config show."""

from __future__ import annotations

import argparse
import sys

from dtrain.config import ConfigError, load_config
from dtrain.train import add_train_arguments, run_from_args


def _config_show(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
