"""GRPO: the loss against TRL's GRPOTrainer number for number, seeded sampling, the rewards, the
data format, runs that resume exactly, and the inputs it refuses.

The parity tests hand both trainers the same prompts, completions and rewards: TRL's generation
(`_generate`) and dtrain's (`generate` in dtrain.objectives.grpo) both return the fixed completions,
and one reward function returns fixed rewards; everything after that is each trainer's own code:
advantages, the old and reference log-probabilities, the loss and its gradient.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_prompts, base_overrides, run_cli, write_jsonl

from dtrain.config import ConfigError, load_config
from dtrain.tracking import read_metrics, read_samples

TRL_FP32 = {"use_cpu": True, "bf16": False, "report_to": []}
PROMPTS = ["12 + 30 = ", "99 - 1 = ", "7 + 5 = "]  # (equal lengths: TRL passes no position ids)
G = 4
# Each prompt's completions (without EOS: added below, but for a truncated one) and rewards: one
# group whose rewards are all equal (advantage 0), one truncated completion, varied lengths.
COMPLETIONS = [["42", "43", "forty-two", "4"], ["98", "98", "98", "98"], ["12", "13 or 12", "eleven!", "1"]]
REWARDS = [[1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.25, 0.0, 0.0]]
TRUNCATED = (2, 1)  # prompt 2's second completion reached max_completion_length without EOS
MAX_COMPLETION = 9


def gsm_rows(n: int = 64) -> list[dict]:
    return arithmetic_prompts(n)


def grpo_overrides(model_dir: Path, data: Path, out: Path, *more: str) -> list[str]:
    return [*base_overrides(model_dir, out), f"data.train={data}", "data.format=prompt", "data.max_seq_len=64",
            "data.val_ratio=0.1", "data.test_ratio=0", "train.micro_batch_size=8", "eval.metric=reward",
            "grpo.num_generations=4", "grpo.max_completion_length=6", "grpo.rewards=[{function: exact_answer}]",
            *more]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", gsm_rows())


# --------------------------------------------------------------------------------------
# The loss, number for number with TRL


def fixed_batch(tokenizer):
    """The prompts' ids, each completion's ids (EOS-terminated but the truncated one), and rewards."""
    eos = tokenizer.eos_token_id
    prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    completions = []
    for p, texts in enumerate(COMPLETIONS):
        for j, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            completions.append(ids[:MAX_COMPLETION] if (p, j) == TRUNCATED else ids + [eos])
    completions[TRUNCATED[0] * G + TRUNCATED[1]] = (completions[TRUNCATED[0] * G + TRUNCATED[1]] * 5)[:MAX_COMPLETION]
    return prompt_ids, completions, [r for group in REWARDS for r in group]


def perturb(model: torch.nn.Module, seed: int = 11, scale: float = 0.05) -> None:
    """Move the policy after its completions were sampled (as an update would), so that the
    probability ratios differ from 1 and the clipping and KL terms matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def trl_loss(model, tokenizer, prompt_ids, completions, rewards, tmp_path, **grpo):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), num_generations=G, per_device_train_batch_size=len(completions),
                      max_completion_length=MAX_COMPLETION, **grpo, **TRL_FP32)
    calls = iter([rewards])
    trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **kw: next(calls), args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    repeated = [ids for ids in prompt_ids for _ in range(G)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    trainer._generate = lambda prompts: (repeated, completions, None, texts, None, {}, None, None)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, inputs["advantages"]


def dtrain_loss(model, reference, tokenizer, prompt_ids, completions, rewards, tmp_path, monkeypatch, **grpo):
    from dtrain.config import validate
    from dtrain.data.loader import Prompt, collate_prompts
    from dtrain.data.formats import Example
    from dtrain.objectives import grpo as grpo_module
    from dtrain.objectives.reference import Reference
    from dtrain.objectives.rewards import RewardFunction
    from dtrain.parallel.collectives import Collectives

    cfg = validate({"model": {"path": "tiny-llama"}, "data": {"format": "prompt"}, "eval": {"metric": "reward"},
                    "train": {"micro_batch_size": len(completions)}, "output_dir": str(tmp_path / "dtrain"),
                    "grpo": {"num_generations": G, "max_completion_length": MAX_COMPLETION,
                             "rewards": [{"function": "exact_answer"}], **grpo}})
    fixed = RewardFunction("fixed", "test", lambda completions, **kw: list(rewards), 1.0)
    objective = grpo_module.GRPO(cfg, Reference("copy", reference) if reference is not None else None, [fixed])
    objective.comm, objective.tokenizer = Collectives(torch.device("cpu")), tokenizer
    objective.policy = model
    (tmp_path / "dtrain").mkdir()
    objective.out = tmp_path / "dtrain"

    width = max(len(c) for c in completions)
    ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    ended = torch.tensor([c[-1] == tokenizer.eos_token_id for c in completions])
    monkeypatch.setattr(grpo_module, "generate", lambda *a, **k: (ids, mask, ended))
    rows = [Prompt(Example(p, [-100] * len(p)), i, json.dumps({"where": f"prompts.jsonl:{i + 1}", "row": {"prompt": text}}))
            for i, (p, text) in enumerate(zip(prompt_ids, PROMPTS))]
    model.train()
    batch = objective.rollout(collate_prompts(rows, tokenizer.pad_token_id), epoch=0, step=1,
                              steps=cfg.grpo.num_iterations)
    perturb(model)
    terms, counts = objective.loss_terms(model, batch), objective.counts(batch)
    loss = sum(value / counts[key] for key, value in terms.sums.items())  # (what train_step does, on one batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, batch["advantages"]


@pytest.mark.parametrize(("loss_type", "grpo"), [
    ("grpo", {}),
    ("dr_grpo", {"scale_rewards": False}),
    ("dapo", {"epsilon_high": 0.28}),
    ("grpo", {"beta": 0.04}),
    ("grpo", {"num_iterations": 2, "beta": 0.04}),
    ("dapo", {"num_iterations": 2, "beta": 0.04, "kl_bias_correction": False}),
    ("dr_grpo", {"num_iterations": 2, "beta": 0.1, "epsilon": 0.1}),
    ("dapo", {"num_iterations": 3, "beta": 0.04, "epsilon_high": 0.28, "temperature": 0.7}),
])
@pytest.mark.parametrize("chunked", [False, True], ids=["full_logits", "chunked_head"])
def test_the_loss_and_its_gradient_equal_trls_grpo_trainer(tiny_model_dir, tmp_path, monkeypatch, loss_type, grpo,
                                                          chunked):
    from transformers import AutoModelForCausalLM

    from dtrain.lm_head import install
    from dtrain.model import load_tokenizer
    from dtrain.schema import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    prompt_ids, completions, rewards = fixed_batch(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours, reference = copy.deepcopy(base), (copy.deepcopy(base) if grpo.get("beta") else None)
    if chunked:
        install(ours, chunk_tokens=7)  # (chunks that end inside sequences)
        if reference is not None:
            install(reference, chunk_tokens=7)
    trl_grpo = {**{k: v for k, v in grpo.items() if k != "kl_bias_correction"},
                "scale_rewards": "group" if grpo.get("scale_rewards", True) else "none",
                "use_bias_correction_kl": grpo.get("kl_bias_correction", True)}
    expected, expected_grads, expected_advantages = trl_loss(base, tokenizer, prompt_ids, completions, rewards,
                                                             tmp_path, loss_type=loss_type, **trl_grpo)
    loss, grads, advantages = dtrain_loss(ours, reference, tokenizer, prompt_ids, completions, rewards, tmp_path,
                                          monkeypatch, loss_type=loss_type, **grpo)
    torch.testing.assert_close(advantages, expected_advantages, rtol=0, atol=1e-6)
    assert abs(loss - expected) <= 1e-5 * max(1.0, abs(expected)), (loss, expected)
    assert loss != 0.0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=f"{name}")


# --------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_draws_from_the_tempered_distribution():
    """argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T); top-p leaves out the tail."""
    from dtrain.objectives.rollout import SeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        counts = torch.zeros(5)
        for seed in range(4000):
            counts[SeededSampling([seed], temperature, top_p, torch.device("cpu"))(None, logits).argmax()] += 1
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1.0:  # the smallest set of tokens holding top_p of the probability, renormalised
            probs = torch.where(torch.arange(5) < 2, probs, 0.0)
            probs /= probs.sum()
        assert torch.allclose(counts / 4000, probs, atol=0.025), (temperature, top_p, counts / 4000, probs)


def test_a_completion_is_the_same_whatever_batch_or_rank_samples_it(tiny_model_dir):
    """Seeds per completion: rows sampled together, apart, or after other rows give the same tokens."""
    from transformers import AutoModelForCausalLM

    from dtrain.objectives.rollout import completion_seed, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[1, 40, 41, 42], [1, 50], [1, 60, 61]]
    seeds = [completion_seed(7, 0, row, 0) for row in range(3)]

    def run(rows):
        width = max(len(prompts[r]) for r in rows)
        ids = torch.tensor([[0] * (width - len(prompts[r])) + prompts[r] for r in rows])
        mask = torch.tensor([[0] * (width - len(prompts[r])) + [1] * len(prompts[r]) for r in rows])
        out, completion_mask, _ = generate(model, ids, mask, max_new_tokens=12, pad_id=0, eos_id=2, synced=False,
                                           seeds=[seeds[r] for r in rows], temperature=1.0)
        return [out[i][completion_mask[i].bool()].tolist() for i in range(len(rows))]

    together = run([0, 1, 2])
    assert [run([r])[0] for r in range(3)] == together
    assert run([2, 0])[::-1] == [together[0], together[2]]
    assert len({tuple(c) for c in together}) == 3  # (sampled, not greedy: the rows differ)
    assert run([0])[0] != run_with_seed(model, prompts[0], completion_seed(7, 1, 0, 0))  # another epoch, another draw


