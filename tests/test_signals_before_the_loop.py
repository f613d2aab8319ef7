"""A preemption signal (SIGTERM, SIGUSR1) while the run is still being set up, here while its
data is being prepared: the command ends with its message and the documented exit code (75,
requeue), not killed by the signal; the half-built data cache is removed and the run
directory holds nothing of the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from dtrain.launch import PREEMPTED_EXIT_CODE


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_during_data_preparation_ends_with_the_requeue_code(sig, tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Add {a} and {a * 7}.", "input": "", "output": str(a * 8)} for a in range(30000)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtrain", "train", "examples/tiny_alpaca.yaml", f"model.path={tiny_model_dir}",
         f"data.train={tmp_path / 'big.jsonl'}", f"output_dir={out}", "train.max_steps=2", "logging.tensorboard=false"],
        cwd=REPO, env={**os.environ, "DTRAIN_CACHE": str(cache)}, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # until data preparation has begun
        seen.append(line)
        if "preparing the data" in line or time.monotonic() > deadline:
            break
    assert "preparing the data" in seen[-1], "".join(seen)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, "".join(seen) + rest
    assert "Traceback" not in rest
    assert f"preempted: {sig.name} arrived before the first training step" in rest
    assert not [p for p in cache.rglob(".tmp-*")], "the half-built cache entry was left behind"
    assert not list(cache.rglob("meta.json"))  # nor taken for a finished one
    assert not out.exists() or not any(out.iterdir())


def test_a_signal_whose_exception_was_lost_is_raised_again_when_the_loops_watch_takes_over():
    """The handler before the loop raises where the signal lands; should that exception be lost on
    the way (swallowed by whatever code it landed in), the loop's watch raises it again when it
    takes over, before anything is written: the command still ends with the requeue code."""
    from dtrain.checkpoint import PreemptionWatch
    from dtrain.cli import SignalledBeforeTraining, _preemption_before_the_loop

    with _preemption_before_the_loop():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SignalledBeforeTraining):
            handler(signal.SIGTERM, None)  # (as the signal would: the exception below is then "lost")
        with pytest.raises(SignalledBeforeTraining, match="SIGTERM"):
            PreemptionWatch().__enter__()
        assert signal.getsignal(signal.SIGTERM) is handler  # (the watch installed nothing)
    with _preemption_before_the_loop():  # a fresh command: nothing pending
        watch = PreemptionWatch().__enter__()
        watch.__exit__()
