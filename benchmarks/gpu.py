"""One GPU: tokens/s, MFU and peak memory of dtrain's training step, against `dtrain estimate`.

    python benchmarks/gpu.py                       # on a GPU: ~1B Llama, full and LoRA, each strategy; 8B QLoRA
    python benchmarks/gpu.py --device cpu --tiny   # smoke test of the same code paths on a CPU

Memory options (model.logits, model.gradient_checkpointing, model.activation_offloading,
model.compile), each measured on the ~1B full fine-tune (single) and on the 8B QLoRA:

    full          the whole logits (model.logits=full: dtrain before the chunked loss)
    chunked       the LM head and the loss in chunks (the default)
    +ac           and activation checkpointing
    +ac+offload   and activation offloading
    +compile      and compiled decoder blocks (1B only)

1. Peak: the device's measured bf16 matmul rate (best of several timed loops of square
   matmuls), the denominator of MFU.
2. A ~1B Llama from config (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632,
   vocab 32000: TinyLlama's shape, 1.10 B parameters), random weights, bf16 autocast, fully
   packed rows (micro-batch x seq tokens, no padding), full fine-tune and LoRA (r=16, all
   linear layers), through each strategy of dtrain at world size 1 (single, fsdp, deepspeed
   ZeRO-2/3 and the offload variants). Every case runs in its own process (a clean allocator
   and process group), the real dtrain step: build_model -> strategy.wrap -> the objective's loss ->
   strategy.backward -> strategy.optimizer_step. Warm-up steps, then timed steps.
   tokens/s = micro-batch x seq x steps / time; MFU = tokens/s x model FLOPs per token
   (`dtrain.estimate.flops_per_token`: 6N + 12 L h s, or 4N + 2N_trainable for LoRA) / peak.
   Peak memory: torch.cuda.max_memory_allocated over the timed steps, against the estimate's
   per-device total for the same shape.
3. QLoRA peak memory for a Llama-3-8B-shaped model (the llama3-8b preset) with random weights
   at seq 2048: built on the meta device, each linear layer of the blocks materialised in bf16
   and quantised to NF4 one at a time (no full-precision 8B copy ever exists), then dtrain's
   memory options and apply_peft (LoRA; embeddings and head stay bf16), then two training steps
   with activation checkpointing; the peak against the estimate for the same options.

Prints a table and writes JSON lines to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ["single", "fsdp", "zero2", "zero3", "zero2+offload", "fsdp+offload", "zero3+offload"]
OPTIONS = {
    "full": ["model.logits=full"],
    "chunked": ["model.logits=chunked"],
    "chunked+ac": ["model.logits=chunked", "model.gradient_checkpointing=true"],
    "chunked+ac+offload": ["model.logits=chunked", "model.gradient_checkpointing=true",
                           "model.activation_offloading=true"],
    "chunked+compile": ["model.logits=chunked", "model.compile=true"],
}
QLORA_OPTIONS = ["full", "chunked+ac", "chunked+ac+offload"]  # (QLoRA always checkpoints here)
DS_JSON = {"zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json",
           "zero2+offload": "ds_configs/zero2_offload.json", "zero3+offload": "ds_configs/zero3_offload.json"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, iters: int, repeats: int = 5) -> float:
    """Best measured TFLOP/s of an n x n x n bf16 matmul loop (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    del a, b, c
    return best


def llama_overrides(args) -> list[str]:
    """The model as a dtrain config: a local directory written by `make_model_dir`."""
    return [f"model.path={args.model_dir}", "model.attn_implementation=sdpa", "train.precision=bf16",
            f"train.micro_batch_size={args.batch}", f"data.max_seq_len={args.seq}", "optim.lr=1e-4",
            f"parallel.device={args.device}", "logging.tensorboard=false", "logging.progress_bar=false"]


def make_model_dir(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.presets import byte_tokenizer

    if (Path(args.model_dir) / "config.json").is_file():
        return
    if args.tiny:
        config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=260, tie_word_embeddings=False)
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                             tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device if args.device != "cpu" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.model_dir)
    byte_tokenizer().save_pretrained(args.model_dir)
    del model


def strategy_overrides(case: str) -> list[str]:
    if case == "single":
        return ["parallel.strategy=single"]
    if case.startswith("fsdp"):
        return ["parallel.strategy=fsdp", f"parallel.fsdp.cpu_offload={'true' if 'offload' in case else 'false'}"]
    return ["parallel.strategy=deepspeed", f"parallel.deepspeed_config={DS_JSON[case]}"]