def test_a_group_reads_its_prompt_once_and_samples_as_if_it_had_been_repeated(tiny_model_dir):
    """repeats=G: one prefill per distinct prompt, its cache copied to the group's rows; the
    completions are those of the prompt repeated G times."""
    from transformers import AutoModelForCausalLM

    from dtrain.objectives.rollout import completion_seed, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 0, 1, 40, 41], [1, 50, 51, 52, 53]])  # (left-padded)
    mask = (ids != 0).long()
    seeds = [completion_seed(3, 0, row, j) for row in range(2) for j in range(3)]
    shared = generate(model, ids, mask, max_new_tokens=10, pad_id=0, eos_id=2, synced=False, seeds=seeds, repeats=3)
    repeated = generate(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), max_new_tokens=10, pad_id=0,
                        eos_id=2, synced=False, seeds=seeds)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in shared[0]}) == 6


def test_a_group_reads_its_prompt_once_in_training_with_the_padded_rows_numbers(tiny_model_dir):
    """The shared-prefix row (sdpa_varlen, data.packing): each prompt once, its completions after
    it; every completion token's log-probability and entropy, and the gradient of a loss over
    them, equal those of the padded rows (prompt repeated per completion), GQA included."""
    from transformers import AutoModelForCausalLM

    from dtrain.lm_head import TokenLogprobs, head_outputs
    from dtrain.objectives.rollout import sequences, shared_prefix_row, target_owner

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa_varlen")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    prompt_ids = torch.tensor([[0, 0, 0, 0, 1, 40], [1, 50, 51, 52, 53, 54], [0, 0, 0, 0, 0, 1]])  # (one of 1 token)
    prompt_mask = (prompt_ids != 0).long()
    completions = torch.randint(3, 200, (9, 5))
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 1, 3])
    completion_mask = (torch.arange(5)[None] < lengths[:, None]).long()
    completions = torch.where(completion_mask.bool(), completions, 0)
    advantages = torch.randn(9)

    def run(batch):
        model.zero_grad()
        request = TokenLogprobs(batch["labels"], 0.7, with_entropy=True)
        logps = head_outputs(model, batch, request)
        scored = batch["labels"][:, 1:] != -100
        owner = target_owner(batch)
        (logps * advantages[owner] * scored).sum().backward()
        by_completion = [(logps[scored & (owner == j)], request.entropies[scored & (owner == j)]) for j in range(9)]
        return by_completion, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = run(sequences(prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0), completions,
                           completion_mask))
    row = shared_prefix_row(prompt_ids, prompt_mask, completions, completion_mask)
    assert row["input_ids"].shape == (1, (1 + 5 + 0) + int(lengths.sum()) + 9)  # prefixes, and 1 + C per completion
    assert row["prefix_segments"].tolist() == [[1, 6, 2, 4], [5, 3, 6, 5], [0, 2, 2, 4]]
    shared = run(row)
    for (logps_a, entropy_a), (logps_b, entropy_b) in zip(padded[0], shared[0]):
        assert len(logps_a) == len(logps_b) > 0
        torch.testing.assert_close(logps_b, logps_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy_b, entropy_a, atol=1e-6, rtol=0)
    for name, grad in padded[1].items():
        torch.testing.assert_close(shared[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_model_whose_attention_is_not_plain_causal_keeps_its_prompts_apart():
    """A sliding window shorter than the run's sequences (or soft-capping) is not what the shared-
    prefix attention computes: such a model trains on the flattened rows instead, and a shared-prefix
    row given to such a layer anyway is refused, not computed wrongly."""
    from transformers import MistralConfig, MistralForCausalLM

    from dtrain.attention import shares_prefixes, shared_prefix_kwargs, sdpa_varlen_attention_forward

    def mistral(window):
        config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=64, sliding_window=window)
        return MistralForCausalLM._from_config(config, attn_implementation="sdpa_varlen")

    assert shares_prefixes(mistral(4096), 64) and shares_prefixes(mistral(None), 64)
    assert not shares_prefixes(mistral(16), 64)
    layer = torch.nn.Module()
    q = torch.randn(1, 2, 12, 16)
    kwargs = shared_prefix_kwargs(torch.tensor([[4, 5, 3]]))
    with pytest.raises(ValueError, match="sliding window"):
        sdpa_varlen_attention_forward(layer, q, q, q, None, sliding_window=6, **kwargs)
    out, _ = sdpa_varlen_attention_forward(layer, q, q, q, None, sliding_window=9, **kwargs)  # (covers 4 + 5)
    assert out.shape == (1, 12, 2, 16)


def run_with_seed(model, prompt, seed):
    from dtrain.objectives.rollout import generate

    out, mask, _ = generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=12, pad_id=0, eos_id=2, synced=False, seeds=[seed])
    return out[0][mask[0].bool()].tolist()


