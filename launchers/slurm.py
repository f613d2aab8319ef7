"""Submit a dtrain run to SLURM from Python, through submitit.

    python -m launchers.slurm CONFIG [key=value ...] --nodes 2 --gpus-per-node 8 --partition gpu --time 1440
    python -m launchers.slurm CONFIG [key=value ...] --local --nproc-per-node 2 --wait

The job is what slurm/train.sh does: one task per node, each running `dtrain train --nproc N`
(torchrun) with a c10d rendezvous on the first node, resuming from output_dir. Before the time
limit (and on `scancel --signal=USR2`) SLURM signals every process of the job step: dtrain's
workers agree on a step, save a checkpoint and exit 75, while submitit calls `TrainJob.checkpoint`
on rank 0, which waits for that save and hands submitit the same job to requeue. The rerun
resumes from the checkpoint. The save, not dtrain's exit, is what the requeue waits for: a
process can hang after a complete save (see QUIET_AFTER_SAVE_S), and the requeue ends it.

dtrain itself knows nothing of SLURM or submitit: this module only starts it and reads its
output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # submitit is imported where a job is submitted, not by the node launcher
    import submitit

PREEMPTED_EXIT_CODE = 75  # dtrain's "checkpoint saved, run me again" (dtrain.launch)
REQUEUE_GRACE_S = 90  # how long a preempted task waits to be ended by the requeue
# Once a checkpoint newer than the one at the signal is complete (dtrain replaces
# checkpoints/latest last, after every rank's part is written) and the output directory has been
# quiet this long, checkpoint() requeues without waiting for dtrain to exit. It normally exits
# within seconds of the save. A worker could deadlock tearing down its process group after it
# (torch's ProcessGroupGloo destructor joining a thread that waits for the GIL, which the
# DDP Reducer's destructor holds: pytorch/pytorch#56297); dtrain now lets go of the wrapped model
# before the group is destroyed (dtrain.train.Run.release), which removes that cause. This rule
# stays for any other hang after a complete save, in which every agent would wait for the hung
# worker, the other nodes' in torchrun's exit barrier (300 s). The requeue ends them all; the run
# lost nothing.
QUIET_AFTER_SAVE_S = 30


def final_metrics(output_dir: str | Path) -> dict:
    """The newest value of every metric in output_dir/metrics.jsonl (train and eval), with its step."""
    from dtrain.tracking import read_metrics

    metrics: dict = {}
    for record in read_metrics(output_dir):  # (a line torn by a kill is skipped; dtrain drops it on restart)
        metrics.update(record)
    return metrics


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """dtrain's checkpoints/latest (the newest complete checkpoint, as JSON text), or None."""
    try:
        return (Path(output_dir) / "checkpoints" / "latest").read_text()
    except OSError:
        return None


def output_progress(output_dir: str | Path) -> tuple:
    """What dtrain's output directory shows of its progress: the newest complete checkpoint,
    the saves in flight (their temporary directories) and the length of metrics.jsonl."""
    out = Path(output_dir)
    try:
        logged = (out / "metrics.jsonl").stat().st_size
    except OSError:
        logged = 0
    return latest_checkpoint(out), tuple(sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))), logged


