"""Learning curves and a short written diagnosis of how a run went.

At the end of every run (and with `dtrain report RUN`) the run directory gets
learning_curves.png (training and validation loss, and the chosen metric, against steps)
and diagnosis.md: underfitting, overfitting, still improving or a good fit, with the numbers
behind the verdict and the best checkpoint; or, when the curves are too short to tell, that
plainly. The rules, on the training loss smoothed over ~5% of its points (at least 3) and the
validation loss (every threshold is in the block below, with the reason for it):

- not enough data: fewer training-loss points than a smoothed curve needs (MIN_POINTS), or, for
  a run whose training loss has flattened, fewer evaluations than it takes to tell a good fit
  from overfitting (MIN_EVALS).
- overfitting: the validation loss rose from its minimum by more than 2% (and 0.01) while the
  training loss kept falling; the step where it turned is named.
- underfitting: the training loss is flat (it fell by less than 2% over the run: nothing is
  being learned, e.g. LR 0 or everything frozen), or it is still falling steeply at the end
  (the last 20% of the run brought more than 10% of the whole improvement: it still falls at
  half its average rate or more).
- still improving: slower than that, but the end of the curve still falls clearly (more than 1%
  of the loss, and more than its noise explains), or the last evaluation was still 1% below the
  one before; training longer would likely help, so it is not yet a fit of any kind.
- a good fit otherwise: both curves have flattened; the generalisation gap is reported.

Preference runs get their reward curves read too (preference_findings): the held-out reward
margin and preference accuracy from the first evaluation to the last, a margin that peaked and
fell (over-fitting the training pairs), an accuracy still at chance, and whether the chosen
responses became more likely while the margin grew, or less (likelihood displacement: the
margin grows by pushing the rejected responses down faster than the chosen ones are kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dtrain.tracking import read_metrics

# ---- Every threshold of the diagnosis, and why.
SMOOTH_SHARE = 0.05  # the training loss is smoothed by a trailing mean over ~5% of its points ...
MIN_WINDOW = 3  # ... and never fewer than 3: one logged loss is one micro-batch's (as much noise as signal);
#                 a mean of 3 has 1/sqrt(3) of its spread
TAIL = 0.2  # "the end of the run": the last 20% of the logged points
# The tail must span a whole window, so that the smoothed loss where the tail starts and at the end
# are means of different points (else "the end still falls" compares a point with itself), and hold
# the 3 points a fitted line needs to have a scatter: MIN_WINDOW / TAIL + 1 points.
MIN_POINTS = 16
MIN_EVALS = 3  # a turn of the validation loss (down, then up) shows in 3 evaluations at the least
RISE, RISE_ABS = 0.02, 0.01  # overfitting: the validation loss rose from its minimum by > 2% (and > 0.01)
FLAT = 0.02  # underfitting: the training loss fell by less than 2% over the whole run
STEEP = 0.1  # underfitting: the tail (20% of the run) brought > 10% of the improvement: >= half the average rate
STILL = 0.01  # still improving: the loss fell by > 1% over the tail (or between the last two evaluations) ...
CLEAR = 2.0  # ... and (training loss) by more than 2 standard errors of a line fitted to the tail's raw points
#              (the evaluations need no such test: every evaluation of a run scores the same rows)


@dataclass
class Diagnosis:
    verdict: str  # overfitting | underfitting | still improving | good fit | not enough data; online RL: reward rising | flat | falling
    reason: str
    turn_step: int | None = None  # overfitting: where the validation loss was lowest
    gap: float | None = None  # validation minus training loss at the end


def points(count: int) -> str:
    return f"{count} point" + ("" if count == 1 else "s")


def smoothing_window(count: int) -> int:
    return max(MIN_WINDOW, int(count * SMOOTH_SHARE))


def smooth(values: list[float]) -> list[float]:
    """Trailing moving average over smoothing_window(len(values)) points (fewer at the start)."""
    window = smoothing_window(len(values))
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def fitted_fall(points: list[tuple[int, float]]) -> tuple[float, float]:
    """How much a least-squares line through (step, loss) `points` falls from the first step to
    the last, and the standard error of that fall (from the scatter around the line)."""
    xs, ys = [float(s) for s, _ in points], [v for _, v in points]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if n < 3 or sxx == 0:
        return 0.0, math.inf
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    span = xs[-1] - xs[0]
    return -slope * span, math.sqrt(residual / sxx) * span


def diagnose(train: list[tuple[int, float]], validation: list[tuple[int, float]]) -> Diagnosis:
    """Verdict on (step, loss) curves: see the module docstring for the rules."""
    if len(train) < MIN_POINTS:
        return Diagnosis("not enough data", f"too few training loss points to judge: {points(len(train))}; a smoothed "
                         f"curve needs at least {MIN_POINTS} (log more often with train.log_every, or train longer)")
    steps = [s for s, _ in train]
    curve = smooth([v for _, v in train])
    window = smoothing_window(len(curve))
    start, end = curve[window - 1], curve[-1]  # the means of the first and of the last `window` points
    if len(validation) >= MIN_EVALS:
        best = min(range(len(validation)), key=lambda i: validation[i][1])
        turn_step, lowest = validation[best]
        last_step, last = validation[-1]
        train_at_turn = curve[max(i for i, s in enumerate(steps) if s <= turn_step)] if turn_step >= steps[0] else start
        if best < len(validation) - 1 and last - lowest > max(RISE * abs(lowest), RISE_ABS) and end < train_at_turn:
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
    tail_index = int((1 - TAIL) * (len(curve) - 1))
    tail_start = curve[tail_index]
    if tail_start - end > STEEP * drop:
        return Diagnosis("underfitting", f"the training loss is still falling steeply at the end: the last "
                         f"{TAIL:.0%} of the run brought {100 * (tail_start - end) / drop:.0f}% of its improvement "
                         f"({start:.4f} -> {end:.4f}); train longer or raise the learning rate", gap=gap)
    fall, error = fitted_fall(train[tail_index:])
    if fall > STILL * abs(end) and fall > CLEAR * error:
        return Diagnosis("still improving", f"the training loss still falls at the end: by {fall:.4f} over the last "
                         f"{TAIL:.0%} of the run (+- {error:.4f}; {start:.4f} -> {end:.4f}); train longer before "
                         "judging the fit", gap=gap)
    if len(validation) >= 2:
        (previous_step, previous), (last_step, last) = validation[-2], validation[-1]
        if previous - last > STILL * abs(previous):
            return Diagnosis("still improving", f"the validation loss still fell at the last evaluation ({previous:.4f} "
                             f"at step {previous_step} -> {last:.4f} at step {last_step}); train longer before "
                             "judging the fit", gap=gap)
    if len(validation) < MIN_EVALS:
        return Diagnosis("not enough data", f"too few evaluations to judge: {points(len(validation))}; the training "
                         f"loss has flattened ({start:.4f} -> {end:.4f}), but telling a good fit from overfitting "
                         f"takes at least {MIN_EVALS} evaluations (set eval.every_steps)", gap=gap)
    gap_text = f"; generalisation gap (validation - training) {gap:+.4f}" if gap is not None else ""
    return Diagnosis("good fit", f"the training loss has flattened ({start:.4f} -> {end:.4f}) and the validation "
                     f"loss did not turn up{gap_text}", gap=gap)


# ---- Preference runs (dpo, ipo, simpo, orpo, kto, reward_model): what their reward curves say.
MARGIN_FALL = 0.1  # the held-out reward margin fell from its best by > 10% of it (and the accuracy did not rise)
CHANCE = 0.55  # a held-out preference accuracy at or below this is about a coin's


def preference_findings(evals: dict[int, dict]) -> list[str]:
    """Sentences about the evaluations' reward margin, preference accuracy and chosen log-probability."""
    steps = sorted(s for s, r in evals.items() if isinstance(r.get("eval_rewards_margin"), (int, float)))
    if len(steps) < 2:
        return []
    margin = [(s, evals[s]["eval_rewards_margin"]) for s in steps]
    first, last = margin[0], margin[-1]
    best_step, best = max(margin, key=lambda p: p[1])
    out = [f"reward margin on held-out pairs {first[1]:+.4f} (step {first[0]}) -> {last[1]:+.4f} (step {last[0]})"]
    accuracy = [evals[s].get("eval_rewards_accuracy") for s in steps]
    if isinstance(accuracy[-1], (int, float)):
        out[-1] += f", preference accuracy {accuracy[0]:.1%} -> {accuracy[-1]:.1%}"
        if accuracy[-1] <= CHANCE:
            out.append(f"the preference accuracy ends at {accuracy[-1]:.1%}, about chance: the model does not yet tell "
                       "the chosen responses from the rejected ones (train longer, raise the learning rate, or check "
                       "that the pairs disagree in a learnable way)")
    if best_step != last[0] and best - last[1] > MARGIN_FALL * abs(best):
        out.append(f"the held-out margin peaked at {best:+.4f} (step {best_step}) and fell since: the policy "
                   "over-fits the training pairs; stop earlier (the best checkpoint by eval_rewards_margin), lower "
                   "the learning rate or raise preference.beta")
    chosen = [evals[s].get("eval_logps_chosen") for s in steps]
    if all(isinstance(c, (int, float)) for c in chosen) and last[1] > first[1]:
        if chosen[-1] < chosen[0]:
            out.append(f"the margin grew while the chosen responses became less likely (log-probability "
                       f"{chosen[0]:.2f} -> {chosen[-1]:.2f}): the rejected ones are pushed down faster than the "
                       "chosen ones are kept (likelihood displacement); check generations, raise preference.beta or "
                       "add an SFT term (train.objective=orpo)")
        else:
            out.append(f"the chosen responses became more likely too (log-probability {chosen[0]:.2f} -> "
                       f"{chosen[-1]:.2f}): the margin grows the healthy way")
    return out


