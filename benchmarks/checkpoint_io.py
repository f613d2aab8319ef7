"""Checkpoint I/O: dtrain's sharded checkpoint against torch.save / torch.load of the same state.

    python benchmarks/checkpoint_io.py [--hidden 512 --layers 8 --nproc 2 --repeat 3]

Starts itself under torchrun. A Llama built from config is sharded with FSDP2 across the
ranks and takes one AdamW step, so that the state is parameters + two moments. Then, in the
same run, on the same disk:

- sharded: dtrain's FSDP strategy saves / loads it (torch.distributed.checkpoint), every
  rank writing its own shard in parallel, fsynced (what a training checkpoint does);
- baseline: rank 0 torch.save's the same state, gathered into one full dict beforehand (the
  gather is not timed, to give the baseline its best case), fsynced too; then torch.load.

Prints MB/s of each and the ratios. Reads come after writes of the same files, so both
sides read from the page cache where it holds them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()  # the checkpoint is done when the slowest rank is
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # start ourselves under torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, *sys.argv[1:]]
        os.execv(sys.executable, cmd)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.config import ParallelConfig
    from dtrain.parallel.fsdp import FSDP

    strategy = FSDP(ParallelConfig(strategy="fsdp", device="cpu"))
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, vocab_size=32000)
    torch.manual_seed(0)
    model, optimizer = strategy.wrap(AutoModelForCausalLM.from_config(config),
                                     lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4))
    model(input_ids=torch.randint(0, 32000, (1, 64)), labels=torch.randint(0, 32000, (1, 64))).loss.backward()
    optimizer.step()
    full_model, full_optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
    full = {"model": full_model, "optimizer": full_optim}
    size = torch.tensor(float(tensor_bytes(full) if strategy.is_main else 0))
    dist.broadcast(size, 0)
    megabytes = size.item() / 1e6

    root = Path(args.dir or tempfile.gettempdir()) / f"dtrain-ckpt-bench-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}"
    times: dict[str, list[float]] = {"sharded save": [], "sharded load": [], "torch.save": [], "torch.load": []}
    for i in range(args.repeat):
        sharded, single = root / f"sharded-{i}", root / f"single-{i}.pt"
        if strategy.is_main:
            sharded.mkdir(parents=True, exist_ok=True)
        times["sharded save"].append(timed(lambda: strategy.save_checkpoint(model, optimizer, sharded)))
        times["sharded load"].append(timed(lambda: strategy.load_checkpoint(model, optimizer, sharded)))

        def save_full() -> None:
            if strategy.is_main:
                with open(single, "wb") as f:
                    torch.save(full, f)
                    f.flush()
                    os.fsync(f.fileno())

        times["torch.save"].append(timed(save_full))
        times["torch.load"].append(timed(lambda: strategy.is_main and torch.load(single, weights_only=True)))
    if strategy.is_main:
        print(f"state: {megabytes:,.0f} MB ({sum(p.numel() for p in full_model.values()) / 1e6:.1f} M parameters "
              f"+ AdamW moments), {args.nproc} ranks, {args.repeat} repeats (median)")
        rate = {name: megabytes / statistics.median(values) for name, values in times.items()}
        for name, mbps in rate.items():
            print(f"{name:>13}: {mbps:8,.0f} MB/s  (median {statistics.median(times[name]):.2f} s)")
        print(f"ratio sharded / torch.save (save): {rate['sharded save'] / rate['torch.save']:.2f}")
        print(f"ratio sharded / torch.load (load): {rate['sharded load'] / rate['torch.load']:.2f}")
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
