"""Knowledge distillation: does a small student learn more from a teacher than from the data alone?

    python benchmarks/distill.py [--student-rows 150 --student-steps 150 --alphas 0.5,0.9]

Everything runs through dtrain's ordinary training entry (`dtrain.train.train`), in one
session, on the arithmetic instructions shipped in examples/data:

1. teacher: the `tiny-llama` preset (4 layers, hidden 128) trained on 1500 rows;
2. student: a 2-layer, hidden-64 Llama with the same byte tokenizer, trained on only the
   first `--student-rows` of those rows, once without a teacher (alpha 0) and once per alpha
   with the teacher (distill.teacher = the teacher's final/ directory);
3. every run is evaluated on the same 300 held-out rows (no run, teacher included, trains
   on them), with the plain task loss (cross-entropy on the answer tokens).

Prints each student's best validation loss and the gain over the student without a teacher.
Same seed, data order, steps, schedule and optimizer for every student: only the loss differs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dtrain.config import load_config
from dtrain.tracking import read_metrics
from dtrain.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "arithmetic_alpaca.jsonl"
TRAIN_ROWS, VALIDATION_ROWS = 1500, 300


def write_rows(rows: list[str], path: Path) -> Path:
    path.write_text("".join(rows))
    return path


def build_student(path: Path) -> Path:
    """A model half as deep and half as wide as the teacher, sharing its (byte) tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.presets import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(name: str, work: Path, overrides: list[str]) -> dict:
    cfg = load_config(None, [
        "data.format=alpaca", f"data.validation={work / 'validation.jsonl'}", "data.test_ratio=0",
        "data.max_seq_len=256", f"data.cache_dir={work / 'cache'}", "schedule.name=cosine",
        "schedule.warmup_steps=10", "train.micro_batch_size=16", "train.log_every=10", "eval.every_steps=25",
        "logging.tensorboard=false", "logging.progress_bar=false", "seed=7",
        f"output_dir={work / name}", *overrides])
    start = time.perf_counter()
    result = train(cfg)
    evals = [record for record in read_metrics(work / name) if "eval_loss" in record]
    return {"best": min(e["eval_loss"] for e in evals), "final": evals[-1]["eval_loss"],
            "seconds": time.perf_counter() - start, "path": result.output_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-rows", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--alphas", default="0.5,0.9", help="distill.alpha values to try (0 = no teacher is always run)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = DATA.read_text().splitlines(keepends=True)
        teacher_data = write_rows(rows[:TRAIN_ROWS], work / "teacher_train.jsonl")
        student_data = write_rows(rows[:args.student_rows], work / "student_train.jsonl")
        write_rows(rows[TRAIN_ROWS:TRAIN_ROWS + VALIDATION_ROWS], work / "validation.jsonl")
        student = build_student(work / "student_init")

        teacher = run("teacher", work, ["model.path=tiny-llama", f"data.train={teacher_data}", "optim.lr=3e-3",
                                        f"train.max_steps={args.teacher_steps}"])
        print(f"teacher (tiny-llama, {TRAIN_ROWS} rows, {args.teacher_steps} steps): "
              f"best eval_loss {teacher['best']:.4f} ({teacher['seconds']:.0f} s)", flush=True)

        student_args = [f"model.path={student}", f"data.train={student_data}", "optim.lr=3e-3",
                        f"train.max_steps={args.student_steps}"]
        baseline = run("student_alone", work, student_args)
        print(f"student alone ({args.student_rows} rows, {args.student_steps} steps): best eval_loss "
              f"{baseline['best']:.4f}, final {baseline['final']:.4f} ({baseline['seconds']:.0f} s)", flush=True)
        for alpha in [float(a) for a in args.alphas.split(",")]:
            got = run(f"student_alpha{alpha}", work, student_args + [
                f"distill.teacher={teacher['path']}/final", f"distill.alpha={alpha}",
                f"distill.temperature={args.temperature}"])
            print(f"student + teacher (alpha {alpha}, T {args.temperature}): best eval_loss {got['best']:.4f} "
                  f"({baseline['best'] - got['best']:+.4f} vs alone, ratio {got['best'] / baseline['best']:.3f}), "
                  f"final {got['final']:.4f} ({got['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