# --------------------------------------------------------------------------------------
# Rewards


def test_the_built_in_rewards():
    from dtrain.objectives.rewards import digit_match, exact_answer, length_penalty, regex_format

    assert exact_answer(["42", "The answer is 41, no: 42.", "forty-two", " -3", ""],
                        answer=["42", "42", "42", "-3", "0"]) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert exact_answer(["1,000", "7.50"], field="solution", solution=[1000, "7.5"]) == [1.0, 1.0]
    assert digit_match(["155", "165", "55", "1155", "no number", "-3"], answer=["155"] * 5 + ["-3"]) == pytest.approx(
        [1.0, 2 / 3, 2 / 3, 3 / 4, 0.0, 1.0])
    assert regex_format(["<think>a</think> 4", "4"], pattern=r"<think>.*</think>\s*\d+") == [1.0, 0.0]
    assert length_penalty([[1] * 10, [1] * 3], target=5, per_token=0.1) == pytest.approx([-0.5, 0.0])


def test_a_project_function_is_called_with_the_rows_fields(tmp_path):
    from dtrain.objectives.rewards import load_rewards, score
    from dtrain.schema import GrpoConfig

    (tmp_path / "my_rewards.py").write_text(
        "def close(prompts, completions, answer, level, **kwargs):\n"
        "    return [1.0 / (1 + abs(int(c) - int(a))) * kwargs['scale'] for c, a in zip(completions, answer)]\n")
    functions = load_rewards(GrpoConfig(rewards=[{"function": f"{tmp_path / 'my_rewards.py'}:close", "weight": 2,
                                                  "args": {"scale": 2}}, {"function": "exact_answer"}]))
    values = score(functions, ["p", "p"], ["41", "42"], [[52, 49], [52, 50]],
                   [{"answer": "42", "level": 1}, {"answer": "42", "level": 2}], ["f:1", "f:2"])
    assert values == [[1.0, 0.0], [2.0, 1.0]]
    assert [f.name for f in functions] == ["close", "exact_answer"] and functions[0].weight == 2