def run_case(args, case: str, peft: str, option: str) -> dict:
    """One strategy x peft x memory option case, in this process: dtrain's step, timed, with peak memory."""
    from dtrain.config import load_config
    from dtrain.parallel import build_strategy

    extra = ["peft.method=lora", "peft.r=16", "peft.alpha=32", "peft.dropout=0"] if peft == "lora" else []
    cfg = load_config(None, llama_overrides(args) + strategy_overrides(case) + extra + OPTIONS[option]
                      + [f"output_dir={args.work}/run"])
    with build_strategy(cfg) as strategy:
        return {**_timed_case(args, cfg, case, peft, strategy), "option": option}


def _timed_case(args, cfg, case: str, peft: str, strategy) -> dict:
    from dtrain.estimate import estimate, flops_per_token
    from dtrain.model import load_tokenizer
    from dtrain.objectives import CausalLM
    from dtrain.optim import build_optimizer
    from dtrain.precision import autocast
    from dtrain.train import build_model

    device = strategy.device
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, None, strategy, Path(args.work))
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260 if args.tiny else 32000, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}  # full rows: no padding, no mask
    targets = args.batch * (args.seq - 1)

    def step() -> float:
        with strategy.gradient_sync(model, enabled=True):
            with autocast("bf16", device):
                loss = CausalLM().loss(model, batch) / targets
            strategy.backward(model, loss)
        strategy.optimizer_step(model, optimizer, 1.0)
        return loss.item()

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tps = args.batch * args.seq * args.steps / seconds
    est = estimate(cfg, gpus=1, gpu_memory=args.gpu_memory_bytes)
    # The estimate's row for this strategy at world size 1 (single's formula for single).
    from dtrain.estimate import STRATEGIES, model_shape, run_shape, strategy_memory

    spec = next(s for s in STRATEGIES if s.name == case)
    mem = strategy_memory(model_shape(cfg), run_shape(cfg, 1, mask=False), spec)
    fpt = flops_per_token(est.shape, args.seq, cfg.peft.method)
    return {"case": case, "peft": peft, "tokens_per_s": tps, "mfu": tps * fpt / (args.peak_tflops * 1e12),
            "flops_per_token": fpt, "peak_bytes": peak, "estimate_bytes": mem.total, "loss": loss,
            "params": est.shape.total, "trainable": est.shape.trainable}


# --------------------------------------------------------------------------------------
# QLoRA, 8B on the meta device, quantised layer by layer


