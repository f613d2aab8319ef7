"""Preference rows -> token ids.

    data.format=preference           {prompt, chosen, rejected}: the prompt and two responses, the
                                     first preferred (DPO, IPO, SimPO, ORPO, reward models)
    data.format=unpaired_preference  {prompt, completion, label}: one response and whether it is
                                     desirable (KTO)

Strings are tokenized as the alpaca format does: the prompt with the tokenizer's special tokens,
each response without them and with EOS appended (data.add_eos). A conversation (`prompt` a
message list; each response a string, an assistant message or a list of messages; or no prompt
at all and two whole conversations that share their first messages) is rendered with the
tokenizer's chat template, and a response is what its messages add to the rendered prompt.

A pair is stored as two sequences that share the prompt, each with the prompt masked in its
labels: the chosen one as `input_ids`/`labels` (what ORPO's SFT term and the report read), the
rejected one as `rejected_ids`/`rejected_labels`. An unpaired example is one sequence and its
label (1 desirable, 0 not).

Too long for data.max_seq_len: data.truncation=prompt_first keeps the responses whole by cutting
the prompt's beginning (down to half of max_seq_len; a leading BOS stays), then the responses'
ends; `end` cuts every sequence's end, as TRL's keep_start does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtrain.data.formats import IGNORE_INDEX, EncodedBatch, Example, TooLong, check_messages, encode_each
from dtrain.data.sources import RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dtrain.schema import DataConfig

PREFERENCE_FORMATS = ("preference", "unpaired_preference")


def _text(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(where, f"missing field {name!r} (present: {sorted(row)})")
    return row[name]


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return not str(value.get("content") or "").strip()
    return not value or all(not str(m.get("content") or "").strip() for m in value if isinstance(m, dict))


def as_messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A response given as a string, one message or a message list, as a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(where, f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    check_messages(value, field, where)
    return value


def texts_differ(a: Any, b: Any) -> bool:
    """Whether two responses (strings or messages) say different things."""
    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return v.strip()
        if isinstance(v, dict):
            v = [v]
        return [(m.get("role"), str(m.get("content", "")).strip()) for m in v if isinstance(m, dict)]
    return norm(a) != norm(b)


class PreferenceEncoder:
    """Encodes rows of data.format preference (pairs) or unpaired_preference (one completion)."""

    def __init__(self, cfg: "DataConfig", tokenizer: "PreTrainedTokenizerBase"):
        self.cfg, self.tok = cfg, tokenizer

    def encode_batch(self, rows: list[dict[str, Any]], wheres: list[str]) -> EncodedBatch:
        """A batch of rows as dtrain.data.formats.Encoder encodes the other formats: a pair's chosen
        sequences, with its rejected ones in `rejected`; an unpaired row's sequence, with its label
        (1 desirable) as a classification row's class."""
        if self.cfg.format == "preference":
            return EncodedBatch.from_pairs(encode_each(self.pair, rows, wheres))
        encoded = encode_each(self.unpaired, rows, wheres)
        batch = EncodedBatch.from_examples([r[0] if isinstance(r, tuple) else r for r in encoded], token_labels=True)
        batch.classes = [r[1] if isinstance(r, tuple) else None for r in encoded]
        return batch

    # -- the two formats --------------------------------------------------------------

    def pair(self, row: dict[str, Any], where: str) -> tuple[Example, Example]:
        """(chosen, rejected) sequences of a preference row."""
        c = self.cfg
        chosen, rejected = _text(row, c.chosen_field, where), _text(row, c.rejected_field, where)
        prompt = row.get(c.prompt_field)
        for name, value in ((c.chosen_field, chosen), (c.rejected_field, rejected)):
            if _is_empty(value):
                raise RowError(where, f"field {name!r} is empty: a pair needs two responses")
        if not texts_differ(chosen, rejected):
            raise RowError(where, f"fields {c.chosen_field!r} and {c.rejected_field!r} are the same response: "
                                  "the pair prefers nothing")
        prompt_ids, (chosen_ids, rejected_ids) = self._tokens(prompt, [(c.chosen_field, chosen),
                                                                       (c.rejected_field, rejected)], where)
        chosen_example, rejected_example = self._fit(prompt_ids, [chosen_ids, rejected_ids])
        return chosen_example, rejected_example

    def unpaired(self, row: dict[str, Any], where: str) -> tuple[Example, int]:
        """The sequence of an unpaired_preference row and its label (1: desirable)."""
        c = self.cfg
        completion = _text(row, c.completion_field, where)
        if _is_empty(completion):
            raise RowError(where, f"field {c.completion_field!r} is empty: nothing to judge")
        label = _text(row, c.label_field, where)
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):
            label = label.strip().lower() == "true"
        if not isinstance(label, bool) and label not in (0, 1):
            raise RowError(where, f"field {c.label_field!r} must be true (desirable) or false, got {label!r}")
        prompt_ids, (completion_ids,) = self._tokens(row.get(c.prompt_field), [(c.completion_field, completion)],
                                                     where)
        (example,) = self._fit(prompt_ids, [completion_ids])
        return example, int(bool(label))

    # -- tokens -----------------------------------------------------------------------

    def _tokens(self, prompt: Any, responses: list[tuple[str, Any]], where: str) -> tuple[list[int], list[list[int]]]:
        """The prompt's ids and each response's ids (what it adds to the prompt)."""
        conversational = isinstance(prompt, list) or (prompt is None and all(isinstance(r, list) for _, r in responses))
        if not conversational:
            if prompt is None:
                raise RowError(where, f"missing field {self.cfg.prompt_field!r} (the responses are strings, so the "
                                      "prompt cannot be found in them)")
            if not isinstance(prompt, str):
                raise RowError(where, f"field {self.cfg.prompt_field!r} must be a string or a list of messages, "
                                      f"got {type(prompt).__name__}")
            ids = self._ids([prompt], first=True)[0]
            return ids, [self._with_eos(r) for r in self._ids([text_of(r, name, where) for name, r in responses],
                                                               first=False)]
        if self.tok.chat_template is None:
            raise RowError(where, "the prompt is a conversation but the tokenizer has no chat template (set "
                                  "model.tokenizer to one that has)")
        messages = [as_messages(r, name, where) for name, r in responses]
        if prompt is None:  # whole conversations: the prompt is the messages they share
            shared = 0
            while all(len(m) > shared + 1 and m[shared] == messages[0][shared] for m in messages):
                shared += 1
            if shared == 0:
                raise RowError(where, f"missing field {self.cfg.prompt_field!r}, and the conversations share no "
                                      "first message to take as the prompt")
            prompt, messages = messages[0][:shared], [m[shared:] for m in messages]
        else:
            check_messages(prompt, self.cfg.prompt_field, where)
        for (name, _), m in zip(responses, messages):
            if m[0]["role"] != "assistant":
                raise RowError(where, f"field {name!r}: a response starts with an assistant message, not "
                                      f"{m[0]['role']!r}")
        render = self.tok.apply_chat_template
        prompt_ids = self._ids([render(prompt, tokenize=False, add_generation_prompt=True)], first=False)[0]
        full = self._ids([render(prompt + m, tokenize=False) for m in messages], first=False)
        # The responses start where the rendered prompt and each rendered conversation part (a template
        # may render the prompt's end differently once an answer follows; TRL splits the same way).
        start = min(common_prefix(prompt_ids, ids) for ids in full)
        return prompt_ids[:start], [self._with_eos(ids[start:]) for ids in full]

    def _ids(self, texts: list[str], *, first: bool) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=first)["input_ids"]

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        if self.cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
            return ids + [eos]
        return ids

    # -- max_seq_len ------------------------------------------------------------------

    def _fit(self, prompt: list[int], responses: list[list[int]]) -> list[Example]:
        """Each prompt + response as an Example, cut to data.max_seq_len as data.truncation says."""
        limit, longest = self.cfg.max_seq_len, max(len(r) for r in responses)
        cut = len(prompt) + longest > limit
        if cut and self.cfg.truncation == "prompt_first":
            keep = max(limit - longest, min(len(prompt), limit // 2))
            if keep < len(prompt):
                head = prompt[:1] if prompt and prompt[0] == self.tok.bos_token_id and keep > 1 else []
                prompt = head + prompt[len(prompt) - keep + len(head):]
            responses = [r[:limit - len(prompt)] for r in responses]
        out = []
        for response in responses:
            ids = (prompt + response)[:limit]
            if len(ids) <= len(prompt):  # (`end` cut the whole response away)
                raise TooLong()
            out.append(Example(ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt):], truncated=cut))
        return out


def text_of(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise RowError(where, f"field {field!r} must be a string when the prompt is one (got {type(value).__name__}); "
                              "give the prompt as a list of messages for conversations")
    return value


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first trained one: the prompt of a preference sequence."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
