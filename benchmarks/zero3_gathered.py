"""What DeepSpeed ZeRO-3 holds gathered at its peak: `dtrain estimate`'s figure (zero3_gathered)
against the parameters a real run holds.

    python benchmarks/zero3_gathered.py [--nproc 2 --hidden 128 --layers 2,4,8]

Starts itself under torchrun (gloo on the CPU, DeepSpeed's CPU accelerator). For Llamas built from
config (untied head) of each depth and each ZeRO-3 setting below, it trains 3 steps and, during the
second, after every module's forward and before every module's backward, sums the elements of the
parameters DeepSpeed holds gathered (ds_status AVAILABLE); it prints the largest sum (rank 0)
beside the estimate. Settings: dtrain's ds_configs/zero3.json (stage3_max_reuse_distance and
stage3_max_live_parameters 1e9), then that file with stage3_max_reuse_distance 0 (what the
prefetcher keeps), with the distance at 1.5 times the model's elements (what the distance keeps),
and with the distance 0 and stage3_max_live_parameters at 40% of them. tests/test_estimate.py
checks the first on its own run (through `measuring_gathered`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mesh_comm import during_step, run_workers, save_llama, worker_overrides

REPO = Path(__file__).resolve().parents[1]


def measuring_gathered(step: int, into: dict[str, Any]) -> contextlib.AbstractContextManager:
    """During optimizer step `step` of every dtrain.train.train run in the block (DeepSpeed ZeRO-3):
    into["peak"], the most parameter elements held gathered at once on this rank (sampled after each
    module's forward and before each module's backward), and into["total"], the model's elements."""

    @contextlib.contextmanager
    def measure(run: Any, micro_batches: list) -> Iterator[None]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        module = run.model.module  # (the engine's)
        params = list(module.parameters())
        peak = 0

        def sample(*_: Any) -> None:
            nonlocal peak
            peak = max(peak, sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE))

        hooks = [h for m in module.modules()
                 for h in (m.register_forward_hook(sample), m.register_full_backward_pre_hook(sample))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        into.update(peak=peak, total=sum(p.ds_numel for p in params))

    return during_step(step, measure)


def settings(total: int) -> dict[str, dict[str, float]]:
    """name -> zero_optimization keys set over dtrain's ds_configs/zero3.json."""
    return {"zero3.json": {},
            "reuse distance 0": {"stage3_max_reuse_distance": 0},
            "reuse distance 1.5P": {"stage3_max_reuse_distance": 3 * total // 2},
            "distance 0, live 0.4P": {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": int(0.4 * total)}}


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dtrain.config import load_config
    from dtrain.estimate import model_shape, zero3_gathered
    from dtrain.train import train

    dist.init_process_group("gloo")
    out, results = Path(args.out), {}
    base = json.loads((REPO / "ds_configs/zero3.json").read_text())
    for layers in args.layers.split(","):
        model = out / f"model{layers}"
        total = json.loads((model / "elements.json").read_text())
        for name, keys in settings(total).items():
            ds = json.loads(json.dumps(base))
            ds["zero_optimization"].update(keys)
            ds_path = out / f"ds-{layers}-{len(results)}.json"
            if dist.get_rank() == 0:
                ds_path.write_text(json.dumps(ds))
            dist.barrier()
            cfg = load_config(None, [*worker_overrides(model, out, seq=256, micro_batch=2, steps=3),
                                     "parallel.strategy=deepspeed", f"parallel.deepspeed_config={ds_path}",
                                     f"output_dir={out / 'runs' / str(len(results))}"])
            measured: dict[str, Any] = {}
            with measuring_gathered(2, measured):
                train(cfg)
            zero = ds["zero_optimization"]
            estimate = zero3_gathered(model_shape(cfg), int(zero["stage3_max_reuse_distance"]),
                                      int(zero["stage3_max_live_parameters"]))
            results[f"{layers} layers, {name}"] = {"estimate": estimate, **measured}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", default="2,4,8", help="the depths, comma-separated")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)  # (the workers' directory)
    args = parser.parse_args()
    if "RANK" in os.environ:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for layers in args.layers.split(","):
            elements = save_llama(out / f"model{layers}", args.hidden, int(layers), max_positions=256)
            (out / f"model{layers}" / "elements.json").write_text(str(elements))
        results = run_workers(__file__, args.nproc, out)
    print(f"Llama hidden {args.hidden} (intermediate {4 * args.hidden}, 4 heads, 2 KV heads, vocab 260, untied head), "
          f"fp32, ZeRO-3 over {args.nproc} processes; parameter elements held gathered at the peak of step 2 (rank 0)")
    print(f"{'run':<36}{'model':>11}{'estimate':>11}{'measured':>11}{'measured/estimate':>19}")
    for name, r in results.items():
        print(f"{name:<36}{r['total']:>11,}{r['estimate']:>11,}{r['peak']:>11,}{r['peak'] / r['estimate']:>19.3f}")


if __name__ == "__main__":
    main()
