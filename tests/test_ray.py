"""The Ray launchers against a real Ray: `ray start --head` in a private network namespace, the
tiny run submitted through the Ray Jobs API (`launchers.ray_submit` -> `dtrain.ray_train` ->
TorchTrainer with 2 workers), its metrics and checkpoints checked, the same command resubmitted
to check that it resumes exactly; and the cloud cluster YAMLs checked with Ray's own schema."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_metrics
from ray_cluster import still_running

from dtrain import checkpoint as ckpt
from dtrain.config import ConfigError, load_config

TINY = REPO / "examples" / "tiny_alpaca.yaml"
HELPER = REPO / "tests" / "ray_cluster.py"
CLOUD = REPO / "launchers" / "cloud"


def tiny_overrides(output_dir: Path) -> list[str]:
    return ["model.path=tiny-llama", "data.max_seq_len=256", "train.max_steps=8", "train.micro_batch_size=2",
            "train.log_every=1", "eval.every_steps=4", "eval.max_batches=2", "checkpoint.every_steps=4",
            "logging.progress_bar=false", "logging.tensorboard=false", "parallel.strategy=ddp",
            "ray.num_workers=2", "ray.cpus_per_worker=1", f"output_dir={output_dir}"]


def in_private_network(argv: list[str]) -> list[str]:
    """argv run in a new network namespace (root: CAP_SYS_ADMIN; others: through a user namespace)."""
    if shutil.which("unshare") is None:
        pytest.fail("the Ray tests need `unshare` (Debian/Ubuntu package util-linux) to keep the test "
                    "cluster off the host's network")
    return ["unshare", "--net", *([] if os.geteuid() == 0 else ["--map-root-user"]), *argv]


# --------------------------------------------------------------------------------------
# One private Ray cluster, two submissions of the same run


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Start a head (2 CPUs), submit the tiny run (2 workers) as a Ray job, keep its metrics,
    remove its step-8 checkpoint and final model (what a run stopped between its checkpoints at
    steps 4 and 8 leaves), submit the same command again, stop the head. Returns the helper's
    report with the paths."""
    work = tmp_path_factory.mktemp("ray")
    out = work / "run"
    submit = [sys.executable, "-m", "launchers.ray_submit", "--working-dir", str(REPO), str(TINY),
              *tiny_overrides(out), "--env", f"DTRAIN_CACHE={os.environ['DTRAIN_CACHE']}"]
    keep_first_and_cut_back = [sys.executable, "-c", (
        "import os, shutil, sys; out, first = sys.argv[1:]; os.makedirs(first); "
        "shutil.copy(out + '/metrics.jsonl', first); "
        "shutil.rmtree(out + '/checkpoints/step_00000008'); shutil.rmtree(out + '/final')"), str(out), str(work / "first")]
    steps = work / "steps.json"
    # dtrain.tune joining the running cluster, as slurm/tune.sh starts it: two 1-CPU trials at once.
    tune = [sys.executable, "-m", "dtrain.tune", str(REPO / "examples" / "tiny_tune.yaml"), "--address", "127.0.0.1:6379",
            f"tune.storage_dir={work / 'tune'}", "tune.name=on_cluster", "tune.algorithm=grid", "tune.num_samples=1",
            "tune.search_space={optim.lr: {grid: [1.0e-3, 1.0e-2]}}", "tune.scheduler.name=none",
            "train.max_steps=4", "eval.every_steps=2"]
    # ... and a search over DPO's beta (examples/tiny_dpo.yaml's own search, from the preset instead of
    # the SFT model), ASHA on the held-out preference accuracy.
    dpo = [sys.executable, "-m", "dtrain.tune", str(REPO / "examples" / "tiny_dpo.yaml"), "--address", "127.0.0.1:6379",
           f"tune.storage_dir={work / 'tune'}", "tune.name=dpo_beta", "model.path=tiny-llama",
           "tune.search_space={preference.beta: {grid: [0.05, 0.5]}}", "train.max_steps=4", "eval.every_steps=2",
           "eval.max_batches=2", "tune.scheduler.grace_period=2", "train.micro_batch_size=4", "train.log_every=1",
           "logging.tensorboard=false", "logging.progress_bar=false"]
    steps.write_text(json.dumps([submit, keep_first_and_cut_back, submit, tune, dpo]))
    proc = subprocess.run(in_private_network([sys.executable, str(HELPER), str(work), str(steps)]), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    report_file = work / "cluster.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {"started": False, "steps": []}
    report.update(out=out, first_metrics=work / "first", tune_dir=work / "tune" / "on_cluster",
                  helper_output=proc.stdout[-3000:] + proc.stderr[-5000:])
    report["logs"] = [Path(s["log"]).read_text() for s in report["steps"]]
    yield report
    for pid in still_running(report.get("ray_pids", [])):  # only if the helper itself died
        os.kill(pid, 9)


def require_started(run: dict) -> None:
    assert run["started"], f"the Ray test cluster did not start:\n{run.get('start_error')}\n{run['helper_output']}"


def step_ok(run: dict, i: int) -> str:
    require_started(run)
    assert len(run["steps"]) > i, f"the scenario stopped before step {i}:\n{run['helper_output']}"
    log = run["logs"][i]
    assert run["steps"][i]["rc"] == 0, f"step {i} ({run['steps'][i]['argv'][:4]}...) failed:\n{log[-8000:]}"
    return log


def done_line(log: str) -> dict:
    """ray_train's summary, printed by the job's driver and followed by ray_submit."""
    lines = [line for line in log.splitlines() if line.startswith("done: ")]
    assert len(lines) == 1, log[-5000:]
    return json.loads(lines[0][len("done: "):])


@pytest.mark.slow
def test_job_trains_on_two_ray_workers(cluster_run):
    log = step_ok(cluster_run, 0)
    assert "submitted job raysubmit_" in log and log.rstrip().endswith("SUCCEEDED"), log[-3000:]
    assert "strategy ddp x2 on cpu" in log  # dtrain saw a 2-process group: Ray's

    # dtrain's records, one line per step (rank 0 writes), the loss learning, eval at 4 and 8.
    records = read_metrics(cluster_run["first_metrics"])
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [4, 8]
    assert evals[8]["eval_loss"] < evals[4]["eval_loss"] and evals[8]["eval_perplexity"] > 1

    # Checkpoints: complete (manifest and checksums), written by 2 ranks.
    out = cluster_run["out"]
    step4 = out / "checkpoints" / "step_00000004"
    assert ckpt.verify(step4) is None
    manifest = ckpt.read_manifest(step4)
    assert manifest["world_size"] == 2 and manifest["strategy"] == "ddp"
    assert sorted(p.name for p in (step4 / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]

    # What Ray got through ray.train.report: rank 0's metrics, and a checkpoint that is complete too.
    summary = done_line(log)
    assert summary["step"] == 8 and summary["stop_reason"] == "max_steps"
    assert summary["last_report"]["step"] == 8
    assert summary["last_report"]["loss"] == pytest.approx(losses[8], abs=1e-9)
    assert summary["last_report"]["eval_loss"] == pytest.approx(evals[8]["eval_loss"], abs=1e-9)
    ray_ckpt = Path(summary["checkpoint"])
    assert ray_ckpt.parent == out and ray_ckpt.name.startswith("ray_step_00000008_")  # Ray's run dir = output_dir
    assert ckpt.verify(ray_ckpt) is None and ckpt.read_manifest(ray_ckpt)["step"] == 8
    assert (out / "checkpoint_manager_snapshot.json").is_file()


@pytest.mark.slow
def test_resubmitting_the_same_command_resumes_exactly(cluster_run):
    step_ok(cluster_run, 1)
    log = step_ok(cluster_run, 2)
    out = cluster_run["out"]
    assert f"resumed from {out}/checkpoints/step_00000004 at step 4" in log, log[-5000:]
    first = read_metrics(cluster_run["first_metrics"])
    second = read_metrics(out)
    first_losses = [(r["step"], r["loss"]) for r in first if "loss" in r]
    second_losses = [(r["step"], r["loss"]) for r in second if "loss" in r]
    # Steps 1-4 kept from the first run, 5-8 trained again from the checkpoint: the same numbers.
    assert [s for s, _ in second_losses] == list(range(1, 9))
    for (s1, l1), (s2, l2) in zip(first_losses, second_losses):
        assert s1 == s2 and abs(l1 - l2) <= 1e-6, (s1, l1, l2)
    eval8 = [r["eval_loss"] for r in second if r.get("step") == 8 and "eval_loss" in r]
    assert eval8 == [pytest.approx(next(r["eval_loss"] for r in first if r.get("step") == 8 and "eval_loss" in r),
                                   abs=1e-6)]
    assert ckpt.verify(out / "checkpoints" / "step_00000008") is None
    assert (out / "final" / "model.safetensors").is_file()
    assert done_line(log)["checkpoint"] != done_line(cluster_run["logs"][0])["checkpoint"]  # a new Ray entry


@pytest.mark.slow
def test_tune_search_on_the_running_cluster(cluster_run):
    """python -m dtrain.tune CONFIG --address HOST:PORT: the trials run on the cluster's CPUs."""
    log = step_ok(cluster_run, 3)
    assert "Connected to Ray cluster" in log or "Connecting to existing Ray cluster" in log, log[-3000:]
    assert "Started a local Ray instance" not in log
    with open(cluster_run["tune_dir"] / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["optim.lr"]) for r in rows) == [1.0e-3, 1.0e-2], rows
    assert all(r["status"] == "completed" and r["steps"] == "4" for r in rows), rows
    assert (cluster_run["tune_dir"] / "best_config.yaml").is_file()


@pytest.mark.slow
def test_a_dpo_beta_search_runs_with_asha_on_the_preference_accuracy(cluster_run):
    step_ok(cluster_run, 4)
    search = cluster_run["tune_dir"].parent / "dpo_beta"
    with open(search / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["preference.beta"]) for r in rows) == [0.05, 0.5], rows
    for row in rows:  # each trial a DPO run, compared on eval_rewards_accuracy
        evals = [r for r in read_metrics(search / "trials" / row["trial_id"]) if "eval_rewards_accuracy" in r]
        assert evals and float(row["eval_rewards_accuracy"]) == max(r["eval_rewards_accuracy"] for r in evals)
    best = yaml.safe_load((search / "best_config.yaml").read_text())
    assert best["train"]["objective"] == "dpo" and best["preference"]["beta"] in (0.05, 0.5)