def read_curves(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[int, dict]]:
    train, validation, evals = [], [], {}
    for record in read_metrics(run):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue  # not a line dtrain wrote (the file was edited, or is another tool's)
        if isinstance(record.get("loss"), float):
            train.append((record["step"], record["loss"]))
        if isinstance(record.get("eval_loss"), float):
            validation.append((record["step"], record["eval_loss"]))
        if any(key.startswith("eval_") and isinstance(value, (int, float)) for key, value in record.items()):
            evals[record["step"]] = record  # (an online-RL run's evaluations have a reward, no loss)
    return train, validation, evals


def read_rewards(run: Path) -> list[tuple[int, float, float]]:
    """An online-RL run's (step, mean reward, fraction of groups that all scored alike) at each logged step."""
    return [(r["step"], r["reward"], r.get("frac_reward_zero_std", 0.0)) for r in read_metrics(run)
            if isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("reward"), (int, float))]


def reward_diagnosis(rewards: list[tuple[int, float, float]], evals: dict[int, dict], metric: str) -> Diagnosis:
    """An online-RL run: its loss says nothing of progress (a surrogate around 0 by construction);
    the rewards do. The training reward's mean over the first and the last 20% of the logged
    steps, the held-out metric from the first evaluation to the last, and whether the groups
    carried any signal (a group whose completions all scored alike has no advantage to learn from)."""
    if len(rewards) < MIN_POINTS:
        return Diagnosis("not enough data", f"{len(rewards)} logged rewards; the reward curve needs at least "
                                            f"{MIN_POINTS} (log more often with train.log_every, or train longer)")
    n = max(MIN_WINDOW, int(len(rewards) * TAIL))
    first, last = [r for _, r, _ in rewards[:n]], [r for _, r, _ in rewards[-n:]]
    start, end = sum(first) / n, sum(last) / n
    # A change counts when it exceeds CLEAR standard errors of the difference of the two means.
    noise = CLEAR * math.sqrt((_variance(first) + _variance(last)) / n)
    alike = sum(z for _, _, z in rewards) / len(rewards)
    reason = f"the training reward averaged {start:.4f} over the first {n} logged steps and {end:.4f} over the last {n}"
    key = f"eval_{metric}"
    scored = sorted((s, r[key]) for s, r in evals.items() if isinstance(r.get(key), (int, float)))
    if len(scored) >= 2:
        reason += f"; {key} went {scored[0][1]:.4f} (step {scored[0][0]}) -> {scored[-1][1]:.4f} (step {scored[-1][0]})"
    if alike > 0.9:
        reason += (f"; {alike:.0%} of the groups scored all alike (no signal): sample more (grpo.num_generations), "
                   "raise grpo.temperature, or add a reward that gives partial credit")
    verdict = "reward rising" if end - start > noise else "reward falling" if start - end > noise else "reward flat"
    if verdict == "reward flat":
        reason += f" (a change within the steps' scatter, {noise:.4f})"
    return Diagnosis(verdict, reason)


