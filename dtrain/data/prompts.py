"""Prompt rows -> token ids, for online RL (data.format=prompt; train.objective=grpo).

A row is `{prompt, ...}`: the prompt a string (tokenized with the tokenizer's special tokens, as
the alpaca format's prompt is) or a list of messages (rendered with the chat template and the
assistant's generation prompt). Its other fields go, untouched, to the reward functions; the row
is stored whole (JSON) beside its tokens, with where it came from (file:line). Cleaning
normalises a prompt's text but keeps its trailing whitespace: it is where the completion begins.

A prompt longer than data.max_seq_len keeps its end (the part next to the completion; a leading
BOS stays), as TRL's max_prompt_length does, and counts as truncated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtrain.data.formats import IGNORE_INDEX, EncodedBatch, Example, check_messages, encode_each
from dtrain.data.sources import RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dtrain.schema import DataConfig


class PromptEncoder:
    def __init__(self, cfg: "DataConfig", tokenizer: "PreTrainedTokenizerBase"):
        self.cfg, self.tok = cfg, tokenizer

    def encode_batch(self, rows: list[dict[str, Any]], wheres: list[str]) -> EncodedBatch:
        return EncodedBatch.from_examples(encode_each(self.prompt, rows, wheres), token_labels=True)

    def prompt(self, row: dict[str, Any], where: str) -> Example:
        name = self.cfg.prompt_field
        prompt = row.get(name)
        if prompt is None:
            raise RowError(where, f"missing field {name!r} (present: {sorted(row)})")
        if isinstance(prompt, list):
            check_messages(prompt, name, where)
            if self.tok.chat_template is None:
                raise RowError(where, "the prompt is a conversation but the tokenizer has no chat template (set "
                                      "model.tokenizer to one that has)")
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = self.tok([text], add_special_tokens=False)["input_ids"][0]
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise RowError(where, f"field {name!r} is empty: nothing to complete")
            ids = self.tok([prompt], add_special_tokens=True)["input_ids"][0]
        else:
            raise RowError(where, f"field {name!r} must be a string or a list of messages, got {type(prompt).__name__}")
        limit = self.cfg.max_seq_len
        truncated = len(ids) > limit
        if truncated:
            head = ids[:1] if ids[0] == self.tok.bos_token_id else []
            ids = head + ids[len(ids) - limit + len(head):]
        return Example(list(ids), [IGNORE_INDEX] * len(ids), truncated=truncated)