@pytest.mark.parametrize(("source", "says"), [
    ("def bad(completions, **kw):\n    return [1 / int(c) for c in completions]\n",
     r"reward function bad \(.*\) raised ZeroDivisionError: division by zero on row prompts.jsonl:2 \(completion '0'\)"),
    ("def bad(completions, **kw):\n    return ['high' if c else 0.0 for c in completions]\n",
     r"reward function bad \(.*\) returned 'high' for row prompts.jsonl:1 \(completion '5'\): a reward must be a finite"),
    ("def bad(completions, **kw):\n    return [float('nan')] * len(completions)\n", r"returned nan for row prompts.jsonl:1"),
    ("def bad(completions, **kw):\n    return 1.0\n", r"returned a float for 2 completions .* one number per completion"),
])
def test_a_reward_function_that_fails_is_named_with_its_row(tmp_path, source, says):
    from dtrain.objectives.rewards import RewardError, load_rewards, score
    from dtrain.schema import GrpoConfig

    (tmp_path / "r.py").write_text(source)
    functions = load_rewards(GrpoConfig(rewards=[{"function": f"{tmp_path / 'r.py'}:bad"}]))
    with pytest.raises(RewardError, match=says):
        score(functions, ["p", "p"], ["5", "0"], [[53], [48]], [{}, {}], ["prompts.jsonl:1", "prompts.jsonl:2"])


