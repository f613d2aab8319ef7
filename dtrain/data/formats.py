"""Turn one row into token ids and labels.

Labels follow Hugging Face's convention: aligned with `input_ids` (the loss shifts them),
-100 where no loss is taken. Prompts are tokenized separately from completions so the
boundary between the masked and the trained part is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dtrain.schema import DataConfig
from dtrain.data.sources import RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")  # (the roles chat templates render)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # token labels (causal LM) or a class index (classification)
    truncated: bool = False


class TooLong(Exception):
    """After truncation to max_seq_len no trained token is left: the row is dropped and counted."""


@dataclass
class EncodedBatch:
    """A batch of encoded rows, flat, as an Arrow list column lays them out: row i's tokens are
    `ids[offsets[i]:offsets[i + 1]]`. A row that could not be encoded has no tokens and its
    RowError or TooLong in `errors` (None for the others)."""

    ids: np.ndarray  # int32
    labels: np.ndarray | None  # int32 token labels aligned with `ids`; None for classification
    classes: list[int | None] | None  # classification: each row's class index
    offsets: np.ndarray  # int32, one more than rows
    truncated: list[bool]
    errors: list[RowError | TooLong | None]
    rejected: EncodedBatch | None = None  # data.format=preference: each row's rejected sequence, row for row

    @classmethod
    def from_pairs(cls, results: list[tuple[Example, Example] | RowError | TooLong]) -> EncodedBatch:
        """Preference pairs: the chosen sequences, with the rejected ones (and the same errors) in `rejected`."""
        chosen = cls.from_examples([r[0] if isinstance(r, tuple) else r for r in results], token_labels=True)
        chosen.rejected = cls.from_examples([r[1] if isinstance(r, tuple) else r for r in results], token_labels=True)
        return chosen

    @classmethod
    def from_examples(cls, results: list[Example | RowError | TooLong], token_labels: bool) -> EncodedBatch:
        examples = [r if isinstance(r, Example) else Example([], [] if token_labels else None) for r in results]
        lengths = [len(ex.input_ids) for ex in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for ex in examples for t in ex.input_ids), dtype=np.int32, count=int(offsets[-1]))
        labels = classes = None
        if token_labels:
            labels = np.fromiter((t for ex in examples for t in ex.labels), dtype=np.int32, count=int(offsets[-1]))
        else:
            classes = [ex.labels for ex in examples]
        return cls(ids, labels, classes, offsets, [ex.truncated for ex in examples],
                   [None if isinstance(r, Example) else r for r in results])

    def examples(self) -> list[Example | RowError | TooLong]:
        out: list[Example | RowError | TooLong] = []
        for i, error in enumerate(self.errors):
            if error is not None:
                out.append(error)
                continue
            start, end = self.offsets[i], self.offsets[i + 1]
            labels = self.labels[start:end].tolist() if self.labels is not None else self.classes[i]
            out.append(Example(self.ids[start:end].tolist(), labels, self.truncated[i]))
        return out


def _field(row: dict[str, Any], name: str, where: str, *, required: bool = True, kind: type = str) -> Any:
    if name not in row or row[name] is None:
        if required:
            raise RowError(where, f"missing field {name!r} (present: {sorted(row)})")
        return None
    value = row[name]
    if kind is str and not isinstance(value, str):
        raise RowError(where, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def encode_each(encode: Any, rows: list[dict[str, Any]], wheres: list[str]) -> list[Any]:
    """encode(row, where) of each row; a bad row's entry is its RowError (or TooLong)."""
    out: list[Any] = []
    for row, where in zip(rows, wheres):
        try:
            out.append(encode(row, where))
        except (RowError, TooLong) as exc:
            out.append(exc)
    return out


