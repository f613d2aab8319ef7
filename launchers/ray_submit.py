"""Send a dtrain run to a Ray cluster as a Ray job, follow its logs, exit with its status.

    python -m launchers.ray_submit --address http://HEAD:8265 CONFIG [key=value ...] [--no-wait]

The job runs `python -m dtrain.ray_train CONFIG ...` on the head node, in a copy of
--working-dir (default: the current directory, a dtrain checkout with launchers/, the configs and
the data they name), which Ray also unpacks on every node for the Ray Train workers. The same as

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m dtrain.ray_train CONFIG key=value ...

The config is checked here first, so a typo fails before anything is uploaded; output_dir must be
an absolute path on storage every node sees (a relative one would land in the job's temporary
copy of the working directory). Exit status: 0 when the job succeeded, 1 when it failed or was
stopped, 2 for a bad config; with --no-wait, 0 once the job is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from dtrain.config import ConfigError, load_config

# Never uploaded with the working directory: environments, run outputs, VCS data.
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache"]


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def entrypoint(config: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "dtrain.ray_train", config, *overrides])


def config_in_working_dir(config: str, working_dir: Path) -> str:
    """The config's path as the job sees it: relative to the uploaded working directory."""
    path = Path(config).absolute()
    try:
        return str(path.relative_to(working_dir.absolute()))
    except ValueError:
        raise ConfigError(f"{config} is not inside --working-dir {working_dir}: the job only sees what is "
                          "uploaded with it") from None


async def follow_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for_end(client, job_id: str):
    """The job's final status (the log stream can end a moment before the status changes)."""
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.ray_submit", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file, inside --working-dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=/shared/runs/x ray.num_workers=8")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the cluster's job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--working-dir", type=Path, default=Path("."),
                        help="directory uploaded for the job (default: the current one)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job and its workers (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("--address http://HEAD:8265 is required (or set RAY_API_SERVER_ADDRESS)")
    try:
        env = parse_env(args.env)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    from dtrain.ray.train import prepare_config

    try:
        config = config_in_working_dir(args.config, args.working_dir)
        prepare_config(load_config(args.config, args.overrides), in_job_working_dir=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ray.job_submission import JobSubmissionClient, JobStatus

    client = JobSubmissionClient(args.address)
    runtime_env = {"working_dir": str(args.working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env}
    job_id = client.submit_job(entrypoint=entrypoint(config, args.overrides), runtime_env=runtime_env)
    print(f"submitted job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {job_id}")
        return 0
    try:
        asyncio.run(follow_logs(client, job_id))
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (ray job stop --address {args.address} {job_id})",
              file=sys.stderr)
        return 130
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