# --------------------------------------------------------------------------------------
# Runs


def run_train(cfg):
    from dtrain.train import train

    return train(cfg)


def test_a_run_logs_rewards_and_samples_and_resumes_exactly(tiny_model_dir, prompts_file, tmp_path):
    """LoRA, the KL to the adapters switched off, two updates per batch of completions: stopped after
    a checkpoint in the middle of a batch's updates (step 3) and resumed, the run samples, scores and
    trains as the uninterrupted one (the sampling state is the data position)."""
    import shutil

    common = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=3", "optim.lr=2e-2",
              "peft.method=lora", "peft.dropout=0", "grpo.num_iterations=2", "grpo.beta=0.04",
              "grpo.rewards=[{function: exact_answer}, {function: regex_format, name: digit, args: {pattern: '.*[0-9].*'}}]",
              "grpo.samples_every=2", "schedule.name=constant", "schedule.warmup_steps=0", "eval.every_steps=3"]
    a, b = tmp_path / "a", tmp_path / "b"
    result = run_train(load_config(None, grpo_overrides(tiny_model_dir, prompts_file, a, *common)))
    assert set(result.final_metrics) >= {"eval_reward", "eval_reward_exact_answer", "eval_reward_digit",
                                         "eval_completion_length"}
    shutil.copytree(a / "checkpoints" / "step_00000003", b / "checkpoints" / "step_00000003")
    samples_a = read_samples(a)
    shutil.copy(a / "samples.jsonl", b / "samples.jsonl")  # (as the stopped run left it, and more)
    run_train(load_config(None, grpo_overrides(tiny_model_dir, prompts_file, b, *common, "checkpoint.resume=auto")))
    steps_a = {r["step"]: r for r in read_metrics(a) if "loss" in r}
    steps_b = {r["step"]: r for r in read_metrics(b) if "loss" in r}
    assert sorted(steps_a) == [1, 2, 3, 4, 5, 6] and sorted(steps_b) == [4, 5, 6]
    keys = ("loss", "reward", "reward_digit", "kl", "entropy", "completion_length", "clip_ratio_low",
            "frac_reward_zero_std", "truncated_ratio", "grad_norm")
    for step in (4, 5, 6):
        for key in keys:
            assert steps_b[step][key] == pytest.approx(steps_a[step][key], abs=1e-6, rel=0), (step, key)
    assert steps_a[6]["loss"] != steps_a[4]["loss"] and steps_a[2]["kl"] > 0
    assert read_samples(b) == samples_a  # (truncated at step 3, then the same completions appended)
    assert {r["step"] for r in samples_a} == {1, 3, 5}  # made for steps 1-2, 3-4, 5-6: each pair holds a multiple of 2
    assert len([r for r in samples_a if r["step"] == 1]) == 8 and set(samples_a[0]) == {
        "step", "prompt", "completion", "reward", "reward_exact_answer", "reward_digit"}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_packed_completions_train_as_the_padded_ones(tiny_model_dir, prompts_file, tmp_path, loss_type):
    """data.packing: each micro-batch's prompts and completions in one padding-free row (variable-
    length attention): the same rewards, KL and losses as padded rows, with two updates per batch
    of completions and the KL to a reference copy."""
    common = ["train.max_steps=4", "grpo.num_iterations=2", "grpo.beta=0.04", f"grpo.loss_type={loss_type}",
              "optim.lr=2e-2", "grpo.rewards=[{function: regex_format, name: digit, args: {pattern: '.*[0-9].*'}}]"]
    runs = {}
    for name, extra in (("padded", []), ("packed", ["data.packing=true"])):
        runs[name] = run_train(load_config(None, grpo_overrides(tiny_model_dir, prompts_file, tmp_path / name,
                                                                *common, *extra)))
    assert runs["packed"].train_losses == pytest.approx(runs["padded"].train_losses, abs=1e-5, rel=0)
    padded = [r for r in read_metrics(tmp_path / "padded") if "reward" in r]
    packed = [r for r in read_metrics(tmp_path / "packed") if "reward" in r]
    for a, b in zip(packed, padded):
        for key in ("reward", "kl", "entropy", "completion_length", "clip_ratio_low"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=0), (a["step"], key)
    assert padded[-1]["kl"] > 0 and padded[0]["reward_std"] > 0 and max(map(abs, runs["padded"].train_losses)) > 1e-4


