"""Hyperparameter search with Ray Tune: every trial is an ordinary dtrain run.

    python -m dtrain.tune CONFIG [key=value ...] [--address ADDR] [--resume] [--num-cpus N]   (entry: dtrain/tune.py)

The `tune:` section of CONFIG says what to search (`tune.search_space`: any config key mapped to
grid / choice / uniform / loguniform / randint / quniform), how (`tune.algorithm`: grid, random,
bayesian = Optuna TPE), how many trials, the early stopping of poor trials (`tune.scheduler`: ASHA
or median stopping on the evaluation metric each trial reports at every `eval.every_steps`) and the
resources of a trial. Everything else in CONFIG is the run each trial starts from.

A trial with parallel.strategy=single runs dtrain's `train()` in the trial's own process; with ddp or
fsdp it runs through Ray Train: the trial is a driver function that builds and fits a `TorchTrainer`
with `tune.resources.workers` workers (dtrain.ray.train.fit), whose reports reach Tune through a
Ray Train callback (Ray's current pattern; not the deprecated `Tuner(trainer)`).

The search directory (tune.storage_dir/tune.name) holds:
    trials/<trial id>/     each trial's dtrain run directory (config.yaml, metrics.jsonl, final/, ...)
    results.csv            one row per trial: parameters, best metric and its step, steps, status
    best_config.yaml       the best trial's full config; `dtrain train best_config.yaml` reruns it
    search.png             every trial's validation curve, and each parameter against the metric
    (Ray Tune's own files: experiment state, one directory per trial with result.json)

`--resume` continues an interrupted search from that directory (Tuner.restore): finished trials
are kept and not run again, unfinished ones continue from their last dtrain checkpoint.
`--resume-or-start` does that when the directory holds a search, else starts it: one command line
for every run of a job that may be requeued (slurm/tune.sh).
Without --address, Ray is started in this process with --num-cpus CPUs (default: all).

Stopping a search so that it can continue (a preemption, a time limit): create the file named by
checkpoint.stop_file. Every running trial saves a checkpoint at its next step and waits; once all
have saved, the search's state is saved and the command exits with 75 (a trial's own process
cannot take a signal: Ray trains in a thread and keeps SIGTERM for itself). slurm/tune.sh does
this on SIGUSR1. A search ended any other way continues from each trial's last periodic checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray Train V2 (the default in Ray 2.60) is the API that Tune's driver-function pattern is built for;
# said explicitly so that an older default cannot bring back the deprecated V1 code paths.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402

from dtrain.config import Config, ConfigError, SearchDimension, load_config, validate  # noqa: E402
from dtrain.parallel import STRATEGIES, strategy_class  # noqa: E402
from dtrain.tracking import read_metrics  # noqa: E402

log = logging.getLogger("dtrain.tune")

RESULT_FILE = "trial_result.json"  # written by a trial when its dtrain run has finished
SAVED_FILE = "stopped_here.json"  # written by a trial that saved and stopped on checkpoint.stop_file
STOPPED_FILE = "stopped.json"  # in the search directory: the search was stopped by checkpoint.stop_file
RAY_TRAIN_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if cls.runs_under_ray_train)


# --------------------------------------------------------------------------------------
# Checks and the search space (before anything starts)


def search_dir(cfg: Config) -> str:
    base = cfg.tune.storage_dir
    return f"{base.rstrip('/')}/{cfg.tune.name}" if "://" in base else str(Path(base).absolute() / cfg.tune.name)


def base_run_config(cfg: Config) -> dict[str, Any]:
    """The config every trial starts from: the whole config without its tune: section."""
    data = cfg.to_dict()
    data.pop("tune")
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def trial_config(base: dict[str, Any], params: dict[str, Any], output_dir: str) -> Config:
    """A trial's run config: the base with the sampled values, its own output_dir, resuming from its
    own checkpoints when Tune restarts it. Raises ConfigError naming the search key."""
    data = json.loads(json.dumps(base))  # a deep copy
    for key, value in params.items():
        set_dotted(data, key, value)
    data["output_dir"] = output_dir
    data["checkpoint"]["resume"] = "auto"
    origin = {k: f"tune.search_space {k}={v!r}" for k, v in params.items()}
    try:
        return validate(data, origin)
    except ConfigError as exc:  # the value does not fit the key's type or range, or a rule
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"tune.search_space: {shown} gives an invalid run config:\n  {exc}") from None


def probe_values(dim: SearchDimension) -> list[Any]:
    """Values that stand for a dimension when checking it against the key's type: every listed
    value, or the bounds (an integer inside a randint range; quniform's rounding of them)."""
    spec = dim.spec
    if dim.kind in ("grid", "choice"):
        return list(spec)
    if dim.kind == "randint":
        return [spec[0], spec[1] - 1]
    return [spec[0], spec[1]]


def check_search(cfg: Config) -> None:
    """Everything that would make the search fail or mean nothing, as a ConfigError, before any
    trial starts. (The config section itself, unknown keys and bad bounds included, was checked when
    it was loaded.)"""
    t = cfg.tune
    if not t.search_space:
        raise ConfigError("tune.search_space is empty: give at least one key to search, e.g.\n"
                          "  tune:\n    search_space:\n      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    kinds = {key: dim.kind for key, dim in t.search_space.items()}
    if t.algorithm == "grid" and any(k != "grid" for k in kinds.values()):
        bad = [key for key, k in kinds.items() if k != "grid"]
        raise ConfigError(f"tune.algorithm=grid takes only grid dimensions; {', '.join(bad)} "
                          "are sampled: use tune.algorithm=random or bayesian, or give them as grid")
    if t.algorithm == "bayesian" and "grid" in kinds.values():
        bad = [key for key, k in kinds.items() if k == "grid"]
        raise ConfigError(f"tune.algorithm=bayesian (Optuna) cannot run a grid ({', '.join(bad)}): "
                          "use choice for a categorical dimension, or tune.algorithm=grid")
    base = base_run_config(cfg)
    for key, dim in t.search_space.items():
        for value in probe_values(dim):
            try:
                trial_config(base, {key: value}, "probe")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: {dim.kind} value {value!r} is not a valid "
                                  f"{key}: {str(exc).split(chr(10), 1)[-1].strip()}") from None
    if not cfg.data.validation and cfg.data.val_ratio == 0:
        raise ConfigError(f"no trial would report {t.metric}: there is no validation data "
                          "(give data.validation, or data.val_ratio > 0)")
    if t.scheduler.name != "none":
        if cfg.eval.every_steps is None:
            raise ConfigError(f"tune.scheduler.name={t.scheduler.name} stops trials on their intermediate "
                              f"{t.metric}, but eval.every_steps is null (evaluation only at the end): "
                              "set eval.every_steps, or tune.scheduler.name=none")
        if max_t(cfg) < t.scheduler.grace_period:
            raise ConfigError(f"tune.scheduler.grace_period={t.scheduler.grace_period} is beyond the trials' "
                              f"last step ({max_t(cfg)})")
    workers, strategy = t.resources.workers, strategy_class(cfg.parallel.strategy)
    in_process = [name for name, cls in STRATEGIES.items() if not cls.multi_process]
    if not strategy.multi_process and workers > 1:
        raise ConfigError(f"tune.resources.workers={workers} needs parallel.strategy={' or '.join(RAY_TRAIN_STRATEGIES)} "
                          f"({strategy.name} runs one process); set parallel.strategy, or tune.resources.workers=1")
    if strategy.multi_process and not strategy.runs_under_ray_train:
        raise ConfigError(f"parallel.strategy={strategy.name} does not run in a Tune trial; use "
                          f"{' / '.join(in_process)} (one process per trial) or {' / '.join(RAY_TRAIN_STRATEGIES)} "
                          "(Ray Train workers)")


def max_t(cfg: Config) -> int:
    """The step at which trials end, ASHA's horizon."""
    if cfg.tune.scheduler.max_t is not None:
        return cfg.tune.scheduler.max_t
    if cfg.train.max_steps is None:
        raise ConfigError("tune.scheduler.name=asha needs the trials' length in steps: set train.max_steps, "
                          "or tune.scheduler.max_t when training by epochs")
    return cfg.train.max_steps


def param_space(cfg: Config) -> dict[str, Any]:
    """tune.search_space as Ray Tune domains, keyed by the dotted config key."""
    space = {}
    for key, dim in cfg.tune.search_space.items():
        spec = dim.spec
        space[key] = {
            "grid": lambda: tune.grid_search(list(spec)),
            "choice": lambda: tune.choice(list(spec)),
            "uniform": lambda: tune.uniform(*spec),
            "loguniform": lambda: tune.loguniform(*spec),
            "randint": lambda: tune.randint(*spec),
            "quniform": lambda: tune.quniform(*spec),
        }[dim.kind]()
    return space


# --------------------------------------------------------------------------------------
# One trial


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled values (handed over by tune.with_parameters)."""

    base: dict[str, Any]
    search_dir: str
    driver_cwd: str
    metric: str
    final_step: int | None  # the trials' last step where known (train.max_steps, or the scheduler's max_t)
    use_gpu: bool


def trial_dir(setup: TrialSetup, trial_id: str) -> str:
    return f"{setup.search_dir}/trials/{trial_id}"


class LastReportGate:
    """Holds back a run's last evaluation until the run has finished.

    A scheduler stops a trial on the report it does not like, and always at its horizon (ASHA's
    max_t): Tune then ends the trial's process, which would cut off the final model save of a run
    that was finishing anyway. So the report of the last step, or of the evaluation on which
    dtrain's own early stopping fires (the same rule, run on the same values), is sent only after
    train() has returned."""

    def __init__(self, cfg: Config, final_step: int | None):
        from dtrain.train_state import EarlyStopping, TrainState

        self.cfg, self.final_step = cfg, final_step
        self.rule, self.shadow = EarlyStopping.from_config(cfg), TrainState()

    def is_last(self, metrics: dict[str, float]) -> bool:
        self.shadow.step = int(metrics["step"])
        stopping = self.rule.update(self.shadow, metrics[f"eval_{self.cfg.eval.metric}"])
        return stopping or (self.final_step is not None and metrics["step"] >= self.final_step)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: one dtrain run with `params` applied."""
    from dtrain.ray.train import enter_driver_directory

    enter_driver_directory(setup.driver_cwd)  # relative data and model paths mean what they meant to the driver
    if not setup.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed; say CPU is meant
    logging.getLogger("dtrain").setLevel(logging.WARNING)  # each trial's record is its metrics.jsonl
    out = Path(trial_dir(setup, tune.get_context().get_trial_id()))
    cfg = trial_config(setup.base, params, str(out))
    (out / SAVED_FILE).unlink(missing_ok=True)  # (from the search's run before this one)
    done = out / RESULT_FILE
    if done.is_file():
        # Finished before the search was interrupted (Tune's saved state may predate that): its
        # result is reported again, nothing is trained again.
        summary = json.loads(done.read_text())
        if summary.get("last_report"):
            tune.report(summary["last_report"])
        return
    if not strategy_class(cfg.parallel.strategy).multi_process:
        from dtrain.train import Preempted, train

        gate, held = LastReportGate(cfg, setup.final_step), {}

        def forward(step: int, metrics: dict[str, float], checkpoint: Any) -> None:
            # Only evaluations go to Tune: its schedulers compare trials on them (a report made for
            # a checkpoint alone has no validation metric).
            if setup.metric not in metrics:
                return
            values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # (no lists)
            held.clear()
            if gate.is_last(values):
                held.update(values)
            else:
                tune.report(values)

        try:
            result = train(cfg, report=forward)
        except Preempted as exc:
            wait_for_the_search_to_stop(out, exc.step, str(exc))
        summary = {"step": result.step, "stop_reason": result.stop_reason, "last_report": dict(held)}
    else:
        from dtrain.ray.train import PREEMPTED, fit

        result = fit(cfg, callbacks=[eval_report_callback(setup.metric, LastReportGate(cfg, setup.final_step))])
        ret = result.return_value or {}
        if ret.get("stop_reason") == PREEMPTED:
            wait_for_the_search_to_stop(out, ret["step"], ret["message"])
        held = result.metrics if result.metrics and setup.metric in result.metrics else {}
        summary = {"step": ret.get("step"), "stop_reason": ret.get("stop_reason"), "last_report": dict(held)}
    done.write_text(json.dumps(summary))  # first: a trial with this file counts as finished
    if summary["last_report"]:
        tune.report(summary["last_report"])


def wait_for_the_search_to_stop(out: Path, step: int, message: str, patience_s: float = 600.0) -> None:
    """The trial saved `step` on checkpoint.stop_file: say so, then keep its place until the driver
    (StopOnStopFile) has saved the search with this trial still running and ends it. A trial
    that returned here would free its CPUs for the next trial, which would start only to stop."""
    print(f"trial {out.name} preempted: {message}", file=sys.stderr, flush=True)
    tmp = out / f".{SAVED_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, out / SAVED_FILE)
    threading.Event().wait(patience_s)
    raise RuntimeError(f"saved step {step} on checkpoint.stop_file, but the search did not stop within {patience_s:.0f} s")


class StopOnStopFile(tune.Callback):
    """Once checkpoint.stop_file exists: when every running trial has saved its checkpoint
    (SAVED_FILE in its run directory; at most `patience_s` after the file appeared), write
    STOPPED_FILE and interrupt Tune as Ctrl-C does: it saves the search, running trials as
    unfinished (a restore continues them), and ends. Tune starts no trial meanwhile: the running
    ones keep their resources while they wait."""

    def __init__(self, stop_file: str, directory: str, patience_s: float = 300.0):
        self.stop_file, self.directory, self.patience_s = stop_file, directory, patience_s
        self.setup()

    def setup(self, **info: Any) -> None:  # (also on a restored search: the pickled state is stale)
        self.seen_at: float | None = None
        self.stopping = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.stopping or not os.path.exists(self.stop_file):
            return
        from ray.tune.experiment import Trial

        self.seen_at = self.seen_at or time.monotonic()
        running = [t.trial_id for t in trials if t.status == Trial.RUNNING]
        saved = [t for t in running if (Path(self.directory) / "trials" / t / SAVED_FILE).is_file()]
        if len(saved) < len(running) and time.monotonic() - self.seen_at < self.patience_s:
            return
        self.stopping = True
        record = {"stop_file": self.stop_file, "saved": saved, "not_saved": sorted(set(running) - set(saved))}
        (Path(self.directory) / STOPPED_FILE).write_text(json.dumps(record))
        log.warning("%s exists: %d running trial(s) saved, stopping the search", self.stop_file, len(saved))
        os.kill(os.getpid(), signal.SIGINT)  # Tune's graceful stop (its handler sets the interrupt event)


def eval_report_callback(metric: str, gate: LastReportGate):
    """Ray Train's TuneReportCallback (it runs in the TorchTrainer's controller), passing on only
    reports with the metric, except the run's last one, which the trial reports when fit() returns.
    Imported here: it is Ray Train's, which single-process searches do not need."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0]
            if metric in first and not gate.is_last({k: float(v) for k, v in first.items()
                                                     if isinstance(v, (int, float))}):
                super().after_report(run_context, metrics, None)  # dtrain's checkpoints stay dtrain's

    return EvalReportCallback()


def trainable(cfg: Config, setup: TrialSetup):
    """run_trial with its setup and the resources a trial takes."""
    r = cfg.tune.resources
    fn = tune.with_parameters(run_trial, setup=setup)
    if not strategy_class(cfg.parallel.strategy).multi_process:
        return tune.with_resources(fn, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker})
    # A driver that only waits for its TorchTrainer, whose workers hold the CPUs and GPUs: it must
    # reserve none ({"cpu": 0} alone is refused; a fraction of a CPU can starve the workers).
    return tune.with_resources(fn, {"cpu": 0, "memory": 1})


def trial_dirname(trial) -> str:
    """Tune's directory for a trial is named by its id, like the trial's dtrain run directory."""
    return trial.trial_id


def trial_run_config(cfg: Config) -> Config:
    """The trials' base config: Ray Train's scaling from tune.resources, Ray's records next to the
    trial's own run directory."""
    r = cfg.tune.resources
    ray_cfg = cfg.ray.model_copy(update={"num_workers": r.workers, "cpus_per_worker": r.cpus_per_worker,
                                         "gpus_per_worker": r.gpus_per_worker, "use_gpu": r.gpus_per_worker > 0,
                                         "storage_path": None})
    return cfg.model_copy(update={"ray": ray_cfg})


# --------------------------------------------------------------------------------------
# The search


def concurrent_trials(cfg: Config) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster's CPUs and GPUs hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    r = cfg.tune.resources
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) // (r.workers * r.cpus_per_worker)]
    if r.gpus_per_worker:
        fits.append(total.get("GPU", 0) // (r.workers * r.gpus_per_worker))
    return max(1, int(min(fits)))


# Ray 2.60 saves no scheduler state with a search: after --resume, ASHA and the median rule would
# start with no record of the trials that ran before and let poor trials run to the end. These give
# the scheduler each restored trial's evaluations back, from the trial's own metrics.jsonl, as Tune
# adds the trial. (A new trial has no such file yet.)
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule  # noqa: E402


def evaluations(directory: str, trial_id: str, metric: str) -> list[dict[str, float]]:
    return [{"step": step, metric: value} for step, value in read_evals(Path(directory) / "trials" / trial_id, metric)]


class ResumableASHA(ASHAScheduler):
    def __init__(self, search_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.search_dir = search_dir

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for result in evaluations(self.search_dir, trial.trial_id, self._metric):
            super().on_trial_result(tune_controller, trial, result)  # recorded in its rungs; decided back then


class ResumableMedian(MedianStoppingRule):
    def __init__(self, search_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.search_dir = search_dir

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # Only recorded: replaying decisions would mark a resumed trial as stopped before it reports.
        # (An empty entry must not be made: the rule reads every entry's last result.)
        history = evaluations(self.search_dir, trial.trial_id, self._metric)
        if history:
            self._results[trial].extend(history)


def build_tuner(cfg: Config, fn: Any) -> tune.Tuner:
    from ray.tune.schedulers import FIFOScheduler

    t = cfg.tune
    seed = t.seed if t.seed is not None else cfg.seed
    if t.algorithm == "bayesian":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE starts from random points; with Optuna's default (10) a small search would be all random.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, t.num_samples // 2)))
        search_alg = OptunaSearch(sampler=sampler)
    else:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=seed)
    s = t.scheduler
    directory = search_dir(cfg)
    # The reported step, not Tune's training_iteration (which restarts at 1 when a search resumes).
    if s.name == "asha":
        scheduler = ResumableASHA(directory, time_attr="step", max_t=max_t(cfg), grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    elif s.name == "median":
        scheduler = ResumableMedian(directory, time_attr="step", grace_period=s.grace_period,
                                    min_samples_required=s.min_samples_required)
    else:
        scheduler = FIFOScheduler()
    storage, name = directory.rsplit("/", 1)
    stop_file = cfg.checkpoint.stop_file
    return tune.Tuner(
        fn,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(cfg),
                                    trial_dirname_creator=trial_dirname,
                                    # A finished trial's process runs the next one: torch, transformers and
                                    # dtrain are imported once per slot, not once per trial (seconds each).
                                    # Not for a Ray Train trial: its workers are new processes anyway, and
                                    # only ending the trial's process ends the TorchTrainer it owns when a
                                    # scheduler stops the trial mid-run.
                                    reuse_actors=not strategy_class(cfg.parallel.strategy).multi_process),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[StopOnStopFile(stop_file, directory)] if stop_file else None),
    )


# Keys besides data.* that change what the prepared data is (the tokenizer's files).
DATA_KEYS = ("data.", "model.path", "model.tokenizer")


def data_variants(cfg: Config) -> list[tuple[str, Config]]:
    """The run configs whose data the trials will read, as far as the search space lists them: the
    base config, and each grid / choice value of a searched data key (one key at a time, as
    check_search probes them). Sampled ranges of data keys (uniform, ...) are met by the trials."""
    variants = [("", cfg)]
    base = base_run_config(cfg)
    for key, dim in cfg.tune.search_space.items():
        if key.startswith(DATA_KEYS) and dim.kind in ("grid", "choice"):
            variants += [(f" (tune.search_space: {key}={value!r})", trial_config(base, {key: value}, "probe"))
                         for value in dim.spec]
    seen, out = set(), []
    for label, variant in variants:
        fingerprint = json.dumps([variant.to_dict()["data"], variant.model.path, variant.model.tokenizer],
                                 sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            out.append((label, variant))
    return out


def prepare_data_once(cfg: Config) -> None:
    """Tokenize the data in the driver, before Ray starts (a bad data file fails here, naming the file
    and line, not in every trial); the trials then find it in the cache. With searched data keys,
    the data of each listed value is prepared too. Raises DataError (or ConfigError for the model)."""
    from dtrain.data import DataError, prepare_data
    from dtrain.model import load_tokenizer

    for label, variant in data_variants(cfg):
        try:
            prepare_data(variant.data, load_tokenizer(variant.model), variant.seed)
        except DataError as exc:
            raise DataError(f"{exc}{label}") from None


def connect(address: str | None, num_cpus: int | None, cfg: Config, min_nodes: int = 1,
            wait_s: float = 300.0) -> None:
    """Join the cluster (or start a local Ray); with min_nodes, wait until that many nodes are up
    (a cluster whose nodes are still joining would place the first trials on too few)."""
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=None, include_dashboard=False)
    deadline = time.monotonic() + wait_s
    while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < min_nodes:
        if time.monotonic() > deadline:
            raise ConfigError(f"--min-nodes {min_nodes}: only {len(nodes)} Ray node(s) joined {address} within "
                              f"{wait_s:.0f} s; see the Ray logs of the missing nodes")
        time.sleep(1)
    total = ray.cluster_resources()
    log.info("Ray cluster: %d node(s), %g CPU(s), %g GPU(s)", len(nodes), total.get("CPU", 0), total.get("GPU", 0))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and not (prefix.startswith("tune.search_space.") and prefix.count(".") > 1):
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def check_same_search(cfg: Config, directory: str, resume: bool) -> None:
    """The search's config is kept next to it; --resume with another one (other trials, other
    search space) would mix two searches in one table, and is refused, naming the keys."""
    if "://" in directory:
        return  # (remote storage: Tune's own state is all there is)
    saved = Path(directory) / "search_config.yaml"
    if not resume:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(cfg.to_yaml())
        return
    if not saved.is_file():
        return
    import yaml

    before, now = flatten(yaml.safe_load(saved.read_text())), flatten(cfg.public_dict())
    # (where the stop file lives says how the search is run, not what it searches)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k != "checkpoint.stop_file")
    if changed:
        raise ConfigError(f"--resume: the config differs from the one the search in {directory} started with, at "
                          f"{', '.join(changed[:8])}; resume with the same config and overrides (see {saved})")


def run_search(cfg: Config, *, resume: bool | str, address: str | None = None, num_cpus: int | None = None,
               min_nodes: int = 1) -> list[dict] | None:
    """Run (or resume; resume="if_any": if there is a search to resume) the search; write and return
    its results. None: stopped by checkpoint.stop_file, its state saved for --resume."""
    directory = search_dir(cfg)
    state_exists = tune.Tuner.can_restore(directory) if "://" in directory or Path(directory).exists() else False
    if resume == "if_any":
        resume = state_exists
    stop_file = cfg.checkpoint.stop_file
    if stop_file and os.path.exists(stop_file):
        raise ConfigError(f"checkpoint.stop_file={stop_file} exists: the search would stop at once; remove it to "
                          "run (it asks running trials to save and the search to stop)")
    if resume and not state_exists:
        raise ConfigError(f"--resume: there is no search to resume in {directory} (tune.storage_dir/tune.name)")
    if not resume and state_exists:
        raise ConfigError(f"{directory} already holds a search: continue it with --resume, or choose another "
                          "tune.name (nothing was overwritten)")
    check_same_search(cfg, directory, resume)
    cfg = trial_run_config(cfg)
    final_step = cfg.tune.scheduler.max_t or cfg.train.max_steps
    setup = TrialSetup(base=base_run_config(cfg), search_dir=directory, driver_cwd=os.getcwd(), metric=cfg.tune.metric,
                       final_step=final_step, use_gpu=cfg.tune.resources.gpus_per_worker > 0)
    connect(address, num_cpus, cfg, min_nodes)
    fn = trainable(cfg, setup)
    if resume:
        # Finished trials stay as they are; unfinished ones are started again (from their dtrain
        # checkpoints); the search algorithm and scheduler continue from their saved state.
        tuner = tune.Tuner.restore(directory, trainable=fn, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(cfg))
    else:
        tuner = build_tuner(cfg, fn)
    stopped = Path(directory) / STOPPED_FILE
    if "://" not in directory:
        stopped.unlink(missing_ok=True)
    grid = tuner.fit()
    if "://" not in directory and stopped.is_file():
        return None
    rows = collect_rows(cfg, grid, directory)
    write_outputs(cfg, rows, directory)
    return rows


# --------------------------------------------------------------------------------------
# Results


def read_evals(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    return [(int(record["step"]), float(record[metric])) for record in read_metrics(run_dir) if metric in record]


def collect_rows(cfg: Config, grid: Any, directory: str) -> list[dict]:
    """One row per trial, from its dtrain run directory and Tune's record of it."""
    metric, mode, keys = cfg.tune.metric, cfg.tune.mode, list(cfg.tune.search_space)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        run_dir = Path(directory) / "trials" / trial_id
        evals = read_evals(run_dir, metric)
        done = run_dir / RESULT_FILE
        summary = json.loads(done.read_text()) if done.is_file() else None
        if result.error is not None:
            status = "error"
        elif summary is not None:
            status = "completed" if summary.get("stop_reason") == "max_steps" else str(summary.get("stop_reason"))
        else:
            status = f"stopped by {cfg.tune.scheduler.name}"
            # Where the scheduler stopped it: its last report. (A Ray Train trial's workers may log
            # an evaluation or two more before they are gone, as many as the machine's timing allows.)
            last = (result.metrics or {}).get("step")
            if last is not None:
                evals = [(step, value) for step, value in evals if step <= last]
        best = (min if mode == "min" else max)(evals, key=lambda p: p[1]) if evals else None
        row = {"trial_id": trial_id, **{k: result.config.get(k) for k in keys},
               metric: best[1] if best else None, "best_step": best[0] if best else None,
               "steps": evals[-1][0] if evals else 0, "status": status,
               "error": trial_error(result.error) if result.error else ""}
        row["_curve"] = evals
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def trial_error(error: BaseException) -> str:
    """A failed trial's error as one line: dtrain's own message (a DataError names the file and
    line), not the worker's traceback that Ray wraps around it."""
    seen: set[int] = set()
    while id(error) not in seen:  # RayTaskError -> .cause; Ray Train / Tune errors -> __cause__
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    from ray.exceptions import RayError

    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if isinstance(error, RayError) or "Traceback (most recent call last)" in text or '  File "' in text:
        return lines[-1][:300]  # (a traceback as text, Tune's error.txt: the exception is its last line)
    name = type(error).__name__
    return (lines[0] if name in ("DataError", "ConfigError", "ValueError") else f"{name}: {lines[0]}")[:300]


def failure_summary(rows: list[dict], directory: str) -> str | None:
    """The `error:` line of a search whose trials failed: how many, and each distinct error once."""
    failed = [r for r in rows if r["status"] == "error"]
    if not failed:
        return None
    by_error: dict[str, list[str]] = {}
    for r in failed:
        by_error.setdefault(r["error"] or "no message", []).append(r["trial_id"])
    details = "\n  ".join(f"trial {', '.join(ids)}: {message}" for message, ids in list(by_error.items())[:5])
    return (f"{len(failed)} of {len(rows)} trials failed (see {Path(directory) / 'results.csv'} and the trials' "
            f"run directories):\n  {details}")


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if r[metric] is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])


