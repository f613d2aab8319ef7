"""sdpa_varlen: a flattened packed row run per example equals the examples run one by one with
plain SDPA (losses and gradients); everything else is exactly transformers' SDPA."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import dtrain.attention as attention
from dtrain.data.formats import Example
from dtrain.data.packing import collate_flattened, collate_packed
from dtrain.attention import uses_varlen_attention
from dtrain.objectives.base import logits_and_labels
from dtrain.model import attention_implementation

CONFIGS = {
    "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=260, max_position_embeddings=1024),
    "qwen2": Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=260, max_position_embeddings=1024),
}


def models(arch):
    torch.manual_seed(0)
    # A config each: from_config records the attention on the config object it is given.
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[arch]), attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[arch]), attn_implementation="sdpa_varlen")
    assert plain.config._attn_implementation == "sdpa" and varlen.config._attn_implementation == "sdpa_varlen"
    varlen.load_state_dict(plain.state_dict())
    return plain, varlen


def rows_of(seed=0):
    """Packed rows of examples of mixed lengths: 1 token, many short ones, equal lengths, long ones."""
    rng = random.Random(seed)
    lengths = [1, 5, 5, 5, 40, 300, 280, 17, 600, 2, 90, 91]
    examples = [Example([rng.randint(3, 259) for _ in range(n)], [rng.randint(3, 259) for _ in range(n)])
                for n in lengths]
    return [examples[:5], examples[5:8], examples[8:]]


def token_losses(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="none")[labels.reshape(-1) != -100]


def equal_rows():
    """Every example equally long (fixed-length data: one batched call on views)."""
    rng = random.Random(2)
    return [[Example([rng.randint(3, 259) for _ in range(50)], [rng.randint(3, 259) for _ in range(50)])]
            for _ in range(4)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("make_rows", [rows_of, equal_rows], ids=["mixed", "equal"])
def test_flattened_losses_and_gradients_equal_one_by_one(arch, make_rows, monkeypatch):
    plain, varlen = models(arch)
    rows = make_rows()
    alone = []
    for ex in (ex for row in rows for ex in row):
        batch = collate_flattened([[ex]])
        logits, labels = logits_and_labels(plain, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])},
                                           shift=True)
        alone.append(token_losses(logits, labels))
    alone = torch.cat(alone)
    alone.sum().backward()

    # Count the per-example SDPA calls: the batched path must be the one that ran.
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape) or sdpa(q, *a, **k))
    batch = collate_flattened(rows)
    logits, labels = logits_and_labels(varlen, batch, shift=True)
    flat = token_losses(logits, labels)
    assert calls and all(shape[2] < batch["input_ids"].shape[1] for shape in calls)
    assert flat.shape == alone.shape
    assert torch.allclose(flat, alone, atol=1e-5, rtol=0)
    flat.sum().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), varlen.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5, rtol=1e-4), name

    # Negative control: without the boundaries it would be one long causal sequence.
    del batch["position_ids"]
    leaky = token_losses(*logits_and_labels(varlen, batch, shift=True))
    assert (leaky - alone).abs().max() > 1e-3


def test_groups_cover_every_example_once_and_batch_similar_lengths():
    bounds = [0, 1, 6, 11, 16, 56, 356, 636, 653, 1253, 1255, 1345, 1436]
    groups = attention._groups(bounds)
    spans = sorted(s for _, group in groups for s in group)
    assert spans == list(zip(bounds[:-1], bounds[1:]))
    assert all(width == max(b - a for a, b in group) for width, group in groups)
    assert len(groups) < len(spans)
    # 600 runs alone; 300 and 280 (within 20%) together; everything <= 256 in one call.
    assert [sorted(b - a for a, b in g) for _, g in groups] == [[600], [280, 300], [1, 2, 5, 5, 5, 17, 40, 90, 91]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padded_and_packed_mask_batches_match_sdpa_exactly(arch):
    plain, varlen = models(arch)
    rows = rows_of(1)
    examples = [ex for row in rows for ex in row][:4]
    ids = torch.zeros((4, 300), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, ex in enumerate(examples):
        n = min(300, len(ex.input_ids))
        ids[i, :n], mask[i, :n] = torch.tensor(ex.input_ids[:n]), 1
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           varlen(input_ids=ids, attention_mask=mask).logits)
        packed = collate_packed(rows, pad_id=0)
        inputs = {k: packed[k] for k in ("input_ids", "attention_mask", "position_ids")}
        assert torch.equal(plain(**inputs).logits, varlen(**inputs).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_matches_sdpa(arch):
    plain, varlen = models(arch)
    prompts = torch.tensor([[0, 0, 5, 9, 33, 7], [4, 8, 15, 16, 23, 42]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left-padded, as evaluation does
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain_out = plain.generate(input_ids=prompts, attention_mask=mask, **kwargs)
    varlen_out = varlen.generate(input_ids=prompts, attention_mask=mask, **kwargs)
    assert torch.equal(plain_out, varlen_out)
    one = prompts[1:]  # batch 1, no padding: a KV cache, position_ids without restarts
    assert torch.equal(plain.generate(input_ids=one, **kwargs), varlen.generate(input_ids=one, **kwargs))


def test_auto_picks_sdpa_varlen_without_flash_attention():
    assert attention_implementation("auto", torch.device("cpu")) == "sdpa_varlen"
    assert attention_implementation("sdpa", torch.device("cpu")) == "sdpa"
    _, varlen = models("llama")
    plain, _ = models("llama")
    assert uses_varlen_attention(varlen) and not uses_varlen_attention(plain)


def test_varlen_kwargs_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    kwargs = attention.varlen_kwargs(position_ids)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4


def test_training_on_packed_data_with_checkpointing_lora_and_bf16(make_config, monkeypatch):
    """auto -> sdpa_varlen through dtrain's loop: flattened batches take the per-example path
    under gradient checkpointing, LoRA and bf16 autocast."""
    from dtrain.train import train

    calls = []
    monkeypatch.setattr(attention, "_segments", lambda *a, _s=attention._segments: calls.append(_s(*a)) or calls[-1])
    result = train(make_config("data.packing=true", "data.max_seq_len=1024", "train.max_steps=2",
                               "model.gradient_checkpointing=true", "peft.method=lora", "train.precision=bf16"))
    assert len(result.train_losses) == 2 and all(0 < x < 10 for x in result.train_losses)
    assert any(bounds is not None and len(bounds) > 2 for bounds in calls)  # several examples per flattened row
