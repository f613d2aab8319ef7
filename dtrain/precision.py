"""The compute precision of a run's forward passes (`train.precision`).

A module of its own, torch only: the objectives use it, and `dtrain.config` imports the
objectives to validate a config, which must not import transformers (a typo in a config then fails
in ~2 s instead of ~6.5 s on a CPU, and the processes Ray starts to drive a run skip the model stack).
"""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for train.precision=bf16 (fp32: no autocast)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
