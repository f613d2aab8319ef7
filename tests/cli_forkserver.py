"""Runs `python -m dtrain ARGV` commands without paying for the interpreter's start and dtrain's
imports each time (about 6 s of CPU per command on the CI machine: torch, then transformers).

This process imports what `python -m dtrain` imports, then, for each request read from stdin
(one JSON object per line: argv, cwd, env, stdout, stderr, timeout), forks a child that does
what `python -m dtrain ARGV` does after its imports: `sys.exit(dtrain.cli.main(argv))` (or, asked
for module dtrain.tune, what `python -m dtrain.tune ARGV` does), with its
working directory, environment and standard streams (files) as asked. An exception that escapes
is printed as the interpreter would print it (a traceback) and exits 1. The exit code goes back
as one JSON line on stdout. tests/test_bad_inputs.py checks that a sample of commands gives the
same exit code and error line here as through a fresh `python -m dtrain`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as dtrain's CLI sets it, before anything imports deepspeed

import dtrain.cli  # noqa: E402
import dtrain.dryrun  # noqa: E402,F401  (what the commands import lazily: torch, transformers, ...)
import dtrain.estimate  # noqa: E402,F401
import dtrain.export  # noqa: E402,F401
import dtrain.train  # noqa: E402,F401


def run_child(request: dict) -> None:
    """In the forked child: become `python -m dtrain ARGV`, then exit."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [sys.argv[0], *request["argv"]]
        try:
            if request.get("module", "dtrain") == "dtrain.tune":  # python -m dtrain.tune (imports Ray)
                from dtrain.ray.tune import main as entry_point
            else:
                entry_point = dtrain.cli.main
            code = entry_point(request["argv"])
        except SystemExit as exc:  # argparse, and sys.exit inside a command
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.02)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        code = wait(pid, request.get("timeout", 300))
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    main()
