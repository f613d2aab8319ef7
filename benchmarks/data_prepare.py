"""Preparation throughput: `dtrain data prepare` against plain `datasets.map(batched=True)`.

Both read the same generated alpaca-style JSONL with the same tokenizer, in one process
run. The baseline is the usual way to tokenize such a file: `load_dataset("json")` and a
batched map calling `tokenizer(prompt + response)`. dtrain also normalises, checks for
boilerplate, deduplicates across splits, splits by content hash, masks the prompt, appends
EOS and writes the cache, so a ratio >= 1.0 means that all of that costs nothing extra.
(Where its time goes instead: it reads the JSONL with pyarrow.json, calls the Rust
tokenizer's batch encode without character offsets, which gives the same ids, and builds
its Arrow columns from flat arrays.)

Each repeat writes a fresh copy of the data, so neither side reuses a cache.

    python benchmarks/data_prepare.py [--rows 50000] [--num-proc 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from datasets import disable_progress_bars, load_dataset

from dtrain.config import load_config
from dtrain.data import prepare_data
from dtrain.data.formats import alpaca_prompt
from dtrain.presets import byte_tokenizer

WORDS = ("the model data train value answer number list sum compute explain short long result question "
         "write describe example token batch step loss rate").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-like lengths: many short examples and a long tail (lognormal word counts)."""
    rng = random.Random(seed)

    def words(mu: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, min(400, int(rng.lognormvariate(mu, 0.8))))))

    return [{"instruction": words(2.5), "input": words(1.5) if rng.random() < 0.4 else "", "output": words(3.5)}
            for _ in range(n)]


def count_tokens(ds) -> int:
    """Tokens in a dataset's input_ids, counted in Arrow (identical cost for both sides)."""
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(ds.with_format("arrow")["input_ids"])).as_py() or 0


def baseline(path: Path, cache: Path, num_proc: int) -> tuple[int, int]:
    tokenizer = byte_tokenizer()
    # The same work as with the default cache, written to a temporary one (not ~/.cache/huggingface).
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))

    def tokenize(batch):
        prompts = [alpaca_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        texts = [p + o for p, o in zip(prompts, batch["output"])]
        return tokenizer(texts, truncation=True, max_length=1024)

    out = ds.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names)
    return len(out), count_tokens(out)


def dtrain_prepare(path: Path, cache: Path, num_proc: int) -> tuple[int, int]:
    cfg = load_config(None, [f"data.train={path}", "data.format=alpaca", "data.max_seq_len=1024",
                             f"data.cache_dir={cache}", f"data.num_proc={num_proc}"])
    data = prepare_data(cfg.data, byte_tokenizer(), cfg.seed, use_cache=False)
    n = len(data.train) + len(data.validation) + len(data.test)
    tokens = sum(count_tokens(split) for split in (data.train, data.validation, data.test))
    return n, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of both sides, one after the other")
    args = parser.parse_args()
    disable_progress_bars()
    ratios, best = [], {"datasets.map": float("inf"), "dtrain": float("inf")}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "alpaca_like.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
            results = {}
            for name, fn in (("datasets.map", lambda: baseline(path, Path(tmp) / "hf-cache", args.num_proc)),
                             ("dtrain", lambda: dtrain_prepare(path, Path(tmp) / "cache", args.num_proc))):
                start = time.perf_counter()
                n, tokens = fn()
                elapsed = time.perf_counter() - start
                results[name] = (n, tokens, elapsed)
                best[name] = min(best[name], elapsed)
                print(f"{name:>13}: {n} examples, {tokens} tokens in {elapsed:.2f} s = {n / elapsed:,.0f} examples/s, "
                      f"{tokens / elapsed:,.0f} tokens/s")
        base, ours = results["datasets.map"], results["dtrain"]
        ratios.append((args.rows / ours[2]) / (args.rows / base[2]))
        print(f"ratio dtrain / datasets.map (examples/s, rows read): {ratios[-1]:.2f}")
    if args.repeat > 1:
        # On a shared machine the best time of each side is the least disturbed one.
        print(f"ratio over {args.repeat} runs: {min(ratios):.2f}-{max(ratios):.2f}; "
              f"of the best times: {best['datasets.map'] / best['dtrain']:.2f} "
              f"(datasets.map {best['datasets.map']:.2f} s, dtrain {best['dtrain']:.2f} s)")


if __name__ == "__main__":
    main()
