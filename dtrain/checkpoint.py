"""Resumable checkpoints, written atomically.

    output_dir/checkpoints/
        step_00000100/
            model.safetensors   trainable parameters (frozen ones come from model.path)
            optimizer.pt        optimizer state (tensors and numbers only: loaded weights_only)
            trainer_state.pt    step, scheduler, data position, early stopping, RNG states
            manifest.json       size and sha256 of each file above, written last
        latest                  name of the newest complete checkpoint, replaced last

A checkpoint is built in a hidden temporary directory and renamed into place only when
every file and the manifest are on disk, so a crash at any moment leaves the previous
checkpoints untouched; a directory whose manifest does not match is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors", "optimizer.pt", "trainer_state.pt", "manifest.json",
)
PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync(tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict,
    trainer_state: dict[str, Any], keep_last: int,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # contiguous copies: safetensors refuses views that share storage
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save({**trainer_state, "step": step}, tmp / STATE_FILE)
    files = {}
    for fname in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        _fsync(tmp / fname)
        files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
    _write_json_atomic(tmp / MANIFEST_FILE, {"step": step, "files": files})
    _fsync(tmp)
    if final.exists():  # same step saved again (e.g. after a resume): swap it out safely
        stale = root / f".stale-{name}-{os.getpid()}"
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    _fsync(root)
    _write_json_atomic(root / "latest", {"checkpoint": name, "step": step})
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = list_checkpoints(root)
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # from a crashed save of an earlier process
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, oldest first (not verified)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete, else what is wrong."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    for fname, meta in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{fname} has {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if checksums and _sha256(f) != meta["sha256"]:
            return f"{fname} checksum mismatch"
    return None


def find_resumable(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint in output_dir; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(checkpoint_root(output_dir))):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """(model state, optimizer state, trainer state); refuses an incomplete checkpoint."""
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    model_state = load_file(path / MODEL_FILE)
    optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    trainer_state = torch.load(path / STATE_FILE, weights_only=True)
    return model_state, optimizer_state, trainer_state
