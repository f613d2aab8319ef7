"""`sbatch slurm/tune.sh` on the real test cluster (tests/slurm_cluster.py: 2 nodes of 1 CPU each,
in a private network namespace): a Ray cluster inside the allocation (the head on n1, a Ray
worker on n2, each in its own srun step), and a Bayesian search (Optuna TPE) with ASHA of 4
trials, each a 2-worker DDP run through Ray Train: with one CPU per node, every trial's two
workers sit on both nodes.

- the search completes, every trial a world-size-2 DDP run, and leaves no Ray process behind;
- the same search preempted mid-way as SLURM's time-limit warning does it (USR1 to the batch
  script): the running trial saves its step, the search saves its state and exits 75, the script
  requeues the job, and the requeued job continues the search: finished trials are not run again
  (their metrics files untouched), the stopped one continues from its save; then killed as
  `scontrol requeue` kills a job (SIGTERM to every process, Ray's too, which exit at once) and
  continued by SLURM's requeue from Tune's saved state and the trials' periodic checkpoints. The
  final table equals the uninterrupted search's, trial for trial (same parameters, same metrics
  at the same steps, same ASHA decisions).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import REPO
from polling import logged_steps, wait_for
from ray_cluster import namespace_pids
from slurm_cluster import SlurmCluster

# The first test's set-up runs both searches, the second one three times (USR1, then scontrol
# requeue): 8.5 to 15 minutes on 2 busy cores, past the suite's 900 s default. Each stage has its
# own bound (wait_job's timeouts); this one only has to be above their usual sum.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 16
RESULT_FILE = "trial_result.json"  # (dtrain.ray.tune's: a trial that has finished)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def search_overrides(model_dir: Path, storage: Path) -> list[str]:
    return [f"model.path={model_dir}", "data.max_seq_len=256", "parallel.strategy=ddp", "tune.resources.workers=2",
            "tune.max_concurrent_trials=1", "tune.num_samples=4", f"train.max_steps={STEPS}", "train.log_every=1",
            "eval.every_steps=4", "checkpoint.every_steps=4", "tune.scheduler.grace_period=4",
            f"tune.storage_dir={storage}", "tune.name=search"]


def submit(cluster: SlurmCluster, tmp: Path, name: str, model_dir: Path) -> dict:
    proc = cluster.run("sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--job-name={name}",
                       f"--output={tmp}/%x-%j.out", "slurm/tune.sh", "examples/tiny_tune.yaml",
                       *search_overrides(model_dir, tmp), cwd=REPO, env={"DTRAIN_LOG_DIR": str(tmp / "logs")})
    return {"job": proc.stdout.strip().split(";")[0], "search": tmp / "search", "tmp": tmp, "name": name}


def job_log(job: dict) -> str:
    path = job["tmp"] / f"{job['name']}-{job['job']}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def trial_dirs(search: Path) -> list[Path]:
    return sorted(p for p in (search / "trials").glob("*") if p.is_dir()) if (search / "trials").is_dir() else []


def read_table(search: Path) -> list[dict]:
    with open(search / "results.csv") as f:
        return list(csv.DictReader(f))


def comparable(rows: list[dict]) -> list[tuple]:
    """The table without trial ids (random per search), in the order the trials were sampled."""
    return sorted((float(r["optim.lr"]), int(r["schedule.warmup_steps"]), round(float(r["eval_loss"]), 6),
                   int(r["best_step"]), int(r["steps"]), r["status"]) for r in rows)


def ray_processes(cluster: SlurmCluster, job_id: str) -> list[str]:
    """The job's Ray processes still in the cluster's namespace (raylet, GCS, workers, the srun
    steps that ran `ray start`): those whose environment names the job."""
    found = []
    for pid in namespace_pids(cluster.netns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "ray" in cmd.lower() and f"SLURM_JOB_ID={job_id}".encode() in env:
            found.append(f"{pid}: {cmd[:150]}")
    return found


def wait_job(cluster: SlurmCluster, job: dict, condition, timeout: float, every: float = 0.5) -> None:
    assert wait_for(condition, timeout=timeout, every=every), f"{cluster.job(job['job'])}\n{job_log(job)[-5000:]}"


@pytest.fixture(scope="module")
def searches(cluster, tiny_model_dir, tmp_path_factory):
    """Both jobs submitted at once (the second waits for the two nodes). The second is sent USR1
    while its third trial (sampled third in both searches; ASHA lets it run on) trains past its
    first evaluation, then killed by `scontrol requeue` once its continuation has trained 3 steps."""
    plain = submit(cluster, tmp_path_factory.mktemp("tune-plain"), "plain", tiny_model_dir)
    preempted = submit(cluster, tmp_path_factory.mktemp("tune-usr1"), "usr1", tiny_model_dir)
    state = lambda job: cluster.job(job["job"])  # noqa: E731
    t0 = time.monotonic()
    wait_job(cluster, plain, lambda: state(plain).get("JobState") in ENDED, timeout=600, every=1)
    plain["seconds"], plain["info"], plain["log"] = time.monotonic() - t0, state(plain), job_log(plain)
    wait_for(lambda: not ray_processes(cluster, plain["job"]), timeout=30)  # (its steps may still be exiting)
    plain["ray_left"] = ray_processes(cluster, plain["job"])

    def third_trial_past_its_first_evaluation() -> bool:
        trials = sorted(trial_dirs(preempted["search"]), key=lambda t: (t / "config.yaml").stat().st_mtime_ns
                        if (t / "config.yaml").exists() else float("inf"))
        return len(trials) >= 3 and not (trials[2] / RESULT_FILE).exists() and 5 <= logged_steps(trials[2]) < STEPS

    t0 = time.monotonic()
    wait_job(cluster, preempted, third_trial_past_its_first_evaluation, timeout=400, every=0.1)
    preempted["before"] = {t.name: ((t / "metrics.jsonl").read_bytes(), (t / "metrics.jsonl").stat().st_mtime_ns)
                           for t in trial_dirs(preempted["search"]) if (t / RESULT_FILE).is_file()}
    cluster.run("scancel", "--batch", "--signal=USR1", preempted["job"])
    wait_job(cluster, preempted, lambda: state(preempted).get("Restarts") == "1"
             and state(preempted).get("JobState") == "RUNNING", timeout=300)
    preempted["requeued_after"] = time.monotonic() - t0
    steps_then = {t.name: logged_steps(t) for t in trial_dirs(preempted["search"])}

    def a_trial_trained_3_more_steps() -> bool:
        return any(logged_steps(t) >= steps_then.get(t.name, 0) + 3 and not (t / RESULT_FILE).exists()
                   for t in trial_dirs(preempted["search"]))

    wait_job(cluster, preempted, a_trial_trained_3_more_steps, timeout=300, every=0.1)
    cluster.run("scontrol", "requeue", preempted["job"])
    wait_job(cluster, preempted, lambda: state(preempted).get("Restarts") == "2", timeout=300)
    wait_job(cluster, preempted, lambda: state(preempted).get("JobState") in ENDED, timeout=600, every=1)
    preempted["seconds"], preempted["info"], preempted["log"] = time.monotonic() - t0, state(preempted), job_log(preempted)
    print(f"\nsearch of 4 two-worker trials on 2 nodes: {plain['seconds']:.0f} s; the preempted one: requeued "
          f"{preempted['requeued_after']:.0f} s after USR1 was due, done {preempted['seconds']:.0f} s after it")
    return {"plain": plain, "usr1": preempted, "cluster": cluster}


def test_tune_sh_runs_a_bayesian_asha_search_of_two_worker_trials_over_two_nodes(searches):
    plain, cluster = searches["plain"], searches["cluster"]
    log = plain["log"]
    assert plain["info"]["JobState"] == "COMPLETED" and plain["info"]["ExitCode"] == "0:0", log[-6000:]
    assert "Ray cluster: 2 node(s), 2 CPU(s)" in log  # both nodes joined before the first trial
    assert "done: 4 trials (0 failed)" in log
    rows = read_table(plain["search"])
    assert len(rows) == 4 and all(r["status"] in ("completed", "stopped by asha") for r in rows), rows
    assert any(r["status"] == "completed" for r in rows)
    for row in rows:  # every trial a DDP run of world size 2, with its own checkpoint
        trial = plain["search"] / "trials" / row["trial_id"]
        manifest = json.loads(next(trial.glob("checkpoints/step_*/manifest.json")).read_text())
        assert manifest["world_size"] == 2 and manifest["strategy"] == "ddp", manifest
        evals = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
        # An evaluation every 4 steps, up to where the trial ended (one ASHA stopped may log one or
        # two more while its workers are being ended: the table counts up to the stopping report).
        assert [e["step"] for e in evals] == list(range(4, 4 * len(evals) + 1, 4)), (row, evals)
        assert evals[-1]["step"] >= int(row["steps"]) and (row["status"] != "completed" or row["steps"] == str(STEPS))
    assert (plain["search"] / "best_config.yaml").is_file()
    assert cluster.sacct_states(plain["job"]) == ["COMPLETED"]
    assert plain["ray_left"] == []  # each Ray node ended with its srun step


def test_preempted_then_killed_search_continues_to_the_uninterrupted_table(searches):
    usr1, plain, cluster = searches["usr1"], searches["plain"], searches["cluster"]
    log = usr1["log"]
    assert usr1["info"]["JobState"] == "COMPLETED" and usr1["info"]["ExitCode"] == "0:0", log[-6000:]
    first, second, third = log.split("restart 1:")[0], log.split("restart 1:")[1].split("restart 2:")[0], \
        log.split("restart 2:")[1]
    # USR1: the running trial saved its step, the search saved and exited 75, the script requeued.
    assert "USR1: asking the trials to checkpoint and the search to stop" in first
    stopped = [line for line in first.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "1 running trial(s) saved a checkpoint" in stopped[0], first[-6000:]
    saved = [line for line in first.splitlines() if "preempted: stopped at step" in line and "stop file" in line]
    assert len(set(saved)) == 1, first[-6000:]  # (both nodes' log monitors forward each line: one host)
    step = int(saved[0].split("stopped at step ")[1].split()[0])
    assert 5 <= step < STEPS and "search saved; requeueing job" in first
    assert f"at step {step}" in second  # (dtrain: "resumed from .../step_N at step N")
    # scontrol requeue: SLURM ended every process; SLURM requeued the job.
    assert "TERM: Slurm is ending the job" in second
    assert "resumed from" in third  # a trial killed mid-run continues from its last periodic checkpoint
    assert "done: 4 trials (0 failed)" in third
    assert cluster.sacct_states(usr1["job"]) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    # Finished trials were not run again.
    for trial_id, (metrics, mtime) in usr1["before"].items():
        path = usr1["search"] / "trials" / trial_id / "metrics.jsonl"
        assert path.read_bytes() == metrics and path.stat().st_mtime_ns == mtime, f"trial {trial_id} ran again"
    assert comparable(read_table(usr1["search"])) == comparable(read_table(plain["search"]))
