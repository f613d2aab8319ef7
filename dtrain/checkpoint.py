"""Resumable, sharded checkpoints, written atomically.

    output_dir/checkpoints/
        step_00000100/
            dcp/                trainable parameters + optimizer state (torch.distributed.checkpoint):
                                each rank writes its own shard; loads at any world size (single, ddp, fsdp)
            deepspeed/          or: the DeepSpeed engine's checkpoint (ZeRO partitions)
            trainer_state.pt    step, scheduler, data position, early stopping (tensors and numbers only)
            rng/rank_00000.pt   each rank's RNG states (Python, NumPy, torch, CUDA)
            manifest.json       size and sha256 of every file above, step, world size, strategy
                                and the run's config; written last
        latest                  name of the newest complete checkpoint, replaced last

Every rank writes into one hidden temporary directory; once all have finished, the main
rank writes the manifest and renames the directory into place, then replaces `latest`.
A crash at any moment therefore leaves the previous checkpoints untouched, and a
directory whose files do not match its manifest is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from dtrain.config import Config
    from dtrain.parallel import Strategy

log = logging.getLogger(__name__)

STATE_FILE, MANIFEST_FILE, RNG_DIR = "trainer_state.pt", "manifest.json", "rng"
PREFIX = "step_"
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


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


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


# --------------------------------------------------------------------------------------
# RNG


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


# --------------------------------------------------------------------------------------
# Compatibility: what a checkpoint must agree on with the run that resumes it


def compatibility(cfg: "Config") -> dict[str, Any]:
    """Config values that make a checkpoint's tensors mean something: the model and its adapters.
    (LR, steps, batch size and the like may change on resume; the data position checks the data.)"""
    return {"model.path": cfg.model.path, "model.task": cfg.model.task, "model.dtype": cfg.model.dtype,
            **{f"peft.{k}": v for k, v in cfg.peft.model_dump(mode="json").items()},
            "deepspeed": cfg.parallel.strategy == "deepspeed"}


def check_compatible(path: Path, manifest: dict[str, Any], cfg: "Config") -> None:
    saved, current = manifest.get("compatibility", {}), compatibility(cfg)
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not differ:
        return
    if differ == ["deepspeed"]:
        saved_kind = "a DeepSpeed engine checkpoint" if saved.get("deepspeed") else "a torch.distributed checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is {saved_kind}, which parallel.strategy={cfg.parallel.strategy} cannot resume; "
            f"resume with the strategy family it was written by, or turn it into a model with "
            f"`dtrain checkpoint consolidate {path}` and start from that")
    details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}" for k in differ)
    raise CheckpointError(f"checkpoint {path} belongs to a different model or adapter ({details}); "
                          "resume it with the config it was written with, or start a new output_dir")


# --------------------------------------------------------------------------------------
# Save


def save_checkpoint(root: Path, step: int, *, strategy: "Strategy", model: "nn.Module", optimizer: "Optimizer",
                    trainer_state: dict[str, Any], cfg: "Config", keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically (collective: every rank calls it)."""
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    if strategy.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of the same step
        (tmp / RNG_DIR).mkdir(parents=True)
    strategy.barrier()

    strategy.save_checkpoint(model, optimizer, tmp)  # each rank writes its shard
    _torch_save(rng_state(), tmp / RNG_DIR / f"rank_{strategy.rank:05d}.pt")
    if strategy.is_main:
        _torch_save({**trainer_state, "step": step}, tmp / STATE_FILE)
    strategy.barrier()

    # Checksums in parallel: rank r hashes every world_size-th file.
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    mine = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
            for f in files[strategy.rank::strategy.world_size]}
    hashed = {f: meta for part in strategy.all_gather_object(mine) for f, meta in part.items()}

    if strategy.is_main:
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": strategy.world_size,
                    "strategy": strategy.name, "compatibility": compatibility(cfg), "config": cfg.to_dict(),
                    "files": {f: hashed[f] for f in files}}
        _write_json_atomic(tmp / MANIFEST_FILE, manifest)
        _fsync(tmp)
        if final.exists():  # same step saved again (e.g. after a resume): swap it out safely
            stale = root / f".stale-{name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        _fsync(root)
        _write_json_atomic(root / "latest", {"checkpoint": name, "step": step})
        _prune(root, keep_last)
    strategy.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    for path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in list(root.glob(".tmp-*")) + list(root.glob(".stale-*")):  # from crashed saves
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Find, verify, load


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, oldest first (not verified)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest; CheckpointError with the reason when there is no usable one."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError("no manifest (incomplete save)") from None
    except json.JSONDecodeError:
        raise CheckpointError("manifest is not valid JSON") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"written by another dtrain version (format {manifest.get('format', 1)}, "
                              f"this one reads {FORMAT_VERSION})")
    return manifest


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return str(exc)
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
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    return None


def load_checkpoint(path: Path, *, strategy: "Strategy", model: "nn.Module", optimizer: "Optimizer",
                    cfg: "Config") -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path` (collective); returns the
    trainer state (scheduler, data position, loop state). Refuses a damaged or foreign checkpoint."""
    problem = verify(path) if strategy.is_main else None
    problem = strategy.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    manifest = read_manifest(path)
    check_compatible(path, manifest, cfg)
    strategy.load_checkpoint(model, optimizer, path)
    trainer_state = torch.load(path / STATE_FILE, weights_only=True)
    rng_file = path / RNG_DIR / f"rank_{strategy.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # a rank the saving run did not have (resumed at a larger world size)
        log.warning("checkpoint %s has no RNG state for rank %d (saved at world size %d): seeding it afresh",
                    path, strategy.rank, manifest["world_size"])
    trainer_state["world_size"] = manifest["world_size"]
    return trainer_state


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds, as full fp32 CPU tensors keyed by parameter
    name, from either format (torch.distributed or DeepSpeed ZeRO), in one process."""
    if (path / "dcp").is_dir():
        return read_state(path)["model"]
    engine_dir = path / "deepspeed"
    if not engine_dir.is_dir():
        raise CheckpointError(f"{path} is not a dtrain checkpoint (no dcp/ or deepspeed/ inside)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Reassembles the fp32 master partitions of every rank (DeepSpeed's zero_to_fp32).
    frozen_excluded = read_manifest(path)["compatibility"].get("peft.method", "none") != "none"
    state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="state",
                                                     exclude_frozen_parameters=frozen_excluded)
    return {name: tensor.float() for name, tensor in state.items()}


def read_state(path: Path) -> dict[str, Any]:
    """A torch.distributed checkpoint read whole into this process, as plain CPU tensors:
    {"model": {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}.
    For inspection and `dtrain checkpoint consolidate`; resuming goes through load_checkpoint."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not (path / "dcp").is_dir():
        raise CheckpointError(f"checkpoint {path} holds no torch.distributed checkpoint (dcp/)")
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent here
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        return _load_state_dict_from_keys(checkpoint_id=str(path / "dcp"))
