"""The SLURM launchers on a real cluster: slurmctld, two slurmd (n1, n2), munge and slurmdbd on
MariaDB, started on this host by tests/slurm_cluster.py, in a private network namespace with
only loopback, and stopped afterwards by pid.

- `sbatch slurm/train.sh` on 2 nodes x 1 worker completes and leaves checkpoint and metrics; on
  2 nodes x 2 workers, HSDP and FSDP x tensor parallel train the same curve;
- preemption: `scancel --batch --signal=USR1` (what `--signal=B:USR1@300` sends) and, separately,
  `scontrol requeue` on the running job lead to a checkpoint, a requeue and a completed job whose
  losses equal those of the uninterrupted job, step by step;
- submitit (`python -m launchers.slurm`): the same run, preempted by SLURM's USR2 on the way,
  completes and `--wait` prints its final metrics; `--local` runs it through LocalExecutor;
  its checkpoint() hook (no cluster) requeues once the preemption save is complete, even when
  dtrain never exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ALPACA, REPO, eval_losses, losses
from polling import logged_steps, wait_for
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow

STEPS = 16
TINY = "examples/tiny_alpaca.yaml"


def overrides(model_dir: Path, out: Path) -> list[str]:
    # 2 nodes x 1 worker: DDP at world size 2, one example per rank and step.
    return [f"model.path={model_dir}", f"data.train={ALPACA}", "data.max_seq_len=256", f"train.max_steps={STEPS}",
            "train.micro_batch_size=2", "train.log_every=1", "eval.every_steps=8", "eval.max_batches=2",
            "checkpoint.every_steps=100", "logging.tensorboard=false", "logging.progress_bar=false",
            "parallel.strategy=ddp", f"output_dir={out}"]


def sbatch(cluster: SlurmCluster, tmp: Path, name: str, *args: str, per_node: int = 1) -> str:
    proc = cluster.run("sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--job-name={name}",
                       f"--output={tmp}/%x-%j.out", "slurm/train.sh", TINY, *args, cwd=REPO,
                       env={"DTRAIN_LOG_DIR": str(tmp / "logs"), "DTRAIN_NPROC_PER_NODE": str(per_node)})
    return proc.stdout.strip().split(";")[0]


def job_logs(tmp: Path, name: str, job_id: str) -> str:
    """The script's own output, then each node's."""
    text = (tmp / f"{name}-{job_id}.out").read_text() if (tmp / f"{name}-{job_id}.out").exists() else ""
    for node_log in sorted((tmp / "logs" / f"{name}-{job_id}").glob("node*.out")):
        text += f"\n--- {node_log.name} ---\n" + node_log.read_text(errors="replace")
    return text


def wait_until_finished(cluster: SlurmCluster, job_id: str, timeout: float) -> dict[str, str]:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
    wait_for(lambda: cluster.job(job_id).get("JobState") in done, timeout=timeout, every=0.5)
    return cluster.job(job_id)


def assert_same_curve(out: Path, reference: Path) -> float:
    """Every step's training loss and every evaluation equal the reference's; returns the max diff."""
    got, ref = losses(out), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in ref]
    assert max(diffs) <= 1e-6, {s: (got[s], ref[s]) for s in ref if abs(got[s] - ref[s]) > 1e-6}
    assert eval_losses(out) == pytest.approx(eval_losses(reference), abs=1e-6, rel=0)
    return max(diffs)


@pytest.fixture(scope="module")
def reference(cluster, tiny_model_dir, tmp_path_factory):
    """The uninterrupted job: `sbatch slurm/train.sh` on 2 nodes; the curve the others must follow."""
    tmp = tmp_path_factory.mktemp("sbatch-reference")
    out = tmp / "run"
    job = sbatch(cluster, tmp, "ref", *overrides(tiny_model_dir, out))
    info = wait_until_finished(cluster, job, timeout=240)
    return {"job": job, "info": info, "out": out, "log": job_logs(tmp, "ref", job)}


def test_sbatch_two_nodes_completes_with_checkpoint_and_metrics(cluster, reference):
    info, out, log = reference["info"], reference["out"], reference["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"
    assert "2 node(s) x 1 worker(s)" in log and log.count("done: ") == 1  # rank 0 of the 2 speaks
    assert "strategy ddp x2 on cpu" in log
    latest = json.loads((out / "checkpoints" / "latest").read_text())
    assert latest["step"] == STEPS and (out / "checkpoints" / latest["checkpoint"] / "manifest.json").is_file()
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert (out / "final" / "model.safetensors").is_file()
    # Both nodes ran and logged to the per-job directory; accounting saw the job through.
    assert len(list((out.parent / "logs" / f"ref-{reference['job']}").glob("node*.out"))) == 2
    assert cluster.sacct_states(reference["job"]) == ["COMPLETED"]


# 2 nodes x 2 workers as a 2-D mesh: nodes are the outer (replicate / data) dimension, the two
# workers of a node the inner one (shard / tensor). The same global batch of 8: the same curve.
MESH_JOBS = {
    "hsdp": (["parallel.mesh.replicate=2", "parallel.mesh.shard=2", "train.micro_batch_size=2"],
             "mesh replicate 2 x shard 2"),
    "fsdp_tp": (["parallel.mesh.shard=2", "parallel.mesh.tensor=2", "train.micro_batch_size=4"],
                "mesh shard 2 x tensor 2"),
}
MESH_STEPS = 6


@pytest.fixture(scope="module")
def mesh_jobs(cluster, tiny_model_dir, tmp_path_factory):
    """Both submitted at once (they queue for the two nodes), then awaited."""
    submitted = {}
    for name, (mesh, _) in MESH_JOBS.items():
        tmp = tmp_path_factory.mktemp(f"sbatch-{name}")
        args = [*overrides(tiny_model_dir, tmp / "run"), "parallel.strategy=fsdp", *mesh,
                f"train.max_steps={MESH_STEPS}", "eval.every_steps=3"]
        submitted[name] = (tmp, sbatch(cluster, tmp, name, *args, per_node=2))
    return {name: {"info": wait_until_finished(cluster, job, timeout=300), "out": tmp / "run",
                   "log": job_logs(tmp, name, job)} for name, (tmp, job) in submitted.items()}


def test_two_nodes_of_two_workers_train_as_a_2d_mesh(mesh_jobs):
    for name, (_, layout) in MESH_JOBS.items():
        job = mesh_jobs[name]
        assert job["info"]["JobState"] == "COMPLETED", f"{job['info']}\n{job['log'][-5000:]}"
        assert "2 node(s) x 2 worker(s)" in job["log"] and f"strategy fsdp x4 on cpu, {layout}" in job["log"]
        assert sorted(losses(job["out"])) == list(range(1, MESH_STEPS + 1))
    hsdp, tensor = (losses(mesh_jobs[name]["out"]) for name in MESH_JOBS)
    assert [tensor[s] for s in sorted(tensor)] == pytest.approx([hsdp[s] for s in sorted(hsdp)], abs=1e-5, rel=0)
    assert eval_losses(mesh_jobs["fsdp_tp"]["out"]) == pytest.approx(eval_losses(mesh_jobs["hsdp"]["out"]),
                                                                    abs=1e-5, rel=0)


@pytest.mark.parametrize("how", ["scancel --batch --signal=USR1", "scontrol requeue"])
def test_preempted_job_checkpoints_requeues_and_matches_the_uninterrupted_run(cluster, reference, tiny_model_dir,
                                                                               tmp_path, how):
    name = "usr1" if "USR1" in how else "requeue"
    out = tmp_path / "run"
    job = sbatch(cluster, tmp_path, name, *overrides(tiny_model_dir, out))
    assert wait_for(lambda: logged_steps(out) >= 3 or cluster.job(job).get("JobState") not in ("PENDING", "RUNNING"),
                    timeout=180)
    assert logged_steps(out) >= 3, f"{cluster.job(job)}\n{job_logs(tmp_path, name, job)[-3000:]}"
    sent = time.monotonic()
    cluster.run(*how.split(), job)
    # Running again after the requeue (its restart count goes up), then to the end.
    assert wait_for(lambda: cluster.job(job).get("Restarts") == "1" and cluster.job(job).get("JobState") == "RUNNING",
                    timeout=120), f"{cluster.job(job)}\n{job_logs(tmp_path, name, job)[-4000:]}"
    requeued_after = time.monotonic() - sent
    info = wait_until_finished(cluster, job, timeout=240)
    log = job_logs(tmp_path, name, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"

    signal_name = "SIGUSR1" if "USR1" in how else "SIGTERM"
    stopped = [line for line in log.splitlines() if line.startswith("preempted: stopped at step")]
    assert len(stopped) == 1 and f"on {signal_name}: checkpoint" in stopped[0], log[-5000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert 3 <= step < STEPS  # the signal came mid-run, not after it
    assert f"resumed from {out / 'checkpoints'}/step_{step:08d} at step {step}" in log
    if "USR1" in how:  # the script requeued the job itself; under scontrol requeue, SLURM did
        assert "checkpoint saved; requeueing job" in log
    else:  # (the script may be SIGKILLed after KillWait, before it says more)
        assert "TERM: Slurm is ending the job" in log and "checkpoint saved; requeueing job" not in log
    assert cluster.sacct_states(job) == ["REQUEUED", "COMPLETED"]
    diff = assert_same_curve(out, reference["out"])
    print(f"{how}: stopped at step {step}, running again {requeued_after:.1f} s after the signal, "
          f"max loss diff {diff:.2e}")


def launcher(*args: str, env: dict, cluster: SlurmCluster | None = None) -> subprocess.Popen:
    """python -m launchers.slurm; with a cluster, inside its network namespace, where its daemons are."""
    argv = [sys.executable, "-m", "launchers.slurm", *args]
    return subprocess.Popen(cluster.command(*argv) if cluster else argv, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_submitit_job_survives_a_preemption_and_returns_its_final_metrics(cluster, reference, tiny_model_dir,
                                                                          tmp_path):
    """SLURM's USR2 (what submitit's --signal asks for) mid-run: dtrain saves, submitit's
    checkpoint() hook requeues, and `--wait` returns the metrics of the completed run."""
    out = tmp_path / "run"
    proc = launcher(TINY, *overrides(tiny_model_dir, out), "--nodes", "2", "--cpus-per-task", "1", "--time", "10",
                    "--log-dir", str(tmp_path / "submitit" / "%j"), "--wait", env=cluster.env, cluster=cluster)
    first = proc.stdout.readline()
    assert first.startswith("submitted job "), first + proc.stderr.read()
    job = first.split()[2]
    assert wait_for(lambda: logged_steps(out) >= 3 or proc.poll() is not None, timeout=180)
    cluster.run("scancel", "--signal=USR2", job)
    stdout, stderr = proc.communicate(timeout=300)
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "submitit" / job).glob("*_log.*")))
    assert proc.returncode == 0, stdout + stderr + logs[-5000:]
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["step"] == STEPS
    assert metrics["loss"] == pytest.approx(losses(reference["out"])[STEPS], abs=1e-6, rel=0)
    assert metrics["eval_loss"] == pytest.approx(eval_losses(reference["out"])[STEPS], abs=1e-6, rel=0)
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs
    assert cluster.sacct_states(job) == ["REQUEUED", "COMPLETED"]
    assert_same_curve(out, reference["out"])


def stand_in_for_dtrain(on_usr2: str) -> subprocess.Popen:
    """A process in dtrain's place: on USR2 it exits with the code `on_usr2`, or with "hang" never
    exits (as when a worker deadlocks tearing down after its save, and every agent waits for it)."""
    code = ("import signal, sys, time\n"
            f"on = {on_usr2!r}\n"
            "signal.signal(signal.SIGUSR2, signal.SIG_IGN if on == 'hang' else lambda *_: sys.exit(int(on)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"  # its handler is in place
    return proc


@pytest.mark.parametrize("dtrain, requeued", [("hang", True), ("75", True), ("1", False)])
def test_checkpoint_hook_waits_for_the_save_not_for_dtrains_exit(tmp_path, monkeypatch, dtrain, requeued):
    """submitit's checkpoint() hook requeues once the preemption checkpoint is complete, even if
    dtrain never exits (it used to wait stop_timeout_s, 270 s by default, for the exit); an exit
    with 75 requeues at once, any other exit code not at all."""
    monkeypatch.syspath_prepend(str(REPO))
    from launchers import slurm

    monkeypatch.setattr(slurm, "QUIET_AFTER_SAVE_S", 1.0)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text(json.dumps({"checkpoint": "step_00000002", "step": 2}))
    job = slurm.TrainJob("config.yaml", ["train.max_steps=9"], 1, stop_timeout_s=60, output_dir=str(root.parent))
    job._proc = stand_in_for_dtrain(dtrain)
    threading.Thread(target=job._reap, daemon=True).start()
    job._latest_before, job._watching = slurm.latest_checkpoint(root.parent), True  # as TrainJob.__call__ does

    def save():  # dtrain's save: a temporary directory, renamed into place, then `latest` replaced
        time.sleep(0.5)
        (root / ".tmp-step_00000003").mkdir()
        time.sleep(1.0)
        (root / ".tmp-step_00000003").rename(root / "step_00000003")
        (root / "latest").write_text(json.dumps({"checkpoint": "step_00000003", "step": 3}))

    saver = threading.Thread(target=save)
    saver.start()
    try:
        started = time.monotonic()
        delayed = job.checkpoint()
        waited = time.monotonic() - started
        saved = json.loads(slurm.latest_checkpoint(root.parent))["step"]
    finally:
        saver.join()
        job._proc.kill()
        job._proc.wait()
    if not requeued:
        assert delayed is None
        return
    assert delayed.function == slurm.TrainJob("config.yaml", ["train.max_steps=9"], 1, 60, str(root.parent))
    if dtrain == "hang":  # after the save, and its quiet time, not at stop_timeout_s
        assert saved == 3 and 2.5 <= waited < 20, waited
    else:  # at its exit, before the save's quiet time could have passed
        assert job._returncode == 75 and waited < 2.5, waited


def test_submitit_local_executor_runs_the_job_here(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [arg for arg in overrides(tiny_model_dir, out) if not arg.startswith(("train.max_steps", "parallel."))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = launcher(TINY, *args, "train.max_steps=4", "--local", "--time", "5",
                    "--log-dir", str(tmp_path / "submitit"), "--wait", env=env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert stdout.startswith("submitted job ") and "logs: " in stdout
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["step"] == 4 and metrics["loss"] == losses(out)[4] and "eval_loss" in metrics
    assert (out / "final" / "model.safetensors").is_file()


def test_bad_config_is_refused_before_anything_is_submitted(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = launcher("examples/no_such.yaml", "--nodes", "2", env=env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "config file not found: examples/no_such.yaml" in stderr
    script = subprocess.run(["bash", "slurm/train.sh", "examples/no_such.yaml"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "SLURM_JOB_ID": "1"})
    assert script.returncode == 2 and "config file examples/no_such.yaml not found" in script.stderr


def test_shell_scripts_parse():
    for script in ("slurm/train.sh", "slurm/tune.sh"):
        check = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"
