"""Evaluation on a sample of the split, honestly reported; no perplexity for classifiers; a
learning-curve diagnosis that says when the curves are too short to judge.

In-process and small: the tiny model of conftest, a few rows, at most a couple of training steps.
"""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
from conftest import CLASSIFICATION, read_metrics

import dtrain.evaluation as evaluation_mod
from dtrain.config import ConfigError
from dtrain.data import Example, collate, prepare_data
from dtrain.data.loader import eval_batches, take
from dtrain.diagnose import MIN_EVALS, MIN_POINTS, MIN_WINDOW, TAIL, diagnose, write_learning_report
from dtrain.evaluation import evaluate, sample_rows
from dtrain.model import load_tokenizer
from dtrain.objectives import CausalLM, Classification
from dtrain.parallel.collectives import Collectives
from dtrain.train import train

PAD = 0


@pytest.fixture
def index_spy(monkeypatch):
    """The example indices each evaluation scores (one list per evaluation; -1 filler dropped)."""
    evaluations: list[list[int]] = []
    original = evaluation_mod.eval_batches

    def spy(*args, **kwargs):
        seen: list[int] = []
        evaluations.append(seen)
        for batch in original(*args, **kwargs):
            seen.extend(i for i in batch["index"].tolist() if i >= 0)
            yield batch

    monkeypatch.setattr(evaluation_mod, "eval_batches", spy)
    return evaluations


class ThreadCollectives(Collectives):
    """Ranks as threads of one process: all_reduce_sum really sums over them (same order on every rank)."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier: threading.Barrier):
        super().__init__(torch.device("cpu"), rank, world_size)
        self.slots, self.barrier = slots, barrier

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        self.slots[self.rank] = value.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()  # nobody writes the next value before every rank has read this one
        return total


def evaluate_on_ranks(model, examples, objective, cfg, tokenizer, world_size: int) -> list[dict]:
    """evaluate() on `world_size` thread ranks (each with its own copy of the model); each rank's metrics."""
    slots, barrier = [None] * world_size, threading.Barrier(world_size, timeout=60)
    results: list = [None] * world_size

    def rank_main(rank: int) -> None:
        try:
            comm = ThreadCollectives(rank, world_size, slots, barrier)
            results[rank] = evaluate(copy.deepcopy(model), examples, objective, cfg, comm, tokenizer)[0]
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            barrier.abort()
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.fixture
def lm_setup(make_config, tiny_model_dir):
    """(make a config, the tokenizer, the tiny model, its validation split) for evaluate() calls."""
    from transformers import AutoModelForCausalLM

    cfg = make_config()
    tokenizer = load_tokenizer(cfg.model)
    validation = prepare_data(cfg.data, tokenizer, cfg.seed).validation
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return make_config, tokenizer, model, validation


# --------------------------------------------------------------------------------------
# The sample


def test_the_sample_is_seeded_stable_nested_and_not_the_first_rows():
    sample = sample_rows(1000, 40, seed=7)
    assert sample == sample_rows(1000, 40, seed=7)  # every evaluation of the run: the same rows
    assert len(sample) == len(set(sample)) == 40 and sample == sorted(sample)
    assert sample != list(range(40)) and max(sample) > 500  # drawn from the whole split
    assert sample_rows(1000, 40, seed=8) != sample
    assert set(sample) < set(sample_rows(1000, 80, seed=7))  # a larger sample holds the smaller one
    assert sample_rows(1000, 1000, seed=7) is None and sample_rows(1000, None, seed=7) is None


