"""Run a dtrain config with Ray Train: one Ray Train worker per dtrain rank.

    python -m dtrain.ray_train CONFIG [key=value ...]     (the entry point is dtrain/ray_train.py)

`TorchTrainer` starts `ray.num_workers` worker processes (placed anywhere on the cluster) and
joins them into a torch.distributed group (gloo on CPU, NCCL + gloo on GPU). Each worker runs
the ordinary `dtrain.train.train(cfg)`, which joins that group like it joins torchrun's, and
hands every evaluation and completed checkpoint to `ray.train.report`.

Where things go:
    output_dir                  dtrain's run directory, written as with `dtrain train`: config.yaml,
                                metrics.jsonl, checkpoints/step_N (every rank writes its shard), final/.
                                On a multi-node cluster it must be on storage every node sees.
    storage_path/<run name>     Ray Train's run directory; the run name is output_dir's name, so by
                                default (storage_path = output_dir's parent) it IS output_dir. Ray
                                adds its run snapshot and one `ray_step_N` entry per reported
                                checkpoint: hard links to dtrain's files when on the same filesystem
                                (no second copy), a copy otherwise, an upload for s3:// or gs://.

Resuming: running the same command again continues the run exactly where it stopped. The
workers start with `checkpoint.resume=auto`, dtrain's own resume: the newest *complete*
checkpoint in output_dir (checksums verified) restores model, optimizer, scheduler, every rank's
RNG and the data position, and drops metrics logged after it. Ray's own restore
(`ray.train.get_checkpoint()`) is not used to pick the step: it only knows checkpoints that
were reported, and trusts them unverified; dtrain's also covers a checkpoint completed just
before a crash and skips a damaged one. Ray reloads its run snapshot all the same (same
RunConfig name and storage_path), so its records continue too. The same happens when Ray
restarts the workers itself (FailureConfig retries, spot preemption).

`fit(cfg)` is the part a Ray Tune trial calls (one trial = one multi-worker run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, CheckpointUploadMode, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dtrain.config import Config, ConfigError, RayConfig, load_config
from dtrain.parallel import STRATEGIES, strategy_class

# the strategies that join the process group Ray Train's workers set up
RAY_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if cls.runs_under_ray_train)
PREEMPTED = "preempted"  # a run's stop_reason when it saved and stopped on checkpoint.stop_file
CHECKPOINT_PREFIX = "ray_"  # Ray's entry for dtrain's checkpoints/step_N: <Ray run dir>/ray_step_N_<time>


# --------------------------------------------------------------------------------------
# From dtrain's config to Ray's


def prepare_config(cfg: Config, *, in_job_working_dir: bool = False) -> Config:
    """The config the workers run: checked for Ray, output_dir absolute, resuming by default.

    `in_job_working_dir`: this driver runs in a Ray job's uploaded working_dir, a temporary copy."""
    if not strategy_class(cfg.parallel.strategy).runs_under_ray_train:
        raise ConfigError(f"parallel.strategy={cfg.parallel.strategy!r} does not run under Ray Train; "
                          f"use one of {', '.join(RAY_STRATEGIES)} (the workers join Ray's process group)")
    if in_job_working_dir and not Path(cfg.output_dir).is_absolute():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is relative: in a Ray job it would land in the job's "
                          "temporary copy of the working directory; give an absolute path on storage every node sees")
    updates: dict[str, Any] = {"output_dir": str(Path(cfg.output_dir).absolute())}
    if cfg.checkpoint.resume is None:
        # Re-running the command, and Ray restarting failed workers, continue the run.
        updates["checkpoint"] = cfg.checkpoint.model_copy(update={"resume": "auto"})
    return cfg.model_copy(update=updates)


def is_uri(path: str) -> bool:
    return "://" in path


def storage_path(cfg: Config) -> str:
    """Where Ray keeps its run directory: ray.storage_path, else output_dir's parent."""
    path = cfg.ray.storage_path or str(Path(cfg.output_dir).parent)
    return path if is_uri(path) else str(Path(path).absolute())


def run_name(cfg: Config) -> str:
    """Ray's run name: output_dir's name, so that the default Ray run directory is output_dir."""
    return Path(cfg.output_dir).name


def ray_run_dir(cfg: Config) -> str:
    return f"{storage_path(cfg).rstrip('/')}/{run_name(cfg)}"


def scaling_config(ray_cfg: RayConfig) -> ScalingConfig:
    gpus = ray_cfg.gpus_per_worker if ray_cfg.gpus_per_worker is not None else (1 if ray_cfg.use_gpu else 0)
    resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources)


def torch_config(cfg: Config) -> TorchConfig:
    # dtrain's own choice (backend_for): on GPU, NCCL for CUDA tensors and gloo for the CPU
    # ones (object collectives, CPU offload); Ray's default would be NCCL alone.
    if cfg.parallel.backend != "auto":
        return TorchConfig(backend=cfg.parallel.backend)
    return TorchConfig(backend="cpu:gloo,cuda:nccl" if cfg.ray.use_gpu else "gloo")


def run_config(cfg: Config, callbacks: list | None = None) -> RunConfig:
    # Ray keeps (and deletes) its own entries, as many as dtrain keeps of its checkpoints.
    return RunConfig(name=run_name(cfg), storage_path=storage_path(cfg), callbacks=callbacks,
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last))