def check_messages(messages: Any, field: str, where: str) -> None:
    """A non-empty list of {role, content} messages with known roles, or a RowError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RowError(where, f"field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(where, f"{field}[{i}] must be {{role: str, content: str}}")
        if m["role"] not in CHAT_ROLES:  # a typo ("asistant") would be trained on as context
            raise RowError(where, f"{field}[{i}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


class Encoder:
    """Encodes rows of one format. Build once per run; call on each (where, row)."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None = None):
        self.cfg = cfg
        self.tok = tokenizer
        self.label_index = {name: i for i, name in enumerate(label_names or [])}

    def __call__(self, row: dict[str, Any], where: str) -> Example:
        result = self.encode_many([row], [where])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_many(self, rows: list[dict[str, Any]], wheres: list[str]) -> list[Example | RowError | TooLong]:
        """Encode a batch of rows; a bad row's entry is its RowError (or TooLong), not an exception."""
        return self.encode_batch(rows, wheres).examples()

    def encode_batch(self, rows: list[dict[str, Any]], wheres: list[str]) -> EncodedBatch:
        """Encode a batch of rows into flat arrays (see EncodedBatch).

        Prompt/completion formats tokenize the whole batch in two tokenizer calls and assemble
        ids and labels without a Python list per row, which is what makes preparation as fast
        as `datasets.map(batched=True)` over the tokenizer.
        """
        if self.cfg.format in ("chat", "classification"):
            encode_one = self._chat if self.cfg.format == "chat" else self._classification
            out: list[Example | RowError | TooLong] = []
            for row, where in zip(rows, wheres):
                try:
                    out.append(encode_one(row, where))
                except (RowError, TooLong) as exc:
                    out.append(exc)
            return EncodedBatch.from_examples(out, token_labels=self.cfg.format == "chat")
        pairs: list[tuple[str | None, str] | RowError] = []
        for row, where in zip(rows, wheres):
            try:
                pairs.append(self._text_pair(row, where))
            except RowError as exc:
                pairs.append(exc)
        return self._encode_pairs(pairs)

    def _encode_pairs(self, pairs: list[tuple[str | None, str] | RowError]) -> EncodedBatch:
        """(prompt, completion) pairs -> prompt ids + completion ids + EOS, cut to max_seq_len;
        labels are the ids with the prompt masked (unless train_on_prompt). Prompt None: the
        completion is the whole text and gets the tokenizer's special tokens itself."""
        good = [p for p in pairs if not isinstance(p, RowError)]
        prompts = iter(self._batch_ids([p for p, _ in good if p is not None], first=True))
        plain = iter(self._batch_ids([c for p, c in good if p is not None], first=False))
        first = iter(self._batch_ids([c for p, c in good if p is None], first=True))
        eos = self.tok.eos_token_id if self.cfg.add_eos else None
        limit = self.cfg.max_seq_len
        ids: list[int] = []
        offsets = [0]
        masked: list[tuple[int, int]] = []  # (start, length) of each row's masked prompt in `ids`
        truncated: list[bool] = []
        errors: list[RowError | TooLong | None] = []
        for pair in pairs:
            error: RowError | TooLong | None = pair if isinstance(pair, RowError) else None
            cut = False
            if error is None:
                prompt_ids, completion_ids = ([], next(first)) if pair[0] is None else (next(prompts), next(plain))
                n_masked = 0 if self.cfg.train_on_prompt else len(prompt_ids)
                start = len(ids)
                ids += prompt_ids
                ids += completion_ids
                if eos is not None and (not completion_ids or completion_ids[-1] != eos):
                    ids.append(eos)
                if len(ids) - start > limit:
                    del ids[start + limit:]
                    cut = True
                    # Only truncation can leave no trained token in labels[1:] (the loss never uses
                    # position 0's label): then the row teaches nothing and is dropped.
                    if limit <= max(n_masked, 1):
                        del ids[start:]
                        error = TooLong()
                if error is None and n_masked:
                    masked.append((start, n_masked))
            offsets.append(len(ids))
            truncated.append(cut and error is None)
            errors.append(error)
        token_ids = np.fromiter(ids, dtype=np.int32, count=len(ids))
        labels = token_ids.copy()
        for start, n in masked:
            labels[start:start + n] = IGNORE_INDEX  # kept rows are longer than their prompt
        return EncodedBatch(token_ids, labels, None, np.array(offsets, dtype=np.int32), truncated, errors)

    # -- helpers -----------------------------------------------------------------------
    def _batch_ids(self, texts: list[str], *, first: bool) -> list[list[int]]:
        if not texts:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None and backend.padding is None and backend.truncation is None:
            # The Rust tokenizer directly: same ids, without the wrapper's per-batch overhead;
            # encode_batch_fast (tokenizers >= 0.20) also skips the character offsets we never use.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=first)]
        return self.tok(texts, add_special_tokens=first)["input_ids"]

    def _ids(self, text: str, *, first: bool) -> list[int]:
        # Only the first piece gets the tokenizer's own special tokens (BOS for Llama-style).
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        if self.cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
            return ids + [eos]
        return ids

    def _finish(self, ids: list[int], labels: list[int]) -> Example:
        limit = self.cfg.max_seq_len
        truncated = len(ids) > limit
        ids, labels = ids[:limit], labels[:limit]
        # Only truncation can remove every trained token (the loss skips position 0's label).
        if truncated and all(label == IGNORE_INDEX for label in labels[1:]):
            raise TooLong()
        return Example(ids, labels, truncated)

    # -- formats -----------------------------------------------------------------------
    def _text_pair(self, row: dict[str, Any], where: str) -> tuple[str | None, str]:
        """(prompt, completion) strings of a text or alpaca row; prompt None: train on all of it."""
        if self.cfg.format == "text":
            text = _field(row, self.cfg.text_field, where)
            if not text.strip():
                raise RowError(where, f"field {self.cfg.text_field!r} is empty")
            return None, text
        instruction = _field(row, self.cfg.instruction_field, where)
        input_text = _field(row, self.cfg.input_field, where, required=False)
        output = _field(row, self.cfg.output_field, where)
        if not output.strip():
            raise RowError(where, f"field {self.cfg.output_field!r} is empty: nothing to train on")
        return alpaca_prompt(instruction, input_text), output

    def _chat(self, row: dict[str, Any], where: str) -> Example:
        messages = _field(row, self.cfg.messages_field, where, kind=list)
        check_messages(messages, self.cfg.messages_field, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(where, "no assistant message: nothing to train on")
        if self.tok.chat_template is None:
            raise RowError(where, "the tokenizer has no chat template (set model.tokenizer to one that has)")
        render = self.tok.apply_chat_template
        # Trained spans: the tokens each assistant turn adds to the rendered conversation.
        ids = self._ids(render(messages, tokenize=False), first=False)
        n_rendered = len(ids)
        ids = self._with_eos(ids)
        trained = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self._ids(render(messages[:i], tokenize=False, add_generation_prompt=True), first=False))
            end = len(self._ids(render(messages[: i + 1], tokenize=False), first=False))
            trained[start:end] = [True] * (end - start)
        if len(ids) > n_rendered and messages[-1]["role"] == "assistant":
            trained[-1] = True  # an EOS we appended right after an assistant turn is trained too
        labels = [t if (keep or self.cfg.train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, trained)]
        return self._finish(ids, labels)

    def _classification(self, row: dict[str, Any], where: str) -> Example:
        text = _field(row, self.cfg.text_field, where)
        label = row.get(self.cfg.label_field)
        if label is None:
            raise RowError(where, f"missing field {self.cfg.label_field!r}")
        label = str(label)
        if label not in self.label_index:
            raise RowError(where, f"field {self.cfg.label_field!r}: label {label!r} is not one of {list(self.label_index)}")
        ids = self._ids(text, first=True)
        limit = self.cfg.max_seq_len
        return Example(ids[:limit], self.label_index[label], truncated=len(ids) > limit)
