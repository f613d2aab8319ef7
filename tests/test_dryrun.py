"""`dtrain train CONFIG --dry-run` passes for every shipped example and fails clearly on bad configs."""

import subprocess

import pytest
from conftest import EXAMPLES, REPO, run_cli

from dtrain.cli import main
from dtrain.config import load_config
from dtrain.dryrun import shrink
from dtrain.presets import preset_config

# Parameter counts at full scale, as published for these architectures (+ the LoRA adapters / new heads).
FULL_SCALE = {
    "examples/cluster/llama3-8b-lora-1gpu.yaml": "8,072,204,288",  # 8,030,261,248 + 41,943,040 LoRA r=16
    "examples/tiny_alpaca.yaml": "771,712",
}

EXAMPLE_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in EXAMPLES.rglob("*.yaml"))


def test_examples_exist():
    assert any("cluster/" in c for c in EXAMPLE_CONFIGS) and "examples/tiny_alpaca.yaml" in EXAMPLE_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", EXAMPLE_CONFIGS)
def test_dry_run_passes(config, capsys, monkeypatch):
    # `dtrain train CONFIG --dry-run` through the CLI's entry point, in this process: the dry run
    # trains and resumes a shrunk model in-process anyway, and a new interpreter per config only
    # adds its start-up (the tests below run the CLI as a subprocess).
    monkeypatch.chdir(REPO)
    code = main(["train", config, "--dry-run"])
    captured = capsys.readouterr()
    proc = subprocess.CompletedProcess(["dtrain", "train", config, "--dry-run"], code, captured.out, captured.err)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("PASS")
    assert "parameters (full scale)" in proc.stdout and "tokens per optimizer step" in proc.stdout
    if config in FULL_SCALE:
        assert f"parameters (full scale):      {FULL_SCALE[config]} " in proc.stdout, proc.stdout
    assert not (REPO / load_config(REPO / config).output_dir).exists(), "a dry run must not write the real run dir"


def test_dry_run_fails_on_a_bad_model_path(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  path: /nonexistent/llama\ntrain:\n  max_steps: 2\n")
    proc = run_cli("train", str(cfg), "--dry-run")
    assert proc.returncode == 1
    assert "[FAIL]" in proc.stdout and "model.path" in proc.stdout and "/nonexistent/llama" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAIL")


def test_dry_run_fails_on_a_missing_data_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  train: /nonexistent/train.jsonl\ntrain:\n  max_steps: 2\n")
    proc = run_cli("train", str(cfg), "--dry-run")
    assert proc.returncode == 1
    assert "data.train" in proc.stdout and "/nonexistent/train.jsonl" in proc.stdout


def test_dry_run_rejects_an_impossible_combination_before_starting(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  task: classification\ndata:\n  format: alpaca\n")
    proc = run_cli("train", str(cfg), "--dry-run")
    assert proc.returncode == 2
    assert "data.format='alpaca' does not fit model.task='classification'" in proc.stderr
    assert "dry run:" not in proc.stdout


@pytest.mark.parametrize("preset", ["llama3-8b", "llama3-70b", "qwen2-7b", "mistral-7b"])
def test_shrink_keeps_vocab_and_grouped_query_layout(preset):
    full = preset_config(preset)
    small = shrink(full)
    assert small.vocab_size == full.vocab_size
    head_dim = getattr(small, "head_dim", None) or small.hidden_size // small.num_attention_heads
    assert small.num_hidden_layers == 2 and head_dim == 16
    assert small.hidden_size == small.num_attention_heads * 16
    group = full.num_attention_heads // full.num_key_value_heads
    assert small.num_attention_heads // small.num_key_value_heads == group
    assert small.tie_word_embeddings == full.tie_word_embeddings
