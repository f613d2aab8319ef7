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

A run hands its `Checkpointer` everything that must survive a restart once (the model and
optimizer, whose shards the strategy writes, and every object with `state_dict` /
`load_state_dict`: scheduler, data position, loop state); it saves and restores exactly that
set, together with every rank's RNG, and decides when to save: every `checkpoint.every_steps`,
at the end of the run, and when the job is told to stop (SIGTERM, SIGUSR1, SIGUSR2).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from dtrain.schema import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from dtrain.parallel.base import Strategy
    from dtrain.parallel.collectives import Collectives
    from dtrain.schema import Config

log = logging.getLogger(__name__)

STATE_FILE, MANIFEST_FILE, RNG_DIR = "trainer_state.pt", "manifest.json", "rng"
PREFIX = "step_"
FORMAT_VERSION = 2
ENGINE_KEY = "deepspeed"  # the manifest's compatibility entry: written by an engine (DeepSpeed's format), or not


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` beside its final name, flush it to disk and rename it into place (readers see
    the old file or the new one, never half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


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


def compatibility(cfg: "Config", strategy: "Strategy") -> dict[str, Any]:
    """Config values that make a checkpoint's tensors mean something: the model and its adapters,
    and the format they are in. (LR, steps, batch size and the like may change on resume; the data
    position checks the data.)"""
    return {"model.path": cfg.model.path, "model.task": cfg.model.task, "model.dtype": cfg.model.dtype,
            **{f"peft.{k}": v for k, v in cfg.peft.model_dump(mode="json").items()},
            ENGINE_KEY: strategy.engine_checkpoint}


def check_compatible(path: Path, manifest: dict[str, Any], cfg: "Config", strategy: "Strategy") -> None:
    saved, current = manifest.get("compatibility", {}), compatibility(cfg, strategy)
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not differ:
        return
    if differ == [ENGINE_KEY]:
        saved_kind = "a DeepSpeed engine checkpoint" if saved.get(ENGINE_KEY) else "a torch.distributed checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is {saved_kind}, which parallel.strategy={cfg.parallel.strategy} cannot resume; "
            f"resume with the strategy family it was written by, or turn it into a model with "
            f"`dtrain checkpoint consolidate {path}` and start from that")
    details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}" for k in differ)
    raise CheckpointError(f"checkpoint {path} belongs to a different model or adapter ({details}); "
                          "resume it with the config it was written with, or start a new output_dir")


# --------------------------------------------------------------------------------------
# Save


@dataclass
class PendingSave:
    """A checkpoint whose files are being written; `finish_save` completes it."""

    step: int
    tmp: Path
    final: Path
    metric: float | None
    shards: Any = None  # the background write's future (async save), else None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_free_disk(root: Path, comm: "Collectives", min_free_gb: float) -> None:
    """Refuse to start a checkpoint that may not fit: nothing is written, nothing removed."""
    problem = None
    if comm.is_main:
        existing = list_checkpoints(root)
        needed = max(min_free_gb * 1e9, _dir_bytes(existing[-1]) if existing else 0)
        free = shutil.disk_usage(root).free
        if free < needed:
            problem = (f"only {free / 1e9:.2f} GB free in {root}, the checkpoint needs about {needed / 1e9:.2f} GB "
                       "(the last checkpoint's size, or checkpoint.min_free_gb): free some space or lower "
                       "checkpoint.keep_last; the existing checkpoints are untouched")
    problem = comm.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(problem)


def _remove_leftovers(root: Path) -> None:
    """Remove the temporary directories of saves that crashed or failed (they hold no complete
    checkpoint), so that their space counts as free; say what was removed."""
    for leftover in sorted(root.glob(".tmp-*")):
        size = _dir_bytes(leftover)
        shutil.rmtree(leftover, ignore_errors=True)
        log.warning("removed %s (%.2f GB), the unfinished save of an earlier attempt", leftover, size / 1e9)


class SaveFailed(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); its partial files are removed."""


def _save_failed(tmp: Path, step: int, exc: BaseException) -> SaveFailed:
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(exc, "errno", None) == errno.ENOSPC or shutil.disk_usage(tmp.parent).free < 1 << 20:
        reason = "no space left on the device"  # (torch.save says only "unexpected pos")
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SaveFailed(f"writing the checkpoint of step {step} failed: {reason} ({tmp.parent}); its partial files were "
                      "removed and the earlier checkpoints are untouched. Free some space (or lower "
                      "checkpoint.keep_last) and resume with --resume auto")


# What a failed write raises: OSError from Python's files, RuntimeError from torch.save's zip
# writer, CheckpointException (a BaseException) from torch.distributed.checkpoint's ranks.
_WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)


def begin_save(root: Path, step: int, *, strategy: "Strategy", model: "nn.Module", optimizer: "Optimizer",
               trainer_state: dict[str, Any], min_free_gb: float, metric: float | None = None,
               async_save: bool = False) -> PendingSave:
    """Start writing checkpoint `step` into a temporary directory (collective). With
    `async_save` the shards are written in the background and training can go on."""
    name, comm = checkpoint_name(step), strategy.comm
    final, tmp = root / name, root / f".tmp-{name}"
    if comm.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)  # before the free-space check: they are not checkpoints
    _check_free_disk(root, comm, min_free_gb)
    try:
        if comm.is_main:
            (tmp / RNG_DIR).mkdir(parents=True)
        comm.barrier()
        _torch_save(rng_state(), tmp / RNG_DIR / f"rank_{comm.rank:05d}.pt")
        if comm.is_main:
            _torch_save({**trainer_state, "step": step}, tmp / STATE_FILE)
        shards = strategy.save_checkpoint(model, optimizer, tmp, async_save=async_save)  # each rank its shard
    except _WRITE_ERRORS as exc:
        raise _save_failed(tmp, step, exc) from None
    return PendingSave(step, tmp, final, metric, shards)


def finish_save(pending: PendingSave, *, strategy: "Strategy", cfg: "Config") -> Path:
    """Wait for the shards, then manifest, rename into place, `latest`, prune (collective)."""
    comm = strategy.comm
    tmp, final, step = pending.tmp, pending.final, pending.step
    try:
        if pending.shards is not None:
            pending.shards.result()
        comm.barrier()
        _hash_and_publish(pending, strategy=strategy, cfg=cfg)
    except _WRITE_ERRORS as exc:
        raise _save_failed(tmp, step, exc) from None
    comm.barrier()
    return final


def _hash_and_publish(pending: PendingSave, *, strategy: "Strategy", cfg: "Config") -> None:
    comm = strategy.comm
    tmp, final, step = pending.tmp, pending.final, pending.step
    # Checksums in parallel: rank r hashes every world_size-th file.
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    mine = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
            for f in files[comm.rank::comm.world_size]}
    hashed = {f: meta for part in comm.all_gather_object(mine) for f, meta in part.items()}

    if comm.is_main:
        root = final.parent
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": comm.world_size,
                    "strategy": strategy.name, **strategy.checkpoint_info(),
                    "compatibility": compatibility(cfg, strategy), "config": cfg.public_dict(),
                    "metric": None if pending.metric is None else {"name": f"eval_{cfg.eval.metric}",
                                                                   "value": pending.metric, "mode": cfg.eval.mode},
                    "files": {f: hashed[f] for f in files}}
        _write_json_atomic(tmp / MANIFEST_FILE, manifest)
        _fsync(tmp)
        if final.exists():  # same step saved again (e.g. after a resume): swap it out safely
            stale = root / f".stale-{final.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        _fsync(root)
        _write_json_atomic(root / "latest", {"checkpoint": final.name, "step": step})
        _prune(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)


def save_checkpoint(root: Path, step: int, *, strategy: "Strategy", model: "nn.Module", optimizer: "Optimizer",
                    trainer_state: dict[str, Any], cfg: "Config", metric: float | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically (collective: every rank calls it)."""
    pending = begin_save(root, step, strategy=strategy, model=model, optimizer=optimizer, trainer_state=trainer_state,
                         min_free_gb=cfg.checkpoint.min_free_gb, metric=metric)
    return finish_save(pending, strategy=strategy, cfg=cfg)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PreemptionWatch:
    """SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM and cloud schedulers send before they stop a job)
    only set a flag; the ranks agree on it at the next step boundary, so that every rank saves
    the same step. A second signal, during that save say, changes nothing.

    `stop_file` (checkpoint.stop_file) is the same request for a run that signals cannot reach: a
    Ray worker or a Tune trial trains in a thread (only the main thread may take a signal) of a
    process whose SIGTERM Ray keeps for itself. Its appearance is checked at every step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, stop_file: str | None = None) -> None:
        self.received: str | None = None
        self.stop_file = stop_file
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # (Ray runs training in a thread)
            for sig in self.SIGNALS:  # a signal the handler before this one took, whose exception was lost
                getattr(signal.getsignal(sig), "raise_pending", lambda: None)()
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, comm: "Collectives") -> bool:
        """Whether any rank was signalled (collective: every rank calls it at the same step)."""
        if self.received is None and self.stop_file and os.path.exists(self.stop_file):
            self.received = f"the stop file {self.stop_file}"
        flag = torch.tensor(1.0 if self.received else 0.0, device=comm.device)
        return comm.all_reduce_max(flag).item() > 0


@dataclass
class Checkpointer:
    """The checkpoints of one run. Handed, once, everything a restart needs: the model and the
    optimizer (their shards written by the strategy) and `states`, objects with state_dict /
    load_state_dict, saved by name; with every rank's RNG these are what `save` writes and
    `restore` reads back. `step_done` applies the rule for when to save. At most one background
    (async) save is in flight: it is completed before the next one starts, and by `wait`.

    As a context manager it installs the preemption watch, and on the way out completes the
    save in flight (unless an error on some ranks only left the others behind)."""

    cfg: "Config"
    strategy: "Strategy"
    model: "nn.Module"
    optimizer: "Optimizer"
    states: dict[str, Stateful]
    last: Path | None = None  # the newest complete checkpoint written by this run
    preempted_by: str | None = None  # the signal the ranks agreed to stop on
    pending: PendingSave | None = field(default=None, repr=False)
    preemption: PreemptionWatch = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.preemption is None:
            self.preemption = PreemptionWatch(self.cfg.checkpoint.stop_file)

    @property
    def root(self) -> Path:
        return checkpoint_root(self.cfg.output_dir)

    def __enter__(self) -> "Checkpointer":
        self.preemption.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is None or getattr(exc, "on_every_rank", False):
                self.wait()
        finally:
            self.preemption.__exit__()

    def release(self) -> None:
        """Forget the stateful objects (the run is over; see Run.release)."""
        self.model = self.optimizer = None  # type: ignore[assignment]
        self.states = {}

    def restore(self, path: Path) -> dict[str, Any]:
        """Load checkpoint `path` into the model, the optimizer, every state and this rank's RNG
        (collective); returns what the trainer state file held."""
        saved = load_checkpoint(path, strategy=self.strategy, model=self.model, optimizer=self.optimizer, cfg=self.cfg)
        for name, state in self.states.items():
            state.load_state_dict(saved[name])
        return saved

    def step_done(self, step: int, *, final: bool, metric: float | None = None) -> bool:
        """After optimizer step `step` (`final`: the run ends with it): save when it is one of
        every checkpoint.every_steps, the last, or the ranks agree that a preemption signal
        came (then `preempted_by` names it and the save is complete on return). Collective.
        Whether a save was made (or, async, started)."""
        preempted = self.preemption.requested(self.strategy.comm)
        every = self.cfg.checkpoint.every_steps
        saving = bool((every and step % every == 0) or final or preempted)
        if saving:
            self.save(step, metric)
        if preempted:
            self.wait()
            self.preempted_by = self.preemption.received or "a signal to another rank"
        return saving

    def save(self, step: int, metric: float | None = None) -> None:
        self.wait()
        trainer_state = {name: state.state_dict() for name, state in self.states.items()}
        self.pending = begin_save(self.root, step, strategy=self.strategy, model=self.model, optimizer=self.optimizer,
                                  trainer_state=trainer_state, min_free_gb=self.cfg.checkpoint.min_free_gb,
                                  metric=metric, async_save=self.cfg.checkpoint.async_save)
        if not self.cfg.checkpoint.async_save:
            self.wait()

    def wait(self) -> Path | None:
        """Complete the save in flight, if any; returns the newest complete checkpoint."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.last = finish_save(pending, strategy=self.strategy, cfg=self.cfg)
        return self.last


def _prune(root: Path, keep_last: int, keep_best: int = 0) -> None:
    """Keep the newest `keep_last` checkpoints and the `keep_best` best by their eval metric."""
    complete = list_checkpoints(root)
    keep = set(complete[-keep_last:])
    if keep_best:
        scored = []
        for path in complete:
            metric = _manifest_metric(path)
            if metric is not None:
                scored.append((metric["value"] if metric["mode"] == "min" else -metric["value"], path))
        keep.update(path for _, path in sorted(scored, key=lambda item: item[0])[:keep_best])
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in list(root.glob(".tmp-*")) + list(root.glob(".stale-*")):  # from crashed saves
        shutil.rmtree(leftover, ignore_errors=True)
    kept = {path.name for path in keep}
    for converted in root.glob(".universal-*"):  # DeepSpeed conversions of pruned checkpoints
        if converted.name.removeprefix(".universal-") not in kept:
            shutil.rmtree(converted, ignore_errors=True)


def _manifest_metric(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path).get("metric")
    except CheckpointError:
        return None


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


def resume_path(cfg: "Config", comm: "Collectives") -> Path | None:
    """The checkpoint checkpoint.resume names (auto: the newest complete one in output_dir), or
    None to start afresh. The main rank looks (verifying checksums) and tells the others."""
    found = _resume_path(cfg) if comm.is_main else None
    return comm.broadcast_object(found)


def _resume_path(cfg: "Config") -> Path | None:
    spec = cfg.checkpoint.resume
    if spec is None:
        return None
    if spec == "auto":
        found = find_resumable(cfg.output_dir)
        if found is None and list_checkpoints(checkpoint_root(cfg.output_dir)):
            # Starting afresh here would mix a new run with the remains of the old one.
            raise CheckpointError(
                f"--resume auto: every checkpoint in {checkpoint_root(cfg.output_dir)} is damaged (see the warnings "
                "above), so there is nothing to resume from and nothing was changed. To start afresh, move "
                "them away or choose a new output_dir; to resume an older copy, give --resume PATH")
        if found is None:
            log.info("--resume auto: no checkpoint in %s yet, starting from scratch", cfg.output_dir)
        return found
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {spec} is not a checkpoint directory")
    problem = verify(path, checksums=False)  # (the checksums: when it is loaded, still before any write)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume: {path} is not usable: {problem}. Nothing was changed; give "
                              "another checkpoint, or --resume auto for the newest complete one in output_dir")
    return path


def load_checkpoint(path: Path, *, strategy: "Strategy", model: "nn.Module", optimizer: "Optimizer",
                    cfg: "Config") -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path` (collective); returns the
    trainer state (scheduler, data position, loop state). Refuses a damaged or foreign checkpoint."""
    comm = strategy.comm
    problem = verify(path) if comm.is_main else None
    problem = comm.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    manifest = read_manifest(path)
    check_compatible(path, manifest, cfg, strategy)
    strategy.load_checkpoint(model, optimizer, path)
    trainer_state = torch.load(path / STATE_FILE, weights_only=True)
    rng_file = path / RNG_DIR / f"rank_{comm.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # a rank the saving run did not have (resumed at a larger world size)
        log.warning("checkpoint %s has no RNG state for rank %d (saved at world size %d): seeding it afresh",
                    path, comm.rank, manifest["world_size"])
    trainer_state["world_size"] = manifest["world_size"]
    return trainer_state


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds, as full fp32 CPU tensors keyed by parameter
    name, from either format (torch.distributed or DeepSpeed ZeRO), in one process."""
    if (path / "dcp").is_dir():
        return read_state(path)["model"]
    from dtrain.parallel.deepspeed import ENGINE_DIR, read_model_state as read_engine_state

    engine_dir = path / ENGINE_DIR
    if not engine_dir.is_dir():
        raise CheckpointError(f"{path} is not a dtrain checkpoint (no dcp/ or {ENGINE_DIR}/ inside)")
    frozen_excluded = read_manifest(path)["compatibility"].get("peft.method", "none") != "none"
    return read_engine_state(engine_dir, exclude_frozen=frozen_excluded)


def read_state(path: Path) -> dict[str, Any]:
    """A torch.distributed checkpoint read whole into this process, as plain CPU tensors:
    {"model": {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}.
    For inspection and `dtrain checkpoint consolidate`; resuming goes through load_checkpoint."""
    import warnings

    from dtrain.safe_load import dcp_load

    if not (path / "dcp").is_dir():
        raise CheckpointError(f"checkpoint {path} holds no torch.distributed checkpoint (dcp/)")
    state: dict[str, Any] = {}
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent here
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp_load(state, path / "dcp", no_dist=True, whole=True)
    return state
