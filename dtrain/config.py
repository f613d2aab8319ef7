"""Loading a run's config: one YAML file plus `key=value` overrides, validated before any work starts.

`load_config` reads the YAML (remembering the line of every key), applies the overrides and
validates the result against the schema (dtrain/schema.py), then asks the run's objective and
strategy for the rules they set on the rest of the config (`check_rules`): which data formats
and metrics an objective has, what a strategy cannot combine with. Every problem raises
`ConfigError` naming the key, where it came from (file and line, or the override) and the fix.

The schema's types are re-exported here, so `from dtrain.config import Config` keeps working for
users; modules of the core import them from dtrain.schema (this module imports the objectives
and the strategies, which import the schema).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dtrain.objectives import objective_class
from dtrain.parallel import check_config as check_strategy
from dtrain.schema import *  # noqa: F401,F403  (the schema's types, for users of dtrain.config)
from dtrain.schema import ALL_KEYS, Config, ConfigError

def _yaml_with_lines(text: str, filename: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every mapping key, by dotted path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if key in lines:  # YAML would keep the last value silently
                    raise ConfigError(f"{filename}:{line}: `{key}` is given twice (first at line {lines[key]}); "
                                      "keep one of them")
                lines[key] = line
                walk(value_node, key + ".")

    walk(node, "")
    return data, lines


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _did_you_mean(key: str) -> str:
    """The closest valid key: the same leaf in another section first, else a fuzzy match."""
    parts = key.split(".")
    close = [k for k in ALL_KEYS if k != key and k.rsplit(".", 1)[-1] == parts[-1]][:1]
    if not close:
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        close = difflib.get_close_matches(key, [k for k in ALL_KEYS if k not in ancestors], n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _is_union_member(part: str) -> bool:
    """pydantic names the member of a union a value failed against in the error's location
    (`list[str]`, `literal['all-linear']`, `float`): not part of the key."""
    return "[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none", "constrained-str")


def format_errors(exc: ValidationError, origin: dict[str, str]) -> str:
    messages = []
    union_seen: dict[str, int] = {}  # key -> index in messages: one line per key, its alternatives joined
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not isinstance(p, int)]
        loc = [p for p in parts if not _is_union_member(p)]
        key = ".".join(loc)
        if len(loc) < len(parts) and key in union_seen:
            alternative = str(err["msg"]).removeprefix("Value error, ")
            messages[union_seen[key]] = messages[union_seen[key]].replace(" (got ", f"; or: {alternative} (got ", 1)
            continue
        if len(loc) < len(parts):
            union_seen[key] = len(messages)
        where = origin.get(key) or next(
            (origin[k] for k in sorted(origin, key=len, reverse=True) if key.startswith(k + ".")), None
        )
        where = f" ({where})" if where else ""
        if err["type"] in ("search_space_key", "search_space_section"):
            name = err["ctx"]["key"]
            at = origin.get(f"{key}.{name}")
            where = f" ({at})" if at else where
            if err["type"] == "search_space_section":
                messages.append(f"`{name}` in `{key}`{where} is a section; search over its keys, e.g. "
                                f"`{next(k for k in ALL_KEYS if k.startswith(name + '.'))}`")
            else:
                messages.append(f"unknown key `{name}` in `{key}`{where}{_did_you_mean(name)}")
        elif err["type"] == "extra_forbidden":
            messages.append(f"unknown key `{key}`{where}{_did_you_mean(key)}")
        elif err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            messages.append(f"`{key}`{where}: {err['input']!r} is not allowed; expected {allowed}")
        elif err["type"] == "value_error" and not key:
            messages.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            messages.append(f"`{key}`{where}: {msg} (got {err['input']!r})")
    return "\n  ".join(messages)


def check_rules(cfg: Config) -> None:
    """The rules the objective and the strategy set on the rest of the config (ValueError)."""
    objective = objective_class(cfg)
    objective.check_config(cfg)
    check_strategy(cfg)
    if cfg.parallel.mesh.sequence > 1 and not objective.sums_over_tokens:
        raise ValueError(f"parallel.mesh.sequence={cfg.parallel.mesh.sequence} with train.objective={objective.name} "
                         "is not supported: sequence parallel splits each sequence across ranks, and this "
                         "objective needs whole sequences (per-sequence log-probabilities, a teacher, a "
                         "classification head); use parallel.mesh.sequence=1")
    if cfg.model.logits == "chunked" and cfg.model.task != "causal_lm":
        raise ValueError(f"model.logits=chunked chunks a language model's head; model.task={cfg.model.task} has "
                         "none: set model.logits=auto")
    metrics = objective.metric_names(cfg)
    if cfg.eval.metric not in metrics:
        raise ValueError(f"eval.metric={cfg.eval.metric!r} is not reported for this task; allowed: {sorted(metrics)}")
    reported = [f"eval_{name}" for name in metrics]
    if cfg.tune.metric not in reported:
        close = difflib.get_close_matches(cfg.tune.metric, reported, n=1)
        raise ValueError(f"tune.metric={cfg.tune.metric!r} is not reported by any trial: evaluation reports "
                         f"{', '.join(reported)} for this config" + (f"; did you mean {close[0]!r}?" if close else ""))


def validate(data: dict[str, Any], origin: dict[str, str] | None = None) -> Config:
    """A Config from plain data: the schema, then the rules. ConfigError lists the problems, each
    with where its key came from (`origin`: key -> "file:line" or the override)."""
    try:
        cfg = Config.model_validate(data)
        check_rules(cfg)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, origin or {})) from None
    except ValueError as exc:  # a rule (a ConfigError is one too)
        raise ConfigError(str(exc)) from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    source = "from the command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as "
                              "UTF-8") from None
        loaded, lines = _yaml_with_lines(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
        data = loaded
        origin = {k: f"{path}:{line}" for k, line in lines.items()}
    for item in overrides:
        key, value = parse_override(item)
        if key not in ALL_KEYS:
            raise ConfigError(f"unknown key `{key}` in override {item!r}{_did_you_mean(key)}")
        _set_dotted(data, key, value)
        origin[key] = f"override {item!r}"
    try:
        return validate(data, origin)
    except ConfigError as exc:
        raise ConfigError(f"invalid config {source}:\n  {exc}") from None