def test_ranks_score_disjoint_parts_of_the_one_sample():
    examples = [Example([1, 2, 3 + i], [1, 2, 3 + i]) for i in range(50)]
    sample = sample_rows(len(examples), 12, seed=3)
    one = [i for b in eval_batches(examples, 4, PAD, ids=sample) for i in b["index"].tolist()]
    assert one == sample
    per_rank = [[b["index"].tolist() for b in eval_batches(examples, 2, PAD, rank=r, world_size=3, ids=sample)]
                for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of forwards on every rank
    scored = [i for batches in per_rank for batch in batches for i in batch if i >= 0]
    assert sorted(scored) == sample  # disjoint, and together the whole sample


def test_evaluate_scores_a_seeded_sample_and_reports_how_many(lm_setup, index_spy):
    make_config, tokenizer, model, validation = lm_setup
    cfg = make_config("eval.max_batches=2", "train.micro_batch_size=4")
    comm = Collectives(torch.device("cpu"))
    metrics, _ = evaluate(model, validation, CausalLM(), cfg, comm, tokenizer)
    again, _ = evaluate(model, validation, CausalLM(), cfg, comm, tokenizer)
    scored = index_spy[0]
    assert len(scored) == 8 and index_spy[1] == scored  # the same rows at every evaluation
    assert scored != list(range(8))  # not the first rows in file order
    assert metrics["eval_examples"] == 8 and metrics["eval_examples_total"] == len(validation) > 8
    assert metrics["eval_sampled"] is True and again == metrics
    # The loss is the mean over exactly those rows' target tokens.
    batch = collate(take(validation, scored), tokenizer.pad_token_id)
    sums, _ = CausalLM().eval_sums(model, batch)
    assert metrics["eval_loss"] == pytest.approx((sums["loss"] / sums["targets"]).item(), abs=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    # Another seed, another sample; no cap (or one that covers the split): every row, unsampled.
    evaluate(model, validation, CausalLM(), make_config("eval.max_batches=2", "train.micro_batch_size=4", "seed=1"),
             comm, tokenizer)
    assert index_spy[2] != scored
    rows = take(validation, list(range(10)))
    for overrides in ((), ("eval.max_batches=3",)):
        whole, _ = evaluate(model, rows, CausalLM(), make_config(*overrides, "train.micro_batch_size=4"), comm,
                            tokenizer)
        assert index_spy[-1] == list(range(10))
        assert (whole["eval_examples"], whole["eval_examples_total"], whole["eval_sampled"]) == (10, 10, False)


def test_generation_scores_a_seeded_sample_of_prompts(lm_setup, monkeypatch):
    make_config, tokenizer, model, validation = lm_setup
    asked = []
    monkeypatch.setattr(evaluation_mod, "generation_scores",
                        lambda *args, ids=None, **kwargs: asked.append(ids) or {"eval_exact_match": 0.0})
    cfg = make_config("eval.max_batches=1", "eval.generation.enabled=true", "eval.generation.max_examples=5")
    metrics, _ = evaluate(model, validation, CausalLM(), cfg, Collectives(torch.device("cpu")), tokenizer)
    assert asked == [sample_rows(len(validation), 5, cfg.seed)] and asked[0] != list(range(5))
    assert metrics["eval_generation_examples"] == 5


def test_two_ranks_score_the_same_sample_as_one_and_sum_exactly(lm_setup, index_spy):
    """One process x eval batch 4 and two ranks x eval batch 2 (the same global batch) score the
    same rows; the counts and the loss are sums over the ranks."""
    make_config, tokenizer, model, validation = lm_setup
    single = evaluate(model, validation, CausalLM(), make_config("eval.max_batches=3", "eval.batch_size=4"),
                      Collectives(torch.device("cpu")), tokenizer)[0]
    single_rows = index_spy[0]
    ranks = evaluate_on_ranks(model, validation, CausalLM(), make_config("eval.max_batches=3", "eval.batch_size=2"),
                              tokenizer, world_size=2)
    assert sorted(index_spy[1] + index_spy[2]) == sorted(single_rows) and not set(index_spy[1]) & set(index_spy[2])
    for metrics in ranks:  # every rank reports the global numbers
        assert metrics["eval_examples"] == single["eval_examples"] == 12
        assert metrics["eval_sampled"] is True
        assert metrics["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5, rel=0)


def test_in_training_evaluations_score_the_same_sample_and_log_its_size(make_config, tmp_path, index_spy):
    out = tmp_path / "run"
    result = train(make_config("train.max_steps=2", "eval.every_steps=1", "eval.max_batches=2",
                               "eval.worst_examples=0", output_dir=out))
    assert len(index_spy) == 2 and index_spy[0] == index_spy[1] and index_spy[0] != list(range(8))
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [e["eval_examples"] for e in evals] == [8, 8] and all(e["eval_sampled"] is True for e in evals)
    assert evals[0]["eval_examples_total"] > 8 and result.final_metrics["eval_examples"] == 8
    assert "seeded sample of 8 of the" in (out / "diagnosis.md").read_text()


# --------------------------------------------------------------------------------------
# Classification: no perplexity


def test_classification_reports_no_perplexity(make_config, tmp_path):
    classify = ("model.task=classification", "data.format=classification", f"data.train={CLASSIFICATION}")
    assert "perplexity" not in Classification.metric_names(make_config(*classify))
    assert "perplexity" in CausalLM.metric_names(make_config())
    result = train(make_config(*classify, "train.max_steps=1", "eval.max_batches=1", "eval.worst_examples=0",
                               output_dir=tmp_path / "run"))
    metrics = result.final_metrics
    assert "eval_perplexity" not in metrics and {"eval_loss", "eval_accuracy", "eval_examples"} <= set(metrics)
    assert metrics["eval_examples"] == 4  # one batch of train.micro_batch_size
    # Selecting it is refused at load time, naming what is reported.
    with pytest.raises(ConfigError, match=r"eval.metric='perplexity' is not reported for this task; allowed: "
                                          r"\['accuracy', 'f1_macro'"):
        make_config(*classify, "eval.metric=perplexity")
    with pytest.raises(ConfigError, match="tune.metric='eval_perplexity' is not reported"):
        make_config(*classify, "tune.metric=eval_perplexity")


# --------------------------------------------------------------------------------------
# Diagnosis


def curve(values, every=1):
    return [(i * every + every, v) for i, v in enumerate(values)]


def test_a_short_falling_curve_is_too_short_to_judge():
    falling = [3.0 * math.exp(-s / 4) + 0.5 for s in range(10)]  # 10 points, still falling
    got = diagnose(curve(falling), curve([3.0, 2.0, 1.2, 0.9], every=2))
    assert got.verdict == "not enough data" and got.verdict != "good fit"
    assert got.reason.startswith("too few training loss points to judge: 10 points;")
    assert f"at least {MIN_POINTS}" in got.reason
    # The boundary: the tail (TAIL of the points) spans a whole smoothing window from MIN_POINTS on.
    assert MIN_POINTS == round(MIN_WINDOW / TAIL) + 1
    flat = [2.5 + 0.001 * (s % 3) for s in range(MIN_POINTS)]
    assert diagnose(curve(flat[:-1]), []).verdict == "not enough data"
    assert diagnose(curve(flat), []).verdict == "underfitting"


def test_a_tail_that_still_falls_clearly_is_still_improving_not_a_good_fit():
    # 40 points: the last 20% no longer falls steeply (< 10% of the improvement), but it falls by
    # ~0.1 on a loss of ~0.65, far beyond the +-0.01 noise. (The old rules called this a good fit.)
    noisy = [2.0 * math.exp(-s / 15) + 0.5 + 0.01 * (-1) ** s for s in range(40)]
    got = diagnose(curve(noisy), curve([2.2, 1.2, 0.85, 0.7], every=10))
    assert got.verdict == "still improving" and "still falls at the end" in got.reason
    # The validation loss still falling at the last evaluation says the same, on a flat training tail.
    flat_tail = [2.0 * math.exp(-s / 3) + 0.5 for s in range(40)]
    got = diagnose(curve(flat_tail), curve([1.5, 0.9, 0.8, 0.7], every=10))
    assert got.verdict == "still improving" and "validation loss still fell" in got.reason


def test_noise_alone_is_not_improvement_and_a_good_fit_needs_evaluations():
    # A flattened curve whose tail only jitters (+-0.05, no trend): a good fit, with enough evaluations.
    jitter = [2.0 * math.exp(-s / 3) + 0.5 + 0.05 * ((s * 7) % 3 - 1) for s in range(40)]
    validation = curve([1.5, 0.8, 0.70, 0.70], every=10)
    assert diagnose(curve(jitter), validation).verdict == "good fit"
    # The same training curve with one evaluation (the default: only at the end): no verdict.
    got = diagnose(curve(jitter), validation[-1:])
    assert got.verdict == "not enough data"
    assert got.reason.startswith("too few evaluations to judge: 1 point;") and f"at least {MIN_EVALS}" in got.reason


def test_report_of_a_short_run_says_it_cannot_judge(tmp_path):
    lines = [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 9)]
    lines += [{"step": 4, "eval_loss": 2.5, "eval_examples": 8, "eval_examples_total": 90, "eval_sampled": True},
              {"step": 8, "eval_loss": 1.9, "eval_examples": 8, "eval_examples_total": 90, "eval_sampled": True}]
    lines += [["not", "a", "record"], {"loss": 1.0}]  # lines dtrain never writes are skipped, not a crash
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = write_learning_report(tmp_path)
    assert "**not enough data**: too few training loss points to judge: 8 points" in text
    assert "good fit" not in text
    assert "seeded sample of 8 of the 90 validation examples" in text
    assert (tmp_path / "diagnosis.md").read_text() == text and (tmp_path / "learning_curves.png").is_file()
