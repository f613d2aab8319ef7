"""A disk that fills during a checkpoint write (ENOSPC), on a real file system: output_dir is a
small tmpfs mounted for the test (the tests run as root). The failed save leaves the previous
checkpoint intact and no partial files, says so in one message, and the run resumes once space
is freed."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import base_overrides, read_metrics

from dtrain import checkpoint as ckpt
from dtrain.config import load_config
from dtrain.parallel.single import SingleDevice
from dtrain.train import train


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", f"dtrain-test-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests need root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros into `disk` until the kernel says it is full."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc
    return filler


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resumes(small_disk, tiny_model_dir, monkeypatch):
    out = small_disk / "run"
    overrides = base_overrides(tiny_model_dir, out) + ["train.max_steps=4", "checkpoint.every_steps=2",
                                                        "checkpoint.min_free_gb=0", "logging.tensorboard=false"]
    real_write = SingleDevice.save_checkpoint
    filled: list[Path] = []

    def write_onto_a_full_disk(self, model, optimizer, path, async_save=False):
        if ckpt.list_checkpoints(path.parent):  # the second save: someone else fills the disk meanwhile
            filled.append(fill(small_disk))
        return real_write(self, model, optimizer, path, async_save=async_save)

    monkeypatch.setattr(SingleDevice, "save_checkpoint", write_onto_a_full_disk)
    with pytest.raises(ckpt.SaveFailed) as failure:
        train(load_config(None, overrides))
    message = str(failure.value)
    assert "checkpoint of step 4 failed: no space left on the device" in message
    assert "earlier checkpoints are untouched" in message and "--resume auto" in message
    root = ckpt.checkpoint_root(out)
    assert [p.name for p in root.iterdir() if p.name != "latest"] == ["step_00000002"]  # no partial files
    assert ckpt.verify(root / "step_00000002") is None
    assert not (out / "final").exists()

    monkeypatch.undo()
    filled[0].unlink()  # space is freed
    result = train(load_config(None, overrides + ["checkpoint.resume=auto"]))
    assert result.step == 4 and (out / "final" / "config.json").is_file()
    assert ckpt.find_resumable(out).name == "step_00000004"
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
