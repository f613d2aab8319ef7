"""Peak memory and speed of a training step with the Llama 3 vocabulary: dtrain's memory options
against dtrain with the full logits (as before model.logits existed) and Hugging Face Trainer.

    python benchmarks/memory.py [--steps 4] [--objectives causal_lm,distillation,dpo]

The model: a Llama with Llama 3's vocabulary (128,256) and a shrunk body (hidden 256, 2 layers,
intermediate 512: 66 M parameters, nearly all of them the embeddings and the head), fp32 on the
CPU, AdamW, full fine-tuning, SDPA. A step is 2 x 2048 tokens: two 2048-token examples (causal_lm,
distillation: the teacher is the same architecture with other weights), or two pairs of ~1,000-token
sequences (dpo, against a frozen copy of the starting weights). Each run is a process of its own,
so that its peak is its own: peak memory is the peak resident set minus the resident set just
before training (model, optimizer, activations, logits). Tokens per second: dtrain's own
tokens_per_s, the median over the steps after the first; Trainer's over its steps after the first
(a callback's clock). Every dtrain run trains the same batches from the same weights: its losses
are compared with the full-logits run's step by step.

  full        model.logits=full: the whole logits, their log-softmax saved for backward
  chunked     model.logits=chunked (the default): LM head and loss in chunks of 256 positions
  +ac         and model.gradient_checkpointing
  +offload    and model.activation_offloading (with checkpointing). On a CPU, host memory is
              device memory: it can only cost here; on a GPU it moves the saved inputs off it
  +compile    and model.compile (each decoder block compiled)
  trainer     transformers.Trainer on the same model and batches (causal_lm only)
  lora-*      dpo with LoRA adapters (the head frozen), the full logits and chunked; the reference
              is then the policy with its adapters off

Gradients: for each objective, the first step's loss and gradients of model.logits=full and
chunked from the same weights and batch (`--variant gradients`), as the largest difference over
the largest gradient. Later steps' losses are compared too, but AdamW divides each gradient by
its own running scale, so parameters whose gradient is nearly zero (rounding noise) move by a
whole step either way, and the curves drift apart by more than the gradients do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

VOCAB, HIDDEN, LAYERS, INTERMEDIATE, SEQ, BATCH = 128256, 256, 2, 512, 2048, 2
LR = 1e-4
VARIANTS = {  # name: dtrain overrides
    "full": ["model.logits=full"],
    "chunked": ["model.logits=chunked"],
    "chunked+ac": ["model.logits=chunked", "model.gradient_checkpointing=true"],
    "chunked+ac+offload": ["model.logits=chunked", "model.gradient_checkpointing=true",
                           "model.activation_offloading=true"],
    "chunked+compile": ["model.logits=chunked", "model.compile=true"],
    "lora-full": ["model.logits=full", "peft.method=lora", "peft.dropout=0"],
    "lora-chunked": ["model.logits=chunked", "peft.method=lora", "peft.dropout=0"],
}
OBJECTIVE_VARIANTS = {
    "causal_lm": ["full", "chunked", "chunked+ac", "chunked+ac+offload", "chunked+compile", "trainer"],
    "distillation": ["full", "chunked", "chunked+ac"],
    "dpo": ["full", "chunked", "chunked+ac", "lora-full", "lora-chunked"],
}
WORDS = ("the model data train value answer number list sum compute explain short long result question "
         "write describe example token batch step loss rate").split()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def text_of(rng: random.Random, chars: int) -> str:
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars - 1] + "."  # (no trailing space for the cleaning stage to strip: exactly `chars`)


def write_data(work: Path, steps: int) -> None:
    rng = random.Random(0)
    n = steps * BATCH
    # Byte tokenizer: one token per character, + BOS/EOS: each example exactly SEQ tokens.
    with open(work / "text.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": text_of(rng, SEQ - 2)}) + "\n")
    with open(work / "pairs.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text_of(rng, 200) + "\n", "chosen": text_of(rng, 820),
                                "rejected": text_of(rng, 820)}) + "\n")


def overrides(work: Path, objective: str, steps: int) -> list[str]:
    common = [f"model.path={work / 'model'}", "data.val_ratio=0", "data.test_ratio=0", "data.shuffle=false",
              f"data.cache_dir={work / 'cache'}", "parallel.device=cpu", f"train.max_steps={steps}",
              f"train.micro_batch_size={BATCH}", "train.precision=fp32", f"optim.lr={LR}", "optim.weight_decay=0",
              "schedule.name=constant", "logging.tensorboard=false", "logging.progress_bar=false",
              "eval.worst_examples=0", "train.log_every=1", "seed=0"]
    if objective == "dpo":
        return common + [f"data.train={work / 'pairs.jsonl'}", "data.format=preference", f"data.max_seq_len={SEQ}",
                         "train.objective=dpo", "preference.reference=copy", "data.packing=true"]
    data = [f"data.train={work / 'text.jsonl'}", "data.format=text", f"data.max_seq_len={SEQ}"]
    if objective == "distillation":
        return common + data + [f"distill.teacher={work / 'teacher'}", "distill.alpha=0.5"]
    return common + data


# --------------------------------------------------------------------------------------
# One run, in its own process


def run_dtrain(work: Path, objective: str, variant: str, steps: int, out: Path) -> dict:
    from dtrain.config import load_config
    from dtrain.tracking import read_metrics
    from dtrain.train import train

    cfg = load_config(None, overrides(work, objective, steps) + VARIANTS[variant] + [f"output_dir={out}"])
    before = rss_bytes()
    result = train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    speeds = [r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r and r.get("step", 0) > 1]
    return {"peak": peak, "tokens_per_s": statistics.median(speeds), "losses": result.train_losses}


def gradient_difference(work: Path, objective: str, steps: int, out: Path) -> dict:
    """The first step's loss and gradients, full logits against chunked, from the same weights."""
    from dtrain.config import load_config
    from dtrain.train import setup, to_device

    found = {}
    for logits in ("full", "chunked"):
        cfg = load_config(None, overrides(work, objective, steps) + [f"model.logits={logits}",
                                                                   f"output_dir={out}-{logits}"])
        with setup(cfg) as run:
            batch = to_device(next(run.batches), run.strategy.device)
            counts = run.objective.counts(batch)
            terms = run.objective.loss_terms(run.model, batch)
            loss = sum(value / max(counts[key], 1) for key, value in terms.sums.items())  # (as train_step)
            loss.backward()
            found[logits] = (loss.item(), {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None})
    (full_loss, full), (chunked_loss, chunked) = found["full"], found["chunked"]
    diff = max((full[n] - chunked[n]).abs().max().item() for n in full)
    return {"loss_diff": abs(full_loss - chunked_loss), "grad_diff": diff,
            "grad_max": max(g.abs().max().item() for g in full.values())}


