"""Reward functions for online RL: built-ins, and the user's own, named in the config.

`grpo.rewards` lists them, each `{function, weight, args, name}`. A function is called TRL's way,
on the batch of completions at once:

    function(prompts=[...], completions=[...], completion_ids=[[...], ...], <field>=[...], ..., **args)

with, for each other field of the rows (data.format=prompt: `{prompt, answer, ...}`), the list of
its values; it returns one number per completion. A TRL reward function works unchanged.

`module:function` imports `module` from the directory the run starts in (or the Python path),
`path/to/file.py:function` loads that file: either way it is **code execution**, of code your
config names; nothing is ever imported from a checkpoint or a run directory. A function that
cannot be imported fails the run before anything is written; one that raises or returns anything
but a finite number per completion stops the run at that step, naming the function and the row
(file:line) it failed on.

Built-ins:

    exact_answer    1.0 when the last number in the completion equals the row's `field` (default
                    answer) as a number, else 0.0: a verifiable answer to arithmetic or GSM8K
    digit_match     partial credit for a number: the share of the row's `field` digits that the
                    completion's last number has right, aligned from the right (a denser signal
                    than exact_answer for a model that rarely gets a whole answer right)
    regex_format    1.0 when the completion (stripped) matches `pattern` in full, else 0.0
    length_penalty  -per_token (default 0.001) x the completion's tokens beyond `target` (default 0)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dtrain.schema import ConfigError, GrpoConfig

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function failed at a step: the message names it and the row."""


# --------------------------------------------------------------------------------------
# Built-ins


def _as_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    found = NUMBER.findall(str(value).replace(",", ""))
    return float(found[-1]) if found else None


def _answers(rows: dict[str, Any], field: str) -> list[Any]:
    """The rows' values of `field` (the expected answers), or KeyError saying how to name it."""
    if field not in rows:
        raise KeyError(f"the rows have no field {field!r} (they have: {', '.join(sorted(rows)) or 'none'}); set "
                       "args: {field: <the answer's field>}")
    return rows[field]


def exact_answer(completions: Sequence[str], field: str = "answer", **rows: Any) -> list[float]:
    """1.0 where the last number in the completion equals the row's `field` as a number."""
    scores = []
    for completion, expected in zip(completions, _answers(rows, field)):
        said, wanted = _as_number(completion), _as_number(expected)
        scores.append(float(said is not None and wanted is not None and abs(said - wanted) <= 1e-9 * max(1.0, abs(wanted))))
    return scores


def digit_match(completions: Sequence[str], field: str = "answer", **rows: Any) -> list[float]:
    """Partial credit for a numeric answer: the share of the expected number's digits that the
    completion's last number has right, aligned from the right (ones with ones, tens with tens),
    over the longer of the two; 0.0 without a number."""
    scores = []
    for completion, expected in zip(completions, _answers(rows, field)):
        found = NUMBER.findall(str(completion).replace(",", ""))
        said, wanted = (found[-1] if found else ""), str(expected).strip()
        if not said:
            scores.append(0.0)
            continue
        same = sum(a == b for a, b in zip(reversed(said), reversed(wanted)))
        scores.append(same / max(len(said), len(wanted)))
    return scores


