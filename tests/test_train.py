"""The training loop end to end on a tiny model: gradient accumulation, learning, early stopping,
the NaN guard, atomic checkpoints, exact resume, the saved final model, every data format, determinism.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA, CHAT, CLASSIFICATION, TEXT, losses, probe_ids, read_metrics, run_cli, tree_digest

import dtrain.evaluation as evaluation_mod
from dtrain import checkpoint as ckpt
from dtrain.config import ConfigError, ParallelConfig
from dtrain.data import IGNORE_INDEX, Example, collate
from dtrain.parallel.single import SingleDevice
from dtrain.peft import apply_peft
from dtrain.presets import byte_tokenizer
from dtrain.objectives import CausalLM
from dtrain.train import NonFiniteLossError, Preempted, train

LM = CausalLM()  # the objective of these runs, to compute losses and counts by hand


def count_targets(batch, task):
    assert task == "causal_lm"
    return LM.count(batch)


def loss_and_counts(model, batch, task):
    """(the summed loss, its count) as the run's objective computes them."""
    assert task == "causal_lm"
    return LM.loss(model, batch), LM.count(batch)

FAST = ("eval.max_batches=2",)


def run(make_config, *overrides, output_dir=None):
    return train(make_config(*FAST, *overrides, output_dir=output_dir))


def train_lines(out):
    return [m for m in read_metrics(out) if "loss" in m]


def eval_lines(out):
    return [m for m in read_metrics(out) if "eval_loss" in m]


@pytest.fixture
def eval_spy(monkeypatch):
    """Records (copies of) every batch each evaluation sees: one list per evaluation."""
    evaluations: list[list[dict[str, torch.Tensor]]] = []
    original = evaluation_mod.eval_batches

    def spy(*args, **kwargs):
        seen: list[dict[str, torch.Tensor]] = []
        evaluations.append(seen)
        for batch in original(*args, **kwargs):
            seen.append({k: v.clone() for k, v in batch.items()})
            yield batch

    monkeypatch.setattr(evaluation_mod, "eval_batches", spy)
    return evaluations


def nan_from(monkeypatch, bad_calls):
    """Make the objective's loss NaN (with NaN gradients) on the given 0-based call numbers."""
    calls = {"n": 0}
    original = CausalLM.loss

    def fake(self, model, batch):
        loss = original(self, model, batch)
        i = calls["n"]
        calls["n"] += 1
        if i in bad_calls:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(CausalLM, "loss", fake)
    return calls


# --------------------------------------------------------------------------------------
# Gradient accumulation


def _variable_length_examples(tokenizer, n):
    """Alpaca rows with prompts of very different lengths; every third trains on the whole sequence,
    so micro-batches differ in padding *and* in their number of target tokens."""
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()[:n]]
    examples = []
    for i, row in enumerate(rows):
        prompt = tokenizer("Context. " * (i * 3 % 7) + f"{row['instruction']}\n{row['input']}\n")["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_labels = list(prompt) if i % 3 == 0 else [IGNORE_INDEX] * len(prompt)
        examples.append(Example(prompt + answer, prompt_labels + answer))
    return examples


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_over_variable_length_micro_batches_equals_one_batch(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config.attention_dropout == 0.0
    model.train()
    pad = tokenizer.pad_token_id
    examples = _variable_length_examples(tokenizer, 9)
    micro = [collate(examples[i:i + 3], pad) for i in (0, 3, 6)]
    widths = [b["input_ids"].shape[1] for b in micro]
    assert len(set(widths)) == 3, widths  # three different paddings
    assert all(b["attention_mask"].sum() < b["attention_mask"].numel() for b in micro)
    counts = [count_targets(b, "causal_lm") for b in micro]
    assert len(set(counts)) > 1, counts

    # One batch of all nine examples, mean over its target tokens.
    full = collate(examples, pad)
    loss_full, n_full = loss_and_counts(model, full, "causal_lm")
    assert n_full == count_targets(full, "causal_lm") == sum(counts)
    (loss_full / n_full).backward()
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)

    # Three micro-batches, each summed loss normalised by the step's total targets (as dtrain.train does).
    total = sum(counts)
    summed = 0.0
    for batch, count in zip(micro, counts):
        loss, n = loss_and_counts(model, batch, "causal_lm")
        assert n == count
        summed += loss.item()
        (loss / total).backward()
    g_acc = _grads(model)
    model.zero_grad(set_to_none=True)

    assert summed == pytest.approx(loss_full.item(), rel=1e-6)
    assert g_acc.keys() == g_full.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], atol=1e-6, rtol=0, msg=name)
    assert max(g.abs().max().item() for g in g_full.values()) > 1e-2  # the gradients are not ~0

    # Averaging per-micro-batch means (the classic mistake) is visibly different: the check has teeth.
    for batch, count in zip(micro, counts):
        loss, _ = loss_and_counts(model, batch, "causal_lm")
        (loss / count / len(micro)).backward()
    g_naive = _grads(model)
    assert max((g_naive[n] - g_full[n]).abs().max().item() for n in g_full) > 1e-4


