"""Packing: the loss of a packed batch equals the examples run one by one, token by token."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA
from transformers import AutoModelForCausalLM

from dtrain.config import DataConfig
from dtrain.data.formats import Encoder, Example
from dtrain.data.packing import collate_flattened, collate_packed, length_grouped_order, pack_examples
from dtrain.data.report import padding_fraction
from dtrain.presets import byte_tokenizer


def lengths_of(examples):
    return [len(ex.input_ids) for ex in examples]


def token_losses(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                             reduction="none").view(labels.shape)
    return losses[labels != -100]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def alpaca_examples(n, **data):
    enc = Encoder(DataConfig(format="alpaca", **data), byte_tokenizer())
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()[:n]]
    return [enc(row, f"{ALPACA}:{i + 1}") for i, row in enumerate(rows)]


def random_examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 90)
        ids = [1] + [rng.randint(4, 259) for _ in range(length - 1)]
        cut = rng.randint(1, length - 1)
        out.append(Example(ids, [-100] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("examples", [alpaca_examples(10), alpaca_examples(10, train_on_prompt=True),
                                      random_examples(25)], ids=["alpaca", "alpaca-all-tokens", "random"])
def test_packed_loss_equals_one_by_one(model, examples):
    bins = pack_examples(lengths_of(examples), 512)
    assert len(bins) < len(examples)  # several examples share a row
    alone = torch.cat([token_losses(model(input_ids=torch.tensor([examples[i].input_ids])).logits,
                                    torch.tensor([examples[i].labels])) for b in bins for i in b])
    batch = collate_packed([[examples[i] for i in b] for b in bins], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    packed = token_losses(logits, batch["labels"])
    assert packed.shape == alone.shape  # same targets, in the same order
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)
    assert packed.sum().item() == pytest.approx(alone.sum().item(), rel=1e-6)  # fp32 summation order

    # Negative control: the same packed rows with a plain causal mask leak across examples.
    causal = torch.ones_like(batch["input_ids"])
    leaky = token_losses(model(input_ids=batch["input_ids"], attention_mask=causal, position_ids=batch["position_ids"],
                               use_cache=False).logits, batch["labels"])
    assert (leaky - alone).abs().max() > 1e-3


@pytest.mark.parametrize("examples", [alpaca_examples(10), random_examples(25)], ids=["alpaca", "random"])
def test_flattened_loss_equals_one_by_one(model, examples):
    """The variable-length layout (what flash-attention 2 gets): one padding-free row, no mask.
    On CPU, SDPA sees the same example boundaries, read off the restarting position_ids."""
    bins = pack_examples(lengths_of(examples), 512)
    rows = [[examples[i] for i in b] for b in bins]
    alone = torch.cat([token_losses(model(input_ids=torch.tensor([ex.input_ids])).logits,
                                    torch.tensor([ex.labels])) for row in rows for ex in row])
    batch = collate_flattened(rows)
    assert batch["input_ids"].shape == (1, sum(lengths_of(examples))) and "attention_mask" not in batch
    flat = token_losses(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits, batch["labels"])
    assert flat.shape == alone.shape
    assert torch.allclose(flat, alone, atol=1e-5, rtol=0)

    # Negative control: positions that do not restart make it one long sequence.
    running = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    leaky = token_losses(model(input_ids=batch["input_ids"], position_ids=running, use_cache=False).logits,
                         batch["labels"])
    assert (leaky - alone).abs().max() > 1e-3


def test_packed_gradients_equal_one_by_one(tiny_model_dir):
    examples = random_examples(12, seed=3)
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sum(token_losses(m1(input_ids=torch.tensor([ex.input_ids])).logits, torch.tensor([ex.labels])).sum()
        for ex in examples).backward()
    batch = collate_packed([[examples[i] for i in b] for b in pack_examples(lengths_of(examples), 256)], pad_id=0)
    token_losses(m2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits, batch["labels"]).sum().backward()
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5), name


def test_collate_packed_layout():
    a, b = Example([1, 10, 11], [-100, 10, 11]), Example([1, 20], [1, 20])
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 1, 20], [1, 20, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 10, 11, -100, 20], [-100, 20, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    m = batch["attention_mask"][0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"][1, 0].diagonal().all()  # padding attends to itself: no NaN rows


def test_collate_flattened_layout_gives_flash_attention_the_example_boundaries():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    a, b = Example([1, 10, 11], [-100, 10, 11]), Example([1, 20], [1, 20])
    batch = collate_flattened([[a, b], [b]])
    assert batch["input_ids"].tolist() == [[1, 10, 11, 1, 20, 1, 20]]
    assert batch["labels"].tolist() == [[-100, 10, 11, -100, 20, -100, 20]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # What transformers hands the variable-length flash kernel: cumulative example lengths.
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == cu_k.tolist() == [0, 3, 5, 7] and int(max_q) == 3


def test_pack_examples_fits_every_example_once_and_is_deterministic():
    examples = random_examples(300, seed=1)
    bins = pack_examples(lengths_of(examples), 128, shuffle_seed=0)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(len(examples[i].input_ids) for i in b) <= 128 for b in bins)
    assert bins == pack_examples(lengths_of(examples), 128, shuffle_seed=0)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        pack_examples([10], 8)


def alpaca_like_lengths(n=2000, seed=0):
    """Many short examples and a long tail, like Alpaca's token lengths."""
    rng = random.Random(seed)
    return [min(1024, max(16, int(rng.lognormvariate(4.6, 0.75)))) for _ in range(n)]