def run_trainer(work: Path, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dtrain.config import load_config
    from dtrain.data import prepare_data
    from dtrain.presets import byte_tokenizer

    data = prepare_data(load_config(None, overrides(work, "causal_lm", steps)).data, byte_tokenizer(), 0)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(data.train["input_ids"], data.train["labels"])]
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_steps=steps,
                             per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=0.0,
                             lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1_000_000,
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train_dataset.set_format("torch")
    before = rss_bytes()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tokens = BATCH * SEQ
    speeds = [tokens / (b - a) for a, b in zip(times, times[1:])]
    return {"peak": peak, "tokens_per_s": statistics.median(speeds), "losses": []}


def side_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import logging

    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    logging.getLogger("dtrain").setLevel(logging.WARNING)
    work, out = Path(args.work), Path(args.out)
    if args.variant == "trainer":
        result = run_trainer(work, args.steps, out)
    elif args.variant == "gradients":
        result = gradient_difference(work, args.objective, args.steps, out)
    else:
        result = run_dtrain(work, args.objective, args.variant, args.steps, out)
    (out.parent / f"{out.name}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------


def build(work: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.presets import byte_tokenizer

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    for name, seed in (("model", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.save_pretrained(work / name)
        byte_tokenizer().save_pretrained(work / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--objectives", default=",".join(OBJECTIVE_VARIANTS))
    parser.add_argument("--variants", help="only these runs of each objective (comma-separated, e.g. "
                        "lora-full,lora-chunked); default: all")
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return side_main(args)

    work = Path(tempfile.mkdtemp(prefix="dtrain-memory-"))
    params = build(work)
    write_data(work, args.steps)
    print(f"model: Llama, vocabulary {VOCAB:,}, hidden {HIDDEN}, {LAYERS} layers, {params / 1e6:.1f} M parameters, "
          f"fp32, {args.threads} threads; a step: {BATCH} x {SEQ} tokens; {args.steps} steps, speed over steps 2-")
    for objective in args.objectives.split(","):
        results = {}
        wanted = args.variants.split(",") if args.variants else OBJECTIVE_VARIANTS[objective]
        for variant in [v for v in OBJECTIVE_VARIANTS[objective] if v in wanted]:
            out = work / f"{objective}-{variant}"
            cmd = [sys.executable, str(HERE), "--objective", objective, "--variant", variant, "--steps",
                   str(args.steps), "--threads", str(args.threads), "--work", str(work), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{objective} {variant}: failed\n{proc.stderr[-3000:]}")
                continue
            results[variant] = json.loads((work / f"{objective}-{variant}.json").read_text())
        grads = None
        cmd = [sys.executable, str(HERE), "--objective", objective, "--variant", "gradients", "--steps",
               str(args.steps), "--threads", str(args.threads), "--work", str(work), "--out",
               str(work / f"{objective}-gradients")]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            grads = json.loads((work / f"{objective}-gradients.json").read_text())
        base = results.get("full")
        print(f"\n{objective}:")
        if grads:
            print(f"  first step, chunked vs full logits: loss differs by {grads['loss_diff']:.1e}, gradients by at "
                  f"most {grads['grad_diff']:.1e} (largest gradient {grads['grad_max']:.2f})")
        print(f"  {'run':<22}{'peak MiB':>10}{'x full':>8}{'tokens/s':>10}{'x full':>8}   max |loss - full's| "
              "(lora-*: against lora-full)")
        for variant, r in results.items():
            ref = results.get("lora-full", base) if variant.startswith("lora") else base  # (LoRA against LoRA)
            ratio_mem = r["peak"] / ref["peak"] if ref else float("nan")
            ratio_speed = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            diff = (max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
                    if ref and r["losses"] else None)
            print(f"  {variant:<22}{r['peak'] / 2**20:>10.0f}{ratio_mem:>8.2f}{r['tokens_per_s']:>10.0f}"
                  f"{ratio_speed:>8.2f}   {'' if diff is None else f'{diff:.1e}'}")
    print(f"\n(work directory: {work})")


if __name__ == "__main__":
    main()
