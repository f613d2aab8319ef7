"""Checkpoints that survive anything: resharding across world sizes and strategies, kill -9
at random moments (including during a write), preemption signals, damaged shards, and
export of the trained model. Real processes (torchrun, 2 ranks, gloo) throughout."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ALPACA, REPO, eval_losses, losses, read_metrics, run_cli
from polling import logged_steps, wait_for
from dist_worker import dumps
from test_distributed import torchrun

from dtrain import checkpoint as ckpt
from dtrain.config import load_config
from dtrain.train import train

POLL = 0.005  # seconds between looks: fast enough to catch a checkpoint while it is being written

PREEMPTED = 75
STEPS = 12
TINY = REPO / "examples" / "tiny_alpaca.yaml"
ZERO = {z: ["parallel.strategy=deepspeed", f"parallel.deepspeed_config=ds_configs/zero{z}.json"] for z in (2, 3)}


def run_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(TINY), *run_overrides(model_dir), f"output_dir={out}", *extra]


def run_overrides(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={ALPACA}", "data.max_seq_len=256", f"train.max_steps={STEPS}",
            "train.micro_batch_size=2", "train.log_every=1", "optim.lr=2e-3", "eval.every_steps=4",
            "eval.max_batches=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "logging.tensorboard=false",
            "logging.progress_bar=false"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`dtrain train ... --nproc 2` as its own process group, output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "dtrain", "train", *args, "--nproc", "2"], cwd=REPO,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as a dying node would (the workers run in
    sessions of their own, so the process group alone would miss them)."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


# (DDP saves through the same DCP writer and atomic rename as FSDP, only synchronously; its exact
# resume after preemption is checked by tests/test_slurm.py on a 2-node DDP run, loss for loss.)
KILL_STRATEGIES = {
    "fsdp-async": ["parallel.strategy=fsdp", "checkpoint.async_save=true"],
    "zero3": ZERO[3],
}
# Uninterrupted runs to compare with: the kill -9 strategies, saving nothing until the end (so the
# comparison also shows that saving every step changes nothing), and DDP (with the checkpoints the
# damaged-checkpoint test starts from).
REFERENCE_STRATEGIES = {"ddp": ["parallel.strategy=ddp", "checkpoint.every_steps=3"],
                        **{name: [*overrides, "checkpoint.every_steps=100"]
                           for name, overrides in KILL_STRATEGIES.items()}}


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
    """Uninterrupted runs, one per strategy, to compare the interrupted ones with: what `dtrain
    train CONFIG ... --nproc 2` trains, one run after another in one torchrun job (on CPU,
    start-up would dominate three separate jobs)."""
    root = tmp_path_factory.mktemp("reference")
    torchrun({"config": str(TINY), "base": run_overrides(tiny_model_dir),
              "runs": REFERENCE_STRATEGIES}, root)
    return {name: root / name for name in REFERENCE_STRATEGIES}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(KILL_STRATEGIES))
def test_kill_9_anywhere_then_resume_auto_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, references, strategy):
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = run_args(tiny_model_dir, out, *KILL_STRATEGIES[strategy], "--resume", "auto")
    checkpoints = ckpt.checkpoint_root(out)

    # 1. Killed while a checkpoint is being written (its temporary directory exists). The kill
    # must beat a write of a few milliseconds: the pids are collected beforehand, and a kill
    # that came too late is tried again on the resumed run.
    writing = lambda: checkpoints.is_dir() and any(p.name.startswith(".tmp-step_") for p in checkpoints.iterdir())
    for attempt in range(5):
        proc = start(args, log)
        wait_for(lambda: logged_steps(out) >= 1 or proc.poll() is not None, timeout=300, every=POLL)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if wait_for(lambda: writing() or proc.poll() is not None, timeout=120, every=POLL):
            for pid in family:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_everything(proc)
        killed_mid_write = writing()
        if killed_mid_write:
            break
    # 2. Killed at a random moment once a checkpoint is complete and training has gone past it
    # (an async save completes only when the next one starts), so that the last leg resumes.
    proc = start(args, log)
    latest = checkpoints / "latest"
    past_a_checkpoint = lambda: latest.is_file() and logged_steps(out) > json.loads(latest.read_text())["step"]
    assert wait_for(lambda: past_a_checkpoint() or proc.poll() is not None, timeout=300, every=POLL), log.read_text()[-3000:]
    time.sleep(random.Random(f"{strategy}-kill").uniform(0.0, 1.0))
    kill_everything(proc)
    # 3. Resumed to the end.
    proc = start(args, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]

    assert killed_mid_write, "the first kill did not land during a checkpoint write"
    assert "resumed from" in log.read_text()
    reference, got = losses(references[strategy]), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"
    assert eval_losses(out) == pytest.approx(eval_losses(references[strategy]), abs=1e-6, rel=0)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())  # debris cleared


SIGNALS = ["SIGTERM", "SIGUSR1", "SIGUSR2"]


@pytest.fixture(scope="module")
def preempted(tiny_model_dir, tmp_path_factory):
    """One run stopped by each preemption signal in turn, resumed with --resume auto after each,
    then to its end: what each leg did, and the run's directory and log."""
    root = tmp_path_factory.mktemp("preempted")
    out, log = root / "run", root / "run.log"
    args = run_args(tiny_model_dir, out, *KILL_STRATEGIES["fsdp-async"], "checkpoint.every_steps=100")
    legs, resume = {}, []
    for sig in SIGNALS:
        begun = logged_steps(out)  # the steps a resumed run keeps (those up to its checkpoint)
        proc = start(args + resume, log)
        # The first run trains 3 steps, each resumed one 2 more, before its signal comes.
        wanted = 3 if not resume else begun + 2
        assert wait_for(lambda: logged_steps(out) >= wanted, timeout=300, every=POLL), log.read_text()[-3000:]
        sent = time.monotonic()
        os.kill(proc.pid, getattr(signal, sig))  # to the launcher, as SLURM signals the job step
        code = proc.wait(timeout=120)
        elapsed = time.monotonic() - sent
        latest = json.loads((out / "checkpoints" / "latest").read_text())
        legs[sig] = {"code": code, "elapsed": elapsed, "latest": latest, "text": log.read_text(),
                     "verified": ckpt.verify(out / "checkpoints" / latest["checkpoint"]),
                     "final_exists": (out / "final").exists()}
        resume = ["--resume", "auto"]
    proc = start(args + resume, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    return {"legs": legs, "out": out}


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_preemption_signal_saves_exits_75_and_resumes_exactly(preempted, references, sig):
    leg, out = preempted["legs"][sig], preempted["out"]
    code, elapsed, text, latest = leg["code"], leg["elapsed"], leg["text"], leg["latest"]
    assert code == PREEMPTED, text[-5000:]
    assert elapsed < 30, f"{elapsed:.1f} s from {sig} to exit"  # within SLURM's default KillWait
    assert 3 <= latest["step"] < STEPS and f"preempted: stopped at step {latest['step']} on {sig}" in text
    assert leg["verified"] is None
    assert not leg["final_exists"]

    reference, got = losses(references["fsdp-async"]), losses(out)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tiny_model_dir, tmp_path, references):
    """Delete one rank's shard of the newest checkpoint: resume takes the previous one, says
    so, and still ends where the uninterrupted run did."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = run_args(tiny_model_dir, out, *REFERENCE_STRATEGIES["ddp"])
    shutil.copytree(references["ddp"], out)  # the finished run, checkpoints at steps 9 and 12
    newest = ckpt.list_checkpoints(ckpt.checkpoint_root(out))[-1]
    assert newest.name == f"step_{STEPS:08d}"
    (newest / "dcp" / "__1_0.distcp").unlink()
    proc = start(args + ["--resume", "auto"], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    text = log.read_text()
    assert f"skipping checkpoint {newest}: dcp/__1_0.distcp is missing; trying the previous one" in text
    assert f"step_{STEPS - 3:08d} at step {STEPS - 3}" in text
    reference, got = losses(references["ddp"]), losses(out)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"


# --------------------------------------------------------------------------------------
# Resharding: save at one world size, resume at another; values equal exactly.

RESHARD_BASE = ["data.max_seq_len=256", "train.micro_batch_size=2", "train.log_every=1", "optim.lr=2e-3",
                "eval.max_batches=1", "logging.tensorboard=false", "logging.progress_bar=false",
                "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def resharded(tiny_model_dir, tmp_path_factory):
    """Save: fsdp, ZeRO-2 and ZeRO-3 at 2 ranks, single at 1. Resume: the 2-rank ones at 1
    rank (fsdp as single), the 1-rank one at 2 ranks with fsdp."""
    root = tmp_path_factory.mktemp("reshard")
    base = [f"model.path={tiny_model_dir}", f"data.train={ALPACA}", f"data.cache_dir={root / 'cache'}",
            *RESHARD_BASE]
    step3 = ["train.max_steps=3"]
    with dumps():  # (one process: here, dumping its values as the torchrun workers do)
        train(load_config(None, [*base, *step3, f"output_dir={root / 'save1' / 'single'}"]))
    torchrun({"base": base, "dump": True, "runs": {
        "fsdp": ["parallel.strategy=fsdp", *step3], "zero2": [*ZERO[2], *step3], "zero3": [*ZERO[3], *step3],
        "single-to-fsdp": ["parallel.strategy=fsdp", "train.max_steps=4", "checkpoint.resume=auto",
                           f"output_dir={root / 'save1' / 'single'}"],
    }}, root / "save2", nproc=2)
    resume = ["train.max_steps=4", "checkpoint.resume=auto"]
    torchrun({"base": base, "dump": True, "runs": {
        "fsdp-to-single": [*resume, f"output_dir={root / 'save2' / 'fsdp'}"],
        "zero2-to-1": [*ZERO[2], *resume, f"output_dir={root / 'save2' / 'zero2'}"],
        "zero3-to-1": [*ZERO[3], *resume, f"output_dir={root / 'save2' / 'zero3'}"],
    }}, root / "load1", nproc=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", ["save2/fsdp", "save1/single", "save2/zero2", "save2/zero3"],
                         ids=["fsdp-2-to-single-1", "single-1-to-fsdp-2", "zero2-2-to-1", "zero3-2-to-1"])
def test_resharded_resume_restores_model_and_optimizer_exactly(resharded, run):
    out = resharded / run
    saved = torch.load(out / "values_saved_3.pt", weights_only=True)
    loaded = torch.load(out / "values_loaded_3.pt", weights_only=True)
    assert saved.keys() == loaded.keys() and any(k.startswith("exp_avg/") for k in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    manifest = ckpt.read_manifest(out / "checkpoints" / "step_00000003")
    assert manifest["world_size"] == (1 if run == "save1/single" else 2)
    if run.startswith("save2/zero"):
        assert (out / "checkpoints" / ".universal-step_00000003" / "latest_universal").is_file()
    # ... and training went on from there.
    assert max(r["step"] for r in read_metrics(out) if "loss" in r) == 4


@pytest.mark.slow
@pytest.mark.parametrize("run", ["save2/fsdp", "save2/zero3"])
def test_consolidate_a_sharded_checkpoint_into_one_model(resharded, run, tmp_path):
    """`dtrain checkpoint consolidate` turns the 2-rank shards of step 3 into a plain model whose
    weights are the training weights of that step."""
    from safetensors.torch import load_file

    from dtrain.export import export

    out = resharded / run
    model_dir = export(out / "checkpoints" / "step_00000003", tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    saved = {k.removeprefix("param/"): v for k, v in torch.load(out / "values_saved_3.pt", weights_only=True).items()
             if k.startswith("param/")}
    for name, tensor in weights.items():
        assert torch.equal(tensor, saved[name]), name
    # save_pretrained writes a tied weight once (the tiny model ties lm_head to the embedding).
    assert saved.keys() - weights.keys() <= {"lm_head.weight"}


# --------------------------------------------------------------------------------------
# A crafted checkpoint runs no code: each kind of pickle a checkpoint holds, for each format,
# with the manifest's checksums rewritten to match (so that only the loading path defends).


class Payload:
    """Unpickling this runs `touch MARKER`, as a crafted checkpoint file would run anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(checkpoint: Path) -> None:
    """Rewrite the manifest's sizes and checksums to match the files, as an attacker would."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()
                   and p.name != "manifest.json")
    manifest["files"] = {f: {"bytes": (checkpoint / f).stat().st_size, "sha256": ckpt._sha256(checkpoint / f)}
                         for f in files}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.verify(checkpoint) is None


def craft_dcp_metadata(checkpoint: Path, marker: Path) -> None:
    import pickle

    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def craft_dcp_value(checkpoint: Path, marker: Path) -> None:
    """A DCP checkpoint whose metadata is clean but one non-tensor value (an LR) is the payload."""
    import torch.distributed.checkpoint as dcp

    state = ckpt.read_state(checkpoint)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(checkpoint / "dcp")
    dcp.save(state, checkpoint_id=checkpoint / "dcp", no_dist=True)


def craft_deepspeed(checkpoint: Path, marker: Path) -> None:
    (model_states,) = checkpoint.glob("deepspeed/*/zero_pp_rank_0_mp_rank_00_model_states.pt")
    state = torch.load(model_states, weights_only=False)  # (our own file, from the fixture's run)
    state["ds_version"] = Payload(marker)
    torch.save(state, model_states)


CRAFTED = {  # name: (saved run, how it is crafted, what resumes it: one process unless --nproc)
    "dcp-metadata": ("save1/single", craft_dcp_metadata, []),
    "dcp-value-fsdp": ("save2/fsdp", craft_dcp_value, []),
    "deepspeed": ("save2/zero3", craft_deepspeed, ZERO[3]),
    # Two ranks resuming: every rank reads the metadata; each must refuse it.
    "dcp-metadata-2-ranks": ("save1/single", craft_dcp_metadata, ["parallel.strategy=fsdp", "--nproc", "2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_runs_no_code_on_resume_or_consolidate(resharded, case, tmp_path, tiny_model_dir):
    run, craft, strategy = CRAFTED[case]
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "step_00000003"
    shutil.copytree(resharded / run / "checkpoints" / "step_00000003", checkpoint)
    marker = tmp_path / "owned"
    craft(checkpoint, marker)
    reseal(checkpoint)
    assert not marker.exists()

    resume = run_cli("train", *run_args(tiny_model_dir, out, *RESHARD_BASE, *strategy, "train.max_steps=4"),
                     "--resume", str(checkpoint))
    consolidate = run_cli("checkpoint", "consolidate", str(checkpoint), "--out", str(tmp_path / "model"))
    for proc in (resume, consolidate):
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "refusing to load it" in proc.stderr and "runs code" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the crafted checkpoint ran its payload"
    assert not (tmp_path / "model").exists()


def test_the_unpickler_admits_real_metadata_and_refuses_anything_else(tmp_path):
    import io
    import pickle

    import torch.distributed.checkpoint as dcp

    from dtrain.safe_load import UnsafeCheckpointError, load_dcp_metadata

    model = torch.nn.Linear(3, 2)
    dcp.save({"model": model.state_dict(), "lr": 0.5, "betas": (0.9, 0.95), "step": torch.tensor(3.0),
              "half": torch.zeros(2, dtype=torch.bfloat16)}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    real = (tmp_path / "dcp" / ".metadata").read_bytes()
    assert load_dcp_metadata(io.BytesIO(real), "x").state_dict_metadata.keys() == pickle.loads(real).state_dict_metadata.keys()
    for smuggled in (Payload(tmp_path / "owned"), [1, {"a": eval}], getattr):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
            load_dcp_metadata(io.BytesIO(pickle.dumps(smuggled)), "x")
    assert not (tmp_path / "owned").exists()


# --------------------------------------------------------------------------------------
# One process: async save, keep_best, disk check, compatibility, export.


def _train(make_config, out, *overrides):
    from dtrain.train import train

    return train(make_config(*overrides, output_dir=out))


def test_async_checkpoints_hold_what_synchronous_ones_do(make_config, tmp_path):
    common = ("train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=6", "optim.lr=1e-3")
    sync = _train(make_config, tmp_path / "sync", *common)
    background = _train(make_config, tmp_path / "async", *common, "checkpoint.async_save=true")
    assert background.train_losses == sync.train_losses  # training does not wait, nor change
    for step in range(1, 7):
        a = ckpt.read_state(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        b = ckpt.read_state(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}")
        for name, tensor in b["model"].items():
            assert torch.equal(a["model"][name], tensor), (step, name)  # copied before the next step changed it
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for name, state in b["optimizer"]["state"].items():
            assert torch.equal(a["optimizer"]["state"][name]["exp_avg"], state["exp_avg"]), (step, name)


def test_keep_best_keeps_the_best_evaluated_checkpoints_besides_the_last(make_config, tmp_path):
    out = tmp_path / "run"
    _train(make_config, out, "train.max_steps=8", "eval.every_steps=1", "checkpoint.every_steps=1",
           "checkpoint.keep_last=1", "checkpoint.keep_best=2", "optim.lr=3e-2", "schedule.name=constant")
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    best = sorted(evals, key=evals.get)[:2]
    kept = [int(p.name.removeprefix("step_")) for p in ckpt.list_checkpoints(ckpt.checkpoint_root(out))]
    assert sorted(kept) == sorted(set(best) | {8}), (evals, kept)
    for step in kept:
        metric = ckpt.read_manifest(ckpt.checkpoint_root(out) / f"step_{step:08d}")["metric"]
        assert metric == {"name": "eval_loss", "value": evals[step], "mode": "min"}


def test_too_little_free_disk_refuses_the_checkpoint_and_keeps_the_others(make_config, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    out = tmp_path / "run"
    _train(make_config, out, "train.max_steps=2", "checkpoint.every_steps=1")
    before = {p.name for p in ckpt.checkpoint_root(out).iterdir()}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(ckpt.CheckpointError, match=r"only 0.00 GB free .* needs about 1.00 GB .* untouched"):
        _train(make_config, out, "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.resume=auto")
    assert {p.name for p in ckpt.checkpoint_root(out).iterdir()} == before
    assert ckpt.find_resumable(out).name == "step_00000002"
    assert shutil.disk_usage is not None


def test_a_checkpoint_of_another_model_or_adapter_is_refused_with_what_differs(make_config, tmp_path):
    out = tmp_path / "run"
    _train(make_config, out, "train.max_steps=2", "peft.method=lora", "peft.r=8")
    with pytest.raises(ckpt.CheckpointError, match=r"different model or adapter \(peft.r: checkpoint 8, config 16\)"):
        _train(make_config, out, "train.max_steps=4", "peft.method=lora", "peft.r=16", "checkpoint.resume=auto")


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_export_merges_the_adapter_with_the_same_logits(make_config, tmp_path, method, tiny_model_dir):
    """The merged model computes what the base + adapter computes; it needs neither peft nor
    dtrain. QLoRA merges into the de-quantised 4-bit base (the function it was trained on)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtrain.export import base_model, export, resolve_source
    from dtrain.model import load_tokenizer

    out = tmp_path / "run"
    _train(make_config, out, "train.max_steps=6", f"peft.method={method}", "optim.lr=2e-2", "peft.dropout=0")
    ids = torch.tensor([[1, 65, 100, 43, 32, 66, 10]])
    cfg, run_dir, final = resolve_source(out)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base_model(cfg, run_dir, load_tokenizer(cfg.model), None), final).eval()
        expected = adapted(input_ids=ids).logits
        merged_dir = export(out, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter mattered
    # The adapter alone, too: it reloads onto its base.
    adapter_dir = export(out, tmp_path / "adapter", adapter_only=True)
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        export(out, tmp_path / "merged")


@pytest.mark.slow
def test_export_and_generate_through_the_cli(make_config, tmp_path):
    out = tmp_path / "run"
    _train(make_config, out, "train.max_steps=2")
    proc = run_cli("export", str(out), "--out", str(tmp_path / "model"))
    assert proc.returncode == 0 and "exported to" in proc.stdout, proc.stderr[-2000:]
    proc = run_cli("generate", str(out), "--prompt", "12 + 30", "--template", "alpaca",  # a run directory: its final/
                   "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("checkpoint", "consolidate", str(out), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not a checkpoint directory" in proc.stderr