@pytest.mark.slow
def test_the_test_cluster_is_stopped_by_pid(cluster_run):
    require_started(cluster_run)
    pids = cluster_run["ray_pids"]
    assert len(pids) >= 4, pids  # gcs_server, raylet, dashboard, ... were found in the namespace
    assert cluster_run["left_running"] == [], cluster_run.get("ray_logs")
    assert still_running(pids) == []


# --------------------------------------------------------------------------------------
# Fast checks: config handling and the cloud YAMLs


def test_ray_config_checks(tmp_path):
    from dtrain.ray.train import prepare_config, run_config, scaling_config

    cfg = load_config(TINY, ["parallel.strategy=ddp", "output_dir=runs/x", "ray.num_workers=4", "ray.use_gpu=true"])
    ready = prepare_config(cfg)
    assert Path(ready.output_dir).is_absolute() and ready.checkpoint.resume == "auto"
    scaling = scaling_config(ready.ray)
    assert scaling.num_workers == 4 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}
    run = run_config(ready)
    assert Path(run.storage_path) / run.name == Path(ready.output_dir)  # Ray's run directory is output_dir
    with pytest.raises(ConfigError, match="parallel.strategy='single' does not run under Ray Train"):
        prepare_config(load_config(TINY, ["parallel.strategy=single"]))
    with pytest.raises(ConfigError, match="is relative: in a Ray job"):
        prepare_config(load_config(TINY, ["parallel.strategy=ddp"]), in_job_working_dir=True)


