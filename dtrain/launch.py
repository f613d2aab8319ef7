"""torchrun for dtrain: `dtrain train CONFIG --nproc N` and `python -m dtrain.launch`.

    python -m dtrain.launch [torchrun options] -m dtrain.train CONFIG [overrides]

is torchrun (torch.distributed.run: same options, same agent, same rendezvous) plus the
two things a cluster job needs from it:

- Preemption signals reach the workers. SIGTERM, SIGUSR1 and SIGUSR2 sent to this process
  are forwarded to every worker, and the agent keeps waiting for them while they agree on a
  step, save a checkpoint and exit. (torchrun's own agent dies on SIGUSR1/2, orphaning the
  workers, and kills them 30 s after forwarding SIGTERM.)
- The exit code says what happened: PREEMPTED_EXIT_CODE when the workers stopped to be
  requeued (torchrun reports any worker failure as 1), else the first failing worker's code.
  Workers it started leave after a preemption with exit code 0 and a marker file instead of 75:
  to torchrun's agents a non-zero exit is a failure, after which the agent hosting the rendezvous
  store tears it down at once, and an agent on another node whose worker is still exiting then
  hangs on the vanished store. With 0 every agent waits for the others in torchrun's exit
  barrier, and the launcher, seeing the markers, exits with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; slurm/train.sh requeues on it
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
PREEMPTED_MARKERS = "DTRAIN_PREEMPTED_MARKERS"  # the launcher's directory for the workers' markers


def preempted_exit_code() -> int:
    """The exit code of a worker that stopped to be requeued (see the module's docstring)."""
    markers = os.environ.get(PREEMPTED_MARKERS)
    if not markers:
        return PREEMPTED_EXIT_CODE
    with open(os.path.join(markers, f"rank_{os.environ.get('RANK', '0')}"), "w"):
        pass
    return 0


def _forward_to_workers(signum: int, frame: object) -> None:
    import psutil  # already loaded by run_torchrun: an import here could be interrupted by the next signal

    # The agent starts each worker in a session of its own: signal them one by one.
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def run_torchrun(argv: list[str]) -> int:
    """Run torch.distributed.run with `argv`; returns dtrain's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent installs handlers for the signals in this list (its --signals-to-handle option,
    # whose default comes from PET_SIGNALS_TO_HANDLE): keep ours for the others.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    # Loaded before the handlers go in: a second signal arriving while the first handler was still
    # importing psutil found it half-initialised and killed the agent (SLURM sends one to every
    # process of the step, a batch script or submitit may pass on another).
    import psutil  # noqa: F401

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward_to_workers)
    with tempfile.TemporaryDirectory(prefix="dtrain-preempted-") as markers:
        os.environ[PREEMPTED_MARKERS] = markers  # (the workers inherit it)
        try:
            run(parse_args(argv))
        except ChildFailedError as exc:
            codes = [failure.exitcode for failure in exc.failures.values()]
            if codes and all(code == PREEMPTED_EXIT_CODE for code in codes):
                return PREEMPTED_EXIT_CODE
            print(f"dtrain.launch: workers failed with exit codes {codes}", file=sys.stderr)
            return next((code for code in codes if code > 0), 1)
        finally:
            os.environ.pop(PREEMPTED_MARKERS, None)
        return PREEMPTED_EXIT_CODE if os.listdir(markers) else 0


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torchrun arguments for `dtrain train CONFIG --nproc N [--nnodes M --rdzv-endpoint H:P]`."""
    argv = ["--nproc-per-node", str(args.nproc), "--nnodes", str(args.nnodes)]
    if args.rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    elif str(args.nnodes) == "1":
        argv += ["--standalone"]
    else:
        raise SystemExit("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    argv += ["-m", "dtrain.train", args.config, *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def launch_training(args: argparse.Namespace) -> int:
    return run_torchrun(torchrun_argv(args))


def main(argv: list[str] | None = None) -> int:
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
