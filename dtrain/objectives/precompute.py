"""preference.precompute_reference: the reference model's log-probabilities of every row, computed
once and stored with the prepared data, so that training holds one model.

They are computed before the first step (and before a resumed run's weights are restored), by
the reference the config names: the policy with its adapters switched off; for a full
fine-tune the policy itself, which still holds the weights it starts from (or, when
preference.reference_model names another model, that model, loaded for the pass and let go).
Every rank scores its share of each split and the values are gathered. They are written into
the prepared data's cache entry, under a key of everything that changes them (the data, the
reference's files, dtype, precision and attention), atomically; a later run of the same config
(a resumed one, or a search's trials) reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dtrain.data.loader import eval_batches, to_device
from dtrain.objectives.base import frozen_copy
from dtrain.objectives.reference import REFERENCE, Reference, reference_mode
from dtrain.precision import autocast

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.objectives.preference import PreferenceObjective

SPLITS = ("train", "validation", "test")


def reference_key(objective: "PreferenceObjective", cfg: Any) -> str:
    """What the stored values depend on besides the data: the reference's weights (files, or a
    preset and the seed that initialises it), how it runs, and which sequences are scored."""
    from dtrain.presets import is_preset

    mode = reference_mode(cfg)
    path = cfg.preference.reference_model or cfg.model.path
    h = hashlib.sha256()
    h.update(json.dumps([objective.name, mode, path, cfg.model.dtype, cfg.model.attn_implementation,
                         cfg.train.precision, cfg.peft.method, cfg.peft.quant_type, cfg.peft.double_quant,
                         cfg.seed if is_preset(path) else None]).encode())
    if not is_preset(path):
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            stat = f.stat()
            h.update(f"{f.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def attach_reference_logps(objective: "PreferenceObjective", data: "PreparedData", model: nn.Module,
                           strategy: Any, pad_id: int) -> "PreparedData":
    cfg = objective.cfg
    comm = strategy.comm
    if data.cache_path is None:
        raise RuntimeError("preference.precompute_reference needs the prepared data's cache entry")
    entry = Path(data.cache_path) / f"reference-{reference_key(objective, cfg)}"
    stored = comm.broadcast_object((entry / "done").is_file() if comm.is_main else None)
    if stored:
        values = {split: dict(np.load(entry / f"{split}.npz")) for split in SPLITS}
    else:
        values = compute(objective, data, model, strategy, pad_id)
        if comm.is_main:
            write_entry(entry, values)
        comm.barrier()
    splits = {}
    for split in SPLITS:
        dataset = getattr(data, split)
        for name, column in values[split].items():
            dataset = dataset.add_column(name, column.tolist())
        splits[split] = dataset
    return dataclasses.replace(data, **splits)


@torch.no_grad()
def compute(objective: "PreferenceObjective", data: "PreparedData", model: nn.Module, strategy: Any,
            pad_id: int) -> dict[str, dict[str, np.ndarray]]:
    """Every row's reference log-probabilities, by split and name (on every rank)."""
    cfg, comm = objective.cfg, strategy.comm
    mode, other = reference_mode(cfg), cfg.preference.reference_model
    loaded = None
    if mode == "copy" and other is not None and other != cfg.model.path:
        from dtrain.model import load_frozen_model, load_tokenizer

        loaded = strategy.wrap_frozen(load_frozen_model(frozen_copy(cfg, other), REFERENCE, load_tokenizer(cfg.model),
                                                        num_labels=None, seed=cfg.seed, device=strategy.device))
        reference = Reference("copy", loaded)
    elif mode == "copy":  # the policy, before its first step: the weights it starts from
        reference = Reference("copy", model)
    else:
        reference = Reference("adapters_disabled")
    names = objective.reference_columns
    training = model.training
    model.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        for split in SPLITS:
            rows = getattr(data, split)
            found: dict[int, list[float]] = {}
            for batch in eval_batches(rows, cfg.eval.batch_size or cfg.train.micro_batch_size, pad_id,
                                      rank=comm.data_rank, world_size=comm.data_size):
                index = batch["index"].tolist()
                batch = to_device(batch, comm.device)
                with autocast(cfg.train.precision, comm.device):
                    scored = objective.reference_rows(model, batch, reference)
                columns = [scored[name].float().cpu().tolist() for name in names]
                found.update({i: [column[row] for column in columns] for row, i in enumerate(index) if i >= 0})
            gathered: dict[int, list[float]] = {}
            for part in comm.all_gather_object(found):
                gathered.update(part)
            table = np.array([gathered[i] for i in range(len(rows))], dtype=np.float32).reshape(len(rows), len(names))
            out[split] = {name: table[:, k] for k, name in enumerate(names)}
    finally:
        model.train(training)
        del loaded
    return out


def write_entry(entry: Path, values: dict[str, dict[str, np.ndarray]]) -> None:
    """The values as one .npz per split in `entry`, all or nothing (a temporary directory renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        for split, columns in values.items():
            np.savez(tmp / f"{split}.npz", **columns)
        (tmp / "done").write_text("")
        if entry.exists():  # (a stale, incomplete one: no `done` in it)
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
