"""Fine-tuning techniques, evaluation and diagnosis, checked by numbers: frozen weights stay
bit-identical, LR groups get their LRs, the distillation loss is what the formula says,
classification metrics agree with scikit-learn, dropout overrides reach the modules, and the
learning-curve diagnosis names what happened in real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSIFICATION, TEXT, read_metrics, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from dtrain.config import DropoutConfig, FreezeConfig, OptimConfig, load_config
from dtrain.diagnose import Diagnosis, diagnose
from dtrain.evaluation import generation_scores, prompt_and_answer
from dtrain.objectives import CausalLM, Distillation
from dtrain.objectives.classification import classification_metrics
from dtrain.objectives.base import kl_sum
from dtrain.finetune import freeze
from dtrain.model import apply_dropout
from dtrain.optim import build_optimizer
from dtrain.parallel.single import SingleDevice
from dtrain.train import train


def tiny_llama(layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=260, tie_word_embeddings=False))


# --------------------------------------------------------------------------------------
# Partial fine-tuning and discriminative learning rates


def test_frozen_parameters_are_bit_identical_after_training(make_config, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train(make_config("freeze.embeddings=true", "freeze.layers=1", "freeze.patterns=['*.mlp.down_proj.*']",
                      "train.max_steps=4", "optim.lr=1e-2", output_dir=out))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    frozen = [n for n in before if n.startswith(("model.embed_tokens", "model.layers.0.")) or ".mlp.down_proj." in n]
    assert len(frozen) == 1 + 9 + 1  # embeddings, all of block 0, block 1's down_proj
    for name in before:
        if name in frozen:
            assert torch.equal(after[name], before[name]), name
        elif name != "model.norm.weight":  # a norm's gradient can be ~0 on 4 steps; matrices move
            assert not torch.equal(after[name], before[name]), name


def test_head_only_trains_only_the_head():
    model = tiny_llama()
    frozen = freeze(model, FreezeConfig(head_only=True))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    assert "model.embed_tokens.weight" in frozen
    with pytest.raises(Exception, match="freeze.layers=4, but the model has 3 transformer blocks"):
        freeze(tiny_llama(), FreezeConfig(layers=4))


def test_layer_wise_lr_decay_and_pattern_groups_give_the_expected_lrs():
    model = tiny_llama(layers=3)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5,
                      groups=[{"pattern": "*.mlp.*", "lr_scale": 2.0, "weight_decay": 0.0}])
    optimizer = build_optimizer(model, cfg)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)], decay_of[id(p)] = group["lr"], group["weight_decay"]
    p = dict(model.named_parameters())
    L = 3
    assert lr_of[id(p["model.embed_tokens.weight"])] == pytest.approx(1e-3 * 0.5 ** (L + 1))
    for i in range(L):
        assert lr_of[id(p[f"model.layers.{i}.self_attn.q_proj.weight"])] == pytest.approx(1e-3 * 0.5 ** (L - i))
        assert lr_of[id(p[f"model.layers.{i}.mlp.up_proj.weight"])] == pytest.approx(2e-3 * 0.5 ** (L - i))
        assert decay_of[id(p[f"model.layers.{i}.mlp.up_proj.weight"])] == 0.0  # the pattern's weight decay
        assert decay_of[id(p[f"model.layers.{i}.self_attn.q_proj.weight"])] == 0.1
        assert decay_of[id(p[f"model.layers.{i}.input_layernorm.weight"])] == 0.0  # never on norms
    assert lr_of[id(p["lm_head.weight"])] == pytest.approx(1e-3) and lr_of[id(p["model.norm.weight"])] == pytest.approx(1e-3)


def test_l1_adds_its_subgradient_to_weight_matrices_only():
    model = tiny_llama(layers=1)
    strategy = SingleDevice(load_config(None, ["parallel.device=cpu"]).parallel)
    grads = {}
    for l1 in (0.0, 0.01):
        model.zero_grad()
        model(input_ids=torch.tensor([[1, 5, 9, 7]]), labels=torch.tensor([[1, 5, 9, 7]])).loss.backward()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, the gradients are seen
        step = optimizer.step
        optimizer.step = lambda: grads.__setitem__(l1, {n: p.grad.clone() for n, p in model.named_parameters()}) or step()
        strategy.optimizer_step(model, optimizer, max_norm=None, l1=l1)
    for name, p in model.named_parameters():
        expected = grads[0.0][name] + (0.01 * p.detach().sign() if p.ndim >= 2 else 0)
        torch.testing.assert_close(grads[0.01][name], expected, atol=1e-7, rtol=0)


# --------------------------------------------------------------------------------------
# Regularisation


def test_dropout_overrides_reach_the_modules_or_warn():
    llama = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    warnings = apply_dropout(llama, DropoutConfig(attention=0.3, hidden=0.2, classifier=0.1))
    model = AutoModelForCausalLM.from_config(llama)
    assert model.model.layers[0].self_attn.attention_dropout == 0.3
    assert len(warnings) == 2 and "llama models have no hidden dropout" in warnings[0]

    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=260)
    assert apply_dropout(gpt2, DropoutConfig(attention=0.3, hidden=0.2)) == []
    model = AutoModelForCausalLM.from_config(gpt2)
    block = model.transformer.h[0]
    assert block.attn.attn_dropout.p == 0.3 and block.attn.resid_dropout.p == 0.2 and model.transformer.drop.p == 0.2


def test_label_smoothing_is_the_smoothed_cross_entropy():
    model = tiny_llama(layers=1)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 7, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 9, 7, 3]])}
    with torch.no_grad():
        lm = CausalLM(label_smoothing=0.1)
        loss, n = lm.loss(model, batch), lm.count(batch)
        logits = model(input_ids=batch["input_ids"]).logits[0, 1:4]
    assert n == 3
    expected = F.cross_entropy(logits, torch.tensor([9, 7, 3]), reduction="sum", label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------
# Distillation


def test_distillation_loss_equals_a_hand_computation():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]])
    teacher = torch.tensor([[[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, False]])
    T = 2.0
    p = torch.softmax(teacher[0, 0] / T, -1)
    q = torch.softmax(student[0, 0] / T, -1)
    hand = sum(p[i] * math.log(p[i] / q[i]) for i in range(3)) * T * T  # only the unmasked position
    assert kl_sum(student, teacher, mask, T).item() == pytest.approx(float(hand), rel=1e-6)


def test_distillation_from_the_student_itself_with_alpha_1_is_zero():
    model = tiny_llama(layers=1)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[1, 5, 9, 7]])}
    distill = load_config(None, ["distill.alpha=1.0", "distill.temperature=3.0"]).distill
    with torch.no_grad():
        loss = Distillation(CausalLM(), model, alpha=distill.alpha, temperature=distill.temperature).loss(model, batch)
        task = CausalLM().loss(model, batch)
        half = Distillation(CausalLM(), model, alpha=0.5, temperature=distill.temperature).loss(model, batch)
    assert abs(loss.item()) < 1e-6 and half.item() == pytest.approx(0.5 * task.item(), rel=1e-6)


def test_distillation_trains_a_lora_student_and_refuses_another_tokenizer(make_config, tmp_path, tiny_model_dir):
    result = train(make_config(f"distill.teacher={tiny_model_dir}", "peft.method=lora", "train.max_steps=2",
                               output_dir=tmp_path / "run"))
    assert len(result.train_losses) == 2 and all(math.isfinite(x) for x in result.train_losses)
    other = tmp_path / "other-teacher"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(Exception, match="has another tokenizer than the student"):
        train(make_config(f"distill.teacher={other}", "train.max_steps=1", output_dir=tmp_path / "run2"))


# --------------------------------------------------------------------------------------
# Evaluation


def test_classification_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    truth = [0, 0, 1, 2, 2, 2, 1, 0, 3, 3, 1, 2]
    guess = [0, 1, 1, 2, 0, 2, 2, 0, 3, 1, 1, 1]
    confusion = torch.tensor(confusion_matrix(truth, guess, labels=[0, 1, 2, 3]))
    ours = classification_metrics(confusion)
    assert ours["accuracy"] == pytest.approx(accuracy_score(truth, guess))
    assert ours["precision_macro"] == pytest.approx(precision_score(truth, guess, average="macro", zero_division=0))
    assert ours["recall_macro"] == pytest.approx(recall_score(truth, guess, average="macro", zero_division=0))
    assert ours["f1_macro"] == pytest.approx(f1_score(truth, guess, average="macro", zero_division=0))
    assert ours["f1_micro"] == pytest.approx(f1_score(truth, guess, average="micro"))


def test_classification_run_reports_f1_and_the_confusion_matrix(make_config, tmp_path):
    out = tmp_path / "run"
    result = train(make_config("model.task=classification", "data.format=classification",
                               f"data.train={CLASSIFICATION}", "train.max_steps=3", "eval.metric=f1_macro",
                               output_dir=out))
    metrics = result.final_metrics
    confusion = torch.tensor(metrics["eval_confusion_matrix"])
    assert confusion.shape == (3, 3)
    assert metrics["eval_f1_macro"] == pytest.approx(classification_metrics(confusion)["f1_macro"])
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == 3


def test_batched_greedy_generation_equals_one_prompt_at_a_time(make_config, tmp_path, tiny_model_dir):
    """Left padding must not change an answer: the batched scores equal an unbatched loop."""
    from dtrain.data import prepare_data
    from dtrain.model import load_tokenizer

    cfg = make_config("eval.generation.enabled=true", "eval.generation.max_examples=6",
                      "eval.generation.batch_size=3", "eval.generation.max_new_tokens=6")
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_data(cfg.data, tokenizer, cfg.seed).validation
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    strategy = SingleDevice(cfg.parallel)
    scores = generation_scores(model, examples, cfg, strategy.comm, tokenizer)
    exact = contains = 0
    for i in range(6):
        prompt, answer = prompt_and_answer(list(examples[i]["input_ids"]), list(examples[i]["labels"]))
        output = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        said = " ".join(tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).split()).lower()
        reference = " ".join(tokenizer.decode([t for t in answer if t != tokenizer.eos_token_id],
                                              skip_special_tokens=True).split()).lower()
        exact += said == reference
        contains += reference in said
    assert scores == {"eval_exact_match": exact / 6, "eval_contains_answer": contains / 6}


@pytest.mark.slow
def test_eval_command_writes_eval_json_on_the_test_split(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config("train.max_steps=2", output_dir=out)
    train(cfg)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    # --out DIR (a directory that does not exist yet) gets DIR/eval.json; eval.max_batches scores a sample
    proc = run_cli("eval", str(out), str(config), "eval.worst_examples=3", "eval.max_batches=1", "eval.batch_size=4",
                   "--out", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "eval.json").read_text())
    assert result["split"] == "test" and math.isfinite(result["test_loss"])
    assert result["examples"] == result["test_examples"] == 4 < result["test_examples_total"]  # those scored
    assert result["test_sampled"] is True and "test_perplexity" in result
    assert len(result["worst_examples"]) == 3 and {"input", "expected", "predicted"} <= set(result["worst_examples"][0])


# --------------------------------------------------------------------------------------
# Learning-curve diagnosis


def curve(values, every=1):
    return [(i * every + every, v) for i, v in enumerate(values)]


def test_diagnosis_of_synthetic_curves():
    steps = range(100)
    falling_then_flat = [2.0 * math.exp(-s / 10) + 0.5 for s in steps]
    overfit = diagnose(curve(falling_then_flat), curve([2.0, 1.2, 0.9, 0.8, 0.85, 0.95, 1.1], every=14))
    assert overfit.verdict == "overfitting" and overfit.turn_step == 56

    flat = diagnose(curve([2.5 + 0.001 * (s % 3) for s in steps]), curve([2.5, 2.5, 2.5], every=30))
    assert flat.verdict == "underfitting" and "flat" in flat.reason

    still_falling = diagnose(curve([3.0 - 0.02 * s for s in steps]), curve([3.0, 2.5, 2.0], every=30))
    assert still_falling.verdict == "underfitting" and "still falling steeply" in still_falling.reason

    good = diagnose(curve(falling_then_flat), curve([1.9, 0.9, 0.70, 0.68, 0.68], every=20))
    assert good.verdict == "good fit" and good.gap == pytest.approx(0.68 - falling_then_flat[-1], abs=0.01)
    assert diagnose(curve([1.0, 0.9]), []) == Diagnosis(
        "not enough data", "too few training loss points to judge: 2 points; a smoothed curve needs at least 16 "
        "(log more often with train.log_every, or train longer)")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["overfitting", "underfitting"])
def test_diagnosis_of_real_runs(make_config, tmp_path, case):
    """A tiny model trained far too long on 8 examples overfits; one with LR 0 learns nothing."""
    rows = TEXT.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:8]) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(rows[8:40]) + "\n")
    out = tmp_path / "run"
    lr = "optim.lr=3e-3" if case == "overfitting" else "optim.lr=0"
    train(make_config("data.format=text", f"data.train={tmp_path / 'train.jsonl'}",
                      f"data.validation={tmp_path / 'validation.jsonl'}", "data.test_ratio=0", "train.max_steps=150",
                      "train.micro_batch_size=8", "train.log_every=2", "eval.every_steps=10", "schedule.name=constant",
                      lr, output_dir=out))
    text = (out / "diagnosis.md").read_text()
    assert f"**{case}**" in text, text
    assert (out / "learning_curves.png").stat().st_size > 10_000
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert f"best checkpoint (by eval_loss): step {best}" in text
    if case == "overfitting":
        assert f"at step {best}, then rose" in text