# --------------------------------------------------------------------------------------
# On each worker


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """dst: the same files as src, hard-linked where the filesystem allows (checkpoint files are
    never modified after they are written, so the two names can share them), else copied."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(source, target)

    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)  # the same step saved again after a resume
    os.rename(tmp, dst)


def ray_checkpoint(dtrain_checkpoint: Path, run_dir: str) -> tuple[ray.train.Checkpoint, str, CheckpointUploadMode]:
    """(checkpoint, directory name, upload mode) for ray.train.report: on a local Ray run directory
    the entry is made here and Ray is told not to copy; remote storage gets Ray's upload.

    The name is unique per save: a step saved again after resuming from an older checkpoint
    must not share a directory with the entry Ray keeps for the first save (and deletes later)."""
    name = f"{CHECKPOINT_PREFIX}{dtrain_checkpoint.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    if is_uri(run_dir):
        return ray.train.Checkpoint.from_directory(dtrain_checkpoint), name, CheckpointUploadMode.SYNC
    entry = Path(run_dir) / name
    link_or_copy_tree(dtrain_checkpoint, entry)
    return ray.train.Checkpoint.from_directory(entry), name, CheckpointUploadMode.NO_UPLOAD


def enter_driver_directory(driver_cwd: str) -> None:
    """Make relative paths in the config (data files, model directories) mean what they meant to
    the driver. Ray Train starts each worker in a scratch directory of its own; the driver's
    directory (in a Ray job: the job's copy of its working_dir, unpacked at the same path on
    every node) is used instead wherever this node has it."""
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One dtrain rank. Returns (rank 0's value becomes Result.return_value) the run summary."""
    if not loop_config["config"]["ray"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports deepspeed; say CPU is meant
    from dtrain.train import Preempted, train

    enter_driver_directory(loop_config["driver_cwd"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # dtrain places a GPU rank on cuda:LOCAL_RANK (Ray sets it too; this says what dtrain needs).
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    # Ray Train already sends the root logger (and print) to the driver: dtrain's INFO from rank 0.
    logging.getLogger("dtrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    cfg = Config.model_validate(loop_config["config"])
    run_dir = loop_config["ray_run_dir"]

    def report(step: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        # Every rank reports (Ray's report is a barrier); rank 0 alone hands over the checkpoint,
        # which already holds every rank's shard (Ray takes the directory name from rank 0).
        kwargs: dict[str, Any] = {}
        if checkpoint is not None and rank == 0:
            ray_ckpt, name, mode = ray_checkpoint(Path(checkpoint), run_dir)
            kwargs = {"checkpoint": ray_ckpt, "checkpoint_dir_name": name, "checkpoint_upload_mode": mode}
        # (numbers only: a classifier's confusion matrix is a list)
        ray.train.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, **kwargs)

    try:
        result = train(cfg, report=report)
    except Preempted as exc:
        # checkpoint.stop_file appeared (the only request a Ray worker can see) and every rank saved
        # the same step: a result, not a failure, for whoever waits on the run (a Tune trial, main).
        return {"step": exc.step, "stop_reason": PREEMPTED, "message": str(exc), "output_dir": cfg.output_dir}
    return {"step": result.step, "stop_reason": result.stop_reason, "output_dir": result.output_dir,
            "train_losses": result.train_losses, **result.final_metrics}


# --------------------------------------------------------------------------------------
# The driver


def fit(cfg: Config, *, callbacks: list | None = None) -> ray.train.Result:
    """Run `cfg` on the connected Ray cluster with `cfg.ray.num_workers` workers; blocks until done.

    For Ray Tune (one trial = one such run): call it from the trial's function with
    `callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]` and a per-trial output_dir,
    with the trial itself reserving no CPU (`tune.with_resources(fn, {"cpu": 0, "memory": 1})`).
    Raises ray.train.TrainingFailedError when the run fails.
    """
    cfg = prepare_config(cfg)
    # dtrain's rank 0 prints its progress to stderr, which Ray already forwards; Ray Train's print
    # patch would log every such line a second time. (Ray passes this variable on to the workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "ray_run_dir": ray_run_dir(cfg), "driver_cwd": os.getcwd()},
        torch_config=torch_config(cfg),
        scaling_config=scaling_config(cfg.ray),
        run_config=run_config(cfg, callbacks),
    )
    return trainer.fit()


def connect(ray_cfg: RayConfig) -> None:
    """Join the cluster at ray.address (or RAY_ADDRESS, set inside a Ray job); without one,
    start a local Ray with just the CPUs (and GPUs) the workers ask for."""
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    gpus = ray_cfg.gpus_per_worker if ray_cfg.gpus_per_worker is not None else (1 if ray_cfg.use_gpu else 0)
    ray.init(address="local", num_cpus=math.ceil(ray_cfg.num_workers * ray_cfg.cpus_per_worker),
             num_gpus=math.ceil(ray_cfg.num_workers * gpus))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.ray_train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ray.num_workers=4 optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        prepare_config(cfg)  # fail on a bad config before starting Ray
        connect(cfg.ray)
        cfg = prepare_config(cfg, in_job_working_dir=bool(ray.get_runtime_context().runtime_env.working_dir()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ray_train: {cfg.ray.num_workers} workers, output_dir {cfg.output_dir}, Ray run directory "
          f"{ray_run_dir(cfg)}", flush=True)
    try:
        result = fit(cfg)
    except ray.train.TrainingFailedError as exc:
        print(f"error: the run failed: {exc}", file=sys.stderr)
        return 1
    summary = result.return_value or {}
    if summary.get("stop_reason") == PREEMPTED:
        from dtrain.launch import PREEMPTED_EXIT_CODE

        print(f"preempted: {summary['message']}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE  # run the same command again to resume
    summary = {k: v for k, v in summary.items() if k != "train_losses"}
    print("done: " + json.dumps({**summary, "last_report": result.metrics,
                                 "checkpoint": result.checkpoint.path if result.checkpoint else None}), flush=True)
    return 0

