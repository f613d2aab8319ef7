"""Built-in model presets and the byte-level tokenizer that ships with dtrain.

Tiny presets (`tiny-llama`, `tiny-qwen2`) are small random models for CPU runs and tests.
Architecture presets (`llama3-8b`, ...) carry the published shapes of real models: with
random weights they are for pre-training from scratch and for `--dry-run`, which shrinks them.
Nothing here touches the network.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Prefix-stable (rendering messages[:i] is a prefix of rendering messages[:i+1]) so that
# completion-only masking can find each assistant turn; every assistant turn ends in EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer: 4 special tokens + the 256 byte symbols, no merges.

    Every string round-trips, any language works, and the vocabulary (260) is small enough
    for tiny models. BOS is added like Llama's tokenizer does; EOS is added by the data code.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# model_type + config kwargs. Tiny shapes are sized for a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=260, max_position_embeddings=1024,
        tie_word_embeddings=True, **_TOKEN_IDS,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=260, max_position_embeddings=1024,
        tie_word_embeddings=True, **_TOKEN_IDS,
    ),
    # Published shapes of real architectures (random weights when built from the preset).
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **_TOKEN_IDS,
    ),
    "llama3-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **_TOKEN_IDS,
    ),
    "qwen2-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, **_TOKEN_IDS,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, **_TOKEN_IDS,
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_config(name: str) -> PretrainedConfig:
    kwargs = dict(PRESETS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def preset_tokenizer(name: str) -> PreTrainedTokenizerBase:
    # All presets use the shipped byte tokenizer; its ids fit every preset's vocabulary.
    del name
    return byte_tokenizer()