def regex_format(completions: Sequence[str], pattern: str = "", **_: Any) -> list[float]:
    """1.0 where the stripped completion matches `pattern` in full (DOTALL: `.` matches newlines)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]


def length_penalty(completion_ids: Sequence[Sequence[int]], target: int = 0, per_token: float = 0.001,
                   **_: Any) -> list[float]:
    """-per_token for every token beyond `target`."""
    return [-per_token * max(0, len(ids) - target) for ids in completion_ids]


BUILTINS: dict[str, Callable[..., list[float]]] = {
    "exact_answer": exact_answer, "digit_match": digit_match, "regex_format": regex_format,
    "length_penalty": length_penalty}


# --------------------------------------------------------------------------------------
# Loading


@dataclass
class RewardFunction:
    name: str  # in the metrics: reward_<name>
    spec: str  # as the config gives it
    function: Callable[..., Any]
    weight: float
    args: dict[str, Any] = field(default_factory=dict)


def load_function(spec: str, key: str) -> Callable[..., Any]:
    """A built-in, `module:function` or `file.py:function` (ConfigError naming `key` otherwise)."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise ConfigError(f"{key}={spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor module:function; write "
                          "it as my_rewards:correct (my_rewards.py in the directory you run from) or "
                          "path/to/file.py:correct")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ConfigError(f"{key}={spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"dtrain_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # (the user's project: where the run starts; torchrun's workers too)
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever importing the user's module raises, named with its key
        raise ConfigError(f"{key}={spec!r}: cannot import {where} ({type(exc).__name__}: {exc}); it must be "
                          "importable from the directory you run in, or give its file: path/to/file.py:"
                          f"{name}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{key}={spec!r}: {where} has no function {name!r}"
                          + (f" (it has: {', '.join(n for n, v in vars(module).items() if inspect.isfunction(v))})"
                             if hasattr(module, "__dict__") else ""))
    return function


def load_rewards(cfg: GrpoConfig) -> list[RewardFunction]:
    functions: list[RewardFunction] = []
    for i, reward in enumerate(cfg.rewards):
        function = load_function(reward.function, f"grpo.rewards[{i}].function")
        name = reward.name or getattr(function, "__name__", reward.function.rsplit(":", 1)[-1])
        if any(f.name == name for f in functions):
            name = f"{name}_{i}"
        functions.append(RewardFunction(name, reward.function, function, reward.weight, dict(reward.args)))
    return functions


def reward_names(cfg: GrpoConfig) -> list[str]:
    """The functions' names in the metrics, without importing them (as load_rewards names them,
    a user function by the name after the colon)."""
    names: list[str] = []
    for i, reward in enumerate(cfg.rewards):
        name = reward.name or reward.function.rsplit(":", 1)[-1]
        names.append(f"{name}_{i}" if name in names else name)
    return names


# --------------------------------------------------------------------------------------
# Scoring


def score(functions: list[RewardFunction], prompts: list[Any], completions: list[str],
          completion_ids: list[list[int]], rows: list[dict[str, Any]], wheres: list[str]) -> list[list[float]]:
    """Each completion's reward from each function ([completion][function]), or RewardError
    naming the function and the row it failed on."""
    names = sorted({key for row in rows for key in row})
    fields = {key: [row.get(key) for row in rows] for key in names}
    columns = []
    for f in functions:
        try:
            values = f.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                **fields, **f.args)
        except Exception as exc:  # noqa: BLE001 - the user's function: name it and the row it fails on
            raise RewardError(_failed_row(f, prompts, completions, completion_ids, fields, wheres, exc)) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise RewardError(f"reward function {f.name} ({f.spec}) returned {got} for {len(completions)} "
                              f"completions (rows {wheres[0]} ...): it must return a list with one number per "
                              "completion")
        for value, where, completion in zip(values, wheres, completions):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(f"reward function {f.name} ({f.spec}) returned {value!r} for row {where} "
                                  f"(completion {completion[:80]!r}): a reward must be a finite int or float")
        columns.append([float(v) for v in values])
    return [list(row) for row in zip(*columns)] if columns else [[] for _ in completions]


def _failed_row(f: RewardFunction, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                fields: dict[str, list[Any]], wheres: list[str], exc: Exception) -> str:
    """The message for a function that raised: called again one row at a time, the first row it raises on."""
    for i in range(len(completions)):
        try:
            f.function(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                       completion_ids=completion_ids[i:i + 1],
                       **{key: values[i:i + 1] for key, values in fields.items()}, **f.args)
        except Exception as row_exc:  # noqa: BLE001
            return (f"reward function {f.name} ({f.spec}) raised {type(row_exc).__name__}: {row_exc} on row "
                    f"{wheres[i]} (completion {completions[i][:80]!r}); fix the function or the row")
    return (f"reward function {f.name} ({f.spec}) raised {type(exc).__name__}: {exc} on the batch of rows "
            f"{', '.join(dict.fromkeys(wheres))} (on none of them alone); fix the function")
