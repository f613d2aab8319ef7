"""Communication per optimizer step, by device mesh: `dtrain estimate`'s figure against the bytes
counted in a real run.

    python benchmarks/mesh_comm.py [--strategies] [--nproc 4 --hidden 128 --layers 4 --seq 256 --micro-batch 2]

Starts itself under torchrun (gloo on the CPU). For each mesh of 4 processes (FSDP, HSDP 2x2,
FSDP x TP 2x2, TP 2 with 2 replicas, FSDP x sequence parallel 2x2), full fine-tuning and LoRA (and
with 2 micro-batches per step, and with activation checkpointing), it trains a Llama built from
config on packed rows for 2 steps and counts every collective each rank issues during the second:
c10d's (FSDP2, DDP, DeepSpeed) and the functional ones (DTensor's: tensor and sequence parallel),
seen through a dispatch mode, as the bytes a ring algorithm makes one rank send: an all-gather,
reduce-scatter or all-to-all over n ranks sends (n-1)/n of the whole, an all-reduce twice that.
Prints per run the estimate for that step's tokens, the count (the mean over the ranks) and their
ratio. With --strategies: DDP and DeepSpeed ZeRO-1/2/3 (dtrain's ds_configs/) instead, full, LoRA
and with 2 micro-batches. tests/test_mesh.py and tests/test_distributed.py check the same counts on
their own runs (through `counting_step` and `estimated`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
MESHES = {  # name: overrides (4 processes)
    "fsdp": [],
    "hsdp 2x2": ["parallel.mesh.replicate=2", "parallel.mesh.shard=2"],
    "fsdp+tp 2x2": ["parallel.mesh.shard=2", "parallel.mesh.tensor=2"],
    "tp 2, 2 replicas": ["parallel.mesh.replicate=2", "parallel.mesh.shard=1", "parallel.mesh.tensor=2"],
    "fsdp+sp 2x2": ["parallel.mesh.shard=2", "parallel.mesh.sequence=2"],
}
LORA = ["peft.method=lora", "peft.dropout=0"]
CHECKPOINTING = ["model.gradient_checkpointing=true"]
RUNS = {**{f"{name} full": overrides for name, overrides in MESHES.items()},
        **{f"{name} lora": overrides + LORA for name, overrides in MESHES.items()},
        "hsdp 2x2 full, 2 micro-batches": MESHES["hsdp 2x2"] + ["train.grad_accum_steps=2"],
        "fsdp+tp 2x2 lora, checkpointing": MESHES["fsdp+tp 2x2"] + LORA + CHECKPOINTING,
        "fsdp+sp 2x2 full, checkpointing": MESHES["fsdp+sp 2x2"] + CHECKPOINTING}
# --strategies: the one-dimensional ones too (DDP, DeepSpeed ZeRO with dtrain's ds_configs/)
STRATEGIES = {"ddp": ["parallel.strategy=ddp"],
              **{f"zero{stage}": ["parallel.strategy=deepspeed",
                                  f"parallel.deepspeed_config={REPO}/ds_configs/zero{stage}.json"] for stage in (1, 2, 3)}}
STRATEGY_RUNS = {**{f"{name} full": overrides for name, overrides in STRATEGIES.items()},
                 **{f"{name} lora": overrides + LORA for name, overrides in STRATEGIES.items()},
                 **{f"{name} full, 2 micro-batches": overrides + ["train.grad_accum_steps=2"]
                    for name, overrides in STRATEGIES.items()}}

# c10d op -> (kind, argument holding the whole, argument holding the process group)
C10D = {
    "_allgather_base_": ("all_gather", 0, 2), "allgather_": ("all_gather", 0, 2),
    "allgather_into_tensor_coalesced_": ("all_gather", 0, 2),
    "_reduce_scatter_base_": ("reduce_scatter", 1, 2), "reduce_scatter_": ("reduce_scatter", 1, 2),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, 2),
    "allreduce_": ("all_reduce", 0, 1), "allreduce_coalesced_": ("all_reduce", 0, 1),
    "alltoall_base_": ("all_to_all", 1, 2), "alltoall_": ("all_to_all", 1, 2),
}
# functional op -> (kind, argument holding this rank's input, argument holding the group's size or name);
# an all-gather's whole is its input times the group size
FUNCTIONAL = {
    "all_gather_into_tensor": ("all_gather", 0, 1), "all_gather_into_tensor_coalesced": ("all_gather", 0, 1),
    "reduce_scatter_tensor": ("reduce_scatter", 0, 2), "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0, 2),
    "all_reduce": ("all_reduce", 0, 2), "all_reduce_": ("all_reduce", 0, 2), "all_reduce_coalesced": ("all_reduce", 0, 2),
    "all_to_all_single": ("all_to_all", 0, 3),
}
RING = {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "all_reduce": 2}


def _bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _group_size(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):  # a functional collective's group name
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(value).size()
    from torch.distributed import ProcessGroup

    return ProcessGroup.unbox(value).size()  # a c10d op's process group (as the dispatcher holds it)


class CollectiveBytes(TorchDispatchMode):
    """While active: the bytes this rank sends in collectives, by kind (ring algorithms)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        namespace, name = func.namespace, func.__name__.split(".")[0]
        if namespace == "c10d" and name in C10D:
            kind, whole, group = C10D[name]
            n, total = _group_size(args[group]), _bytes(args[whole])
        elif namespace in ("_c10d_functional", "_c10d_functional_autograd") and name in FUNCTIONAL:
            kind, local, group = FUNCTIONAL[name]
            n = _group_size(args[group])
            total = _bytes(args[local]) * (n if kind == "all_gather" else 1)
        else:
            return func(*args, **(kwargs or {}))
        self.sent[kind] += RING[kind] * (n - 1) * total // n
        self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def during_step(step: int, measure: Any) -> Iterator[None]:
    """Optimizer step `step` of every dtrain.train.train run in the block runs inside
    `measure(run, micro_batches)`, a context manager (what a benchmark measures of one step)."""
    import dtrain.train as loop

    real = loop.train_step

    def train_step(run: Any, micro_batches: list) -> Any:
        if run.state.step + 1 != step:
            return real(run, micro_batches)
        with measure(run, micro_batches):
            return real(run, micro_batches)

    loop.train_step = train_step
    try:
        yield
    finally:
        loop.train_step = real


