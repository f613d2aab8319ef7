"""Learning curves and a short written diagnosis of how a run went.

At the end of every run (and with `dtrain report RUN`) the run directory gets
learning_curves.png (training and validation loss, and the chosen metric, against steps)
and diagnosis.md: underfitting, overfitting or a good fit, with the numbers behind the
verdict and the best checkpoint. The rules, on the training loss smoothed over ~5% of the
run and the validation loss:

- overfitting: the validation loss rose from its minimum by more than 2% (and 0.01) while the
  training loss kept falling; the step where it turned is named.
- underfitting: the training loss is flat (it fell by less than 2% over the run: nothing is
  being learned, e.g. LR 0 or everything frozen), or it is still falling steeply at the end
  (the last 20% of the run brought more than 10% of the whole improvement: it still falls at
  half its average rate or more).
- a good fit otherwise: both curves have flattened; the generalisation gap is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtrain.tracking import read_metrics

RISE, FLAT, TAIL, STEEP = 0.02, 0.02, 0.2, 0.1


@dataclass
class Diagnosis:
    verdict: str  # overfitting | underfitting | good fit | not enough data
    reason: str
    turn_step: int | None = None  # overfitting: where the validation loss was lowest
    gap: float | None = None  # validation minus training loss at the end


def smooth(values: list[float]) -> list[float]:
    """Trailing moving average over ~5% of the points (at least 1)."""
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def diagnose(train: list[tuple[int, float]], validation: list[tuple[int, float]]) -> Diagnosis:
    """Verdict on (step, loss) curves: see the module docstring for the rules."""
    if len(train) < 5:
        return Diagnosis("not enough data", f"only {len(train)} training loss points were logged")
    steps = [s for s, _ in train]
    curve = smooth([v for _, v in train])
    start, end = curve[0], curve[-1]
    if len(validation) >= 3:
        best = min(range(len(validation)), key=lambda i: validation[i][1])
        turn_step, lowest = validation[best]
        last_step, last = validation[-1]
        train_at_turn = curve[max(i for i, s in enumerate(steps) if s <= turn_step)] if turn_step >= steps[0] else start
        if best < len(validation) - 1 and last - lowest > max(RISE * abs(lowest), 0.01) and end < train_at_turn:
            return Diagnosis(
                "overfitting",
                f"the validation loss fell to {lowest:.4f} at step {turn_step}, then rose to {last:.4f} by step "
                f"{last_step} while the training loss kept falling ({train_at_turn:.4f} -> {end:.4f}): stop "
                "earlier (early stopping, the best checkpoint), add data or regularisation", turn_step=turn_step)
    gap = validation[-1][1] - end if validation else None
    drop = start - end
    if drop < FLAT * abs(start):
        return Diagnosis("underfitting", f"the training loss is flat ({start:.4f} -> {end:.4f}): the model is not "
                         "learning; check the learning rate, what is frozen, and the data", gap=gap)
    tail_start = curve[int((1 - TAIL) * (len(curve) - 1))]
    if tail_start - end > STEEP * drop:
        return Diagnosis("underfitting", f"the training loss is still falling steeply at the end: the last "
                         f"{TAIL:.0%} of the run brought {100 * (tail_start - end) / drop:.0f}% of its improvement "
                         f"({start:.4f} -> {end:.4f}); train longer or raise the learning rate", gap=gap)
    gap_text = f"; generalisation gap (validation - training) {gap:+.4f}" if gap is not None else ""
    return Diagnosis("good fit", f"the training loss has flattened ({start:.4f} -> {end:.4f}) and the validation "
                     f"loss did not turn up{gap_text}", gap=gap)


def read_curves(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[int, dict]]:
    train, validation, evals = [], [], {}
    for record in read_metrics(run):
        if isinstance(record.get("loss"), float):
            train.append((record["step"], record["loss"]))
        if isinstance(record.get("eval_loss"), float):
            validation.append((record["step"], record["eval_loss"]))
            evals[record["step"]] = record
    return train, validation, evals


def best_checkpoint(run: Path, evals: dict[int, dict], metric: str, mode: str) -> str:
    key = f"eval_{metric}"
    scored = [(record[key], step) for step, record in evals.items() if isinstance(record.get(key), (int, float))]
    if not scored:
        return "no evaluation was logged"
    value, step = (min if mode == "min" else max)(scored)
    path = run / "checkpoints" / f"step_{step:08d}"
    kept = f"checkpoint {path}" if path.is_dir() else "not kept on disk (set checkpoint.keep_best to keep it)"
    return f"step {step}, {key}={value:.4f}: {kept}"


def plot(run: Path, train: list, validation: list, evals: dict, metric: str, diagnosis: Diagnosis) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", alpha=0.3, label="training loss")
        ax.plot([s for s, _ in train], smooth([v for _, v in train]), color="tab:blue", label="training loss (smoothed)")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", color="tab:orange", label="validation loss")
    if diagnosis.turn_step is not None:
        ax.axvline(diagnosis.turn_step, color="tab:red", linestyle="--", label=f"validation turns (step {diagnosis.turn_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    key = f"eval_{metric}"
    if metric not in ("loss",) and any(isinstance(r.get(key), (int, float)) for r in evals.values()):
        other = ax.twinx()
        points = sorted((s, r[key]) for s, r in evals.items() if isinstance(r.get(key), (int, float)))
        other.plot([s for s, _ in points], [v for _, v in points], "s-", color="tab:green", label=key)
        other.set_ylabel(key)
        other.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"{run.name}: {diagnosis.verdict}")
    fig.tight_layout()
    path = run / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_learning_report(run: Path, metric: str = "loss", mode: str = "min") -> str:
    """learning_curves.png and diagnosis.md for the run in `run`; returns the diagnosis text."""
    train, validation, evals = read_curves(run)
    diagnosis = diagnose(train, validation)
    picture = plot(run, train, validation, evals, metric, diagnosis)
    text = (f"# How the run went\n\n**{diagnosis.verdict}**: {diagnosis.reason}.\n\n"
            f"- best checkpoint (by eval_{metric}): {best_checkpoint(run, evals, metric, mode)}\n"
            f"- learning curves: {picture.name}\n")
    if (run / "worst_examples.md").is_file():
        text += "- the validation examples with the highest loss: worst_examples.md\n"
    (run / "diagnosis.md").write_text(text)
    return text
