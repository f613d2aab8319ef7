"""Several dtrain trainings in one torchrun job (on CPU, start-up dominates a 2-process run).

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py SPEC.json OUT_DIR

SPEC.json: {"config": null, "base": [overrides], "runs": {name: [overrides]}, "dump": false}; each
run trains as the config file (if any) with the base and its own overrides, in OUT_DIR/<name> (an
override `output_dir=...` picks another directory). Every rank writes
OUT_DIR/rank<r>.json with, per run: the losses, final metrics and state bytes `train`
returned, its wall time, how many times this rank built the prepared data, or the configuration error.
Any other exception ends the job with its traceback.

With "dump": true, every checkpoint save and every resume also writes the full (gathered)
trainable parameters and Adam moments, as the strategy holds them at that moment, to
<output_dir>/values_saved_<step>.pt and values_loaded_<step>.pt (rank 0): what the
resharding tests compare.

With "count": {"step": k, "runs": [names]}, those runs also report the bytes this rank's
collectives send during optimizer step k, and the step's micro-batch shapes
(benchmarks/mesh_comm.py's counter): what the communication estimate is checked against.
With "gathered": {"step": k, "runs": [names]} (DeepSpeed ZeRO-3 runs), the most parameter
elements held gathered at once during step k (benchmarks/zero3_gathered.py's measure).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # (last: its scripts shadow nothing)
from mesh_comm import counting_step  # noqa: E402
from zero3_gathered import measuring_gathered  # noqa: E402

import dtrain.data.pipeline as pipeline
from dtrain import checkpoint as ckpt
from dtrain.config import ConfigError, load_config
from dtrain.parallel.distributed import destroy_process_group
from dtrain.train import train

# Count data builds (not cache hits) per rank: the main rank builds, the others read.
builds = {"n": 0}
_real_build = pipeline.build


def _counting_build(*args, **kwargs):
    builds["n"] += 1
    return _real_build(*args, **kwargs)



def full_values(strategy, model, optimizer) -> dict[str, torch.Tensor]:
    """Every trainable parameter and its Adam moments, whole (collective; filled on rank 0)."""
    out = {}
    engine = strategy.engine_checkpoint  # DeepSpeed: the values live in the engine's (ZeRO) optimizer
    if engine and strategy.shards_parameters:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, p in strategy.unwrap(model).named_parameters():
            if p.requires_grad:
                out[f"param/{name}"] = safe_get_full_fp32_param(p).cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).cpu().clone()
        return out
    if engine:
        # ZeRO-1/2: each rank holds one contiguous slice of every group's flat fp32 master and
        # its Adam moments; concatenated in rank order they are the group's parameters, in order.
        zero = model.optimizer
        names = {id(p): n for n, p in strategy.unwrap(model).named_parameters()}
        for i, group in enumerate(zero.bit16_groups):
            master = zero.single_partition_of_fp32_groups[i]
            state = zero.optimizer.state[master]
            pieces = {"param": master, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            full = {k: torch.cat(strategy.comm.all_gather_object(v.detach().cpu())) for k, v in pieces.items()}
            offset = 0
            for p in group:
                for key, flat in full.items():
                    out[f"{key}/{names[id(p)]}"] = flat[offset:offset + p.numel()].view(p.shape).clone()
                offset += p.numel()
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    for name, tensor in model_state.items():
        out[f"param/{name}"] = tensor.clone()
    for name, state in optim_state.get("state", {}).items():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = state[key].clone()
    return out


def _dump(cfg, strategy, model, optimizer, kind: str, step: int) -> None:
    values = full_values(strategy, model, optimizer)
    if strategy.comm.is_main:
        torch.save(values, Path(cfg.output_dir) / f"values_{kind}_{step}.pt")


@contextlib.contextmanager
def dumps() -> Iterator[None]:
    """Every checkpoint save and resume in the block also dumps the values (see the docstring)."""
    real_save, real_restore = ckpt.Checkpointer.save, ckpt.Checkpointer.restore

    def save(self, step, metric=None):
        real_save(self, step, metric)
        _dump(self.cfg, self.strategy, self.model, self.optimizer, "saved", step)

    def restore(self, path):
        state = real_restore(self, path)
        _dump(self.cfg, self.strategy, self.model, self.optimizer, "loaded", state["step"])
        return state

    ckpt.Checkpointer.save, ckpt.Checkpointer.restore = save, restore
    try:
        yield
    finally:
        ckpt.Checkpointer.save, ckpt.Checkpointer.restore = real_save, real_restore


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    pipeline.build = _counting_build
    # The job's process group, made here: every training below joins it (and leaves it as it was).
    dist.init_process_group("gloo")
    results = {}
    with dumps() if spec.get("dump") else contextlib.nullcontext():
        run_all(spec, out, results)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    destroy_process_group()


def run_all(spec: dict, out: Path, results: dict) -> None:
    for name, overrides in spec["runs"].items():
        before, started = builds["n"], time.perf_counter()
        try:
            cfg = load_config(spec.get("config"), spec["base"] + [f"output_dir={out / name}"] + overrides)
        except ConfigError as exc:
            results[name] = {"config_error": str(exc)}
            continue
        count, gather = spec.get("count", {}), spec.get("gathered", {})
        counted: dict = {}
        gathered: dict = {}
        with contextlib.ExitStack() as measures:
            if name in count.get("runs", ()):
                measures.enter_context(counting_step(count["step"], counted))
            if name in gather.get("runs", ()):
                measures.enter_context(measuring_gathered(gather["step"], gathered))
            result = train(cfg)
        results[name] = {"losses": result.train_losses, "final": result.final_metrics,
                         "state_bytes": result.state_bytes, "data_builds": builds["n"] - before,
                         "seconds": round(time.perf_counter() - started, 2),  # (what each run costs the suite)
                         **({"collectives": counted} if counted else {}), **({"gathered": gathered} if gathered else {})}


if __name__ == "__main__":
    main()
