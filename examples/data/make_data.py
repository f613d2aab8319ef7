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


if __name__ == "__main__":
    main()
