"""Preference tuning: DPO (and conservative DPO), IPO, SimPO, ORPO, KTO and reward models.

Each loss is compared number for number with TRL's trainer on the same model, batch and settings
(TRL 1.16: DPOTrainer, experimental CPOTrainer and ORPOTrainer, KTOTrainer, RewardTrainer): the
batch is the one dtrain prepared, handed to TRL's own collator. Then the data stage for
preference rows, the reference modes, packing, and the config errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, write_jsonl

from dtrain.config import ConfigError, load_config
from dtrain.data.loader import collate_preference, take
from dtrain.data.preference import prompt_length

BETA = 0.1
# fp32 on the CPU, as dtrain here (TRL's configs default to bf16, which autocasts the reference model).
TRL_FP32 = {"use_cpu": True, "bf16": False, "report_to": []}

# Prompts and answers of varied lengths (the padding and the length normalisation must matter).
PAIRS = [
    {"prompt": "Add the numbers.\n12 + 30 = ", "chosen": "42", "rejected": "43"},
    {"prompt": "Subtract the second number from the first.\n99 - 1 = ", "chosen": "98", "rejected": "one hundred"},
    {"prompt": "Q: 7 + 5?\nA: ", "chosen": "twelve, since 7 + 5 = 12", "rejected": "13"},
    {"prompt": "What is 3 times 4?\n", "chosen": "12", "rejected": "It is 7, as 3 + 4 = 7."},
    {"prompt": "2 + 2 = ", "chosen": "4", "rejected": "5"},
    {"prompt": "Count to three: ", "chosen": "1 2 3", "rejected": "1 3 2"},
    {"prompt": "Double 21.\n", "chosen": "42", "rejected": "44"},
    {"prompt": "Half of 10 is ", "chosen": "5", "rejected": "four"},
]


def dtrain_config(model_dir: Path, data: Path, out: Path, *overrides: str, fmt: str = "preference"):
    return load_config(None, [*base_overrides(model_dir, out), f"data.train={data}", f"data.format={fmt}",
                              "data.val_ratio=0", "data.test_ratio=0", "data.shuffle=false",
                              f"preference.beta={BETA}", *overrides])


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model moved away from itself (so that policy and reference differ and the rewards say something)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("policy")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            (path / name).write_bytes((tiny_model_dir / name).read_bytes())
    return path


def load(path: Path, task: str = "causal_lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = 0
        return model
    return AutoModelForCausalLM.from_pretrained(path)


def prepared(cfg):
    from dtrain.data import prepare_data
    from dtrain.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    return prepare_data(cfg.data, tokenizer, cfg.seed), tokenizer


def dtrain_side(cfg, data, model, reference=None, rows=range(4)):
    """The objective's loss and metrics on rows `rows` of the training split."""
    from dtrain.objectives import build_objective
    from dtrain.objectives.preference import REFERENCE

    objective = build_objective(cfg, data, {REFERENCE: reference} if reference is not None else {})
    batch = collate_preference(take(data.train, list(rows)), 0)
    batch["index"] = torch.arange(len(rows))
    model.train()
    terms, counts = objective.loss_terms(model, batch), objective.counts(batch)
    loss = sum(value / counts[key] for key, value in terms.sums.items())  # (what train_step does, on one batch)
    with torch.no_grad():
        metrics = objective.eval_metrics(objective.eval_sums(model, batch)[0])
    return float(loss), metrics, take(data.train, list(rows))


def trl_pair(pair) -> dict:
    """A dtrain Pair as TRL's tokenized preference example."""
    n = prompt_length(pair.chosen.labels)
    assert pair.rejected.input_ids[:n] == pair.chosen.input_ids[:n]
    return {"prompt_ids": list(pair.chosen.input_ids[:n]), "chosen_ids": list(pair.chosen.input_ids[n:]),
            "rejected_ids": list(pair.rejected.input_ids[n:])}


def cpo_batch(pairs) -> dict[str, torch.Tensor]:
    """The batch CPOTrainer and ORPOTrainer read: chosen_* and rejected_* tensors, labels with the prompt masked."""
    from dtrain.data.loader import collate

    batch = {}
    for side in ("chosen", "rejected"):
        collated = collate([getattr(p, side) for p in pairs], 0)
        batch.update({f"{side}_{key}": value for key, value in collated.items()})
    return batch


