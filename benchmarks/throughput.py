"""Training throughput: dtrain against Hugging Face `Trainer` and a plain PyTorch loop.

    python benchmarks/throughput.py [--examples 64] [--repeat 3] [--fixed-length]

The same Llama built from config (hidden 384, 6 layers: 10.7 M parameters, the byte
tokenizer dtrain ships), the same tokenized instruction examples, one epoch each, in one
process, sides interleaved (a, b, c, a, b, c, ...) on fresh copies of the same initial weights:

  dtrain   its real entry point, `train(cfg)`, with `data.packing: true` (examples packed into
           rows of max_seq_len, block-diagonal attention); micro-batch rows chosen so that a
           micro-batch holds about as many tokens as the others' batches;
  Trainer  `transformers.Trainer` with `DataCollatorForSeq2Seq` (pad to the batch's longest,
           labels padded with -100), no group_by_length: what its examples do;
  plain    a PyTorch loop over shuffled batches padded to the batch's longest,
           `model(input_ids, attention_mask, labels).loss.backward()`.

All three: fp32 on CPU, SDPA attention (dtrain: its default `auto`, i.e. `sdpa_varlen`, SDPA
per example on the flattened packed rows), AdamW (fused) lr 3e-4, no weight decay, constant LR,
gradient clipping at 1.0, loss on the responses only. Useful tokens are the trained (non-padding,
non-prompt) target tokens each side actually processed; tokens/s is over the training loop:
for dtrain from its own metrics (the last log line's tokens_per_s covers the whole loop), for
Trainer its `train_runtime`, for plain the loop. dtrain's end-to-end `train(cfg)` time (model
build, final checkpoint and save, reports; the data cache is built beforehand, as by `dtrain
data prepare`) is printed too.

Data: alpaca-style rows with lognormal word counts (many short, a long tail, like Alpaca),
truncated to max_seq_len (1024) by dtrain's data stage; with --fixed-length every example has
exactly the same token count and max_seq_len is that count (one example per packed row), so
packing has nothing to gain and the ratio to plain shows dtrain's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain.config import load_config  # noqa: E402
from dtrain.data import IGNORE_INDEX, prepare_data  # noqa: E402
from dtrain.data.loader import BatchIterator  # noqa: E402
from dtrain.objectives import CausalLM  # noqa: E402
from dtrain.presets import byte_tokenizer  # noqa: E402
from dtrain.tracking import read_metrics  # noqa: E402

WORDS = ("the model data train value answer number list sum compute explain short long result question "
         "write describe example token batch step loss rate").split()
LR = 3e-4


def make_rows(n: int, fixed: bool, seed: int = 0) -> list[dict]:
    """Alpaca-like rows: lognormal word counts (median 7-word instructions, 40% with a short
    input, median 20-word answers, a long tail: 350 tokens median, 640 at the 90th percentile
    with the Alpaca template, byte tokens), or every example exactly the same length."""
    rng = random.Random(seed)

    def words(mu: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, min(300, int(rng.lognormvariate(mu, 0.9))))))

    if fixed:  # 4-letter words only: the same number of bytes (= tokens) in every row
        four = [w for w in WORDS if len(w) == 4]
        return [{"instruction": f"{i:06d} " + " ".join(rng.choice(four) for _ in range(10)), "input": "",
                 "output": " ".join(rng.choice(four) for _ in range(30))} for i in range(n)]
    return [{"instruction": words(2.0), "input": words(1.3) if rng.random() < 0.4 else "", "output": words(3.0)}
            for _ in range(n)]


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=260,
                       max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=True)


def base_overrides(args, model_dir: Path, data: Path, cache: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={data}", "data.format=alpaca", "data.val_ratio=0",
            "data.test_ratio=0", f"data.max_seq_len={args.max_seq_len}", f"data.cache_dir={cache}",
            "model.attn_implementation=sdpa", "parallel.device=cpu", "train.epochs=1", "train.precision=fp32",
            f"optim.lr={LR}", "optim.weight_decay=0", "optim.grad_clip=1.0", "schedule.name=constant",
            "logging.tensorboard=false", "logging.progress_bar=false", "eval.worst_examples=0", "seed=0"]


def targets_of(examples) -> int:
    """Trained target tokens (the label shift drops each example's first position)."""
    return sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for labels in examples["labels"])


# --------------------------------------------------------------------------------------
# The three sides


def run_dtrain(args, overrides: list[str], out: Path) -> dict:
    from dtrain.train import train

    # dtrain's default attention (auto: sdpa_varlen on CPU, SDPA per example on flattened packed rows).
    cfg = load_config(None, overrides + ["data.packing=true", "model.attn_implementation=auto",
                                         f"train.micro_batch_size={args.dtrain_rows}",
                                         "train.log_every=1000000", f"output_dir={out}"])
    started = time.perf_counter()
    result = train(cfg)
    end_to_end = time.perf_counter() - started
    # What the loop consumed: replay the (deterministic) batch order outside the timing.
    data = prepare_data(cfg.data, byte_tokenizer(), cfg.seed)
    batches = BatchIterator(data.train, cfg.train.micro_batch_size, 0, shuffle=True, seed=cfg.seed)
    real = useful = 0
    for _ in range(result.step):
        b = next(batches)
        useful += CausalLM().count(b)
        real += int((b["input_ids"] != 0).sum())
    last = [record for record in read_metrics(out) if "tokens_per_s" in record][-1]
    loop = real / last["tokens_per_s"]  # dtrain's own timing of the whole loop (one log window)
    return {"useful": useful, "seconds": loop, "end_to_end": end_to_end, "steps": result.step,
            "loss": result.train_losses[-1]}