def rendezvous_endpoint(job_id: str, restart: int) -> str:
    """HOST:PORT of the first node, the same on every node without talking to each other: the host
    is its NodeAddr (node names need not resolve), the port a hash of the job id and restart."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    head = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", head], capture_output=True, text=True, check=True).stdout
    addr = next((item.split("=", 1)[1] for item in node.split() if item.startswith("NodeAddr=")), head)
    port = 20000 + zlib.crc32(f"{job_id}/{restart}".encode()) % 20000
    return f"{addr}:{port}"


@dataclass
class TrainJob:
    """One node's share of a dtrain run; submitit pickles it, runs it on every node and calls
    `checkpoint` on rank 0 when SLURM announces the end (time limit or preemption)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    stop_timeout_s: float = 240.0  # how long checkpoint() waits for dtrain's save
    output_dir: str | None = None  # the config's output_dir (found from the config on rank 0 when not given)

    def __post_init__(self):
        self._proc: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._latest_before: str | None = None  # checkpoints/latest as rank 0 last saw it before a signal
        self._watching = False  # whether __call__ has read it yet

    def command(self) -> list[str]:
        import submitit

        env = submitit.JobEnvironment()
        # `python -m dtrain train`: the node's launcher (torchrun's agent) imports neither torch's
        # models nor transformers; only the workers it starts do.
        argv = [sys.executable, "-m", "dtrain", "train", self.config, *self.overrides, "--resume", "auto",
                "--nproc", str(self.nproc_per_node), "--nnodes", str(env.num_nodes)]
        if env.num_nodes > 1:
            restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            argv += ["--rdzv-endpoint", rendezvous_endpoint(env.job_id, restart), "--rdzv-id", str(env.job_id)]
        return argv

    def __call__(self) -> dict | None:
        import submitit

        env = submitit.JobEnvironment()
        self._proc = subprocess.Popen(self.command(), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # The child is reaped by a thread; the main thread only sleeps. submitit's signal handler
        # runs on the main thread, and must find no lock held there (Popen.wait holds one).
        threading.Thread(target=self._reap, daemon=True).start()
        rank0 = env.global_rank == 0
        if rank0 and self.output_dir is None:  # (while dtrain starts: this imports what the config needs)
            try:
                self.output_dir = self._find_output_dir()
            except Exception:  # noqa: BLE001 - dtrain says what is wrong with the config
                pass
        while self._returncode is None:
            if rank0 and self.output_dir is not None:  # what checkpoint() compares with (see there)
                self._latest_before, self._watching = latest_checkpoint(self.output_dir), True
            time.sleep(0.5)
        code = self._returncode
        if code == PREEMPTED_EXIT_CODE:
            # The checkpoint is saved. Either rank 0's checkpoint() requeues the job (on the other
            # nodes), or SLURM is ending it (SIGTERM: scancel, `scontrol requeue`). Both kill this
            # task soon (all ranks exit 75 within moments of each other); until then write no
            # result, which submitit would take for this run's.
            time.sleep(REQUEUE_GRACE_S)
            raise RuntimeError(f"dtrain stopped on a preemption signal (exit {code}) with a checkpoint saved, "
                               "and the job was not requeued; resubmit the same command to resume")
        if code != 0:
            raise RuntimeError(f"dtrain exited with {code} on node {env.node} (see this task's log)")
        if not rank0:
            return None
        return final_metrics(self.output_dir or self._find_output_dir())

    def _reap(self) -> None:
        self._returncode = self._proc.wait()

    def _find_output_dir(self) -> str:
        from dtrain.config import load_config

        return str(Path(load_config(self.config, self.overrides).output_dir).resolve())

    def checkpoint(self) -> "submitit.helpers.DelayedSubmission | None":
        """submitit's requeue hook (rank 0, on SLURM's USR2). The signal went to every process of
        the step, dtrain's included; pass it on anyway (a `kill -USR2` may have reached only us),
        wait for the checkpoint, and requeue the same job, which resumes from it."""
        import submitit

        if self._proc is not None and self._returncode is None:
            try:
                self._proc.send_signal(signal.SIGUSR2)
            except ProcessLookupError:
                pass
            self._wait_for_the_save()
        if self._returncode not in (None, PREEMPTED_EXIT_CODE):
            print(f"launchers.slurm: dtrain exited with {self._returncode}, not its preemption code; not requeueing",
                  file=sys.stderr, flush=True)
            return None
        # A fresh TrainJob: this one holds a live process, which does not pickle.
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, self.nproc_per_node,
                                                           self.stop_timeout_s, self.output_dir))

    def _wait_for_the_save(self) -> None:
        """Until dtrain exits, or its save is complete and it has had QUIET_AFTER_SAVE_S to exit
        (see there), or stop_timeout_s has passed. Complete: checkpoints/latest names another
        checkpoint than before the signal, no save is in flight, and nothing in the output
        directory changed for that long (a periodic save may complete just after the signal;
        training then goes on to the step the ranks stop at, and saves that)."""
        deadline = time.monotonic() + self.stop_timeout_s
        if not self._watching:  # (a signal before __call__ knew the output directory)
            while self._returncode is None and time.monotonic() < deadline:
                time.sleep(0.2)
            return
        before = self._latest_before
        progress, since = output_progress(self.output_dir), time.monotonic()
        while self._returncode is None and time.monotonic() < deadline:
            time.sleep(0.2)
            now = output_progress(self.output_dir)
            if now != progress:
                progress, since = now, time.monotonic()
            latest, saving, _ = progress
            quiet = time.monotonic() - since >= QUIET_AFTER_SAVE_S
            if latest is not None and latest != before and not saving and quiet:
                try:
                    name = json.loads(latest)["checkpoint"]
                except (ValueError, KeyError, TypeError):
                    name = latest.strip()
                print(f"launchers.slurm: dtrain's checkpoint {name} is complete, but dtrain has not "
                      f"exited {QUIET_AFTER_SAVE_S} s later; requeueing (the requeue ends it)",
                      file=sys.stderr, flush=True)
                return


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launchers.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="dtrain YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for dtrain train")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node to allocate (0: a CPU job)")
    parser.add_argument("--nproc-per-node", type=int, help="workers per node (default: --gpus-per-node, else 1)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", type=int, default=24 * 60, metavar="MIN", help="time limit in minutes")
    parser.add_argument("--signal-delay-s", type=int, default=300,
                        help="USR2 this many seconds before the time limit: time for one step and one save")
    parser.add_argument("--job-name", default="dtrain")
    parser.add_argument("--log-dir", default="logs/submitit", help="submitit's folder: logs and pickles (%%j: job id)")
    parser.add_argument("--local", action="store_true", help="run here through submitit's LocalExecutor (1 node)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its final metrics (JSON)")
    # Overrides may also follow the options (CONFIG --nodes 2 optim.lr=1e-3).
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    return args