def test_submit_refuses_before_uploading(tmp_path):
    """A bad config, a relative output_dir or a config outside the working dir fail here, exit 2."""
    def submit(*args):
        return subprocess.run([sys.executable, "-m", "launchers.ray_submit", "--address", "http://127.0.0.1:9",
                               *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    relative = submit(str(TINY), "parallel.strategy=ddp")
    assert relative.returncode == 2 and "is relative" in relative.stderr
    outside = tmp_path / "c.yaml"
    outside.write_text(TINY.read_text())
    proc = submit(str(outside), "parallel.strategy=ddp", f"output_dir={tmp_path}/run")
    assert proc.returncode == 2 and "is not inside --working-dir" in proc.stderr
    typo = submit(str(TINY), "optim.lrr=1", f"output_dir={tmp_path}/run")
    assert typo.returncode == 2 and "did you mean `optim.lr`" in typo.stderr


CORE_MODULES = ["dtrain.config", "dtrain.data", "dtrain.model", "dtrain.peft", "dtrain.parallel", "dtrain.train",
                "dtrain.checkpoint", "dtrain.tracking", "dtrain.cli", "dtrain.optim", "dtrain.evaluation",
                "dtrain.objectives", "dtrain.tune", "dtrain.ray_train"]


def test_core_never_imports_ray(tmp_path):
    """The core (and a whole training run through it) works without Ray: only dtrain.ray_train and
    dtrain.tune import it. Checked in a fresh interpreter, where nothing else imported Ray first."""
    script = (
        "import sys, importlib\n"
        f"for name in {CORE_MODULES!r}: importlib.import_module(name)\n"
        "from dtrain.config import load_config\n"
        "from dtrain.train import train\n"
        f"cfg = load_config({str(TINY)!r}, sys.argv[1:])\n"
        "train(cfg)\n"
        "print('ray modules:', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    overrides = ["model.path=tiny-llama", "data.max_seq_len=256", "train.max_steps=2", "train.micro_batch_size=2",
                 "eval.max_batches=1", "eval.worst_examples=0", "logging.progress_bar=false",
                 "logging.tensorboard=false", f"output_dir={tmp_path}/run"]
    proc = subprocess.run([sys.executable, "-c", script, *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "ray modules: []" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_cluster_yaml_passes_rays_schema(name):
    """What `ray up` checks before it talks to the cloud: defaults filled in, then Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLOUD / name).read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert len(gpu_types) >= 2 and all(t["max_workers"] >= t["min_workers"] for t in types.values())
    setup = "\n".join(config["setup_commands"] + config["worker_setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("dtrain[ray]")  # pinned torch first (README)