def test_packing_cuts_padding_below_5_percent_on_alpaca_like_lengths(capsys):
    lengths = alpaca_like_lengths()
    bins = pack_examples(lengths, 1024, shuffle_seed=0)
    packed_lengths = [sum(lengths[i] for i in b) for b in bins]
    padded = padding_fraction(lengths, 8)
    packed = padding_fraction(packed_lengths, 8)
    with capsys.disabled():
        print(f"\nalpaca-like lengths, batch 8, max_seq_len 1024: pad-to-longest {100 * padded:.1f}% padding "
              f"({sum(lengths)} real tokens), packed {100 * packed:.2f}% ({len(bins)} rows)")
    assert packed < 0.05 < padded


def test_length_grouped_order_reduces_padding():
    lengths = alpaca_like_lengths(seed=2)
    order = length_grouped_order(lengths, 8, seed=0)
    assert sorted(order) == list(range(len(lengths)))
    grouped = padding_fraction([lengths[i] for i in order], 8)
    assert grouped < padding_fraction(lengths, 8) / 3
    assert order != length_grouped_order(lengths, 8, seed=1)


def test_prepare_data_packs_every_training_token_once(tmp_path):
    from dtrain.data import prepare_data

    cfg = DataConfig(train=[str(ALPACA)], format="alpaca", max_seq_len=1024, val_ratio=0.1, test_ratio=0.0,
                     cache_dir=str(tmp_path / "cache"))
    plain = prepare_data(cfg, byte_tokenizer(), seed=0)
    packed = prepare_data(cfg.model_copy(update={"packing": True}), byte_tokenizer(), seed=0)
    assert packed.packed and len(packed.train) < len(plain.train) / 3
    rows = packed.train[:]
    assert all(sum(lens) == len(ids) <= 1024 for lens, ids in zip(rows["seq_lens"], rows["input_ids"]))
    assert sum(sum(lens) for lens in rows["seq_lens"]) == sum(plain.lengths_before_packing)
    assert sorted(n for lens in rows["seq_lens"] for n in lens) == sorted(plain.lengths_before_packing)
    assert len(packed.validation) == len(plain.validation)  # evaluation data is never packed


def test_training_on_packed_data(make_config):
    from dtrain.train import train

    result = train(make_config("data.packing=true", "data.max_seq_len=1024", "train.max_steps=3"))
    assert len(result.train_losses) == 3 and all(0 < x < 10 for x in result.train_losses)
