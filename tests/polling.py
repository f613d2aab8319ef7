"""Waiting on subprocesses and daemons in tests: one place for the polling loop and the step count."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for(condition, timeout: float, every: float = 0.2) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its value at the end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def logged_steps(out: Path) -> int:
    """Training-loss lines a run has written to its metrics.jsonl so far."""
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    except FileNotFoundError:
        return 0
