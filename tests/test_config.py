"""Config loading: readable errors (key, file:line / override, what is allowed), overrides, CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from dtrain.config import ALL_KEYS, Config, ConfigError, load_config, parse_override
from conftest import EXAMPLES, run_cli

SECTIONS = ["model", "data", "peft", "freeze", "parallel", "optim", "schedule", "train", "eval", "checkpoint",
            "distill", "preference", "grpo", "logging", "ray", "tune", "seed", "output_dir"]


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_key_in_yaml_names_key_file_line_and_close_match(tmp_path):
    path = write_yaml(tmp_path, """
        model:
          path: tiny-llama
        optim:
          weight_decay: 0.01
          lrr: 0.001
        seed: 3
    """)
    msg = config_error(path)
    assert "unknown key `optim.lrr`" in msg
    assert f"{path}:5" in msg  # `lrr:` is on line 5
    assert "did you mean `optim.lr`?" in msg


def test_unknown_section_in_yaml_suggests_the_section(tmp_path):
    path = write_yaml(tmp_path, """
        seed: 1
        optimizer:
          lr: 0.1
    """)
    msg = config_error(path)
    assert "unknown key `optimizer`" in msg
    assert f"{path}:2" in msg
    assert "did you mean `optim`?" in msg


def test_unknown_leaf_in_wrong_section_suggests_the_right_section(tmp_path):
    # `lr` does not live in train:, but the leaf matches optim.lr.
    path = write_yaml(tmp_path, """
        train:
          max_steps: 10
          lr: 0.1
    """)
    msg = config_error(path)
    assert "unknown key `train.lr`" in msg
    assert f"{path}:3" in msg
    assert "did you mean `optim.lr`?" in msg
    assert "did you mean `eval.early_stopping.patience`?" in config_error(None, ["eval.patience=3"])


def test_unknown_key_in_override_names_the_override_and_close_match():
    msg = config_error(None, ["optim.lrr=0.1"])
    assert "unknown key `optim.lrr`" in msg
    assert "override 'optim.lrr=0.1'" in msg
    assert "did you mean `optim.lr`?" in msg


def test_override_with_only_the_leaf_suggests_the_full_key():
    msg = config_error(None, ["max_steps=5"])
    assert "unknown key `max_steps`" in msg
    assert "did you mean `train.max_steps`?" in msg


def test_override_without_equals_sign_is_an_error():
    msg = config_error(None, ["optim.lr"])
    assert "'optim.lr'" in msg and "key=value" in msg


# --------------------------------------------------------------------------------------
# Wrong types, bad values


def test_wrong_type_in_yaml_names_key_and_line(tmp_path):
    path = write_yaml(tmp_path, """
        train:
          micro_batch_size: 2
          max_steps: abc
    """)
    msg = config_error(path)
    assert f"`train.max_steps` ({path}:3)" in msg
    assert "valid integer" in msg
    assert "'abc'" in msg


def test_literal_value_lists_allowed_values(tmp_path):
    path = write_yaml(tmp_path, """
        train:
          precision: fp8
    """)
    msg = config_error(path)
    assert f"`train.precision` ({path}:2)" in msg
    assert "'fp8' is not allowed" in msg
    assert "'fp32'" in msg and "'bf16'" in msg


def test_every_bad_value_is_reported_with_its_own_line(tmp_path):
    path = write_yaml(tmp_path, """
        train:
          max_steps: abc
          precision: fp8
        optim:
          weight_decay: -0.5
        data:
          val_ratio: 1.5
    """)
    msg = config_error(path)
    assert f"`train.max_steps` ({path}:2)" in msg
    assert f"`train.precision` ({path}:3)" in msg
    assert f"`optim.weight_decay` ({path}:5)" in msg
    assert "greater than or equal to 0" in msg and "-0.5" in msg
    assert f"`data.val_ratio` ({path}:7)" in msg
    assert "less than 1" in msg and "1.5" in msg


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("optim.weight_decay=-1", "optim.weight_decay", "greater than or equal to 0"),
        ("data.val_ratio=1.5", "data.val_ratio", "less than 1"),
        ("train.precision=fp8", "train.precision", "'fp32' or 'bf16'"),
        ("train.max_steps=0", "train.max_steps", "greater than or equal to 1"),
        ("data.max_seq_len=4", "data.max_seq_len", "greater than or equal to 8"),
        ("data.format=json", "data.format", "'alpaca'"),
    ],
)
def test_bad_value_in_override_names_key_override_and_allowed(override, key, allowed):
    msg = config_error(None, [override])
    assert f"`{key}` (override {override!r})" in msg
    assert allowed in msg


# --------------------------------------------------------------------------------------
# Impossible combinations


def test_classification_data_needs_classification_task():
    msg = config_error(None, ["data.format=classification"])
    assert "data.format='classification'" in msg
    assert "model.task='causal_lm'" in msg
    assert "model.task=classification" in msg


def test_classification_task_needs_classification_data():
    msg = config_error(None, ["model.task=classification"])
    assert "data.format='alpaca'" in msg and "model.task='classification'" in msg


def test_classification_pair_is_accepted():
    cfg = load_config(None, ["data.format=classification", "model.task=classification"])
    assert (cfg.data.format, cfg.model.task) == ("classification", "classification")


def test_max_steps_and_epochs_together_is_an_error(tmp_path):
    msg = config_error(None, ["train.max_steps=10", "train.epochs=2"])
    assert "set only one of train.max_steps and train.epochs" in msg

    path = write_yaml(tmp_path, """
        seed: 1
        train:
          max_steps: 10
          epochs: 2
    """)
    msg = config_error(path)
    assert "set only one of train.max_steps and train.epochs" in msg
    assert f"{path}:2" in msg  # the train: section


def test_accuracy_metric_only_for_classification():
    msg = config_error(None, ["eval.metric=accuracy"])
    assert "eval.metric='accuracy'" in msg and "['loss', 'perplexity']" in msg
    cfg = load_config(None, ["eval.metric=accuracy", "data.format=classification", "model.task=classification"])
    assert cfg.eval.metric == "accuracy"


# --------------------------------------------------------------------------------------
# Overrides and defaults


def test_overrides_apply_and_parse_types():
    cfg = load_config(None, [
        "optim.lr=3e-4", "data.train=x.jsonl", "train.max_steps=7", "logging.wandb=true", "optim.grad_clip=null",
        "optim.betas=[0.8,0.95]", "eval.early_stopping.patience=3", "data.labels=[a,b]",
    ])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert [src.path for src in cfg.data.train] == ["x.jsonl"]
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.epochs is None
    assert cfg.logging.wandb is True
    assert cfg.optim.grad_clip is None
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.eval.early_stopping.patience == 3
    assert cfg.data.labels == ["a", "b"]


def test_parse_override_types():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", "3e-4")  # YAML 1.1; pydantic makes it a float
    assert parse_override("optim.lr=0.01") == ("optim.lr", 0.01)
    assert parse_override("seed=5") == ("seed", 5)
    assert parse_override("data.train=[a.jsonl, b.jsonl]") == ("data.train", ["a.jsonl", "b.jsonl"])
    assert parse_override("model.tokenizer=") == ("model.tokenizer", None)
    assert parse_override(" seed =5") == ("seed", 5)
    assert parse_override("output_dir=a=b") == ("output_dir", "a=b")


def test_overrides_win_over_yaml_and_keep_other_yaml_values(tmp_path):
    path = write_yaml(tmp_path, """
        optim:
          lr: 0.5
          weight_decay: 0.1
        data:
          train: [a.jsonl, b.jsonl]
    """)
    cfg = load_config(path, ["optim.lr=0.01", "data.validation=v.jsonl"])
    assert cfg.optim.lr == 0.01
    assert cfg.optim.weight_decay == 0.1
    assert [src.path for src in cfg.data.train] == ["a.jsonl", "b.jsonl"]
    assert [src.path for src in cfg.data.validation] == ["v.jsonl"]


def test_override_into_a_null_section(tmp_path):
    path = write_yaml(tmp_path, """
        optim:
        seed: 9
    """)
    cfg = load_config(path, ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25 and cfg.seed == 9


def test_default_length_is_one_epoch():
    cfg = load_config(None)
    assert cfg.train.epochs == 1.0 and cfg.train.max_steps is None
    cfg = load_config(None, ["train.max_steps=12"])
    assert cfg.train.epochs is None and cfg.train.max_steps == 12
    cfg = load_config(None, ["train.epochs=2.5"])
    assert cfg.train.epochs == 2.5 and cfg.train.max_steps is None


def test_every_documented_key_is_overridable():
    assert {"optim.lr", "train.max_steps", "eval.early_stopping.patience", "seed", "output_dir"} <= set(ALL_KEYS)
    cfg = load_config(None, ["eval.early_stopping.min_delta=0.5"])
    assert cfg.eval.early_stopping.min_delta == 0.5


def test_numeric_values_for_string_fields_are_accepted():
    cfg = load_config(None, ["data.format=classification", "model.task=classification", "data.labels=[0,1]",
                             "output_dir=2024"])
    assert cfg.data.labels == ["0", "1"]
    assert cfg.output_dir == "2024"


def test_yaml_config_round_trips_through_to_yaml(tmp_path):
    cfg = load_config(EXAMPLES / "tiny_alpaca.yaml", ["optim.lr=0.02", "data.labels=[x]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert load_config(path, ["optim.lr=0.03"]).fingerprint() != cfg.fingerprint()


# --------------------------------------------------------------------------------------
# Files


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  path: x\n\toptim: 1\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}:3: not valid YAML")


def test_invalid_yaml_mapping_value_on_first_line(tmp_path):
    path = write_yaml(tmp_path, "seed: 1: 2\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}:1: not valid YAML")


def test_missing_config_file(tmp_path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "config file not found" in msg and "nope.yaml" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- model\n- data\n")
    msg = config_error(path)
    assert str(path) in msg and "mapping" in msg


def test_empty_yaml_gives_defaults(tmp_path):
    path = write_yaml(tmp_path, "# nothing\n")
    assert load_config(path) == Config()


def test_example_config_loads():
    cfg = load_config(EXAMPLES / "tiny_alpaca.yaml")
    assert cfg.model.path == "tiny-llama"
    assert [src.path for src in cfg.data.train] == ["examples/data/arithmetic_alpaca.jsonl"]
    assert cfg.data.val_ratio == 0.05 and cfg.data.max_seq_len == 320
    assert cfg.optim.lr == 3e-3 and cfg.train.max_steps == 200 and cfg.train.epochs is None
    assert cfg.output_dir == "runs/tiny_alpaca"


# --------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_config_show_prints_every_section_with_overrides():
    proc = run_cli("config", "show", "examples/tiny_alpaca.yaml", "optim.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert list(shown) == SECTIONS
    assert shown["optim"]["lr"] == 0.01
    assert shown["optim"]["weight_decay"] == 0.01  # from the file
    assert shown["train"]["max_steps"] == 200 and shown["train"]["epochs"] is None
    assert [src["path"] for src in shown["data"]["train"]] == ["examples/data/arithmetic_alpaca.jsonl"]
    assert shown["peft"]["method"] == "none"  # a default, printed too
    assert shown["eval"]["early_stopping"] == {"patience": None, "min_delta": 0.0}
    assert shown == load_config(EXAMPLES / "tiny_alpaca.yaml", ["optim.lr=0.01"]).to_dict()


@pytest.mark.slow
def test_cli_config_show_bad_override_exits_2():
    proc = run_cli("config", "show", "examples/tiny_alpaca.yaml", "optim.lrr=0.01")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "unknown key `optim.lrr`" in proc.stderr and "did you mean `optim.lr`?" in proc.stderr


@pytest.mark.slow
def test_cli_train_with_typo_exits_2_before_creating_output(tmp_path):
    out = tmp_path / "out"
    path = write_yaml(tmp_path, f"""
        model:
          path: tiny-llama
        train:
          max_step: 3
        output_dir: {out}
    """)
    proc = run_cli("train", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown key `train.max_step`" in proc.stderr
    assert f"{path}:4" in proc.stderr
    assert "did you mean `train.max_steps`?" in proc.stderr
    assert not out.exists()
