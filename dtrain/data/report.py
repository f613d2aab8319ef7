"""`data_report.md` (+ PNGs): what the data stage did, and what the model will see."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

from transformers import PreTrainedTokenizerBase

from dtrain.data.formats import IGNORE_INDEX
from dtrain.data.pipeline import PreparedData


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Fraction of pad tokens when batches of `batch_size` (in order) are padded to their longest."""
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / padded if padded else 0.0


def _histogram(path: Path, series: dict[str, list[int]], title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # One filled outline per series on shared bins (not 50 bar patches each), and fixed margins
    # instead of tight_layout: the same picture in half the time, paid by every run's main rank.
    present = {name: np.asarray(values) for name, values in series.items() if len(values)}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
    if present:
        edges = np.histogram_bin_edges(np.concatenate(list(present.values())), bins=50)
        for name, values in present.items():
            ax.stairs(np.histogram(values, bins=edges)[0], edges, fill=True, alpha=0.6,
                      label=f"{name} (n={len(values)})")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _figure(data: PreparedData, path: Path, render: Callable[[Path], None]) -> None:
    """Write the figure `path`. The report's figures show the prepared data and nothing else, so
    they are rendered once and kept in its cache entry: later runs on the same data copy them
    (matplotlib costs ~0.1 s a figure, paid again by every run's main rank otherwise)."""
    cached = Path(data.cache_path) / "figures" / path.name if data.cache_path else None
    if cached is not None and cached.is_file():
        _copy_atomic(cached, path)
        return
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # (savefig picks the format by the suffix)
    render(tmp)
    os.replace(tmp, path)
    if cached is not None:
        try:
            cached.parent.mkdir(exist_ok=True)
            _copy_atomic(path, cached)
        except OSError:  # a read-only cache still serves the data; the figure is rendered next time
            pass


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")  # (runs sharing a cache may copy at once)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _bars(path: Path, counts: dict[str, list[int]], label_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(label_names))
    width = 0.8 / max(1, len(counts))
    for k, (split, values) in enumerate(counts.items()):
        total = max(1, sum(values))
        ax.bar(x + k * width, [v / total for v in values], width, label=split)
    ax.set_xticks(x + width * (len(counts) - 1) / 2, label_names)
    ax.set_ylabel("fraction of split")
    ax.set_title("label distribution per split")
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_example(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase,
                   prompt: bool = True) -> str:
    """The text exactly as tokenized, with trained spans wrapped in ⟦ ⟧ (the rest is context only;
    `prompt=False`: without the context before the first trained span)."""
    if not prompt:
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        input_ids, labels = input_ids[first:], labels[first:]
    parts, current, trained = [], [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            parts.append((trained, current))
            current = []
        current.append(token)
        trained = is_trained
    if current:
        parts.append((trained, current))
    text = "".join(
        ("⟦" + tokenizer.decode(ids) + "⟧") if is_trained else tokenizer.decode(ids) for is_trained, ids in parts
    )
    return text


def _responses(ids: list[list[int]], labels: list[list[int]]) -> list[int]:
    """Each sequence's response length: its tokens after the prompt."""
    return [sum(1 for label in row if label != IGNORE_INDEX) for row in labels]


def preference_section(data: PreparedData, out_dir: Path) -> list[str]:
    """Pairs per split and how long the responses are (chosen against rejected: a preference that
    tracks length teaches length); for unpaired data the desirable and undesirable counts."""
    train = data.train
    lines = ["## Preferences", ""]
    if "rejected_ids" in train.column_names:
        chosen, rejected = _responses(train["input_ids"], train["labels"]), _responses(
            train["rejected_ids"], train["rejected_labels"])
        longer = sum(c > r for c, r in zip(chosen, rejected))
        lines += [f"- pairs: {len(data.train)} train, {len(data.validation)} validation, {len(data.test)} test "
                  "(the pairs of one prompt are all in one split)",
                  f"- response tokens, chosen: mean {sum(chosen) / max(len(chosen), 1):.1f}, median "
                  f"{sorted(chosen)[len(chosen) // 2]}; rejected: mean {sum(rejected) / max(len(rejected), 1):.1f}, "
                  f"median {sorted(rejected)[len(rejected) // 2]}",
                  f"- the chosen response is the longer one in {100 * longer / max(len(chosen), 1):.0f}% of the pairs"]
        _figure(data, out_dir / "data_responses.png", lambda path: _histogram(
            path, {"chosen": chosen, "rejected": rejected}, "response tokens: chosen vs rejected", "tokens"))
        lines += ["", "![responses](data_responses.png)", ""]
    else:
        labels = train["label"]
        lines += [f"- judged completions: {len(labels)} train ({sum(labels)} desirable, "
                  f"{len(labels) - sum(labels)} undesirable), {len(data.validation)} validation, {len(data.test)} test",
                  ""]
    return lines


def write_report(data: PreparedData, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, batch_size: int,
                 max_seq_len: int, seed: int, samples: int = 3) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Data report", ""]
    lines += ["## Steps", "", "| step | rows out | dropped |", "|---|---|---|"]
    for step, rows, drops in data.steps:
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in drops.items() if n) or "-"
        lines.append(f"| {step} | {rows} | {dropped} |")
    lines += ["", f"Splits: {len(data.train)} train {'packed sequences' if data.packed else 'examples'}, "
              f"{len(data.validation)} validation, {len(data.test)} test.", ""]
    if data.skipped:
        lines += ["## Skipped rows", ""] + [f"- {s}" for s in data.skipped[:50]]
        if len(data.skipped) > 50:
            lines.append(f"- ... and {len(data.skipped) - 50} more")
        lines.append("")

    if "rejected_ids" in data.train.column_names or "label" in data.train.column_names and not data.label_names:
        lines += preference_section(data, out_dir)

    before = data.lengths_before_packing
    after = [len(x) for x in data.train["input_ids"]] if data.packed else []
    unpacked_pad = padding_fraction(before, batch_size)
    lines += ["## Lengths and padding", "",
              f"- tokens per example: min {min(before)}, median {sorted(before)[len(before) // 2]}, "
              f"max {max(before)} (max_seq_len {max_seq_len}); {data.truncated} examples truncated to max_seq_len",
              f"- padding when batches of {batch_size} are padded to their longest: {100 * unpacked_pad:.1f}% of tokens"]
    if data.packed:
        lines.append(f"- after packing into {len(after)} sequences: {100 * padding_fraction(after, batch_size):.1f}% "
                     f"padding ({len(before)} examples, {sum(before)} tokens)")
    _figure(data, out_dir / "data_lengths.png", lambda path: _histogram(
        path, {"examples": before, "packed sequences": after}, "training tokens per sequence", "tokens"))
    lines += ["", "![lengths](data_lengths.png)", ""]

    if data.label_names:
        counts = {}
        for split in ("train", "validation", "test"):
            c = Counter(getattr(data, split)["label"])
            counts[split] = [c.get(i, 0) for i in range(len(data.label_names))]
        lines += ["## Labels", "", "| label | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
        for i, name in enumerate(data.label_names):
            lines.append(f"| {name} | " + " | ".join(str(counts[s][i]) for s in counts) + " |")
        if data.class_weights:
            lines.append("\nClass weights for the loss: " + ", ".join(
                f"{n}={w:.3f}" for n, w in zip(data.label_names, data.class_weights)))
        _figure(data, out_dir / "data_labels.png", lambda path: _bars(path, counts, data.label_names))
        lines += ["", "![labels](data_labels.png)", ""]

    lines += ["## Samples", "", "Exactly as the model sees them; ⟦trained⟧ spans carry the loss.", ""]
    rng = random.Random(seed)
    for i in rng.sample(range(len(data.train)), min(samples, len(data.train))):
        row = data.train[i]
        if data.label_names:
            text = f"{tokenizer.decode(row['input_ids'])}  →  label {data.label_names[row['label']]!r}"
        elif "rejected_ids" in row:  # the prompt once, then both responses
            text = (render_example(row["input_ids"], row["labels"], tokenizer) + "\n--- rejected:\n"
                    + render_example(row["rejected_ids"], row["rejected_labels"], tokenizer, prompt=False))
        else:
            text = render_example(row["input_ids"], row["labels"], tokenizer)
            if "label" in row:
                text += f"\n--- {'desirable' if row['label'] else 'undesirable'}"
        lines += [f"### train[{i}]", "", "```", text, "```", ""]
    path = out_dir / "data_report.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
