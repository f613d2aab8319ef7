"""GRPO throughput and memory: dtrain against TRL's GRPOTrainer.

    python benchmarks/grpo.py [--prompts 64] [--repeat 3] [--prompts-per-step 4] [--generations 8]

The same Llama built from config (hidden 256, 4 layers, the byte tokenizer dtrain ships), the same
prompts (word problems of lognormal lengths ending in an addition, with its answer), the same reward function (dtrain's built-in
`exact_answer`, which TRL calls as one of its own: it takes TRL's arguments), and the same
settings: `--generations` completions per prompt sampled at temperature 1 with the model's own
`generate` (KV cache, at most `--max-completion` tokens, stop at EOS), DAPO's token-level loss,
one update per batch of completions, no KL term (beta 0: no reference model), activation
checkpointing on (TRL's default; `--no-checkpointing` turns it off on both sides), fp32 on the CPU,
AdamW lr 1e-6, constant LR, clipping at 1.0, `--prompts-per-step` prompts per optimizer step,
one epoch. Each side runs in a process of its own, sides interleaved (dtrain, trl, dtrain, ...),
so that its peak memory is its own:

  dtrain  `train(cfg)`, train.objective=grpo on data.format=prompt, with data.packing=true (a
          step's prompts and completions trained as one padding-free row, variable-length
          attention; each group's prompt read once to generate, and once to train: the row holds
          the prompt once, its completions after it); the seconds are its optimizer
          steps' (rollouts included: `RunResult.train_seconds`), as TRL's `train_runtime`;
  trl     `GRPOTrainer` (TRL 1.16): prompts left-padded and completions right-padded to the
          longest of the batch, each prompt read once per completion; the seconds are its
          `train_runtime` (the loop; the model is loaded before it).

Prompts/s: prompts trained on (each with its group of completions) per second. Peak memory is the
process's peak resident set (imports, model, data and training: all of what a user's process holds). The mean completion
length of each side is printed too: both sample from the same model, so they should agree.
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
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

LR = 1e-6


WORDS = ("the model data train value answer number list sum compute explain short long result question "
         "write describe example token batch step loss rate").split()


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """Word problems of lognormal lengths (many short, a long tail, as in GSM8K-like data) ending in
    an addition, with its answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        story = " ".join(rng.choice(WORDS) for _ in range(max(1, min(120, int(rng.lognormvariate(2.8, 0.8))))))
        rows.append({"prompt": f"Question: {story}. What is {a} + {b}?\nAnswer: ", "answer": str(a + b)})
    return rows


def overrides(work: Path, args: argparse.Namespace) -> list[str]:
    return [f"model.path={work / 'model'}", f"data.train={work / 'prompts.jsonl'}", "data.format=prompt",
            "data.val_ratio=0", "data.test_ratio=0", "data.max_seq_len=1024", f"data.cache_dir={work / 'cache'}",
            "parallel.device=cpu", "train.epochs=1", "train.precision=fp32",
            f"train.micro_batch_size={args.prompts_per_step * args.generations}",
            f"grpo.num_generations={args.generations}", f"grpo.max_completion_length={args.max_completion}",
            "grpo.temperature=1.0", "grpo.loss_type=dapo", "grpo.beta=0", "grpo.samples_every=null",
            "grpo.rewards=[{function: exact_answer}]", "eval.metric=reward", f"optim.lr={LR}",
            "optim.weight_decay=0", "optim.grad_clip=1.0", "schedule.name=constant", "logging.tensorboard=false",
            "logging.progress_bar=false", "eval.worst_examples=0", "train.log_every=1", "seed=0",
            f"model.gradient_checkpointing={str(args.checkpointing).lower()}"]


# --------------------------------------------------------------------------------------
# One side, in its own process