def test_prompt_rows_keep_their_fields_and_the_prompts_end(tiny_model_dir, tmp_path):
    from dtrain.data import prepare_data
    from dtrain.data.loader import batch_rows, collate_rows, take
    from dtrain.model import load_tokenizer

    rows = [{"prompt": "Q: 1 + 1?\nA:  ", "answer": 2, "meta": {"level": 1}},
            {"prompt": [{"role": "user", "content": "1 + 2?"}], "answer": 3},
            {"prompt": "Q: 1 + 1?\nA:  ", "answer": 2, "meta": {"level": 1}},  # a duplicate
            {"prompt": "Q: 1 + 1?\nA:  ", "answer": 5}]  # the same prompt, another answer: kept
    cfg = load_config(None, grpo_overrides(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "o",
                                           "data.val_ratio=0", "data.shuffle=false"))
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.seed)
    assert len(data.train) == 3
    batch = collate_rows(take(data.train, [0, 1, 2]), tokenizer.pad_token_id)
    stored = sorted(batch_rows(batch["row_utf8"]), key=lambda r: r["where"])
    assert [r["where"].rsplit(":", 1)[1] for r in stored] == ["1", "2", "4"]
    assert stored[0]["row"] == rows[0] and stored[1]["row"]["answer"] == 3
    texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert any(t.endswith("A:  ") for t in texts)  # (cleaning keeps a prompt's trailing space: the completion starts there)
    assert tokenizer.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True) in texts
    assert batch["input_ids"][:, -1].ne(tokenizer.pad_token_id).all()  # left-padded
    assert (batch["labels"] == -100).all()


