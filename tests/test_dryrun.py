"""`dtrain train CONFIG --dry-run` passes for every shipped example and fails clearly on bad configs."""

import re
import subprocess
import time

import pytest
import torch
from conftest import ALPACA, EXAMPLES, REPO, run_cli
from test_estimate import ARCHITECTURES, architecture_config, save_gpt2_dir

from dtrain.cli import main
from dtrain.config import load_config
from dtrain.dryrun import shrink
from dtrain.estimate import model_dims
from dtrain.presets import preset_config

# Parameter counts at full scale, as published for these architectures (+ the LoRA adapters / new heads).
FULL_SCALE = {
    "examples/cluster/llama3-8b-lora-1gpu.yaml": "8,072,204,288",  # 8,030,261,248 + 41,943,040 LoRA r=16
    "examples/tiny_alpaca.yaml": "771,712",
}

EXAMPLE_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in EXAMPLES.rglob("*.yaml"))

# Examples that start from the model another example writes (its output_dir/final): on a clean
# checkout that run is trained first, shortened, as a user would (the example's comment says so).
STARTS_FROM = {"examples/tiny_dpo.yaml": "examples/tiny_alpaca.yaml", "examples/tiny_grpo.yaml": "examples/tiny_sums.yaml"}


def test_examples_exist():
    assert any("cluster/" in c for c in EXAMPLE_CONFIGS) and "examples/tiny_alpaca.yaml" in EXAMPLE_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", EXAMPLE_CONFIGS)
def test_dry_run_passes(config, capsys, monkeypatch, tmp_path):
    # `dtrain train CONFIG --dry-run` through the CLI's entry point, in this process: the dry run
    # trains and resumes a shrunk model in-process anyway, and a new interpreter per config only
    # adds its start-up (the tests below run the CLI as a subprocess).
    monkeypatch.chdir(REPO)
    overrides = []
    if config in STARTS_FROM:
        first = STARTS_FROM[config]
        assert load_config(REPO / config).model.path == f"{load_config(REPO / first).output_dir}/final"
        sft_dir = tmp_path / "first"
        assert main(["train", first, "train.max_steps=2", f"output_dir={sft_dir}"]) == 0
        overrides = [f"model.path={sft_dir / 'final'}"]
        capsys.readouterr()
    code = main(["train", config, "--dry-run", *overrides])
    captured = capsys.readouterr()
    proc = subprocess.CompletedProcess(["dtrain", "train", config, "--dry-run"], code, captured.out, captured.err)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("PASS")
    assert "parameters (full scale)" in proc.stdout and "tokens per optimizer step" in proc.stdout
    if config in FULL_SCALE:
        assert f"parameters (full scale):      {FULL_SCALE[config]} " in proc.stdout, proc.stdout
    assert not (REPO / load_config(REPO / config).output_dir).exists(), "a dry run must not write the real run dir"


@pytest.mark.slow
def test_dry_run_with_deepspeed_saves_reloads_and_resumes(capsys, monkeypatch):
    # Two runs in one process (the dry run's train, then its resume): DeepSpeed's cached process
    # groups must not outlive the first run's (`Group ... is not registered`).
    monkeypatch.chdir(REPO)
    code = main(["train", "examples/tiny_alpaca.yaml", "--dry-run", "parallel.strategy=deepspeed",
                 "parallel.deepspeed_config=ds_configs/zero2.json"])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("PASS"), out
    assert "[ok]   save, verify and reload a checkpoint, then resume one step" in out


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