def test_grad_accum_run_matches_a_bigger_micro_batch(make_config, tmp_path):
    common = ("train.max_steps=3", "optim.lr=1e-3", "eval.batch_size=4")
    big = run(make_config, *common, "train.micro_batch_size=8", "train.grad_accum_steps=1", output_dir=tmp_path / "a")
    acc = run(make_config, *common, "train.micro_batch_size=4", "train.grad_accum_steps=2", output_dir=tmp_path / "b")
    acc4 = run(make_config, *common, "train.micro_batch_size=2", "train.grad_accum_steps=4", output_dir=tmp_path / "c")
    assert len(big.train_losses) == 3
    assert big.train_losses[0] != big.train_losses[2]  # it trained
    assert acc.train_losses == pytest.approx(big.train_losses, abs=1e-5, rel=0)
    assert acc4.train_losses == pytest.approx(big.train_losses, abs=1e-5, rel=0)
    assert acc.final_metrics["eval_loss"] == pytest.approx(big.final_metrics["eval_loss"], abs=1e-5, rel=0)


# --------------------------------------------------------------------------------------
# Learning, logging, evaluation


def test_tokens_per_s_counts_training_time_only(make_config, tmp_path, monkeypatch):
    """Evaluation and checkpoint time is logged apart (eval_seconds, checkpoint_seconds) and kept
    out of tokens_per_s. A fake clock makes it plain: every reading advances it by 1 s, and an
    evaluation or a save by 1000 s more; a step is timed by two readings around it."""
    import dtrain.train as train_mod

    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] += 1.0
        return clock["now"]

    def slow(real):
        def call(*args, **kwargs):
            clock["now"] += 1000.0
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(train_mod.time, "perf_counter", perf_counter)
    monkeypatch.setattr(train_mod, "evaluate_run", slow(train_mod.evaluate_run))
    monkeypatch.setattr(ckpt.Checkpointer, "save", slow(ckpt.Checkpointer.save))
    out = tmp_path / "run"
    run(make_config, "train.max_steps=6", "train.log_every=2", "eval.every_steps=2", "checkpoint.every_steps=2",
        "checkpoint.keep_last=3", output_dir=out)
    monkeypatch.undo()
    records = read_metrics(out)
    rate = {r["step"]: r["tokens_per_s"] for r in records if "tokens_per_s" in r}
    assert sorted(rate) == [1, 2, 4, 6]
    seen = {int(p.name.split("_")[1]): torch.load(p / ckpt.STATE_FILE, weights_only=True)["train_state"]["tokens_seen"]
            for p in ckpt.list_checkpoints(ckpt.checkpoint_root(out))}
    for since, step in ((2, 4), (4, 6)):  # each window follows an evaluation and a save (1000 s each)
        # 2 steps of ~1 s each (more only if something else reads the clock inside a step):
        # with the evaluation and the save counted, the rate would be ~1000x lower.
        assert rate[step] == pytest.approx((seen[step] - seen[since]) / 2, rel=0.5)
    assert [r["step"] for r in records if "eval_seconds" in r] == [2, 4, 6]
    assert all(r["eval_seconds"] >= 1000 for r in records if "eval_seconds" in r)
    assert [r["step"] for r in records if "checkpoint_seconds" in r] == [2, 4, 6]
    assert all(r["checkpoint_seconds"] >= 1000 for r in records if "checkpoint_seconds" in r)


def test_loss_falls_and_metrics_are_logged(make_config, tmp_path, eval_spy):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    peak = 3e-3
    result = run(make_config, "train.max_steps=30", f"optim.lr={peak}", "schedule.name=cosine",
                 "schedule.warmup_steps=3", "eval.every_steps=10", output_dir=out)
    losses = result.train_losses
    assert result.step == 30 and result.stop_reason == "max_steps" and len(losses) == 30
    assert losses[0] > 5.0  # ~ln(260) for a random model
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 1.5
    assert max(losses[-5:]) < min(losses[:3]) - 1.0

    records = train_lines(out)
    assert [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert set(r) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0
    assert [r["loss"] for r in records] == losses
    # LR of step s (1-based): warmup s/3 * peak, then cosine over the remaining 27 steps
    expected_lr = [peak * s / 3 if s <= 3 else peak * 0.5 * (1 + math.cos(math.pi * (s - 4) / 27)) for s in range(1, 31)]
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-9)
    # epoch = step / batches_per_epoch, rounded to 4 places
    per_epoch = round(30 / records[-1]["epoch"])
    assert 250 <= per_epoch <= 500  # ~1700 training rows / 4 per batch
    assert [r["epoch"] for r in records] == [round(s / per_epoch, 4) for s in range(1, 31)]

    evals = eval_lines(out)
    assert [e["step"] for e in evals] == [10, 20, 30]
    for e in evals:
        assert set(e) == {"step", "eval_loss", "eval_perplexity", "eval_examples", "eval_examples_total",
                          "eval_sampled", "eval_seconds"}
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-12)
        assert e["eval_seconds"] > 0  # (logged beside the metrics: not one of them)
    assert evals[0]["eval_loss"] > evals[1]["eval_loss"] > evals[2]["eval_loss"]
    assert result.final_metrics == {k: v for k, v in evals[-1].items() if k not in ("step", "eval_seconds")}

    # eval_loss is the mean over all target tokens of the evaluated batches: recompute it from final/.
    assert len(eval_spy) == 3 and all(len(batches) == 2 for batches in eval_spy)
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for batch in eval_spy[-1]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").item()
            targets += int((labels != IGNORE_INDEX).sum())
    assert loss_sum / targets == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)


