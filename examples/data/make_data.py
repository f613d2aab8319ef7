"""Generate the small datasets that ship with dtrain's examples (deterministic; no download).

Arithmetic questions have answers a script can check, so a fine-tune's progress is
visible in exact-match accuracy as well as in the loss.

    python examples/data/make_data.py        # rewrites the files next to this script
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice(["+", "-"])
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    instruction = "Add the numbers." if op == "+" else "Subtract the second number from the first."
    return instruction, f"{a} {op} {b}", str(answer)


# The prompt the alpaca format renders (dtrain.data.formats.ALPACA_PROMPT_WITH_INPUT): preference data
# in the words a model fine-tuned on arithmetic_alpaca.jsonl has learned to answer.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def wrong(expr: str, answer: str, rng: random.Random) -> str:
    """A wrong answer a fine-tuned model should learn to avoid: the other operation's result (the
    sum asked for a difference, and the other way round), or off by 10 where the two agree."""
    a, op, b = expr.split()
    other = int(a) - int(b) if op == "+" else int(a) + int(b)
    return str(other if str(other) != answer and other >= 0 else int(answer) + 10)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(1234)
    alpaca = []
    for _ in range(2000):
        instruction, expr, answer = arithmetic(rng)
        alpaca.append({"instruction": instruction, "input": expr, "output": answer})
    write_jsonl(HERE / "arithmetic_alpaca.jsonl", alpaca)

    chat = []
    for _ in range(1000):
        _, expr, answer = arithmetic(rng)
        chat.append({"messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": f"What is {expr}?"},
            {"role": "assistant", "content": answer},
        ]})
    write_jsonl(HERE / "arithmetic_chat.jsonl", chat)

    write_jsonl(HERE / "arithmetic_text.jsonl",
                [{"text": f"{expr} = {answer}"} for _, expr, answer in (arithmetic(rng) for _ in range(1000))])

    with open(HERE / "compare_classification.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(1000):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            writer.writerow([f"{a} vs {b}", "first" if a > b else "second" if b > a else "equal"])
    preference_data()
    prompt_data()
    sums_data()


def preference_data() -> None:
    """arithmetic_preference.jsonl: the right answer chosen over a wrong one, two pairs for some
    prompts (a prompt's pairs must share a split); arithmetic_kto.jsonl: the same judgements
    unpaired, each answer labelled desirable or not. (Their own random stream: the files above
    stay as they were.)"""
    rng = random.Random(5678)
    pairs, judged = [], []
    for _ in range(1200):
        instruction, expr, answer = arithmetic(rng)
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=expr)
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong(expr, answer, rng)})
        if rng.random() < 0.25:  # a second pair for some prompts: the same question, a refusal rejected
            pairs.append({"prompt": prompt, "chosen": answer, "rejected": "I cannot compute that."})
        judged.append({"prompt": prompt, "completion": answer if rng.random() < 0.5 else wrong(expr, answer, rng),
                       "label": None})
        judged[-1]["label"] = judged[-1]["completion"] == answer
    write_jsonl(HERE / "arithmetic_preference.jsonl", pairs)
    write_jsonl(HERE / "arithmetic_kto.jsonl", judged)


def prompt_data() -> None:
    """arithmetic_prompt.jsonl: questions in the alpaca prompt a model fine-tuned on
    arithmetic_alpaca.jsonl answers, with the answer for a reward function to check (GRPO). (Its
    own random stream.)"""
    rng = random.Random(9012)
    rows = []
    for _ in range(800):
        instruction, expr, answer = arithmetic(rng)
        rows.append({"prompt": ALPACA_PROMPT.format(instruction=instruction, input=expr), "answer": answer})
    write_jsonl(HERE / "arithmetic_prompt.jsonl", rows)



def sums_data() -> None:
    """The arithmetic of examples/tiny_sums.yaml (SFT) and examples/tiny_grpo.yaml (GRPO after it). Every
    sum and difference of two numbers below 100 (15,050 problems) is dealt to one of two pools:
    - arithmetic_sums.jsonl: nine tenths, each once, as text rows `a + b = c`, what the SFT learns from;
    - the other tenth, never seen by the SFT, as prompts `a + b = ` with their answer: 905 in
      arithmetic_sums_prompts.jsonl (GRPO trains on them), 600 in arithmetic_sums_test.jsonl (neither
      run sees them: the held-out test of both models).
    (Their own random stream: the files above stay as they were.)"""
    rng = random.Random(3456)
    problems = [(a, op, b) for a in range(100) for b in range(100) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(problems)
    answer = lambda a, op, b: a + b if op == "+" else a - b  # noqa: E731
    held, taught = problems[:len(problems) // 10], problems[len(problems) // 10:]
    write_jsonl(HERE / "arithmetic_sums.jsonl", [{"text": f"{a} {op} {b} = {answer(a, op, b)}"} for a, op, b in taught])
    prompts = [{"prompt": f"{a} {op} {b} = ", "answer": str(answer(a, op, b))} for a, op, b in held]
    write_jsonl(HERE / "arithmetic_sums_test.jsonl", prompts[:600])
    write_jsonl(HERE / "arithmetic_sums_prompts.jsonl", prompts[600:])


if __name__ == "__main__":
    main()
