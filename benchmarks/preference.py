"""DPO throughput and memory: dtrain against TRL's DPOTrainer.

    python benchmarks/preference.py [--pairs 96] [--repeat 3] [--batch 8]

The same Llama built from config (hidden 384, 6 layers: 10.7 M parameters, the byte tokenizer
dtrain ships), the same tokenized pairs (dtrain's data stage prepares them; TRL gets the same
prompt / chosen / rejected token ids), one epoch of DPO each (sigmoid loss, beta 0.1, full
fine-tuning against a frozen copy of the starting weights), fp32 on the CPU, AdamW lr 1e-5,
constant LR, clipping at 1.0, `--batch` pairs per step. Each side runs in a process of its own,
sides interleaved (dtrain, trl, dtrain, trl, ...), so that its peak memory is its own:

  dtrain  `train(cfg)`, train.objective=dpo, with data.packing=true: a micro-batch's 2 x batch
          sequences in one row with no padding, each attending only to itself (sdpa_varlen);
  trl     `DPOTrainer` (TRL 1.16) with its collator: chosen and rejected padded to the batch's
          longest, its chunked "fused" LM head.

Useful tokens are the response tokens (chosen and rejected) that carry the loss; tokens/s is over
the training loop (dtrain: its own tokens_per_s, which covers the loop; TRL: train_runtime).
Peak memory is the process's peak resident set minus its resident set just before training.

Pairs: prompts and responses of lognormal word counts (many short, a long tail), the kind of
length variety real preference data has.
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

WORDS = ("the model data train value answer number list sum compute explain short long result question "
         "write describe example token batch step loss rate").split()
LR, BETA = 1e-5, 0.1


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(mu: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, min(200, int(rng.lognormvariate(mu, 0.9))))))

    return [{"prompt": words(2.5) + "\n", "chosen": words(3.0), "rejected": words(3.0)} for _ in range(n)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def overrides(work: Path, batch: int) -> list[str]:
    return [f"model.path={work / 'model'}", f"data.train={work / 'pairs.jsonl'}", "data.format=preference",
            "data.val_ratio=0", "data.test_ratio=0", "data.max_seq_len=1024", f"data.cache_dir={work / 'cache'}",
            "train.objective=dpo", f"preference.beta={BETA}", "preference.reference=copy", "parallel.device=cpu",
            "train.epochs=1", "train.precision=fp32", f"train.micro_batch_size={batch}", f"optim.lr={LR}",
            "optim.weight_decay=0", "optim.grad_clip=1.0", "schedule.name=constant", "logging.tensorboard=false",
            "logging.progress_bar=false", "eval.worst_examples=0", "train.log_every=1000000", "seed=0"]


def response_tokens(data) -> int:
    from dtrain.data import IGNORE_INDEX

    return sum(sum(1 for t in labels if t != IGNORE_INDEX) for split in ("labels", "rejected_labels")
               for labels in data.train[split])


# --------------------------------------------------------------------------------------
# One side, in its own process


def run_dtrain(work: Path, batch: int, out: Path) -> dict:
    from dtrain.config import load_config
    from dtrain.tracking import read_metrics
    from dtrain.train import train

    cfg = load_config(None, overrides(work, batch) + ["data.packing=true", f"output_dir={out}"])
    before = rss_bytes()
    result = train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    from dtrain.data import prepare_data
    from dtrain.presets import byte_tokenizer

    data = prepare_data(cfg.data, byte_tokenizer(), cfg.seed)
    real = sum(len(x) for x in data.train["input_ids"]) + sum(len(x) for x in data.train["rejected_ids"])
    full = result.step * batch  # (the last incomplete batch is dropped)
    share = full / len(data.train)
    last = [record for record in read_metrics(out) if "tokens_per_s" in record][-1]
    seconds = real * share / last["tokens_per_s"]
    return {"useful": round(response_tokens(data) * share), "seconds": seconds, "peak": peak, "steps": result.step,
            "loss": sum(result.train_losses) / len(result.train_losses)}  # (the epoch's mean, as TRL reports it)


def run_trl(work: Path, batch: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from dtrain.config import load_config
    from dtrain.data import prepare_data
    from dtrain.data.preference import prompt_length
    from dtrain.presets import byte_tokenizer

    cfg = load_config(None, overrides(work, batch))
    tokenizer = byte_tokenizer()
    data = prepare_data(cfg.data, tokenizer, cfg.seed)
    rows = []
    for ids, labels, rejected in zip(data.train["input_ids"], data.train["labels"], data.train["rejected_ids"]):
        n = prompt_length(labels)
        rows.append({"prompt_ids": ids[:n], "chosen_ids": ids[n:], "rejected_ids": rejected[n:]})
    dataset = Dataset.from_list(rows)  # (already tokenized: TRL's collator reads these columns)
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(out), beta=BETA, loss_type=["sigmoid"], use_cpu=True, bf16=False, report_to=[],
                     per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR, weight_decay=0.0,
                     lr_scheduler_type="constant", max_grad_norm=1.0, optim="adamw_torch", logging_steps=1_000_000,
                     save_strategy="no", max_length=None, dataloader_drop_last=True, disable_tqdm=True, seed=0)

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # (the same token ids as dtrain's: no re-tokenizing)
            return dataset

    trainer = Pretokenized(model=model, ref_model=reference, args=args, train_dataset=dataset,
                           processing_class=tokenizer)
    before = rss_bytes()
    output = trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    share = output.global_step * batch / len(rows)
    return {"useful": round(response_tokens(data) * share), "seconds": output.metrics["train_runtime"], "peak": peak,
            "steps": output.global_step, "loss": output.training_loss}


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
    result = (run_dtrain if args.side == "dtrain" else run_trl)(work, args.batch, out)
    (out.parent / f"{out.name}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
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

    work = Path(tempfile.mkdtemp(prefix="dtrain-preference-"))
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs)))
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=260,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(work / "model")
    byte_tokenizer().save_pretrained(work / "model")
    data = prepare_data(load_config(None, overrides(work, args.batch)).data, byte_tokenizer(), 0)  # (cached for both)
    lengths = [len(x) for x in data.train["input_ids"]] + [len(x) for x in data.train["rejected_ids"]]
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, fp32, {args.threads} threads")
    print(f"data: {len(data.train)} pairs, sequence tokens mean {statistics.mean(lengths):.0f}, min {min(lengths)}, "
          f"max {max(lengths)}; {response_tokens(data):,} response tokens; {args.batch} pairs per step")

    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeat):
        for side in sides:
            out = work / f"{side}-{rep}"
            proc = subprocess.run([sys.executable, str(HERE), "--side", side, "--work", str(work), "--out", str(out),
                                   "--batch", str(args.batch), "--threads", str(args.threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {side} side failed:\n{proc.stderr[-5000:]}")
            r = json.loads((work / f"{side}-{rep}.json").read_text())
            r["tps"] = r["useful"] / r["seconds"]
            results[side].append(r)
            print(f"  [{rep + 1}/{args.repeat}] {side:<6} {r['useful']:>8,} response tokens in {r['seconds']:6.1f} s = "
                  f"{r['tps']:7.0f} tok/s, peak +{r['peak'] / 2**20:6.0f} MiB ({r['steps']} steps, "
                  f"mean loss {r['loss']:.4f})", flush=True)

    print(f"\nmedian of {args.repeat}:")
    med = {s: statistics.median(r["tps"] for r in results[s]) for s in sides}
    mem = {s: statistics.median(r["peak"] for r in results[s]) for s in sides}
    for s in sides:
        print(f"  {s:<6} {med[s]:8.0f} response tokens/s   peak +{mem[s] / 2**20:.0f} MiB")
    if "dtrain" in sides and "trl" in sides:
        print(f"dtrain / trl: tokens/s x{med['dtrain'] / med['trl']:.2f}, peak memory x{mem['dtrain'] / mem['trl']:.2f}")


if __name__ == "__main__":
    main()
