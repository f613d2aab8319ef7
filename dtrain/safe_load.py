"""Reading checkpoints without running code from them.

A checkpoint is a set of pickles: torch.distributed.checkpoint's `.metadata` (read by torch with
plain `pickle.load`), the non-tensor values inside its `.distcp` files (read with
`torch.load(weights_only=False)`), and DeepSpeed's engine files (`torch.load(weights_only=False)`
inside DeepSpeed). Any of them can name an arbitrary callable, which unpickling calls: a
checkpoint copied from shared storage could run code on `--resume` or `checkpoint consolidate`.
The sha256 manifest is no defence (whoever writes the pickle rewrites the manifest too).

So dtrain reads them all through allow-lists:
  - DCP metadata with `RestrictedUnpickler` (the dataclasses of torch.distributed.checkpoint's
    metadata, torch sizes and dtypes, builtin containers, nothing else);
  - DCP's non-tensor values with `torch.load(weights_only=True)`;
  - DeepSpeed's files, which DeepSpeed insists on loading unrestricted, are each loaded first
    with `torch.load(weights_only=True)` and the few plain-data classes DeepSpeed stores in them
    (`scan_torch_files`): a file that names anything else is refused before DeepSpeed opens it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file names a class or function that plain data never needs. (Not a
    CheckpointError: this module sits below dtrain.checkpoint, which imports it.)"""


# What a DCP `.metadata` pickle may name: module -> names. The dataclasses of DCP's metadata and
# what they hold (sizes, dtypes, layouts by name, the checkpoint's path); constructing any of them
# runs no code of the file's choosing. Anything else is refused.
_DCP_METADATA_GLOBALS: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch": {"Size", *(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))},
    "torch.serialization": {"_get_layout"},  # (a lookup of torch.strided & co. by name)
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in an allow-list."""

    def __init__(self, file: Any, allowed: dict[str, set[str]], *, source: str) -> None:
        super().__init__(file)
        self.allowed = allowed
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} names {module}.{name}, which a checkpoint never holds: refusing to load it "
            "(a crafted pickle runs code when it is loaded)")


def load_dcp_metadata(file: Any, source: str) -> Any:
    return RestrictedUnpickler(file, _DCP_METADATA_GLOBALS, source=source).load()


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through the allow-list instead of `pickle.load`
    (the rest of torch's read_metadata, kept as is)."""

    refusal: UnsafeCheckpointError | None = None  # (DCP wraps errors; dcp_load raises this one instead)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as metadata_file:
            try:
                metadata = load_dcp_metadata(metadata_file, str(path))
            except UnsafeCheckpointError as exc:
                self.refusal = exc
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    """Non-tensor values (learning rates, betas, step counts) read weights-only, where torch's
    planners use torch.load(weights_only=False)."""

    refusal: UnsafeCheckpointError | None = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refusal = UnsafeCheckpointError(
                f"the checkpoint's value for {read_item.dest_index.fqn} is not plain data; refusing to load "
                f"it (a crafted pickle runs code when it is loaded): {_first_line(exc)}")
            raise self.refusal from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """dcp.load into an existing state dict (resuming)."""


class SafeEmptyLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """dcp.load that rebuilds the whole state dict from the metadata (consolidating, inspecting)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def dcp_load(state: dict[str, Any], checkpoint: Path, *, no_dist: bool, whole: bool = False) -> None:
    """dcp.load of the checkpoint directory `checkpoint` into `state` (in place), through the safe
    reader and planner. `whole`: rebuild every entry from the metadata into an empty `state`
    (one process, for consolidating). A refused file raises UnsafeCheckpointError, not the
    CheckpointException DCP wraps it in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(checkpoint)
    if (checkpoint / ".metadata").is_file():
        # Refused here, before DCP reads it: DCP would log the refusal with a traceback as it
        # falls back to per-rank metadata.
        reader.read_metadata()
    planner = SafeEmptyLoadPlanner() if whole else SafeLoadPlanner()
    try:
        if whole:  # (what torch's _load_state_dict_from_keys does)
            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
        else:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # (CheckpointException is a BaseException)
        # This rank's refusal, or another rank's, which DCP gathers into its CheckpointException.
        gathered = [failure[0] for failure in getattr(exc, "failures", {}).values()]
        refusal = reader.refusal or planner.refusal or next(
            (e for e in gathered if isinstance(e, UnsafeCheckpointError)), None)
        if refusal is not None:
            raise refusal from None
        raise


# --------------------------------------------------------------------------------------
# DeepSpeed


def _deepspeed_safe_globals() -> list[Any]:
    """The plain-data classes DeepSpeed writes into its engine and optimizer files."""
    import argparse
    import collections

    safe: list[Any] = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set, frozenset]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        safe += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # an older or newer DeepSpeed: its files are judged on plain data alone
        pass
    return safe


def refuse_unsafe_files(folder: Path, comm: Any) -> None:
    """(collective) The main rank scans every `*.pt` under `folder` (scan_torch_files); every rank
    raises UnsafeCheckpointError if one holds more than plain data."""
    problem = None
    if comm.is_main:
        try:
            scan_torch_files(sorted(folder.rglob("*.pt")))
        except UnsafeCheckpointError as exc:
            problem = str(exc)
    problem = comm.broadcast_object(problem)
    if problem is not None:
        raise UnsafeCheckpointError(problem)


def scan_torch_files(paths: Iterable[Path]) -> None:
    """Load each file weights-only (plus DeepSpeed's plain-data classes); raise
    UnsafeCheckpointError naming the first file that holds anything else."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in paths:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(
                    f"{path} holds more than plain data ({_first_line(exc)}); refusing to load it, since DeepSpeed "
                    "would unpickle it unrestricted (a crafted pickle runs code when it is loaded)") from None