def last_metrics(trainer) -> dict[str, float]:
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


def close(a: float, b: float, what: str) -> None:
    assert a == pytest.approx(b, abs=1e-5, rel=0), f"{what}: dtrain {a} vs TRL {b}"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


# --------------------------------------------------------------------------------------
# Against TRL


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trls_dpo_trainer(policy_dir, tiny_model_dir, pairs_file, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    objective = "dpo" if loss_type == "sigmoid" else "ipo"
    cfg = dtrain_config(policy_dir, pairs_file, tmp_path / "run", f"train.objective={objective}")
    data, tokenizer = prepared(cfg)
    loss, metrics, pairs = dtrain_side(cfg, data, load(policy_dir), load(tiny_model_dir).eval())

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=[loss_type], **TRL_FP32,
                     per_device_train_batch_size=4, max_length=None)
    trainer = DPOTrainer(model=load(policy_dir), ref_model=load(tiny_model_dir), args=args,
                         train_dataset=_strings(PAIRS), processing_class=tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([trl_pair(p) for p in pairs])
    trainer.model.train()
    trl_loss = float(trainer._compute_loss(trainer.model, batch, False))
    trl = last_metrics(trainer)
    close(loss, trl_loss, "loss")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        close(metrics[name.replace("/", "_").replace("margins", "margin").replace("accuracies", "accuracy")],
              trl[name], name)
    assert abs(metrics["rewards_margin"]) > 1e-3  # (policy and reference differ: the comparison has teeth)


def test_conservative_dpo_is_the_label_smoothed_sigmoid_loss(policy_dir, tiny_model_dir, pairs_file, tmp_path):
    """TRL 1.16 has no conservative DPO; its sigmoid and robust losses pin it down: with A = mean
    -log sigmoid(x) (sigmoid) and R = ((1 - e) A - e B) / (1 - 2e) (robust), cDPO = (1 - e) A + e B."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    e = 0.2
    cfg = dtrain_config(policy_dir, pairs_file, tmp_path / "run", f"preference.label_smoothing={e}")
    data, tokenizer = prepared(cfg)
    loss, _, pairs = dtrain_side(cfg, data, load(policy_dir), load(tiny_model_dir).eval())
    values = {}
    for loss_type in ("sigmoid", "robust"):
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=[loss_type], label_smoothing=e,
                         **TRL_FP32, per_device_train_batch_size=4, max_length=None)
        trainer = DPOTrainer(model=load(policy_dir), ref_model=load(tiny_model_dir), args=args,
                             train_dataset=_strings(PAIRS), processing_class=tokenizer)
        batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([trl_pair(p) for p in pairs])
        trainer.model.train()
        values[loss_type] = float(trainer._compute_loss(trainer.model, batch, False))
    a, r = values["sigmoid"], values["robust"]
    b = ((1 - e) * a - (1 - 2 * e) * r) / e
    close(loss, (1 - e) * a + e * b, "cDPO loss")


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_equal_trls_cpo_and_orpo_trainers(policy_dir, pairs_file, tmp_path, objective):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = dtrain_config(policy_dir, pairs_file, tmp_path / "run", f"train.objective={objective}",
                        "preference.gamma=0.7")
    data, tokenizer = prepared(cfg)
    loss, metrics, pairs = dtrain_side(cfg, data, load(policy_dir))
    common = {"output_dir": str(tmp_path / "trl"), "beta": BETA, **TRL_FP32, "per_device_train_batch_size": 4}
    if objective == "simpo":
        trainer = CPOTrainer(model=load(policy_dir), args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7,
                                                                    **common),
                             train_dataset=_strings(PAIRS), processing_class=tokenizer)
    else:
        trainer = ORPOTrainer(model=load(policy_dir), args=ORPOConfig(**common), train_dataset=_strings(PAIRS),
                              processing_class=tokenizer)
    trainer.model.train()
    trl_loss, trl = trainer.get_batch_loss_metrics(trainer.model, cpo_batch(pairs))
    close(loss, float(trl_loss), "loss")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        key = name.replace("/", "_").replace("margins", "margin").replace("accuracies", "accuracy")
        close(metrics[key], float(trl[name]), name)


def test_kto_equals_trls_kto_trainer(policy_dir, tiny_model_dir, tmp_path):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": bool(i % 3)}
            for i, p in enumerate(PAIRS)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = dtrain_config(policy_dir, path, tmp_path / "run", "preference.desirable_weight=1.3",
                        "preference.undesirable_weight=0.8", fmt="unpaired_preference")
    data, tokenizer = prepared(cfg)
    loss, metrics, judged = dtrain_side(cfg, data, load(policy_dir), load(tiny_model_dir).eval(), rows=range(6))

    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, desirable_weight=1.3, undesirable_weight=0.8,
                     **TRL_FP32, per_device_train_batch_size=6, max_length=cfg.data.max_seq_len)
    trainer = KTOTrainer(model=load(policy_dir), ref_model=load(tiny_model_dir), args=args,
                         train_dataset=_strings(rows), processing_class=tokenizer)
    examples = []
    for j in judged:
        n, k = prompt_length(j.example.labels), prompt_length(j.mismatched.labels)
        examples.append({"prompt_ids": list(j.example.input_ids[:n]), "completion_ids": list(j.example.input_ids[n:]),
                         "KL_completion_ids": list(j.mismatched.input_ids[k:]), "label": bool(j.desirable)})
    batch = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    trainer.model.train()
    close(loss, float(trainer._compute_loss(trainer.model, batch, False)), "loss")
    trl = last_metrics(trainer)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        key = name.replace("/", "_").replace("margins", "margin")
        close(metrics[key], trl[name], name)
    assert 0 < sum(j.desirable for j in judged) < len(judged)


def test_reward_model_loss_equals_trls_reward_trainer(tiny_model_dir, pairs_file, tmp_path):
    from trl import RewardConfig, RewardTrainer

    cfg = dtrain_config(tiny_model_dir, pairs_file, tmp_path / "run", "model.task=reward")
    data, tokenizer = prepared(cfg)
    torch.manual_seed(11)
    model = load(tiny_model_dir, "reward")  # (the score head: random, seeded, the same for both)
    head = {k: v.clone() for k, v in model.state_dict().items()}
    loss, metrics, pairs = dtrain_side(cfg, data, model)

    twin = load(tiny_model_dir, "reward")
    twin.load_state_dict(head)
    trainer = RewardTrainer(model=twin, args=RewardConfig(output_dir=str(tmp_path / "trl"), **TRL_FP32,
                                                          per_device_train_batch_size=4),
                            train_dataset=_strings(PAIRS), processing_class=tokenizer)
    batch = collate_preference(pairs, tokenizer.pad_token_id)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"]})
    close(loss, float(trl_loss), "loss")
    trl = last_metrics(trainer)
    close(metrics["rewards_accuracy"], trl["accuracy"], "accuracy")
    close(metrics["rewards_margin"], trl["margin"], "margin")


def _strings(rows):
    """A text dataset the TRL trainers accept at construction (the compared batch is handed over apart)."""
    from datasets import Dataset

    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------
# Training runs


def train_run(cfg):
    from dtrain.train import train

    return train(cfg)


def test_dpo_starts_at_ln_2_and_its_reference_modes_agree(tiny_model_dir, pairs_file, tmp_path):
    """With the reference equal to the policy the first step's loss is ln 2, for any batch; the
    reference as the policy with its adapters off, as a frozen copy of the base, and as
    precomputed log-probabilities give the same curve."""
    common = ["train.max_steps=5", "train.micro_batch_size=2", "optim.lr=5e-2", "peft.method=lora", "peft.dropout=0"]
    curves = {}
    for mode in ("adapters_disabled", "copy", "precomputed"):
        extra = ([f"preference.reference={mode}"] if mode != "precomputed" else ["preference.precompute_reference=true"])
        if mode == "copy":
            extra.append(f"preference.reference_model={tiny_model_dir}")
        result = train_run(dtrain_config(tiny_model_dir, pairs_file, tmp_path / mode, *common, *extra))
        curves[mode] = result.train_losses
    assert curves["adapters_disabled"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert curves["adapters_disabled"][-1] < math.log(2) - 1e-3  # it learns
    for mode in ("copy", "precomputed"):
        assert curves[mode] == pytest.approx(curves["adapters_disabled"], abs=1e-5, rel=0), mode


def test_packed_pairs_train_as_the_padded_ones(tiny_model_dir, pairs_file, tmp_path):
    """data.packing: each micro-batch's sequences in one row, none attending to another: the same losses."""
    common = ["train.max_steps=4", "train.micro_batch_size=3", "optim.lr=1e-2"]
    padded = train_run(dtrain_config(tiny_model_dir, pairs_file, tmp_path / "padded", *common)).train_losses
    packed = train_run(dtrain_config(tiny_model_dir, pairs_file, tmp_path / "packed", *common,
                                     "data.packing=true")).train_losses
    assert packed == pytest.approx(padded, abs=1e-5, rel=0)


def test_metrics_are_logged_at_each_step_and_evaluation(tiny_model_dir, tmp_path):
    from conftest import read_metrics

    path = write_jsonl(tmp_path / "pairs.jsonl", [dict(p, prompt=f"{i}: {p['prompt']}") for i in range(6)
                                                 for p in PAIRS])
    cfg = load_config(None, [*base_overrides(tiny_model_dir, tmp_path / "run"), f"data.train={path}",
                             "data.format=preference", "data.val_ratio=0.2", "data.test_ratio=0", "train.max_steps=3",
                             "eval.every_steps=3"])
    train_run(cfg)
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and {"rewards_chosen", "rewards_margin", "rewards_accuracy", "logps_chosen"} <= set(steps[0])
    evals = [r for r in records if "eval_loss" in r]
    assert evals and {"eval_rewards_accuracy", "eval_rewards_margin"} <= set(evals[-1])
    report = (tmp_path / "run" / "data_report.md").read_text()
    assert "## Preferences" in report and "--- rejected:" in report and "data_responses.png" in report


# --------------------------------------------------------------------------------------
# The data stage


def test_bad_preference_rows_name_their_file_and_line(tiny_model_dir, tmp_path):
    from dtrain.data import DataError

    cases = {
        "missing": ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        "same": ({"prompt": "p", "chosen": "a", "rejected": " a "}, "the same response"),
        "empty": ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    }
    for name, (bad, says) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [PAIRS[0], bad])
        cfg = dtrain_config(tiny_model_dir, path, tmp_path / name)
        with pytest.raises(DataError, match=f"{path}:2: .*{says}"):
            prepared(cfg)


