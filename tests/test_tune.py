"""python -m dtrain.tune against a real Ray (started by the search itself, with 2 CPUs, inside a
private network namespace): a 6-trial Bayesian search and a 4-point grid over optim.lr on the tiny
model with ASHA; the grid search is killed mid-way and resumed. Also: a trial with 2 workers through
Ray Train, the errors that stop a search before it starts, and optim.lr_scaling."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, fork_server, read_metrics
from ray_cluster import only_loopback, process_start_time, still_running

from dtrain.config import ConfigError, load_config

TUNE_YAML = REPO / "examples" / "tiny_tune.yaml"
NETNS_EXEC = REPO / "tests" / "netns_exec.py"
GRID = [1.0e-2, 3.0e-3, 1.0e-3, 1.0e-5]  # the last one barely learns: ASHA's obvious candidate


def private_network(argv: list[str]) -> list[str]:
    """argv in a new network namespace with only loopback (Ray binds to the host's address otherwise)."""
    if shutil.which("unshare") is None:
        pytest.fail("the Tune tests need `unshare` (util-linux) to keep Ray off the host's network")
    return ["unshare", "--net", *([] if os.geteuid() == 0 else ["--map-root-user"]),
            sys.executable, str(NETNS_EXEC), *argv]


def tune_env() -> dict[str, str]:
    # A private local Ray: no token file written to ~/.ray, no usage stats.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def tune_command(storage: Path, *overrides: str) -> list[str]:
    return private_network([sys.executable, "-m", "dtrain.tune", str(TUNE_YAML), "--num-cpus", "2",
                            f"tune.storage_dir={storage}", "train.max_steps=12", "tune.max_concurrent_trials=2",
                            *overrides])


def run_tune(storage: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(tune_command(storage, *overrides), cwd=REPO, env=tune_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_csv(search: Path) -> list[dict]:
    with open(search / "results.csv") as f:
        return list(csv.DictReader(f))


def saved_statuses(search: Path) -> dict[str, str]:
    """Trial id -> status, as in Tune's saved experiment state (what a restore starts from)."""
    files = sorted(search.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # being rewritten
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(a) for a, _ in state["trial_data"])}


def no_deprecation_warnings(output: str) -> None:
    lines = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert not lines, "\n".join(lines[:10])


def check_ok(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    no_deprecation_warnings(output)
    return output


def stopped_early(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "stopped by asha"]


# --------------------------------------------------------------------------------------
# A Bayesian search (Optuna TPE + ASHA), run to the end


@pytest.fixture(scope="module")
def bayes(tmp_path_factory):
    storage = tmp_path_factory.mktemp("tune-bayes")
    t0 = time.monotonic()
    proc = run_tune(storage, "tune.name=bayes", "tune.num_samples=6",
                    "tune.search_space={optim.lr: {loguniform: [1.0e-4, 3.0e-2]}}")
    return {"search": storage / "bayes", "proc": proc, "seconds": time.monotonic() - t0}


@pytest.mark.slow
def test_bayesian_search_with_asha(bayes):
    output = check_ok(bayes["proc"])
    print(f"bayesian search: {bayes['seconds']:.0f} s")
    rows = read_csv(bayes["search"])
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6, rows
    lrs = [float(r["optim.lr"]) for r in rows]
    assert all(1e-4 <= lr <= 3e-2 for lr in lrs) and len(set(lrs)) == 6
    for r in rows:
        # Every trial is an ordinary dtrain run directory whose evaluations the row summarises.
        evals = [x for x in read_metrics(bayes["search"] / "trials" / r["trial_id"]) if "eval_loss" in x]
        assert int(r["steps"]) == evals[-1]["step"]
        assert float(r["eval_loss"]) == pytest.approx(min(x["eval_loss"] for x in evals), abs=1e-9)
        assert r["status"] in ("completed", "stopped by asha"), r
        assert (r["status"] == "completed") == (int(r["steps"]) == 12), r
    assert stopped_early(rows), "ASHA stopped no trial:\n" + output[-3000:]
    assert "Searcher" in output or "OptunaSearch" in output or "optuna" in output.lower()
    # The table printed at the end lists every trial.
    assert all(r["trial_id"] in output for r in rows)
    assert "done: 6 trials (0 failed)" in output


@pytest.mark.slow
def test_best_config_trains_with_dtrain_train_and_reproduces_the_best_trial(bayes, tmp_path):
    check_ok(bayes["proc"])
    rows = read_csv(bayes["search"])
    best = min((r for r in rows if r["eval_loss"]), key=lambda r: float(r["eval_loss"]))
    best_yaml = bayes["search"] / "best_config.yaml"
    config = yaml.safe_load(best_yaml.read_text())
    assert "tune" not in config and config["checkpoint"]["resume"] is None
    assert config["optim"]["lr"] == pytest.approx(float(best["optim.lr"]), rel=1e-12)
    # Unchanged, as a user would run it (one thread, like the trial's 1-CPU Ray worker).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "dtrain", "train", str(best_yaml)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    step = int(best["best_step"])
    rerun = {r["step"]: r["eval_loss"] for r in read_metrics(config["output_dir"]) if "eval_loss" in r}
    print(f"best trial {best['trial_id']}: lr {float(best['optim.lr']):.5g}, eval_loss {float(best['eval_loss']):.6f} "
          f"at step {step}; dtrain train: {rerun[step]:.6f} (diff {abs(rerun[step] - float(best['eval_loss'])):.2e})")
    assert rerun[step] == pytest.approx(float(best["eval_loss"]), abs=1e-5)


@pytest.mark.slow
def test_search_plot_and_table(bayes):
    check_ok(bayes["proc"])
    import matplotlib.image

    image = matplotlib.image.imread(bayes["search"] / "search.png")
    assert image.shape[0] > 200 and image.shape[1] > 600  # curves + one scatter panel


# --------------------------------------------------------------------------------------
# A 4-point grid, killed mid-way, resumed


@pytest.fixture(scope="module")
def grid_killed(tmp_path_factory):
    storage = tmp_path_factory.mktemp("tune-grid")
    search = storage / "grid"
    overrides = ("tune.name=grid", "tune.algorithm=grid", "tune.num_samples=1",
                 "tune.search_space={optim.lr: {grid: " + json.dumps(GRID) + "}}")
    log = open(storage / "first.log", "w")
    t0 = time.monotonic()
    # Tune snapshots its state every 10 s by default: a search of 4 short trials (whose processes
    # are reused) may end between two snapshots, before one shows a finished trial to kill after.
    driver = subprocess.Popen(tune_command(storage, *overrides), cwd=REPO,
                              env={**tune_env(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}, stdout=log, stderr=subprocess.STDOUT)
    namespace = None
    before: dict[str, dict] = {}
    try:
        namespace = private_namespace_of(driver.pid)
        finished: list[str] = []
        deadline = time.monotonic() + 240
        # Kill once Tune has saved at least one finished trial while others are still to come.
        while time.monotonic() < deadline and driver.poll() is None:
            saved = saved_statuses(search)
            finished = [t for t, s in saved.items() if s == "TERMINATED"]
            if finished and len(finished) < len(GRID):
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the search ended before it could be killed:\n" + (storage / "first.log").read_text()[-5000:]
        assert finished, "no trial finished in time:\n" + (storage / "first.log").read_text()[-5000:]
        for trial_id in finished:
            run_dir = search / "trials" / trial_id
            before[trial_id] = {"metrics": (run_dir / "metrics.jsonl").read_bytes(),
                                "mtime": (run_dir / "metrics.jsonl").stat().st_mtime_ns}
        driver.kill()  # the search's driver process, SIGKILL: no chance to save anything more
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
        leftovers = stop_namespace(namespace)
    first_seconds = time.monotonic() - t0
    t1 = time.monotonic()
    resumed = subprocess.run(tune_command(storage, *overrides) + ["--resume"], cwd=REPO, env=tune_env(),
                             capture_output=True, text=True, timeout=400)
    again = run_tune(storage, *overrides)  # without --resume: refused, nothing overwritten
    other = subprocess.run(tune_command(storage, *overrides, "train.max_steps=16") + ["--resume"], cwd=REPO,
                           env=tune_env(), capture_output=True, text=True, timeout=400)
    return {"search": search, "finished_before": before, "resumed": resumed, "again": again, "other": other,
            "leftovers": leftovers, "first_log": (storage / "first.log").read_text(),
            "seconds": (first_seconds, time.monotonic() - t1)}


def host_namespaces() -> set[str]:
    """This process's network namespace and init's (unreadable to non-root users)."""
    found = {os.readlink("/proc/self/ns/net")}
    try:
        found.add(os.readlink("/proc/1/ns/net"))
    except OSError:
        pass
    return found


def private_namespace_of(pid: int, timeout_s: float = 30.0) -> str:
    """The network namespace `pid` moved into with `unshare --net`. Never the host's own: until
    unshare has run, the process is still in ours, and everything there must be left alone."""
    host = host_namespaces()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:  # exited
            break
        if namespace not in host and only_loopback(pid):
            return namespace
        time.sleep(0.05)
    pytest.fail(f"process {pid} did not enter a private network namespace")


def stop_namespace(namespace: str | None) -> list[int]:
    """SIGKILL what the killed driver left in its private network namespace (Ray's processes), by pid."""
    if namespace is None:
        return []
    assert namespace not in host_namespaces(), "refusing to stop the processes of the host's network namespace"
    time.sleep(2)  # Ray's own processes notice their driver is gone
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") == namespace:
                    pids.append(int(entry.name))
            except OSError:
                pass
    # Every one of them must sit in a namespace with nothing but loopback: never the host's.
    procs = [{"pid": p, "start": process_start_time(p)} for p in pids if only_loopback(p)]
    for p in procs:
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    return still_running(procs)


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(grid_killed):
    print("grid search: %.0f s until killed, %.0f s to resume and finish" % grid_killed["seconds"],
          f"finished before the kill: {sorted(grid_killed['finished_before'])}")
    assert grid_killed["leftovers"] == []
    output = check_ok(grid_killed["resumed"])
    search = grid_killed["search"]
    rows = read_csv(search)
    assert len(rows) == len(GRID) and sorted(float(r["optim.lr"]) for r in rows) == sorted(GRID), rows
    ids = {r["trial_id"] for r in rows}
    assert set(grid_killed["finished_before"]) <= ids
    for trial_id, before in grid_killed["finished_before"].items():
        metrics = search / "trials" / trial_id / "metrics.jsonl"
        assert metrics.read_bytes() == before["metrics"] and metrics.stat().st_mtime_ns == before["mtime"], \
            f"finished trial {trial_id} ran again"
    assert all(r["status"] in ("completed", "stopped by asha") for r in rows), rows
    assert any(r["status"] == "completed" for r in rows)
    assert "done: 4 trials (0 failed)" in output


@pytest.mark.slow
def test_grid_asha_stops_the_poor_learning_rate(grid_killed):
    check_ok(grid_killed["resumed"])
    rows = read_csv(grid_killed["search"])
    stopped = stopped_early(rows)
    assert stopped, rows
    assert all(int(r["steps"]) < 12 for r in stopped)
    worst = next(r for r in rows if float(r["optim.lr"]) == 1e-5)
    assert worst["status"] == "stopped by asha", rows


@pytest.mark.slow
def test_rerunning_a_search_without_resume_is_refused(grid_killed):
    again = grid_killed["again"]
    assert again.returncode == 2 and "already holds a search: continue it with --resume" in again.stderr
    other = grid_killed["other"]  # --resume with another config: refused, naming the key
    assert other.returncode == 2 and "the config differs" in other.stderr and "train.max_steps" in other.stderr, \
        other.stderr


@pytest.mark.parametrize("name", ["asha", "median"])
def test_resumed_scheduler_remembers_the_trials_that_ran_before(tmp_path, name):
    """Ray saves no scheduler state with a search; dtrain's schedulers read each restored trial's
    evaluations back from its metrics.jsonl, so that a trial started after --resume is judged
    against them (here: a much worse trial is stopped at once). Ray's real Trial objects."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from dtrain.ray.tune import ResumableASHA, ResumableMedian

    for i, losses in enumerate([[3.0, 2.5, 2.0], [3.2, 2.6, 2.1], [3.1, 2.7, 2.2]]):  # steps 4, 8, 12
        run_dir = tmp_path / "trials" / f"t_{i:05d}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 4 * (k + 1), "eval_loss": v}) + "\n" for k, v in enumerate(losses)))
    if name == "asha":
        scheduler = ResumableASHA(str(tmp_path), time_attr="step", max_t=12, grace_period=4, reduction_factor=2)
    else:
        scheduler = ResumableMedian(str(tmp_path), time_attr="step", grace_period=4, min_samples_required=3)
    scheduler.set_search_properties("eval_loss", "min")
    for i in range(3):  # what Tuner.restore adds: the trials of the saved search
        scheduler.on_trial_add(None, Trial("run_trial", config={}, trial_id=f"t_{i:05d}", stub=True))
    new = Trial("run_trial", config={}, trial_id="t_00003", stub=True)
    scheduler.on_trial_add(None, new)  # no records yet: a new trial
    waiting = Trial("run_trial", config={}, trial_id="t_00005", stub=True)
    scheduler.on_trial_add(None, waiting)  # added, not yet reporting (must not disturb the others)
    assert scheduler.on_trial_result(None, new, {"step": 4, "eval_loss": 5.0}) == TrialScheduler.STOP
    good = Trial("run_trial", config={}, trial_id="t_00004", stub=True)
    scheduler.on_trial_add(None, good)
    assert scheduler.on_trial_result(None, good, {"step": 4, "eval_loss": 1.0}) == TrialScheduler.CONTINUE


# --------------------------------------------------------------------------------------
# A trial with 2 workers: a driver function that fits a TorchTrainer


@pytest.mark.slow
def test_two_worker_trial_runs_through_ray_train(tmp_path):
    proc = run_tune(tmp_path, "tune.name=ddp", "tune.algorithm=grid", "tune.num_samples=1",
                    "tune.search_space={optim.lr: {grid: [3.0e-3]}}", "tune.scheduler.name=none",
                    "parallel.strategy=ddp", "tune.resources.workers=2", "train.max_steps=4",
                    "eval.every_steps=2", "tune.max_concurrent_trials=1")
    output = check_ok(proc)
    rows = read_csv(tmp_path / "ddp")
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["steps"] == "4", rows
    run_dir = tmp_path / "ddp" / "trials" / rows[0]["trial_id"]
    manifest = json.loads(next(run_dir.glob("checkpoints/step_*/manifest.json")).read_text())
    assert manifest["world_size"] == 2 and manifest["strategy"] == "ddp"
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and float(rows[0]["eval_loss"]) == min(r["eval_loss"] for r in evals)
    assert "TorchTrainer" in output or "ray.train" in output or "Train" in output


# --------------------------------------------------------------------------------------
# Bad input: refused before any trial starts


def tune_error(*overrides: str) -> str:
    from dtrain.ray.tune import check_search

    with pytest.raises(ConfigError) as info:
        check_search(load_config(TUNE_YAML, list(overrides)))
    return str(info.value)


def test_unknown_search_key_is_named_with_a_suggestion():
    msg = tune_error("tune.search_space={optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}}")
    assert "unknown key `optim.lrr` in `tune.search_space`" in msg and "did you mean `optim.lr`?" in msg
    msg = tune_error("tune.search_space={train.max_step: {grid: [4, 8]}}")
    assert "unknown key `train.max_step`" in msg and "did you mean `train.max_steps`?" in msg


def test_unknown_search_key_in_yaml_names_file_and_line(tmp_path):
    text = TUNE_YAML.read_text().replace("    optim.lr: {loguniform", "    optim.lrr: {loguniform")
    path = tmp_path / "t.yaml"
    path.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "optim.lrr:" in l)
    with pytest.raises(ConfigError, match=rf"unknown key `optim.lrr` in `tune.search_space` \({path}:{line}\); "
                                          r"did you mean `optim.lr`\?"):
        load_config(path)


def test_empty_grid_and_bad_bounds():
    assert "`tune.search_space.optim.lr.grid`" in tune_error("tune.search_space={optim.lr: {grid: []}}")
    assert "at least 1 item" in tune_error("tune.search_space={optim.lr: {grid: []}}")
    msg = tune_error("tune.search_space={optim.lr: {loguniform: [0, 1.0e-2]}}")
    assert "`tune.search_space.optim.lr`" in msg and "loguniform needs bounds > 0" in msg
    assert "loguniform needs bounds > 0" in tune_error("tune.search_space={optim.lr: {loguniform: [-1.0e-3, 1.0e-2]}}")
    assert "lower bound must be below" in tune_error("tune.search_space={optim.lr: {uniform: [0.1, 0.01]}}")
    assert "exactly one of" in tune_error("tune.search_space={optim.lr: {grid: [0.1], choice: [0.2]}}")
    # A value the key itself refuses (optim.lr >= 0), named with the key.
    msg = tune_error("tune.search_space={optim.lr: {choice: [1.0e-3, -1]}}")
    assert "tune.search_space.optim.lr: choice value -1 is not a valid optim.lr" in msg
    assert "sampled" in tune_error("tune.algorithm=grid")  # grid takes grid dimensions only
    assert "tune.search_space is empty" in tune_error("tune.search_space={}")
    assert "section" in tune_error("tune.search_space={optim: {choice: [1]}}")
    assert "cannot be searched" in tune_error("tune.search_space={output_dir: {choice: [a, b]}}")


def test_a_metric_no_trial_reports():
    msg = tune_error("tune.metric=eval_accuracy")  # a causal LM: no accuracy
    assert "tune.metric='eval_accuracy' is not reported by any trial" in msg
    assert "eval_loss, eval_perplexity" in msg
    assert "did you mean 'eval_loss'" in tune_error("tune.metric=eval_los")
    assert "no trial would report eval_loss" in tune_error("data.val_ratio=0")
    assert "eval.every_steps is null" in tune_error("eval.every_steps=null")


def test_bad_input_fails_before_ray_starts(tmp_path, tmp_path_factory):
    """The CLI (`python -m dtrain.tune`, through the fork server): exit 2 with the message, no search
    directory, no Ray started (no namespace needed)."""
    work = tmp_path_factory.mktemp("tune-output")  # (the command's stdout and stderr, kept apart)
    proc = fork_server().run("dtrain.tune", [str(TUNE_YAML), f"tune.storage_dir={tmp_path}",
                                             "tune.search_space={optim.lrr: {grid: [1.0e-3]}}"], tune_env(), work,
                             timeout=120)
    assert proc.returncode == 2 and "did you mean `optim.lr`?" in proc.stderr, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    proc = fork_server().run("dtrain.tune", [str(TUNE_YAML), f"tune.storage_dir={tmp_path}", "--resume"], tune_env(),
                             work, timeout=120)
    assert proc.returncode == 2 and "there is no search to resume" in proc.stderr, proc.stderr
    # A stop file left from before would stop the new search at once: refused, naming the key.
    stop = tmp_path / "stop"
    stop.touch()
    proc = fork_server().run("dtrain.tune", [str(TUNE_YAML), f"tune.storage_dir={tmp_path}",
                                             f"checkpoint.stop_file={stop}", "--resume-or-start"], tune_env(), work,
                             timeout=120)
    assert proc.returncode == 2 and f"checkpoint.stop_file={stop} exists" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stop"]


# --------------------------------------------------------------------------------------
# optim.lr_scaling


def test_sqrt_token_lr_scaling(make_config, capsys):
    from dtrain.train import train

    # micro_batch_size 4 x 1 process x max_seq_len 320 = 1280 tokens per batch; reference 5120.
    cfg = make_config("optim.lr=1.0e-3", "optim.lr_scaling=sqrt_tokens", "optim.lr_reference_tokens=5120",
                      "schedule.name=constant", "train.max_steps=2")
    result = train(cfg)
    expected = 1.0e-3 * math.sqrt(1280 / 5120)
    lrs = [r["lr"] for r in read_metrics(result.output_dir) if "lr" in r]
    assert lrs and all(lr == pytest.approx(expected, rel=1e-9) for lr in lrs)
    assert "lr 0.0005 = optim.lr 0.001 x sqrt(1280 tokens per batch / 5120 reference)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optim.lr_scaling=sqrt_tokens needs optim.lr_reference_tokens"):
        make_config("optim.lr_scaling=sqrt_tokens")