def qlora_peak(args, option: str) -> dict:
    import bitsandbytes as bnb
    from torch import nn
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from dtrain.config import load_config
    from dtrain.estimate import model_shape, run_shape, strategy_memory, STRATEGIES
    from dtrain.model import apply_memory_options, keep_4bit_training_kernel
    from dtrain.objectives import CausalLM
    from dtrain.optim import build_optimizer
    from dtrain.peft import apply_peft
    from dtrain.precision import autocast
    from dtrain.presets import preset_config

    device = torch.device(args.device)
    preset = "tiny-llama" if args.tiny else "llama3-8b"
    config = preset_config(preset)
    config._attn_implementation = "sdpa"
    seq = 64 if args.tiny else 2048
    cfg = load_config(None, [f"model.path={preset}", "peft.method=qlora", "peft.r=16", "peft.alpha=32",
                             "peft.dropout=0", "model.gradient_checkpointing=true", "train.precision=bf16",
                             "model.dtype=bfloat16", f"train.micro_batch_size={1 if args.tiny else 2}",
                             f"data.max_seq_len={seq}", f"parallel.device={args.device}", *OPTIONS[option]])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # What from_pretrained(quantization_config=...) does: Linear -> Linear4bit, head kept.
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # (the weights drawn on the device: the same in every option's run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            # Params4bit quantises when it moves to the device: one layer in bf16 at a time.
            module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                              quant_storage=torch.uint8).to(device)
            del w
        else:
            for name, p in list(module.named_parameters(recurse=False)):
                value = (torch.ones if "norm" in type(module).__name__.lower() else torch.empty)(
                    p.shape, dtype=torch.bfloat16, device=device)
                if "norm" not in type(module).__name__.lower():
                    value.normal_(0, 0.02)
                setattr(module, name, nn.Parameter(value, requires_grad=p.requires_grad))
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its buffers were on meta
    model.is_loaded_in_4bit = True
    keep_4bit_training_kernel(model)
    apply_memory_options(model, cfg.model, device, preset)  # (what load_model does after loading)
    model = apply_peft(model, cfg.peft, "causal_lm", gradient_checkpointing=True)  # dtrain's QLoRA path
    model.train()
    after_load = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    optimizer = build_optimizer(model, cfg.optim)
    batch_size = cfg.train.micro_batch_size
    ids = torch.randint(4, config.vocab_size, (batch_size, seq), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    for _ in range(2):  # the second step has the optimizer state from the start
        with autocast("bf16", device):
            loss_sum = CausalLM().loss(model, batch)
        (loss_sum / (batch_size * (seq - 1))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    single = next(s for s in STRATEGIES if s.name == "single")
    mem = strategy_memory(model_shape(cfg), run_shape(cfg, 1, mask=False), single)
    return {"case": f"qlora {preset} {batch_size}x{seq}", "option": option, "peak_bytes": peak, "after_load_bytes": after_load,
            "estimate_bytes": mem.total, "estimate": {"weights": mem.weights, "gradients": mem.gradients,
                                                     "optimizer": mem.optimizer, "activations": mem.activations,
                                                     "logits": mem.logits},
            "loss": (loss_sum / (batch_size * (seq - 1))).item()}


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short sequences (smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 4; tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--pefts", default="none,lora")
    parser.add_argument("--options", default=",".join(OPTIONS), help="memory options run on single, full fine-tuning")
    parser.add_argument("--skip-qlora", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul measurement")
    parser.add_argument("--work", default=None, help="scratch directory (model, runs)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: case:peft in this process
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    import tempfile

    args.work = args.work or tempfile.mkdtemp(prefix="dtrain-gpu-bench-")
    args.model_dir = str(Path(args.work) / "model")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run with --device cpu --tiny for a smoke test")
    args.gpu_memory_bytes = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                             else 80 * 10**9)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")

    if args.one:
        case, peft, option = args.one.split(":")
        if case == "qlora":
            print("RESULT " + json.dumps(qlora_peak(args, option)))
        else:
            print("RESULT " + json.dumps(run_case(args, case, peft, option)))
        return

    if args.peak_tflops is None:
        n, iters = (8192, 50) if device.type == "cuda" else (512, 10)
        args.peak_tflops = matmul_peak(device, n, iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; measured bf16 matmul peak {args.peak_tflops:.3g} TFLOP/s; "
          f"memory {args.gpu_memory_bytes / 2**30:.1f} GiB", flush=True)
    make_model_dir(args)
    jobs = [(c, p, "chunked") for p in args.pefts.split(",") for c in args.cases.split(",")]
    jobs += [("single", "none", option) for option in args.options.split(",") if option != "chunked"]
    if not args.skip_qlora:
        jobs += [("qlora", "qlora", option) for option in QLORA_OPTIONS]
    results = []
    for case, peft, option in jobs:
        cmd = [sys.executable, __file__, "--one", f"{case}:{peft}:{option}", "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--peak-tflops", str(args.peak_tflops), "--work", args.work] + (["--tiny"] if args.tiny else [])
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(29500 + len(results) + (os.getpid() % 1000))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            oom = "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr
            r = {"case": case, "peft": peft, "option": option,
                 "error": "OOM" if oom else proc.stderr.strip().splitlines()[-1][:200]}
        else:
            r = json.loads(line[len("RESULT "):])
        r["device"], r["peak_tflops"] = name, args.peak_tflops
        results.append(r)
        print(format_row(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"  {r['case']:<14} {r.get('peft', ''):<6} {r.get('option', ''):<20} {r['error']}"
    gib = 2**30
    peak = f"{r['peak_bytes'] / gib:6.2f} GiB" if r.get("peak_bytes") else "   n/a (CPU)"
    vs = f" ({r['estimate_bytes'] / r['peak_bytes'] - 1:+.0%})" if r.get("peak_bytes") else ""
    if "tokens_per_s" not in r:
        return (f"  {r['case']:<24} {r['option']:<20} peak {peak}, estimate {r['estimate_bytes'] / gib:.2f} GiB{vs}; "
                f"loss {r['loss']:.3f}")
    return (f"  {r['case']:<14} {r['peft']:<6} {r['option']:<20} {r['tokens_per_s']:10,.0f} tok/s  MFU {r['mfu']:6.1%}  peak {peak}  "
            f"estimate {r['estimate_bytes'] / gib:6.2f} GiB{vs}  loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