def _variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)


def best_checkpoint(run: Path, evals: dict[int, dict], metric: str, mode: str) -> str:
    key = f"eval_{metric}"
    scored = [(record[key], step) for step, record in evals.items() if isinstance(record.get(key), (int, float))]
    if not scored:
        return "no evaluation was logged"
    value, step = (min if mode == "min" else max)(scored)
    path = run / "checkpoints" / f"step_{step:08d}"
    kept = f"checkpoint {path}" if path.is_dir() else "not kept on disk (set checkpoint.keep_best to keep it)"
    return f"step {step}, {key}={value:.4f}: {kept}"


def plot(run: Path, train: list, validation: list, evals: dict, metric: str, diagnosis: Diagnosis,
         ylabel: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", alpha=0.3, label=f"training {ylabel}")
        ax.plot([s for s, _ in train], smooth([v for _, v in train]), color="tab:blue",
                label=f"training {ylabel} (smoothed)")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", color="tab:orange", label="validation loss")
    if diagnosis.turn_step is not None:
        ax.axvline(diagnosis.turn_step, color="tab:red", linestyle="--", label=f"validation turns (step {diagnosis.turn_step})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    key = f"eval_{metric}"
    if metric == "loss" and any(isinstance(r.get("eval_rewards_margin"), (int, float)) for r in evals.values()):
        key = "eval_rewards_margin"  # (a preference run: the margin says more than a second loss)
    if key != "eval_loss" and any(isinstance(r.get(key), (int, float)) for r in evals.values()):
        other = ax.twinx()
        points = sorted((s, r[key]) for s, r in evals.items() if isinstance(r.get(key), (int, float)))
        other.plot([s for s, _ in points], [v for _, v in points], "s-", color="tab:green", label=key)
        other.set_ylabel(key)
        other.legend(loc="upper center")
    if ax.get_legend_handles_labels()[0]:  # (an empty metrics file: no curve, no legend, no warning)
        ax.legend(loc="upper right")
    ax.set_title(f"{run.name}: {diagnosis.verdict}")
    # Fixed margins, not tight_layout (which costs more than drawing): room for a right axis.
    fig.subplots_adjust(left=0.08, right=0.9 if len(fig.axes) > 1 else 0.97, top=0.92, bottom=0.12)
    path = run / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_learning_report(run: Path, metric: str = "loss", mode: str = "min") -> str:
    """learning_curves.png and diagnosis.md for the run in `run`; returns the diagnosis text."""
    train, validation, evals = read_curves(run)
    rewards = read_rewards(run)
    diagnosis = reward_diagnosis(rewards, evals, metric) if rewards else diagnose(train, validation)
    picture = plot(run, [(s, r) for s, r, _ in rewards] if rewards else train, validation, evals, metric, diagnosis,
                   ylabel="reward" if rewards else "loss")
    text = (f"# How the run went\n\n**{diagnosis.verdict}**: {diagnosis.reason}.\n\n"
            f"- best checkpoint (by eval_{metric}): {best_checkpoint(run, evals, metric, mode)}\n"
            f"- learning curves: {picture.name}\n")
    last_eval = evals[max(evals)] if evals else {}
    if last_eval.get("eval_sampled"):
        text += (f"- the validation metrics are on a seeded sample of {last_eval.get('eval_examples')} of the "
                 f"{last_eval.get('eval_examples_total')} validation examples, the same rows at every evaluation "
                 "(eval.max_batches)\n")
    if (run / "worst_examples.md").is_file():
        text += "- the validation examples with the highest loss: worst_examples.md\n"
    text += "".join(f"- preferences: {finding}\n" for finding in preference_findings(evals))
    (run / "diagnosis.md").write_text(text)
    return text