def run_trainer(args, model, dataset, tokenizer, out: Path) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=LR,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        optim="adamw_torch_fused", logging_steps=1_000_000, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator)
    output = trainer.train()
    return {"useful": targets_of(dataset), "seconds": output.metrics["train_runtime"],
            "steps": output.global_step, "loss": output.training_loss, "loss_kind": "mean"}


def run_plain(args, model, dataset) -> dict:
    examples = list(zip(dataset["input_ids"], dataset["labels"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    started = time.perf_counter()
    steps = 0
    for start in range(0, len(order), args.batch):
        batch = [examples[i] for i in order[start:start + args.batch]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids)] = torch.tensor(lab)
            mask[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    seconds = time.perf_counter() - started
    return {"useful": targets_of(dataset), "seconds": seconds, "steps": steps, "loss": loss.item()}


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fixed-length", action="store_true", help="every example the same length")
    parser.add_argument("--batch", type=int, default=8, help="examples per batch (Trainer, plain)")
    parser.add_argument("--max-seq-len", type=int, default=1024,
                        help="packed row length (with --fixed-length: the examples' length, one per row)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", default="dtrain,trainer,plain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    import logging

    logging.getLogger("dtrain").setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="dtrain-throughput-"))
    data_file = tmp / "train.jsonl"
    rows = make_rows(args.examples, args.fixed_length)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp / "model"
    initial = AutoModelForCausalLM.from_config(model_config(args), attn_implementation="sdpa")
    initial.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in initial.parameters())
    overrides = base_overrides(args, model_dir, data_file, tmp / "cache")

    # The data stage once (cached), unpacked for Trainer and plain, packed for dtrain's runs.
    cfg = load_config(None, overrides)
    plain_data = prepare_data(cfg.data, tokenizer, cfg.seed)
    if args.fixed_length:
        # Rows of exactly one example each: packing gains nothing and adds no attention work
        # (a longer row would attend over all of it), so only the loop's own cost differs.
        lengths = {len(x) for x in plain_data.train["input_ids"]}
        assert len(lengths) == 1, f"fixed-length examples have lengths {sorted(lengths)}"
        args.max_seq_len = lengths.pop()
        overrides = base_overrides(args, model_dir, data_file, tmp / "cache")
        cfg = load_config(None, overrides)
        plain_data = prepare_data(cfg.data, tokenizer, cfg.seed)
    packed_cfg = load_config(None, overrides + ["data.packing=true"])
    packed = prepare_data(packed_cfg.data, tokenizer, packed_cfg.seed)
    dataset = Dataset.from_dict({"input_ids": list(plain_data.train["input_ids"]),
                                 "labels": list(plain_data.train["labels"])})
    lengths = [len(x) for x in dataset["input_ids"]]
    mean_len = statistics.mean(lengths)
    # A dtrain micro-batch of rows holds about as many tokens as `batch` examples.
    args.dtrain_rows = max(1, round(args.batch * mean_len / args.max_seq_len))
    padded = sum(max(lengths[i:i + args.batch]) * len(lengths[i:i + args.batch]) for i in range(0, len(lengths), args.batch))
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f} M parameters, fp32, "
          f"{args.threads} threads")
    print(f"data: {len(dataset)} examples, tokens per example mean {mean_len:.0f}, min {min(lengths)}, "
          f"max {max(lengths)}; {targets_of(dataset):,} target tokens; batch {args.batch} examples "
          f"(pad-to-longest padding in dataset order: {1 - sum(lengths) / padded:.0%}); "
          f"dtrain: {len(packed.train)} packed rows of <= {args.max_seq_len}, {args.dtrain_rows} per micro-batch")

    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeat):
        for side in sides:
            out = tmp / f"{side}-{rep}"
            if side == "dtrain":
                r = run_dtrain(args, overrides, out)
            else:
                model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
                r = run_trainer(args, model, dataset, tokenizer, out) if side == "trainer" else run_plain(args, model, dataset)
            r["tps"] = r["useful"] / r["seconds"]
            results[side].append(r)
            extra = f", end-to-end train(cfg) {r['end_to_end']:.1f} s" if "end_to_end" in r else ""
            print(f"  [{rep + 1}/{args.repeat}] {side:<8} {r['useful']:>8,} useful tokens in {r['seconds']:6.1f} s "
                  f"= {r['tps']:7.0f} tok/s ({r['steps']} steps, {r.get('loss_kind', 'last')} loss {r['loss']:.3f}{extra})", flush=True)

    print(f"\nuseful (target) tokens/s, median of {args.repeat} (best):")
    med = {s: statistics.median(r["tps"] for r in results[s]) for s in sides}
    best = {s: max(r["tps"] for r in results[s]) for s in sides}
    for s in sides:
        print(f"  {s:<8} {med[s]:8.0f}  ({best[s]:.0f})")
    if "dtrain" in sides:
        for other in [s for s in sides if s != "dtrain"]:
            per_rep = [d["tps"] / o["tps"] for d, o in zip(results["dtrain"], results[other])]
            print(f"ratio dtrain/{other}: {med['dtrain'] / med[other]:.2f} (medians); per interleaved repeat "
                  f"{min(per_rep):.2f}-{max(per_rep):.2f}; best times {best['dtrain'] / best[other]:.2f}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