def run_dtrain(work: Path, args: argparse.Namespace, out: Path) -> dict:
    from dtrain.config import load_config
    from dtrain.tracking import read_metrics
    from dtrain.train import train

    cfg = load_config(None, overrides(work, args) + ["data.packing=true", f"output_dir={out}"])
    result = train(cfg)
    seconds = result.train_seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [r for r in read_metrics(out) if "completion_length" in r]
    return {"prompts": result.step * args.prompts_per_step, "seconds": seconds, "peak": peak, "steps": result.step,
            "completion_length": statistics.mean(r["completion_length"] for r in steps),
            "reward": statistics.mean(r["reward"] for r in steps)}


def run_trl(work: Path, args: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from dtrain.objectives.rewards import exact_answer
    from dtrain.presets import byte_tokenizer

    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    config = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], num_train_epochs=1,
                        per_device_train_batch_size=args.prompts_per_step * args.generations,
                        num_generations=args.generations, max_completion_length=args.max_completion, temperature=1.0,
                        loss_type="dapo", beta=0.0, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
                        max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                        gradient_checkpointing=args.checkpointing,
                        disable_tqdm=True, seed=0, dataloader_drop_last=True)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=byte_tokenizer())
    output = trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logged = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"prompts": output.global_step * args.prompts_per_step, "seconds": output.metrics["train_runtime"],
            "peak": peak, "steps": output.global_step,
            "completion_length": statistics.mean(r["completions/mean_length"] for r in logged),
            "reward": statistics.mean(r["reward"] for r in logged)}


def side_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    logging.getLogger("dtrain").setLevel(logging.WARNING)
    work, out = Path(args.work), Path(args.out)
    result = (run_dtrain if args.side == "dtrain" else run_trl)(work, args, out)
    (out.parent / f"{out.name}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-completion", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="activation checkpointing off on both sides (default: on, TRL's default)")
    parser.add_argument("--sides", default="dtrain,trl")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side_main(args)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.config import load_config
    from dtrain.data import prepare_data
    from dtrain.presets import byte_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dtrain-grpo-"))
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_prompts(args.prompts)))
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=260,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(work / "model")
    byte_tokenizer().save_pretrained(work / "model")
    prepare_data(load_config(None, overrides(work, args)).data, byte_tokenizer(), 0)  # (cached for dtrain's runs)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, fp32, {args.threads} threads")
    print(f"{args.prompts} prompts, {args.prompts_per_step} per step x {args.generations} completions of at most "
          f"{args.max_completion} tokens; activation checkpointing {'on' if args.checkpointing else 'off'}")

    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeat):
        for side in sides:
            out = work / f"{side}-{rep}"
            proc = subprocess.run([sys.executable, str(HERE), "--side", side, "--work", str(work), "--out", str(out),
                                   "--prompts-per-step", str(args.prompts_per_step), "--generations",
                                   str(args.generations), "--max-completion", str(args.max_completion),
                                   "--threads", str(args.threads), *([] if args.checkpointing else ["--no-checkpointing"])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {side} side failed:\n{proc.stderr[-5000:]}")
            r = json.loads((work / f"{side}-{rep}.json").read_text())
            r["pps"] = r["prompts"] / r["seconds"]
            results[side].append(r)
            print(f"  [{rep + 1}/{args.repeat}] {side:<6} {r['prompts']} prompts in {r['seconds']:6.1f} s = "
                  f"{r['pps']:5.2f} prompts/s, peak {r['peak'] / 2**20:5.0f} MiB ({r['steps']} steps, mean "
                  f"completion {r['completion_length']:.1f} tokens, mean reward {r['reward']:.3f})", flush=True)

    print(f"\nmedian of {args.repeat}:")
    medians = {s: (statistics.median(r["pps"] for r in rs), statistics.median(r["peak"] for r in rs))
               for s, rs in results.items()}
    for side, (pps, peak) in medians.items():
        print(f"  {side:<6} {pps:6.2f} prompts/s  peak {peak / 2**20:5.0f} MiB")
    if "dtrain" in medians and "trl" in medians:
        print(f"  dtrain / TRL: x{medians['dtrain'][0] / medians['trl'][0]:.2f} prompts/s, "
              f"x{medians['dtrain'][1] / medians['trl'][1]:.2f} peak memory")


if __name__ == "__main__":
    main()