@pytest.mark.parametrize(("overrides", "says"), [
    (["grpo.num_generations=1", "train.micro_batch_size=8"],
     "grpo.num_generations=1: a completion's advantage is its reward against the other completions"),
    (["train.micro_batch_size=6"], "train.micro_batch_size=6 is not a multiple of grpo.num_generations=4: .* set "
                                   "train.micro_batch_size to 4 or 8"),
    (["grpo.rewards=[]"], "grpo.rewards is empty"),
    (["grpo.rewards=[{function: no_such_module:f}]"],
     r"grpo.rewards\[0\].function='no_such_module:f': cannot import no_such_module \(ModuleNotFoundError"),
    (["grpo.rewards=[{function: exact}]"], r"grpo.rewards\[0\].function='exact' is neither a built-in"),
    (["grpo.rewards=[{function: os.path:no_such}]"], "os.path has no function 'no_such'"),
    (["eval.metric=loss"], "eval.metric=loss: train.objective=grpo has no evaluation loss; set eval.metric=reward"),
    (["data.packing=true", "model.attn_implementation=sdpa"],
     "data.packing with train.objective=grpo .* needs variable-length attention: set model.attn_implementation"),
    (["grpo.beta=0.1", "preference.reference=adapters_disabled"], "peft.method is none"),
    (["train.objective=dpo"], "does not fit train.objective=dpo"),
    (["parallel.strategy=fsdp", "parallel.mesh.tensor=2"], "parallel.mesh.tensor=2 with train.objective=grpo"),
])
def test_a_grpo_config_that_cannot_work_is_refused_naming_the_key(tiny_model_dir, prompts_file, tmp_path, overrides,
                                                                  says):
    from dtrain.train import setup

    with pytest.raises(ConfigError, match=says):
        cfg = load_config(None, grpo_overrides(tiny_model_dir, prompts_file, tmp_path / "o", *overrides))
        setup(cfg).release()  # (importing the reward functions is setup's: a run's first act, before it writes)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_prompt_and_its_completion_must_fit_a_learned_position_table(tiny_model_dir, prompts_file, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dtrain.train import setup

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=260, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            (model_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    cfg = load_config(None, grpo_overrides(model_dir, prompts_file, tmp_path / "o", "data.max_seq_len=60"))
    with pytest.raises(ConfigError, match="data.max_seq_len=60 \\+ 6 generated tokens is longer than the 64 positions "
                                          ".* set data.max_seq_len to 58 or less"):
        setup(cfg).release()


def test_a_reward_function_that_raises_stops_the_run_naming_it_and_the_row(tiny_model_dir, tmp_path):
    """From the command line: one `error:` line (exit 1), no traceback; the output directory holds
    no checkpoint."""
    (tmp_path / "rewards.py").write_text("def strict(completions, answer, **kw):\n"
                                         "    return [float(c == a) if a != 'boom' else 1 / 0 for c, a in zip(completions, answer)]\n")
    rows = gsm_rows(16)
    rows[5]["answer"] = "boom"
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    (tmp_path / "grpo.yaml").write_text("seed: 42\n")
    proc = run_cli("train", str(tmp_path / "grpo.yaml"), *grpo_overrides(tiny_model_dir, data, out, "data.val_ratio=0", "train.max_steps=8",
                                            "grpo.rewards=[{function: rewards:strict}]"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: reward function strict (rewards:strict) raised ZeroDivisionError: division by zero on row " \
           f"{data}:6" in proc.stderr
    assert not (out / "checkpoints").exists()


def test_the_diagnosis_reads_the_reward_curves():
    from dtrain.diagnose import reward_diagnosis

    evals = {10: {"eval_reward": 0.1}, 40: {"eval_reward": 0.3}}
    rising = reward_diagnosis([(s, 0.01 * s + 0.02 * (s % 3), 0.2) for s in range(1, 41)], evals, "reward")
    assert rising.verdict == "reward rising" and "eval_reward went 0.1000 (step 10) -> 0.3000 (step 40)" in rising.reason
    flat = reward_diagnosis([(s, 0.0, 1.0) for s in range(1, 41)], {}, "reward")
    assert flat.verdict == "reward flat" and "100% of the groups scored all alike" in flat.reason
    noisy = reward_diagnosis([(s, 0.03 * (s % 4 == 0) + 0.001 * s / 40, 0.9) for s in range(1, 41)], {}, "reward")
    assert noisy.verdict == "reward flat" and "within the steps' scatter" in noisy.reason
    assert reward_diagnosis([(1, 0.0, 0.0)], {}, "reward").verdict == "not enough data"