def counting_step(step: int, into: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Count the collectives of optimizer step `step` of every dtrain.train.train run in the block:
    into["sent"] (bytes by kind), into["calls"], into["micro_batches"] (their input_ids shapes)."""

    @contextlib.contextmanager
    def count(run: Any, micro_batches: list) -> Iterator[None]:
        with CollectiveBytes() as counter:
            yield
        into.update(sent=dict(counter.sent), calls=dict(counter.calls),
                    micro_batches=[list(b["input_ids"].shape) for b in micro_batches])

    return during_step(step, count)


def worker_overrides(model: Path, out: Path, seq: int, micro_batch: int, steps: int) -> list[str]:
    """The benchmarks' training runs: `model` on the shipped alpaca rows, packed, without logs to
    TensorBoard or a progress bar, one validation batch; data cached under `out`."""
    return [f"model.path={model}", f"data.train={REPO / 'examples/data/arithmetic_alpaca.jsonl'}",
            "data.format=alpaca", "data.packing=true", f"data.max_seq_len={seq}", f"data.cache_dir={out / 'cache'}",
            f"train.micro_batch_size={micro_batch}", f"train.max_steps={steps}", "eval.max_batches=1",
            "logging.tensorboard=false", "logging.progress_bar=false"]


def save_llama(path: Path, hidden: int, layers: int, max_positions: int) -> int:
    """A Llama built from config (seeded, untied head, byte tokenizer) saved to `path`; its elements."""
    import transformers

    from dtrain.presets import byte_tokenizer

    config = transformers.LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_workers(script: str, nproc: int, out: Path) -> dict[str, Any]:
    """`script` with this command's arguments under torchrun (`--out` names the workers' directory);
    the results.json its rank 0 writes there. (`--nproc` stays here: torchrun would read it as an
    abbreviation of its own --nproc-per-node.)"""
    argv, forwarded = sys.argv[1:], []
    while argv:
        arg = argv.pop(0)
        if arg == "--nproc":
            argv.pop(0)
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    script, *forwarded, "--out", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "results.json").read_text())


def estimated(cfg: Any, world: int, micro_batches: list[list[int]]) -> int:
    """`dtrain estimate`'s bytes per device and optimizer step for `cfg`'s strategy (and mesh) at
    `world` processes, for the step's micro-batches (their input_ids shapes: packing fills rows up
    to max_seq_len, not always to it; tensor and sequence parallel pad to a multiple of their degree)."""
    from dtrain.estimate import STRATEGIES, StrategySpec, model_shape, run_shape, strategy_memory

    mesh = cfg.parallel.mesh
    if cfg.parallel.strategy == "fsdp":
        spec = StrategySpec("counted", "fsdp", "sharded", replicate=mesh.replicate, tensor=mesh.tensor,
                            sequence=mesh.sequence)
    else:
        name = cfg.parallel.strategy
        if name == "deepspeed":
            path = Path(cfg.parallel.deepspeed_config)
            path = path if path.is_absolute() or path.exists() else REPO / path
            name = f"zero{json.loads(path.read_text())['zero_optimization']['stage']}"
        spec = next(s for s in STRATEGIES if s.name == name)
    (rows, length), multiple = micro_batches[0], mesh.tensor * mesh.sequence
    run = run_shape(cfg, world, micro_batch=rows, seq=-(-length // multiple) * multiple, accum=len(micro_batches))
    return strategy_memory(model_shape(cfg), run, spec).comm


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dtrain.config import load_config
    from dtrain.train import train

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    results = {}
    for name, overrides in (STRATEGY_RUNS if args.strategies else RUNS).items():
        cfg = load_config(None, [*worker_overrides(out / "model", out, args.seq, args.micro_batch, steps=2),
                                 "parallel.strategy=fsdp", *overrides, f"output_dir={out / 'runs' / str(len(results))}"])
        counted: dict[str, Any] = {}
        with counting_step(2, counted):
            train(cfg)
        everyone = [None] * world
        dist.all_gather_object(everyone, sum(counted["sent"].values()))
        results[name] = {"estimate": estimated(cfg, world, counted["micro_batches"]), "counted": everyone,
                         "by_kind": counted["sent"], "micro_batches": counted["micro_batches"]}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--strategies", action="store_true",
                        help="DDP and ZeRO-1/2/3 (full, LoRA, 2 micro-batches) instead of the FSDP2 meshes")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)  # (the workers' directory)
    args = parser.parse_args()
    if "RANK" in os.environ:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_llama(out / "model", args.hidden, args.layers, max_positions=args.seq)
        results = run_workers(__file__, args.nproc, out)
    print(f"Llama hidden {args.hidden} x {args.layers} layers (4 heads, 2 KV heads, vocab 260), fp32, "
          f"{args.nproc} processes, packed rows of up to {args.micro_batch} x {args.seq} tokens; the second "
          "optimizer step; bytes each rank sends (ring collectives)")
    print(f"{'run':<34}{'tokens':>8}{'estimate MiB':>14}{'counted MiB':>13}{'counted/estimate':>18}  counted by kind "
          "(rank 0, MiB)")
    for name, r in results.items():
        counted = sum(r["counted"]) / len(r["counted"])
        kinds = ", ".join(f"{kind} {sent / 2**20:.3f}" for kind, sent in sorted(r["by_kind"].items()))
        tokens = sum(rows * length for rows, length in r["micro_batches"])
        print(f"{name:<34}{tokens:>8}{r['estimate'] / 2**20:>14.3f}{counted / 2**20:>13.3f}"
              f"{counted / r['estimate']:>18.3f}  {kinds}")


if __name__ == "__main__":
    main()
