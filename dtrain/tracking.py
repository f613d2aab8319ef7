"""Where metrics go: metrics.jsonl (always), TensorBoard, W&B, and a progress bar.

Only the main process tracks; other ranks get a tracker that does nothing. metrics.jsonl is
written and read only through this module: one JSON object per line, each with its `step`
(training lines: loss, lr, grad_norm, ...; evaluation lines: eval_*). A line torn by a killed
process is skipped when read, and dropped when a resumed run truncates the file.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from dtrain.schema import Config

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # GRPO: prompts, completions and rewards of some steps


def _lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:  # the torn last line of a killed process
            continue
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl, in order ([] when there is none)."""
    return [record for _, record in _lines(Path(run_dir) / METRICS_FILE)]


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a run's samples.jsonl."""
    return [record for _, record in _lines(Path(run_dir) / SAMPLES_FILE)]


def append_samples(run_dir: str | Path, records: list[dict[str, Any]]) -> None:
    """Append records (each with its "step") to samples.jsonl, one line each, in one write."""
    with open(Path(run_dir) / SAMPLES_FILE, "a") as f:
        f.write("".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in records))


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records logged after `step` (a resumed run is about to produce them again), from
    metrics.jsonl and samples.jsonl."""
    for name in (METRICS_FILE, SAMPLES_FILE):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept = [line for line, record in _lines(path) if record["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class Tracker:
    def __init__(self, cfg: Config, *, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        self.jsonl = open(out / METRICS_FILE, "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events after the starting step belong to an attempt that is being redone.
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=initial_step + 1)
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, dir=str(out), config=cfg.public_dict(),
                name=out.name, resume="allow", id=f"{out.name}-{cfg.fingerprint()}",
            )
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                       file=sys.stderr, disable=None)  # (None: off when stderr is not a terminal)
            self.bar = None if bar.disable else bar

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step",)}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """A logged step: on the progress bar, or (no terminal: a SLURM log, `| tee`, CI; or
        logging.progress_bar off) as one plain line."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()
        else:
            self.message(f"step {step}/{self.total_steps}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (a step that logged nothing)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
        self.enabled = False  # (closing twice is harmless)