def write_outputs(cfg: Config, rows: list[dict], directory: str) -> None:
    out = Path(directory)
    metric, mode, keys = cfg.tune.metric, cfg.tune.mode, list(cfg.tune.search_space)
    columns = ["trial_id", *keys, metric, "best_step", "steps", "status", "error"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows, columns), flush=True)
    best = best_row(rows, metric, mode)
    if best is None:
        print(f"no trial reported {metric}; see the trials' run directories under {out / 'trials'}", flush=True)
    else:
        write_best_config(cfg, best, out)
        print(f"best: trial {best['trial_id']}, {metric}={best[metric]:.6g} at step {best['best_step']} ("
              + ", ".join(f"{k}={best[k]!r}" for k in keys) + ")", flush=True)
    plot_search(rows, keys, metric, cfg, out / "search.png")
    print(f"results: {out / 'results.csv'}, {out / 'best_config.yaml'}, {out / 'search.png'}", flush=True)


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    columns = [c for c in columns if c != "error" or any(r["error"] for r in rows)]
    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_best_config(cfg: Config, best: dict, out: Path) -> Path:
    """The best trial's config as `dtrain train` takes it: its own output_dir, no resume, no tune:."""
    import yaml

    trial = Config.model_validate(yaml.safe_load((out / "trials" / best["trial_id"] / "config.yaml").read_text()))
    data = trial.to_dict()
    data.pop("tune")
    data["output_dir"] = str(out / "best")
    data["checkpoint"]["resume"] = None
    data["checkpoint"]["stop_file"] = None  # (the search's, not the rerun's)
    Config.model_validate(data)  # what dtrain train will read back
    path = out / "best_config.yaml"
    header = (f"# Best trial {best['trial_id']} of the search in {out}:\n"
              f"# {cfg.tune.metric}={best[cfg.tune.metric]:.6g} at step {best['best_step']}.  dtrain train {path}\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def plot_search(rows: list[dict], keys: list[str], metric: str, cfg: Config, path: Path) -> None:
    """Left: every trial's validation curve (dashed: stopped early). Right: each parameter against
    the trial's best metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5 * (1 + len(keys)), 4), squeeze=False)
    curves = axes[0][0]
    for r in rows:
        if r["_curve"]:
            steps, values = zip(*r["_curve"])
            curves.plot(steps, values, marker=".", linestyle="-" if r["status"] == "completed" else "--",
                        label=f"{r['trial_id']} ({r['status']})")
    curves.set_xlabel("step")
    curves.set_ylabel(metric)
    curves.set_title("validation curves")
    if len(rows) <= 12:
        curves.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys):
        dim = cfg.tune.search_space[key]
        points = [(r[key], r[metric]) for r in rows if r[metric] is not None]
        xs = [p[0] for p in points]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, [p[1] for p in points])
            if dim.kind == "loguniform" or (xs and min(xs) > 0 and max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
        else:  # categorical values: one position each
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], [p[1] for p in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"{key} vs {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from dtrain.cli import DEBUG_FLAG, parse_with_overrides, run_command

    parser = argparse.ArgumentParser(prog="python -m dtrain.tune", description=__doc__.splitlines()[0],
                                     parents=[DEBUG_FLAG])
    parser.add_argument("config", help="YAML config file with a tune: section")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=20 train.max_steps=100")
    parser.add_argument("--address", help="Ray cluster to run on (HOST:PORT of its head, or auto); default: "
                        "ray.address, $RAY_ADDRESS, else a Ray started here")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search in tune.storage_dir/tune.name")
    parser.add_argument("--resume-or-start", action="store_true",
                        help="continue the search in tune.storage_dir/tune.name if there is one, else start it "
                        "(the same command line for every run of a requeued job)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the Ray started here (default: all)")
    parser.add_argument("--min-nodes", type=int, default=1,
                        help="wait (up to 5 minutes) until the cluster has this many nodes before the first trial")
    args = parse_with_overrides(parser, argv)  # overrides may also follow the options
    # (run_command: any other failure is one `error:` line too, exit 1; the traceback with --debug)
    return run_command(_search, args)


def _search(args: argparse.Namespace) -> int:
    from dtrain.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    try:
        cfg = load_config(args.config, args.overrides)
        check_search(cfg)
        prepare_data_once(cfg)  # before Ray starts: a bad data file is one error line, exit 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ValueError) as exc:  # (as `dtrain train` reports them: exit 1)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        rows = run_search(cfg, resume="if_any" if args.resume_or_start else args.resume, address=args.address,
                          num_cpus=args.num_cpus, min_nodes=args.min_nodes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rows is None:
        from dtrain.launch import PREEMPTED_EXIT_CODE

        record = json.loads((Path(search_dir(cfg)) / STOPPED_FILE).read_text())
        print(f"stopped: {cfg.checkpoint.stop_file} exists; {len(record['saved'])} running trial(s) saved a checkpoint"
              + (f", {len(record['not_saved'])} did not in time" if record["not_saved"] else "")
              + f". Continue with --resume (exit code {PREEMPTED_EXIT_CODE} asks for a requeue)", flush=True)
        return PREEMPTED_EXIT_CODE
    failed = sum(r["status"] == "error" for r in rows)
    print(f"done: {len(rows)} trials ({failed} failed) in {time.monotonic() - t0:.0f} s", flush=True)
    summary = failure_summary(rows, search_dir(cfg))
    if summary and failed == len(rows):
        print(f"error: {summary}", file=sys.stderr)
        return 1
    if summary:
        print(f"warning: {summary}", file=sys.stderr)
    return 0

