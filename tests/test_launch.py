"""`dtrain train CONFIG --nproc N`: torchrun started for you, rank-0-only output, and errors
that say which rank they come from."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, read_metrics, run_cli

TINY = str(REPO / "examples" / "tiny_alpaca.yaml")


def fast(model_dir, out):
    return [f"model.path={model_dir}", "data.max_seq_len=256", "train.max_steps=4", "train.log_every=1",
            "checkpoint.every_steps=2", "eval.max_batches=2", "logging.tensorboard=false", f"output_dir={out}"]


@pytest.mark.slow
def test_nproc_2_trains_with_one_voice(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", TINY, "--nproc", "2", "parallel.strategy=ddp", *fast(tiny_model_dir, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("done: ") == 1  # rank 0 only
    assert proc.stderr.count("strategy ddp x2 on cpu") == 1
    # Not a terminal (a log file): one plain line per logged step, from rank 0 alone; no bars.
    assert [proc.stderr.count(f"step {s}/4: loss ") for s in (1, 2, 3, 4)] == [1, 1, 1, 1], proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]  # one line per step, not two
    latest = out / "checkpoints" / json.loads((out / "checkpoints" / "latest").read_text())["checkpoint"]
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert len(list((latest / "dcp").glob("*.distcp"))) == 2  # each rank wrote its shard
    assert (out / "final" / "model.safetensors").is_file()


def test_ddp_in_one_process_trains_with_one_warning(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", TINY, "parallel.strategy=ddp", *fast(tiny_model_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("parallel.strategy=ddp in one process") == 1
    assert "--nproc N" in proc.stderr and "parallel.strategy=single" in proc.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_rank_failure_is_reported_with_its_rank(tiny_model_dir, tmp_path):
    """Only the main rank prepares data, so a bad data file fails there; the message says
    which rank, and the launcher exits with that worker's code."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n')
    proc = run_cli("train", TINY, "--nproc", "2", "parallel.strategy=ddp", f"data.train={bad}",
                   *fast(tiny_model_dir, tmp_path / "run"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"[rank 0] error: {bad}:2:" in proc.stderr
    assert "dtrain.launch: workers failed with exit codes" in proc.stderr