def make_executor(args: argparse.Namespace):
    import submitit

    executor = submitit.AutoExecutor(folder=args.log_dir, cluster="local" if args.local else "slurm")
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=1, timeout_min=args.time)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if not args.local:
        params.update(slurm_signal_delay_s=args.signal_delay_s, slurm_additional_parameters={"requeue": True})
        if args.partition:
            params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    return executor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dtrain.config import ConfigError, load_config

    if args.local and args.nodes != 1:
        print("error: --local runs on this machine: use --nodes 1", file=sys.stderr)
        return 2
    try:  # a bad config or override fails here, before anything is queued
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    job = TrainJob(str(Path(args.config).resolve()), list(args.overrides), nproc,
                   stop_timeout_s=max(args.signal_delay_s - 30, 30), output_dir=str(Path(cfg.output_dir).resolve()))
    executor = make_executor(args)
    submitted = executor.submit(job)
    unexpanded = Path(args.log_dir)  # submitit also makes the folder with a literal %j in its name
    if "%j" in args.log_dir and unexpanded.is_dir() and not any(unexpanded.iterdir()):
        unexpanded.rmdir()
    print(f"submitted job {submitted.job_id} ({args.nodes} node(s) x {nproc} worker(s))")
    print(f"logs: {submitted.paths.stdout}\n      {submitted.paths.stderr}", flush=True)
    if not args.wait:
        return 0
    try:
        results = submitted.results()  # one per node; rank 0's holds the metrics
    except Exception as exc:  # submitit re-raises the job's failure with its traceback
        print(f"error: job {submitted.job_id} failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