# --------------------------------------------------------------------------------------
# Early stopping


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_on_a_flat_validation_loss(make_config, tmp_path, patience):
    out = tmp_path / "run"
    result = run(make_config, "optim.lr=0", "eval.every_steps=1", f"eval.early_stopping.patience={patience}",
                 "train.max_steps=10", output_dir=out)
    assert result.stop_reason == "early_stopping"
    assert result.step == patience + 1  # the first eval sets the best, then `patience` without improvement
    assert result.best_step == 1
    assert len(result.train_losses) == patience + 1
    evals = eval_lines(out)
    assert [e["step"] for e in evals] == list(range(1, patience + 2))
    assert len({e["eval_loss"] for e in evals}) == 1  # lr=0: exactly flat
    last = ckpt.find_resumable(out)
    assert last is not None and last.name == f"step_{patience + 1:08d}"  # saved at the stop
    saved = torch.load(last / ckpt.STATE_FILE, weights_only=True)["train_state"]
    assert saved["evals_without_improvement"] == patience and saved["best_step"] == 1
    assert (out / "final" / "config.json").is_file()


def _expected_stop(losses, min_delta, patience):
    """The documented rule: an eval improves when it beats the best by more than min_delta."""
    best, best_step, waited = None, None, 0
    for step, value in enumerate(losses, start=1):
        if best is None or best - value > min_delta:
            best, best_step, waited = value, step, 0
        else:
            waited += 1
        if waited >= patience:
            return step, best_step
    return None, best_step


def test_early_stopping_respects_min_delta(make_config, tmp_path):
    common = ("optim.lr=1e-3", "schedule.name=constant", "eval.every_steps=1", "eval.early_stopping.patience=2",
              "train.max_steps=8")
    ref = run(make_config, *common, output_dir=tmp_path / "ref")
    losses = [e["eval_loss"] for e in eval_lines(tmp_path / "ref")]
    assert len(losses) == 8 and all(a > b for a, b in zip(losses, losses[1:])), losses  # always improving
    assert ref.stop_reason == "max_steps" and ref.step == 8 and ref.best_step == 8

    # A min_delta larger than the first improvement but smaller than the first two together.
    delta = ((losses[0] - losses[1]) + (losses[0] - losses[2])) / 2
    stop_step, best_step = _expected_stop(losses, delta, 2)
    assert stop_step is not None and 3 < stop_step < 8 and best_step > 1  # a case between the extremes
    mid = run(make_config, *common, f"eval.early_stopping.min_delta={delta}", output_dir=tmp_path / "mid")
    assert mid.stop_reason == "early_stopping"
    assert (mid.step, mid.best_step) == (stop_step, best_step)
    assert [e["eval_loss"] for e in eval_lines(tmp_path / "mid")] == pytest.approx(losses[:stop_step], abs=1e-6)

    # A huge min_delta: no evaluation counts as an improvement even though the loss keeps falling.
    huge = run(make_config, *common, "eval.early_stopping.min_delta=10", output_dir=tmp_path / "huge")
    assert (huge.stop_reason, huge.step, huge.best_step) == ("early_stopping", 3, 1)


def test_early_stopping_without_validation_data_is_a_config_error(make_config, tmp_path):
    with pytest.raises(ConfigError, match="early_stopping.patience"):
        run(make_config, "data.val_ratio=0", "eval.early_stopping.patience=2", output_dir=tmp_path / "x")


# --------------------------------------------------------------------------------------
# NaN guard


def _all_finite(path: Path) -> bool:
    """Every tensor of a safetensors file, or of a checkpoint's trainable weights, is finite."""
    from safetensors.torch import load_file

    tensors = ckpt.read_state(path)["model"] if path.is_dir() else load_file(path)
    assert tensors
    return all(torch.isfinite(t).all() for t in tensors.values())