@pytest.mark.parametrize("name", ["gpt2", *ARCHITECTURES])
def test_shrink_works_for_each_familys_config_names(name):
    """GPT-2's n_layer / n_head / n_embd / n_inner (null), OPT's ffn_dim, Falcon's and GPT-BigCode's
    multi-query, null KV heads or head_dim: the shrunk config builds and trains a step."""
    from transformers import AutoModelForCausalLM, GPT2Config

    full = (GPT2Config(n_embd=128, n_layer=4, n_head=8, n_inner=None, vocab_size=260) if name == "gpt2"
            else architecture_config(name))
    small = shrink(full)
    before, after = model_dims(full), model_dims(small)
    assert after.layers == 2 and after.head_dim == 16 and after.hidden == after.heads * 16
    assert after.heads // after.kv_heads == before.heads // before.kv_heads
    assert after.intermediate / after.hidden == pytest.approx(before.intermediate / before.hidden, rel=0.3)
    assert small.vocab_size == full.vocab_size
    if name == "gpt2":
        assert small.n_layer == 2 and small.n_inner is None  # null: 4 x the new n_embd
    model = AutoModelForCausalLM.from_config(small)
    ids = torch.randint(3, 260, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_dry_run_of_a_gpt2_dir_prints_one_checklist_and_the_whole_elapsed_time(tmp_path):
    """Through the CLI, as a user runs it: PASS on a GPT-2-style model directory; the inner training
    runs' own announcements and reports are not mixed into the checklist; and the elapsed time
    covers the whole command, imports and model loading included (as measured around it)."""
    model = save_gpt2_dir(tmp_path / "gpt2")
    cfg = tmp_path / "gpt2.yaml"
    cfg.write_text(f"model:\n  path: {model}\ndata:\n  train: {ALPACA}\n  format: alpaca\n  max_seq_len: 256\n"
                   "train:\n  micro_batch_size: 2\n")
    started = time.perf_counter()
    proc = run_cli("train", str(cfg), "--dry-run")
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.rstrip().endswith("PASS") and "Traceback" not in out + proc.stderr
    assert out.count("dry run: ") == 1 and out.count("  elapsed: ") == 1
    assert "[FAIL]" not in out and out.count("  [ok]   ") == 9
    # The inner runs' announcement ("dtrain: MODEL ..."), data summary and learning report stay inside.
    for inner in ("dtrain: ", "data: 64 rows", "# How the run went", "final model saved"):
        assert inner not in out and inner not in proc.stderr, inner
    lines = out.splitlines()
    checklist = [i for i, line in enumerate(lines) if line.startswith("  [")]
    assert checklist == list(range(1, 10)), out  # the checks, one after another, right under the header
    elapsed = float(re.search(r"elapsed: +([0-9.]+) s", out).group(1))
    # The interpreter's exit after the last line takes a second or two; the dry run before it is most.
    assert 0.7 * wall <= elapsed <= wall + 0.5, (elapsed, wall)


def test_captured_takes_every_kind_of_output_and_lets_none_through(capfd):
    """print, sys.stderr, a logging handler holding the original stream, and a write to the file
    descriptor itself (as C code and DeepSpeed's logger do) all end up in the capture."""
    import logging
    import os
    import sys

    from dtrain.dryrun import captured

    handler = logging.StreamHandler(sys.stderr)
    log = logging.getLogger("dtrain.test-captured")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with captured() as inner:
            print("printed")
            print("progress 10%\rprogress 100%", file=sys.stderr)
            log.info("logged")
            os.write(1, b"from the descriptor\n")
    finally:
        log.removeHandler(handler)
    assert inner.lines == ["printed", "progress 100%", "logged", "from the descriptor"]
    out, err = capfd.readouterr()
    assert out == err == ""


def test_a_failed_step_shows_its_own_last_lines_under_its_fail_line(make_config, monkeypatch, capsys):
    import dtrain.train

    from dtrain.dryrun import dry_run

    def failing_train(cfg, **kwargs):
        print("dtrain: the inner run announces itself")
        print("warning: something the real run would say too")
        raise RuntimeError("the step broke")

    monkeypatch.setattr(dtrain.train, "train", failing_train)
    assert dry_run(make_config()) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    fail = next(i for i, line in enumerate(lines) if line.startswith("  [FAIL] train 3 steps"))
    assert lines[fail].endswith(": the step broke")
    assert lines[fail + 1:fail + 4] == ["         its output (last 2 lines):",
                                        "           | dtrain: the inner run announces itself",
                                        "           | warning: something the real run would say too"]
    assert out.count("dtrain: the inner run") == 1 and out.rstrip().endswith("FAIL")