def test_every_pair_of_a_prompt_is_in_one_split(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Add {a} and {a + 1}.\n", "chosen": str(2 * a + 1), "rejected": str(2 * a + 1 + k)}
            for a in range(60) for k in (1, 2, 3)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(None, [*base_overrides(tiny_model_dir, tmp_path / "run"), f"data.train={path}",
                             "data.format=preference", "data.val_ratio=0.2", "data.test_ratio=0.2"])
    data, tokenizer = prepared(cfg)
    prompts = {}
    for split in ("train", "validation", "test"):
        for ids, labels in zip(getattr(data, split)["input_ids"], getattr(data, split)["labels"]):
            prompts.setdefault(tuple(ids[:prompt_length(labels)]), set()).add(split)
    assert len(prompts) == 60 and all(len(splits) == 1 for splits in prompts.values())
    assert len(data.validation) and len(data.test)
    assert len(data.train) + len(data.validation) + len(data.test) == 180


def test_truncation_cuts_the_prompt_before_the_responses(tiny_model_dir, tmp_path):
    row = {"prompt": "x" * 100 + "QUESTION:", "chosen": "a good answer", "rejected": "bad"}
    path = write_jsonl(tmp_path / "long.jsonl", [row, PAIRS[0]])
    for mode, keeps_answer in (("prompt_first", True), ("end", False)):
        cfg = dtrain_config(tiny_model_dir, path, tmp_path / mode, "data.max_seq_len=40", f"data.truncation={mode}")
        data, tokenizer = prepared(cfg)
        pair = next(p for p in take(data.train, range(len(data.train))) if len(p.chosen.input_ids) == 40) \
            if keeps_answer else None
        if keeps_answer:
            text = tokenizer.decode(pair.chosen.input_ids, skip_special_tokens=True)
            assert text.endswith("QUESTION:a good answer") and pair.chosen.input_ids[0] == tokenizer.bos_token_id
            assert tokenizer.decode(pair.rejected.input_ids, skip_special_tokens=True).endswith("QUESTION:bad")
        else:  # the end cut: the responses are gone, the pair dropped as too long
            assert len(data.train) == 1


def test_conversations_are_rendered_with_the_chat_template(tiny_model_dir, tmp_path):
    system = {"role": "system", "content": "You are a calculator."}
    user = {"role": "user", "content": "What is 2 + 2?"}
    rows = [{"prompt": [system, user], "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]},
            {"chosen": [system, user, {"role": "assistant", "content": "4"}],  # whole conversations
             "rejected": [system, user, {"role": "assistant", "content": "22"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data, tokenizer = prepared(dtrain_config(tiny_model_dir, path, tmp_path / "run", "data.clean.exact_dedup=false"))
    rendered = tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    for pair in take(data.train, range(len(data.train))):
        n = prompt_length(pair.chosen.labels)
        assert tokenizer.decode(pair.chosen.input_ids[:n]) == rendered
        assert tokenizer.decode(pair.chosen.input_ids[n:], skip_special_tokens=True).strip().startswith("4")


# --------------------------------------------------------------------------------------
# Config errors, before any work starts


@pytest.mark.parametrize(("overrides", "says"), [
    (["train.objective=dpo", "data.format=alpaca"], "does not fit train.objective=dpo"),
    (["data.format=preference", "train.objective=causal_lm"], "set train.objective to dpo"),
    (["data.format=preference", "preference.reference=adapters_disabled"], "peft.method is none"),
    (["data.format=preference", "train.objective=orpo", "preference.reference=copy"],
     "train.objective=orpo uses no reference model"),
    (["data.format=preference", "train.objective=simpo", "preference.precompute_reference=true"],
     "preference.precompute_reference: train.objective=simpo uses no reference model"),
    (["data.format=preference", "train.objective=reward_model"], "needs model.task=reward"),
    (["data.format=preference", "model.task=reward", "data.packing=true"], "data.packing"),
    (["data.format=unpaired_preference", "train.objective=dpo"], "does not fit train.objective=dpo"),
    (["data.format=preference", "data.train_on_prompt=true"], "data.train_on_prompt"),
])
def test_a_preference_config_that_cannot_work_is_refused_naming_the_key(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)


def test_auto_picks_the_objective_of_the_data():
    from dtrain.objectives import objective_name

    assert objective_name(load_config(None, ["data.format=preference"])) == "dpo"
    assert objective_name(load_config(None, ["data.format=unpaired_preference"])) == "kto"
    assert objective_name(load_config(None, ["data.format=preference", "model.task=reward"])) == "reward_model"
    assert json.loads(json.dumps(load_config(None, []).to_dict()))["preference"]["beta"] == 0.1


def test_the_diagnosis_reads_the_reward_curves():
    from dtrain.diagnose import preference_findings

    def evals(margins, chosen, accuracy):
        return {10 * (i + 1): {"eval_rewards_margin": m, "eval_logps_chosen": c, "eval_rewards_accuracy": a}
                for i, (m, c, a) in enumerate(zip(margins, chosen, accuracy))}

    displaced = " ".join(preference_findings(evals([0.0, 0.5, 1.0], [-10.0, -12.0, -15.0], [0.5, 0.8, 0.9])))
    assert "likelihood displacement" in displaced and "-10.00 -> -15.00" in displaced
    healthy = " ".join(preference_findings(evals([0.0, 0.5, 1.0], [-10.0, -9.0, -8.0], [0.5, 0.8, 0.9])))
    assert "the healthy way" in healthy and "peaked" not in healthy
    peaked = " ".join(preference_findings(evals([0.0, 2.0, 1.0], [-10.0, -9.0, -9.5], [0.5, 0.9, 0.8])))
    assert "peaked at +2.0000 (step 20)" in peaked
    chance = " ".join(preference_findings(evals([0.0, 0.01], [-10.0, -10.0], [0.5, 0.5])))
    assert "about chance" in chance
    assert preference_findings({10: {"eval_loss": 1.0}}) == []  # not a preference run


def test_eval_scores_a_dpo_run_against_its_reference(tiny_model_dir, tmp_path):
    from conftest import run_cli

    path = write_jsonl(tmp_path / "pairs.jsonl", [dict(p, prompt=f"{i}: {p['prompt']}") for i in range(5)
                                                 for p in PAIRS])
    overrides = [f"data.train={path}", "data.format=preference", "data.val_ratio=0", "data.test_ratio=0.3",
                 "train.max_steps=3", "optim.lr=5e-2", "preference.reference=copy"]
    cfg = load_config(None, [*base_overrides(tiny_model_dir, tmp_path / "run"), *overrides])
    train_run(cfg)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    proc = run_cli("eval", str(tmp_path / "run"), str(config), "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["test_examples"] == result["examples"] > 0
    assert {"test_loss", "test_rewards_margin", "test_rewards_accuracy"} <= set(result)
    assert result["test_rewards_margin"] != 0  # (the trained policy against the copy of its start)


def test_an_exported_reward_model_scores_like_the_trained_one(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dtrain.export import export

    out = tmp_path / "run"
    cfg = dtrain_config(tiny_model_dir, pairs_file, out, "model.task=reward", "train.max_steps=3", "optim.lr=1e-2")
    train_run(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(export(out, tmp_path / "reward")).eval()
    assert model.config.num_labels == 1
    data, _ = prepared(cfg)
    batch = collate_preference(take(data.train, [0, 1]), 0)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    trained = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(scores, expected)
    assert scores.shape == (4,)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_resumed_preference_run_continues_exactly(tiny_model_dir, pairs_file, tmp_path, objective):
    """Stopped after its checkpoint at step 3 and resumed, a run logs the losses and rewards of the
    uninterrupted one (LoRA, the reference as the adapters switched off; KTO on unpaired data)."""
    import shutil

    data = pairs_file
    if objective == "kto":
        data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                                                     for p in PAIRS for side in ("chosen", "rejected")])
    common = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=3", "optim.lr=2e-2",
              "peft.method=lora", "peft.dropout=0", "train.micro_batch_size=2"]
    fmt = "unpaired_preference" if objective == "kto" else "preference"
    a, b = tmp_path / "a", tmp_path / "b"
    train_run(dtrain_config(tiny_model_dir, data, a, *common, fmt=fmt))
    shutil.copytree(a / "checkpoints" / "step_00000003", b / "checkpoints" / "step_00000003")
    train_run(dtrain_config(tiny_model_dir, data, b, *common, "checkpoint.resume=auto", fmt=fmt))
    from conftest import read_metrics

    steps_a = {r["step"]: r for r in read_metrics(a) if "loss" in r}
    steps_b = {r["step"]: r for r in read_metrics(b) if "loss" in r}
    assert sorted(steps_b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "rewards_chosen", "rewards_margin"):
            assert steps_b[step][key] == pytest.approx(steps_a[step][key], abs=1e-6, rel=0), (step, key)
    assert steps_a[6]["loss"] != steps_a[4]["loss"]


def test_qlora_dpo_trains_in_one_process(tiny_model_dir, pairs_file, tmp_path):
    result = train_run(dtrain_config(tiny_model_dir, pairs_file, tmp_path / "run", "peft.method=qlora",
                                     "peft.dropout=0", "train.max_steps=3", "train.micro_batch_size=2",
                                     "optim.lr=2e-2"))
    assert result.train_losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the reference: the 4-bit base, adapters off
    assert len(result.train_losses) == 3 and all(math.isfinite(x) for x in result.train_losses)
    assert result.train_losses[-1] != result.train_losses[0]