def test_persistent_nan_stops_after_max_bad_steps(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = nan_from(monkeypatch, bad_calls=set(range(2, 100)))  # steps 1-2 fine, NaN from step 3 on
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf for 3 consecutive steps \(up to step 5\)"):
        run(make_config, "train.max_steps=10", "train.max_bad_steps=3", "checkpoint.every_steps=2",
            "checkpoint.keep_last=5", output_dir=out)
    assert calls["n"] == 5  # stopped right at the third bad step
    assert not (out / "final").exists() and not (out / ".final.tmp").exists()
    assert [p.name for p in ckpt.list_checkpoints(ckpt.checkpoint_root(out))] == ["step_00000002"]
    assert ckpt.find_resumable(out).name == "step_00000002"
    assert _all_finite(ckpt.find_resumable(out))
    assert [r["step"] for r in train_lines(out)] == [1, 2]  # bad steps are never logged as losses


def test_a_single_bad_step_is_skipped_and_training_continues(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_from(monkeypatch, bad_calls={1})  # only step 2
    result = run(make_config, "train.max_steps=4", "train.max_bad_steps=2", output_dir=out)
    assert result.step == 4 and result.stop_reason == "max_steps"
    assert len(result.train_losses) == 3 and all(math.isfinite(x) for x in result.train_losses)
    assert [r["step"] for r in train_lines(out)] == [1, 3, 4]
    last = ckpt.find_resumable(out)
    optim_state = ckpt.read_state(last)["optimizer"]
    # AdamW took 3 updates, not 4: the NaN step never reached the weights
    assert {float(s["step"]) for s in optim_state["state"].values()} == {3.0}
    assert _all_finite(last)
    assert _all_finite(out / "final" / "model.safetensors")


def test_bad_last_step_still_gets_final_eval_and_checkpoint(make_config, tmp_path, monkeypatch):
    """A skipped (NaN) update on the very last step must not lose the end-of-run eval/checkpoint."""
    out = tmp_path / "run"
    nan_from(monkeypatch, bad_calls={3})  # step 4 of 4
    result = run(make_config, "train.max_steps=4", "train.max_bad_steps=3", output_dir=out)
    assert result.step == 4 and len(result.train_losses) == 3
    assert (out / "final" / "config.json").is_file()
    assert "eval_loss" in result.final_metrics
    assert ckpt.find_resumable(out) is not None and ckpt.find_resumable(out).name == "step_00000004"


def test_huge_lr_raises_and_leaves_finite_checkpoints(make_config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        run(make_config, "optim.lr=1e30", "train.max_steps=10", "train.max_bad_steps=2", "checkpoint.every_steps=1",
            "checkpoint.keep_last=10", output_dir=out)
    assert not (out / "final").exists()
    found = ckpt.list_checkpoints(ckpt.checkpoint_root(out))
    assert found, "the good first step was checkpointed"
    for path in found:
        assert ckpt.verify(path) is None
        assert _all_finite(path)


@pytest.mark.slow
def test_cli_reports_non_finite_loss_with_exit_code_1(make_config, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(make_config(*FAST, output_dir=out).to_yaml())
    proc = run_cli("train", str(config), "optim.lr=1e30", "train.max_steps=10", "train.max_bad_steps=2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: loss or gradient was NaN/inf for 2 consecutive steps" in proc.stderr
    assert "train.max_bad_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "done:" not in proc.stdout
    assert not (out / "final").exists()


# --------------------------------------------------------------------------------------
# Atomic checkpoints


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)


def _small_run(tmp_path, make_config, *overrides):
    """A model, a stepped optimizer, the single strategy and a config: what save_checkpoint takes."""
    torch.manual_seed(0)
    model = _Linear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.proj(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, SingleDevice(ParallelConfig(device="cpu")), make_config("checkpoint.keep_last=3", *overrides)


def _save(root, step, model, optimizer, strategy, cfg, marker):
    return ckpt.save_checkpoint(root, step, strategy=strategy, model=model, optimizer=optimizer,
                                trainer_state={"marker": marker}, cfg=cfg)


class Killed(BaseException):
    """The process dies here (kill -9, node failure): nothing after this point runs, no cleanup."""


def _crash_partway(real):
    """A replacement for a save function: writes half the bytes, then the process dies."""

    def fake(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise Killed("the process died here")

    return fake


@pytest.mark.parametrize("victim", ["shards", "trainer_state", "manifest"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, victim, make_config):
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(out)
    model, optimizer, strategy, cfg = _small_run(tmp_path, make_config)
    saved_weight = model.proj.weight.detach().clone()
    first = _save(root, 1, model, optimizer, strategy, cfg, marker=1)
    if victim == "shards":  # the sharded writer dies halfway through its file
        real = SingleDevice.save_checkpoint

        def shard_crash(self, model, optimizer, path, async_save=False):
            real(self, model, optimizer, path)
            shard = next((path / "dcp").glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            raise Killed("the process died here")

        monkeypatch.setattr(SingleDevice, "save_checkpoint", shard_crash)
    elif victim == "trainer_state":
        monkeypatch.setattr(ckpt, "_torch_save", _crash_partway(ckpt._torch_save))
    else:  # every data file is complete, the save dies writing the manifest

        def json_crash(path, data):
            Path(path).write_text(json.dumps(data)[:10])
            raise Killed("the process died here")

        monkeypatch.setattr(ckpt, "_write_json_atomic", json_crash)
    with torch.no_grad():
        model.proj.weight += 1
    with pytest.raises(Killed):
        _save(root, 2, model, optimizer, strategy, cfg, marker=2)
    monkeypatch.undo()

    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [".tmp-step_00000002"]  # the crashed save's debris ...
    assert ckpt.list_checkpoints(root) == [first]  # ... is not a checkpoint
    assert ckpt.find_resumable(out) == first
    assert json.loads((root / "latest").read_text())["step"] == 1
    fresh_model, fresh_optimizer, _, _ = _small_run(tmp_path, make_config)
    trainer_state = ckpt.load_checkpoint(first, strategy=strategy, model=fresh_model, optimizer=fresh_optimizer,
                                         cfg=cfg)
    assert trainer_state["marker"] == 1 and trainer_state["step"] == 1
    assert torch.equal(fresh_model.proj.weight, saved_weight)
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].shape == (2, 3)

    # The next save removes the debris (before its free-space check), then writes that step.
    second = _save(root, 2, model, optimizer, strategy, cfg, marker=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert ckpt.find_resumable(out) == second
    assert torch.equal(ckpt.read_state(second)["model"]["proj.weight"], model.proj.weight.detach())


def test_truncated_or_corrupted_checkpoint_is_skipped(tmp_path, make_config):
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(out)
    model, optimizer, strategy, cfg = _small_run(tmp_path, make_config, "checkpoint.keep_last=5")
    paths = [_save(root, s, model, optimizer, strategy, cfg, marker=s) for s in (1, 2, 3)]
    assert ckpt.find_resumable(out) == paths[2]

    # step 3: truncated shard
    shard = paths[2] / "dcp" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    problem = ckpt.verify(paths[2])
    assert problem == f"dcp/__0_0.distcp has {size // 2} bytes, manifest says {size}"
    assert ckpt.find_resumable(out) == paths[1]
    with pytest.raises(ckpt.CheckpointError, match="not usable"):
        ckpt.load_checkpoint(paths[2], strategy=strategy, model=model, optimizer=optimizer, cfg=cfg)

    # step 2: same size, one byte flipped
    state_file = paths[1] / ckpt.STATE_FILE
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    assert ckpt.verify(paths[1]) == "trainer_state.pt checksum mismatch"
    assert ckpt.verify(paths[1], checksums=False) is None
    assert ckpt.find_resumable(out) == paths[0]
    loaded = ckpt.load_checkpoint(paths[0], strategy=strategy, model=model, optimizer=optimizer, cfg=cfg)
    assert loaded["marker"] == 1

    # step 1: no manifest -> nothing resumable
    (paths[0] / ckpt.MANIFEST_FILE).unlink()
    assert ckpt.verify(paths[0]) == "no manifest (incomplete save)"
    assert ckpt.find_resumable(out) is None


def test_a_refused_resume_leaves_a_presets_base_model_as_it_was(make_config, tmp_path):
    """A LoRA run on a preset saves its random base (base_model/); resuming it with another adapter
    is refused, and that attempt must not have written base_model/ again first."""
    out = tmp_path / "run"
    lora = ("model.path=tiny-llama", "peft.method=lora", "train.max_steps=1", "eval.max_batches=1")
    run(make_config, *lora, output_dir=out)
    weights = out / "base_model" / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    with pytest.raises(ckpt.CheckpointError, match="different model or adapter"):
        run(make_config, *lora, "peft.r=4", "checkpoint.resume=auto", output_dir=out)
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_the_next_save_removes_a_crashed_saves_leftovers_and_says_so(tmp_path, make_config, caplog):
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(out)
    model, optimizer, strategy, cfg = _small_run(tmp_path, make_config)
    _save(root, 1, model, optimizer, strategy, cfg, marker=1)
    debris = root / ".tmp-step_00000002"
    (debris / "dcp").mkdir(parents=True)
    (debris / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 5000)  # what a killed save leaves
    with caplog.at_level("WARNING", logger="dtrain.checkpoint"):
        _save(root, 2, model, optimizer, strategy, cfg, marker=2)
    assert not debris.exists()
    assert f"removed {debris}" in caplog.text and "unfinished save of an earlier attempt" in caplog.text


def test_crash_in_a_training_checkpoint_then_resume_auto(make_config, tmp_path, monkeypatch):
    """Training dies while writing its second checkpoint; --resume auto picks up the first and
    finishes with the same losses as a run that never crashed."""
    common = ("train.max_steps=4", "checkpoint.every_steps=2", "optim.lr=1e-3")
    reference = run(make_config, *common, output_dir=tmp_path / "ref")

    out = tmp_path / "run"
    calls = {"n": 0}
    real_save = ckpt._torch_save

    def save_then_crash(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first small file of the second checkpoint (RNG + trainer state per checkpoint)
            _crash_partway(real_save)(obj, path, *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "_torch_save", save_then_crash)
    with pytest.raises(Killed):
        run(make_config, *common, output_dir=out)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(ckpt.checkpoint_root(out))] == ["step_00000002"]
    assert ckpt.find_resumable(out).name == "step_00000002"
    assert not (out / "final").exists()

    resumed = run(make_config, *common, "checkpoint.resume=auto", output_dir=out)
    assert resumed.step == 4 and resumed.train_losses == pytest.approx(reference.train_losses[2:], abs=1e-6, rel=0)
    assert resumed.final_metrics["eval_loss"] == pytest.approx(reference.final_metrics["eval_loss"], abs=1e-6)
    assert [r["step"] for r in train_lines(out)] == [1, 2, 3, 4]
    assert not any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_root(out).iterdir())


# --------------------------------------------------------------------------------------
# Exact resume

N = 5


def _resume_config(make_config, out, *extra):
    return make_config(*FAST, f"train.max_steps={2 * N}", f"checkpoint.every_steps={N}", "checkpoint.keep_last=3",
                       "optim.lr=1e-3", "schedule.warmup_steps=2", *extra, output_dir=out)


@pytest.mark.slow
def test_exact_resume_through_the_cli(make_config, tmp_path, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    cfg_a = _resume_config(make_config, a)
    result_a = train(cfg_a)
    assert result_a.step == 2 * N
    ckpt_name = f"step_{N:08d}"
    shutil.copytree(a / "checkpoints" / ckpt_name, b / "checkpoints" / ckpt_name)
    config = tmp_path / "config.yaml"
    config.write_text(cfg_a.to_yaml())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same kernels/thread count as this process
    before = tree_digest(b)

    # Without --resume an output_dir holding checkpoints is refused, and nothing is touched.
    proc = run_cli("train", str(config), f"output_dir={b}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "already holds checkpoints" in proc.stderr and "--resume auto" in proc.stderr
    assert tree_digest(b) == before and sorted(p.name for p in b.iterdir()) == ["checkpoints"]

    proc = run_cli("train", str(config), f"output_dir={b}", "--resume", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.split("done: ", 1)[1])
    assert summary["step"] == 2 * N and summary["stop_reason"] == "max_steps"

    rec_a = {r["step"]: r for r in train_lines(a)}
    rec_b = {r["step"]: r for r in train_lines(b)}
    assert sorted(rec_b) == list(range(N + 1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert rec_b[step]["loss"] == pytest.approx(rec_a[step]["loss"], abs=1e-6, rel=0), step
        assert rec_b[step]["lr"] == pytest.approx(rec_a[step]["lr"], rel=1e-12)
        assert rec_b[step]["epoch"] == rec_a[step]["epoch"]
    assert rec_a[N + 1]["loss"] != rec_a[2 * N]["loss"]
    assert summary["eval_loss"] == pytest.approx(result_a.final_metrics["eval_loss"], abs=1e-6)
    from safetensors.torch import load_file

    final_a, final_b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], atol=1e-6, rtol=0)


def test_exact_resume_with_lora_dropout(make_config, tmp_path):
    """LoRA dropout makes the loss depend on the RNG: the checkpoint's RNG state must be restored."""
    a, b = tmp_path / "A", tmp_path / "B"
    lora = ("peft.method=lora", "peft.dropout=0.1", "optim.lr=1e-2")
    result_a = train(_resume_config(make_config, a, *lora))
    ckpt_name = f"step_{N:08d}"
    shutil.copytree(a / "checkpoints" / ckpt_name, b / "checkpoints" / ckpt_name)
    result_b = train(_resume_config(make_config, b, *lora, "checkpoint.resume=auto"))
    assert result_b.step == 2 * N and len(result_b.train_losses) == N
    assert result_b.train_losses == pytest.approx(result_a.train_losses[N:], abs=1e-6, rel=0)
    assert result_b.final_metrics["eval_loss"] == pytest.approx(result_a.final_metrics["eval_loss"], abs=1e-6)
    # the adapter is what trains, and the resumed one ends where the uninterrupted one did
    state = ckpt.read_state(ckpt.find_resumable(a))["model"]
    assert state and all("lora_" in k for k in state)


def test_exact_resume_from_an_explicit_path(make_config, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    result_a = train(_resume_config(make_config, a))
    result_b = train(_resume_config(make_config, b, f"checkpoint.resume={a / 'checkpoints' / f'step_{N:08d}'}"))
    assert result_b.train_losses == pytest.approx(result_a.train_losses[N:], abs=1e-6, rel=0)


def test_existing_checkpoints_without_resume_fail_and_delete_nothing(make_config, tmp_path):
    out = tmp_path / "run"
    run(make_config, "train.max_steps=2", output_dir=out)
    before = tree_digest(out)
    assert any(k.startswith("checkpoints/step_") for k in before)
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*--resume auto"):
        run(make_config, "train.max_steps=2", output_dir=out)
    assert tree_digest(out) == before


# --------------------------------------------------------------------------------------
# The final model


def test_full_fine_tune_final_model_reloads_and_generates(make_config, tmp_path, final_spy, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run(make_config, "train.max_steps=3", "optim.lr=3e-3", output_dir=out)
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = probe_ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(logits, final_spy["logits"], atol=1e-5, rtol=0)
    assert (logits - base).abs().max() > 1e-2  # it is the trained model, not the base
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("12 + 30")["input_ids"] == byte_tokenizer()("12 + 30")["input_ids"]
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[0] == 1 and ids.shape[1] < generated.shape[1] <= ids.shape[1] + 6
    assert torch.equal(generated[0, : ids.shape[1]], ids[0])
    assert generated[0, ids.shape[1]].item() == final_spy["logits"][0, -1].argmax().item()  # greedy


def test_lora_final_adapter_reloads_on_the_local_base(make_config, tmp_path, final_spy, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(make_config, "train.max_steps=3", "optim.lr=1e-2", "peft.method=lora", output_dir=out)
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert not (out / "base_model").exists()  # a local base is not copied
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = probe_ids()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
        model = PeftModel.from_pretrained(base, final).eval()
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, final_spy["logits"], atol=1e-5, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter changed the model

    # The trained adapter is also what the last checkpoint holds.
    fresh = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       make_config("peft.method=lora", output_dir=out).peft, "causal_lm")
    loaded = fresh.load_state_dict(ckpt.read_state(ckpt.find_resumable(out))["model"], strict=False)
    assert not loaded.unexpected_keys and all("lora_" not in k for k in loaded.missing_keys)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, logits, atol=1e-5, rtol=0)


def _preset_lora_run(make_config, out):
    return run(make_config, "model.path=tiny-llama", "train.max_steps=2", "optim.lr=1e-2", "peft.method=lora",
               output_dir=out)


def test_lora_on_a_preset_saves_the_base_next_to_the_adapter(make_config, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "run"
    _preset_lora_run(make_config, out)
    base_dir = out / "base_model"
    assert (base_dir / "config.json").is_file() and (base_dir / "tokenizer.json").is_file()
    assert not (out / ".base_model.tmp").exists()
    adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    config = AutoConfig.from_pretrained(adapter_config["base_model_name_or_path"])
    assert config.num_hidden_layers == 4 and config.hidden_size == 128  # the preset's shape


def test_lora_on_a_preset_reloads_with_the_trained_logits(make_config, tmp_path, final_spy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    _preset_lora_run(make_config, out)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, out / "final").eval()(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, final_spy["logits"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Tasks and formats


def test_classification_trains_and_reports_accuracy(make_config, tmp_path, eval_spy):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    result = run(make_config, "model.task=classification", "data.format=classification",
                 f"data.train={CLASSIFICATION}", "train.max_steps=4", "optim.lr=1e-3", output_dir=out)
    assert result.step == 4 and len(result.train_losses) == 4
    assert all(math.isfinite(x) and x > 0 for x in result.train_losses)
    metrics = result.final_metrics
    # No perplexity: it means nothing for a classifier's cross-entropy.
    assert set(metrics) == {"eval_loss", "eval_accuracy", "eval_precision_macro", "eval_recall_macro", "eval_f1_macro",
                            "eval_f1_micro", "eval_confusion_matrix", "eval_examples", "eval_examples_total",
                            "eval_sampled"}
    assert eval_lines(out)[-1]["eval_accuracy"] == metrics["eval_accuracy"]

    # Recompute loss and accuracy on the evaluated batches with the saved classifier.
    batches = eval_spy[-1]
    assert len(batches) == 2
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "equal", 1: "first", 2: "second"}  # the classes by name, not LABEL_0..2
    assert model.config.label2id == {"equal": 0, "first": 1, "second": 2}
    loss_sum, correct, n = 0.0, 0, 0
    confusion = [[0] * 3 for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            assert batch["labels"].dim() == 1
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
            for truth, guess in zip(batch["labels"].tolist(), logits.argmax(-1).tolist()):
                confusion[truth][guess] += 1
    assert n == 8
    assert metrics["eval_accuracy"] == pytest.approx(correct / n)
    assert metrics["eval_confusion_matrix"] == confusion
    assert metrics["eval_loss"] == pytest.approx(loss_sum / n, abs=1e-5)


@pytest.mark.parametrize(("fmt", "path"), [("chat", CHAT), ("text", TEXT)])
def test_chat_and_text_formats_train(make_config, tmp_path, fmt, path):
    out = tmp_path / "run"
    result = run(make_config, f"data.format={fmt}", f"data.train={path}", "train.max_steps=2", output_dir=out)
    assert result.step == 2 and len(result.train_losses) == 2
    assert all(math.isfinite(x) and 3.0 < x < 7.0 for x in result.train_losses)  # ~ln(260) at the start
    assert [r["step"] for r in train_lines(out)] == [1, 2]
    assert math.isfinite(result.final_metrics["eval_loss"])
    assert (out / "final" / "config.json").is_file()


# --------------------------------------------------------------------------------------
# Determinism


def test_identical_runs_give_identical_losses(make_config, tmp_path):
    common = ("train.max_steps=3", "peft.method=lora", "peft.dropout=0.1", "optim.lr=1e-2")
    first = run(make_config, *common, output_dir=tmp_path / "a")
    second = run(make_config, *common, output_dir=tmp_path / "b")
    other_seed = run(make_config, *common, "seed=7", output_dir=tmp_path / "c")
    assert len(first.train_losses) == 3
    assert first.train_losses == second.train_losses
    assert first.final_metrics == second.final_metrics
    assert other_seed.train_losses != first.train_losses  # the seed matters, so equality above means something
    from safetensors.torch import load_file

    ad_a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    ad_b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)


def test_report_is_called_after_each_evaluation_and_checkpoint(make_config, tmp_path):
    """The hook Ray Train and Tune follow a run by."""
    calls = []
    out = tmp_path / "run"
    train(make_config("train.max_steps=6", "eval.every_steps=2", "checkpoint.every_steps=3", output_dir=out),
          report=lambda step, metrics, checkpoint: calls.append((step, set(metrics), checkpoint)))
    assert [c[0] for c in calls] == [2, 3, 4, 6]
    assert all("eval_loss" in keys for step, keys, _ in calls if step % 2 == 0)
    assert "eval_loss" not in calls[1][1] and {"step", "loss"} <= calls[1][1]
    root = out / "checkpoints"
    assert [c[2] for c in calls] == [None, root / "step_00000003", None, root / "step_00000006"]


def _live_ddp_modules() -> list:
    """Every DistributedDataParallel object in memory, reachable or not (no collection first)."""
    from torch.nn.parallel import DistributedDataParallel

    return [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]


def test_the_wrapped_model_is_gone_before_the_process_group_is(make_config, tmp_path):
    """After a run, normal or preempted (its exception still held, as the command line holds it),
    nothing keeps the DDP-wrapped model alive: freed after the process group was destroyed, its
    reducer frees the gloo group from a destructor holding the GIL, which can hang the process
    (pytorch/pytorch#56297). The garbage collector is off: the module must be freed when the run
    lets go of it, not whenever a collection happens to come."""
    gc.collect()
    gc.disable()
    try:
        _check_the_wrapped_model_is_freed(make_config, tmp_path)
    finally:
        gc.enable()


def _check_the_wrapped_model_is_freed(make_config, tmp_path) -> None:
    assert not _live_ddp_modules()
    train(make_config("parallel.strategy=ddp", "train.max_steps=2", output_dir=tmp_path / "done"))
    assert not _live_ddp_modules()

    def preempt(step, metrics, checkpoint):
        os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM signals a job before its time is up

    try:
        train(make_config("parallel.strategy=ddp", "train.max_steps=8", "eval.every_steps=2",
                          output_dir=tmp_path / "preempted"), report=preempt)
    except Preempted as exc:  # (as dtrain.cli catches it: the traceback and its frames alive)
        assert "stopped at step" in str(exc) and exc.__traceback__ is not None
        assert not _live_ddp_modules()
    else:
        raise AssertionError("the run was not preempted")


def test_a_stop_file_saves_and_stops_the_run_like_a_preemption_signal(make_config, tmp_path):
    """checkpoint.stop_file: for runs no signal reaches (a Ray worker trains in a thread). Made
    after step 3, it is seen at step 4's boundary: a checkpoint of step 4, then Preempted (exit
    75 on the command line); without it, the run resumes from there to its end."""
    stop, out = tmp_path / "stop", tmp_path / "run"
    cfg = make_config("train.max_steps=8", "checkpoint.every_steps=3", f"checkpoint.stop_file={stop}", output_dir=out)

    def make_the_file(step, metrics, checkpoint):  # (called at each checkpoint)
        if step == 3:
            stop.touch()

    with pytest.raises(Preempted, match=f"stopped at step 4 on the stop file {stop}: checkpoint"):
        train(cfg, report=make_the_file)
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == 4
    before = tree_digest(out)
    with pytest.raises(ConfigError, match="checkpoint.stop_file=.* exists, so the run would save and stop"):
        train(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": "auto"})}))
    assert tree_digest(out) == before  # refused before anything was written
    stop.unlink()
    result = train(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": "auto"})}))
    assert result.step == 8 and sorted(losses(out)) == list(range(1, 9))
