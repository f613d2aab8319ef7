"""Bad inputs, each run through the CLI in a process of its own, as a user would: the exit code (2
for a bad config or input, 1 for a failed run), dtrain's own `error:` line naming the key, file
or path, and no traceback. The terminal summary counts the verdicts (conftest).

The corpus covers whole classes: every constrained key of the schema with a value it refuses
(generated from the schema), then config files, overrides and combinations, data files of
every format, model directories and tokenizers, checkpoints, output directories, command-line
arguments and the environment. A second test hashes a finished run directory, runs every failing
command that targets it, and finds nothing of it changed.

The commands run through tests/cli_forkserver.py: a process that has made dtrain's imports once
and forks one child per command (each `python -m dtrain` would spend ~6 s of CPU importing torch
and transformers first). test_the_fork_server_answers_as_python_m_dtrain shows, on a sample of
every class, that a fresh `python -m dtrain` gives the same exit code and error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import REPO, ForkServer, base_overrides, fork_server, tree_digest, user_environment
from pydantic import BaseModel

TINY = REPO / "examples" / "tiny_alpaca.yaml"
CLASSIFY = REPO / "examples" / "tiny_classification.yaml"
Make = Callable[[Path, Path, Path], None]  # (tmp, model, run): writes the bad input


@dataclass
class Case:
    """argv with {model} {out} {tmp} {run} {ro} filled in; `make(tmp, model, run)` writes the bad input."""

    id: str
    argv: list[str]
    code: int
    says: list[str]  # each must appear in stderr
    make: Make = lambda tmp, model, run: None
    targets_run: bool = False  # a failing command pointed at the finished run directory itself
    env: dict[str, str] = field(default_factory=dict)
    module: str = "dtrain"  # python -m MODULE ARGV: dtrain, or dtrain.tune
    never: list[str] = field(default_factory=list)  # must appear in neither stdout nor stderr


def write(rel: str, content: str | bytes) -> Make:
    def make(tmp: Path, model: Path, run: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def jsonl(rel: str, rows: list) -> Make:
    return write(rel, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def both(*makes: Make) -> Make:
    def make(tmp: Path, model: Path, run: Path) -> None:
        for m in makes:
            m(tmp, model, run)
    return make


def model_copy(edit: Callable[[Path], None]) -> Make:
    """A copy of the tiny model directory at tmp/model, then `edit(copy)`."""
    def make(tmp: Path, model: Path, run: Path) -> None:
        shutil.copytree(model, tmp / "model")
        edit(tmp / "model")
    return make


def run_copy(edit: Callable[[Path], None]) -> Make:
    """A copy of the finished run at tmp/run (its checkpoints: tmp/run/checkpoints/step_*), then `edit(copy)`."""
    def make(tmp: Path, model: Path, run: Path) -> None:
        shutil.copytree(run, tmp / "run")
        edit(tmp / "run")
    return make


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep])
    return edit


def remove(*names: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for name in names:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return edit


def overwrite(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads((path / name).read_text())
        change(data)
        (path / name).write_text(json.dumps(data))
    return edit


def in_every_checkpoint(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    def each(run: Path) -> None:
        for ckpt in sorted((run / "checkpoints").glob("step_*")):
            edit(ckpt)
    return each


def flip_a_byte(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    return edit


def first_shard(path: Path) -> str:
    return str(next((path / "dcp").glob("*.distcp")).relative_to(path))


TRAIN = ["train", str(TINY), "model.path={model}", "output_dir={out}", "train.max_steps=2",
         "logging.tensorboard=false", "logging.progress_bar=false"]
RESUME_RUN = ["train", str(TINY), "model.path={model}", "output_dir={run}", "train.max_steps=2",
              "logging.tensorboard=false", "logging.progress_bar=false", "--resume", "auto"]
COPY = "{tmp}/run"  # the run_copy's directory
RESUME_COPY = ["train", str(TINY), "model.path={model}", f"output_dir={COPY}", "train.max_steps=3",
               "logging.tensorboard=false", "logging.progress_bar=false", "--resume", "auto"]
CLASSIFY_TRAIN = ["train", str(CLASSIFY), "model.path={model}", "output_dir={out}", "train.max_steps=2",
                  "logging.tensorboard=false", "logging.progress_bar=false", "eval.early_stopping.patience=null"]


# --------------------------------------------------------------------------------------
# Generated from the schema: every key whose values are constrained, given one it refuses.


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _refused_value(info) -> str | None:
    """A value the field must refuse, or None when any string would do (paths, names)."""
    ann = info.annotation
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    kinds = {typing.get_origin(a) or a for a in args if a is not type(None)}
    bounds = {type(m).__name__: m for m in info.metadata}
    if typing.Literal in kinds:
        return "no-such-choice"
    if kinds == {bool}:
        return "maybe"
    if kinds & {int, float} and not kinds & {str, list, dict}:
        if "Ge" in bounds:
            return str(bounds["Ge"].ge - 1)
        if "Gt" in bounds:
            return str(bounds["Gt"].gt - (1 if kinds == {int} else 0))
        if "Le" in bounds:
            return str(bounds["Le"].le + 1)
        if "Lt" in bounds:
            return str(bounds["Lt"].lt)
        return "not-a-number"
    return None


# What the key needs beside it to be checked on its own (the example sets train.max_steps).
ALONE = {"train.epochs": ["train.max_steps=null"]}


def schema_cases() -> list[Case]:
    from dtrain.schema import Config

    cases = []
    for key, info in _leaf_fields(Config):
        value = _refused_value(info)
        if value is not None:
            cases.append(Case(f"schema:{key}={value}", ["train", str(TINY), *ALONE.get(key, []), f"{key}={value}",
                                                        "output_dir={out}"], 2, [f"`{key}`", "override"]))
    return cases


# --------------------------------------------------------------------------------------
# Written by hand, by class


def _tokenizer_vocab_grows(path: Path) -> None:
    data = json.loads((path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(400):
        vocab[f"<extra_{i}>"] = len(vocab)
    (path / "tokenizer.json").write_text(json.dumps(data))


def _weights_of_another_shape(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})



CONFIG_FILES = [
    Case("config-missing", ["train", "{tmp}/nope.yaml"], 2, ["config file not found", "nope.yaml"]),
    Case("config-not-yaml", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:3", "not valid YAML"],  # (where YAML notices)
         write("c.yaml", "model:\n  path: [unclosed\n")),
    Case("config-top-level-list", ["train", "{tmp}/c.yaml"], 2, ["c.yaml", "top level must be a mapping"],
         write("c.yaml", "- model\n- data\n")),
    Case("config-top-level-scalar", ["config", "show", "{tmp}/c.yaml"], 2, ["c.yaml", "top level must be a mapping"],
         write("c.yaml", "just words\n")),
    Case("config-not-utf8", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "not UTF-8"],
         write("c.yaml", b"seed: 1\noutput_dir: caf\xe9\n")),
    Case("config-show-not-utf8", ["config", "show", "{tmp}/c.yaml"], 2, ["c.yaml:1", "not UTF-8"],
         write("c.yaml", b"\xff\xfeseed: 1\n")),
    Case("config-binary", ["train", "{tmp}/c.yaml"], 2, ["c.yaml"], write("c.yaml", bytes(range(256)) * 4)),
    Case("config-is-a-directory", ["train", "{tmp}/conf.yaml"], 2, ["conf.yaml"],
         lambda tmp, model, run: (tmp / "conf.yaml").mkdir()),
    Case("config-tab-indent", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "not valid YAML"],
         write("c.yaml", "optim:\n\tlr: 0.1\n")),
    Case("config-python-tag", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:1", "not valid YAML"],
         write("c.yaml", "seed: !!python/object/apply:os.system ['touch /tmp/dtrain-pwned']\n")),
    Case("config-duplicate-key", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:4", "`optim.lr` is given twice", "line 2"],
         write("c.yaml", "optim:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\n")),
    Case("config-duplicate-section", ["config", "show", "{tmp}/c.yaml"], 2, ["c.yaml:3", "`train` is given twice"],
         write("c.yaml", "train:\n  max_steps: 3\ntrain:\n  epochs: 1\n")),
    Case("config-typo-key", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`optim.lrr`", "did you mean `optim.lr`"],
         write("c.yaml", "optim:\n  lrr: 0.1\n")),
    Case("config-typo-section", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:1", "`optimizer`", "did you mean `optim`"],
         write("c.yaml", "optimizer:\n  lr: 0.1\n")),
    Case("config-section-is-a-scalar", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:1", "`optim`"],
         write("c.yaml", "optim: 0.1\n")),
    Case("config-bad-type", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`optim.lr`", "'fast'"],
         write("c.yaml", "optim:\n  lr: fast\n")),
    Case("config-bad-choice", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`parallel.strategy`", "'fsdp3'"],
         write("c.yaml", "parallel:\n  strategy: fsdp3\n")),
    Case("config-list-for-a-number", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`train.max_steps`"],
         write("c.yaml", "train:\n  max_steps: [1, 2]\n")),
    Case("labels-empty", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`data.labels`", "at least 1"],
         write("c.yaml", "data:\n  labels: []\n")),
]

OVERRIDES = [
    Case("override-no-equals", ["train", str(TINY), "optim.lr"], 2, ["optim.lr", "key=value"]),
    Case("override-empty-key", ["train", str(TINY), "=3"], 2, ["'=3'"]),
    Case("override-unknown-key", ["train", str(TINY), "optim.learning_rate=1e-3"], 2,
         ["`optim.learning_rate`", "override"]),
    Case("override-unknown-section", ["config", "show", str(TINY), "optimizer.lr=1e-3"], 2, ["`optimizer.lr`"]),
    Case("override-below-a-leaf", ["config", "show", str(TINY), "optim.lr.max=1"], 2, ["optim.lr"]),
    Case("override-a-section", ["config", "show", str(TINY), "optim=3"], 2, ["`optim`"]),
    Case("override-bad-value", ["config", "show", str(TINY), "train.max_steps=-3"], 2, ["`train.max_steps`", "-3"]),
    Case("override-unclosed-list", ["config", "show", str(TINY), "optim.betas=[0.9"], 2, ["optim.betas"]),
    Case("override-list-for-a-number", ["config", "show", str(TINY), "train.max_steps=[1]"], 2, ["`train.max_steps`"]),
    Case("override-mapping-for-a-list", ["config", "show", str(TINY), "peft.target_modules={a: 1}"], 2,
         ["`peft.target_modules`"]),
]

COMBINATIONS = [
    Case("ratios-leave-no-training-data", ["train", str(TINY), "data.val_ratio=0.6", "data.test_ratio=0.5"], 2,
         ["data.val_ratio", "data.test_ratio"]),
    Case("early-stopping-without-validation", [*TRAIN, "data.val_ratio=0", "eval.early_stopping.patience=2"], 2,
         ["eval.early_stopping.patience", "validation"]),
    Case("deepspeed-without-its-config", ["train", str(TINY), "parallel.strategy=deepspeed"], 2,
         ["parallel.deepspeed_config", "ds_configs/zero2.json"]),
    Case("deepspeed-config-without-deepspeed", ["train", str(TINY), "parallel.deepspeed_config=ds_configs/zero2.json"],
         2, ["parallel.deepspeed_config", "parallel.strategy=deepspeed"]),
    Case("deepspeed-config-missing-file", ["train", str(TINY), "parallel.strategy=deepspeed",
                                           "parallel.deepspeed_config={tmp}/ds.json"], 2, ["ds.json", "not a file"]),
    Case("deepspeed-config-not-json", ["train", str(TINY), "parallel.strategy=deepspeed",
                                       "parallel.deepspeed_config={tmp}/ds.json"], 2, ["ds.json:2", "not valid JSON"],
         write("ds.json", '{"zero_optimization":\n  {"stage": 2,}}\n')),
    Case("deepspeed-with-async-save", ["train", str(TINY), "parallel.strategy=deepspeed",
                                       "parallel.deepspeed_config=ds_configs/zero2.json", "checkpoint.async_save=true"],
         2, ["checkpoint.async_save"]),
    Case("sql-source-url-and-path", ["config", "show", str(TINY), "data.train=[{path: a.jsonl, url: 'sqlite://'}]"],
         2, ["data.train"]),
    Case("search-bounds-reversed", ["config", "show", str(TINY), "tune.search_space={optim.lr: {loguniform: [1, 0.1]}}"],
         2, ["tune.search_space", "lower bound"]),
    Case("search-two-kinds", ["config", "show", str(TINY),
                              "tune.search_space={optim.lr: {loguniform: [0.1, 1], choice: [1]}}"], 2,
         ["tune.search_space", "exactly one of"]),
    Case("search-the-output-dir", ["config", "show", str(TINY), "tune.search_space={output_dir: {choice: [a, b]}}"],
         2, ["output_dir", "cannot be searched"]),
    Case("flash-attention-on-cpu", ["train", str(TINY), "model.attn_implementation=flash_attention_2",
                                    "parallel.device=cpu"], 2, ["flash_attention_2", "CUDA"]),
    Case("lr-scaling-without-reference", ["config", "show", str(TINY), "optim.lr_scaling=sqrt_tokens",
                                          "optim.lr_reference_tokens=null"], 2, ["optim.lr_reference_tokens"]),
    Case("teacher-for-a-plain-objective", ["train", str(TINY), "distill.teacher=tiny-llama", "train.objective=causal_lm"],
         2, ["distill.teacher", "train.objective"]),
    Case("classification-metric-for-lm", ["train", str(TINY), "eval.metric=accuracy"], 2, ["eval.metric", "accuracy"]),
    Case("classification-task-with-alpaca-data", ["train", str(TINY), "model.task=classification"], 2,
         ["data.format", "classification"]),
    Case("generation-eval-for-classification", [*CLASSIFY_TRAIN, "eval.generation.enabled=true"], 2,
         ["eval.generation.enabled"]),
    Case("perplexity-for-classification", [*CLASSIFY_TRAIN, "eval.metric=perplexity"], 2,
         ["eval.metric", "perplexity"]),
    Case("distill-teacher-missing", [*TRAIN, "distill.teacher={tmp}/no-teacher"], 2,
         ["distill.teacher", "no-teacher"]),
    Case("distill-teacher-another-vocabulary", [*TRAIN, "distill.teacher={tmp}/model"], 2,
         ["distill.teacher", "another tokenizer"], model_copy(_tokenizer_vocab_grows)),
    Case("objective-distillation-without-teacher", ["train", str(TINY), "train.objective=distillation"], 2,
         ["train.objective", "distill.teacher"]),
    Case("tune-search-unknown-key", ["config", "show", str(TINY), "tune.search_space={optim.lrr: [1, 2]}"], 2,
         ["tune.search_space", "optim.lrr"]),
]

ARGUMENTS = [
    Case("unknown-command", ["trian", str(TINY)], 2, ["invalid choice", "trian"]),
    Case("unknown-option", ["train", str(TINY), "--nprocs", "2"], 2, ["--nprocs"]),
    Case("nproc-zero", ["train", str(TINY), "--nproc", "0"], 2, ["--nproc 0", "at least 1"]),
    Case("nproc-negative", ["train", str(TINY), "--nproc", "-2"], 2, ["--nproc -2", "at least 1"]),
    Case("nproc-not-a-number", ["train", str(TINY), "--nproc", "two"], 2, ["--nproc", "'two'"]),
    Case("resume-without-value", ["train", str(TINY), "--resume"], 2, ["--resume", "expected one argument"]),
    Case("resume-not-a-dir", [*TRAIN, "--resume", "{tmp}/nowhere"], 2, ["checkpoint.resume", "nowhere"]),
    Case("resume-typo-of-auto", [*TRAIN, "--resume", "atuo"], 2, ["checkpoint.resume", "atuo"]),
    Case("train-without-config", ["train"], 2, ["config"]),
    Case("estimate-bad-memory-unit", ["estimate", str(TINY), "--gpu-memory", "80XB"], 2, ["80XB"]),
    Case("eval-missing-run", ["eval", "{tmp}/no-run", str(TINY)], 2, ["no-run", "not a run directory"]),
    Case("eval-without-config", ["eval", "{tmp}"], 2, ["config"]),
    Case("generate-not-a-model", ["generate", "{tmp}", "--prompt", "hi"], 2, ["not a model directory", "final/"]),
    Case("generate-missing-dir", ["generate", "{tmp}/none", "--prompt", "hi"], 2, ["none"]),
    Case("report-not-a-run", ["report", "{tmp}"], 2, ["metrics.jsonl", "run directory"]),
    Case("report-missing-dir", ["report", "{tmp}/none"], 2, ["none"]),
    Case("consolidate-not-a-checkpoint", ["checkpoint", "consolidate", "{tmp}", "--out", "{tmp}/m"], 2,
         ["not a checkpoint directory"]),
    Case("consolidate-missing", ["checkpoint", "consolidate", "{tmp}/none", "--out", "{tmp}/m"], 2, ["none"]),
    Case("export-missing-source", ["export", "{tmp}/none", "--out", "{tmp}/m"], 1, ["none"]),
    Case("data-prepare-bad-config", ["data", "prepare", "{tmp}/c.yaml"], 2, ["c.yaml:1", "`dat`"],
         write("c.yaml", "dat:\n  train: x.jsonl\n")),
]

OUTPUT_DIRS = [
    Case("output-dir-is-a-file", TRAIN, 2, ["output_dir", "is a file", "choose another output_dir"],
         write("out", "not a directory")),
    Case("output-dir-below-a-file", [*TRAIN, "output_dir={tmp}/file/run"], 2, ["output_dir", "file", "is a file"],
         write("file", "x")),
    Case("output-dir-read-only", [*TRAIN, "output_dir={ro}/run"], 2, ["output_dir", "choose a writable output_dir"]),
    Case("output-dir-read-only-existing", [*TRAIN, "output_dir={ro}"], 2, ["output_dir", "not writable"]),
    Case("output-dir-is-dev-null", [*TRAIN, "output_dir=/dev/null"], 2, ["output_dir", "/dev/null"]),
    Case("data-report-dir-is-a-file", ["data", "prepare", str(TINY), "model.path={model}", "--report-dir", "{tmp}/f"],
         2, ["--report-dir", "{tmp}/f", "is a file"], write("f", "x")),
]

ALPACA_ROW = {"instruction": "Add 1 and 2.", "input": "", "output": "3"}
DATA_FILES = [
    Case("data-missing", [*TRAIN, "data.train={tmp}/none.jsonl"], 1, ["data.train", "none.jsonl"]),
    Case("data-unsupported-suffix", [*TRAIN, "data.train={tmp}/d.xlsx"], 1, ["data.train", "d.xlsx", ".jsonl"],
         write("d.xlsx", "x")),
    Case("data-empty-file", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl"], write("d.jsonl", "")),
    Case("data-bad-json-line", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2", "data.on_error=skip"],
         write("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')),
    Case("data-json-line-not-an-object", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2"],
         jsonl("d.jsonl", [ALPACA_ROW, [1, 2, 3]])),
    Case("data-nul-bytes", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl"],
         write("d.jsonl", json.dumps(ALPACA_ROW) + "\n\0\0\0\0\n")),
    Case("data-not-utf8", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:1"],
         write("d.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n')),
    Case("data-json-array-in-jsonl", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl"],
         write("d.jsonl", json.dumps([ALPACA_ROW, ALPACA_ROW], indent=1))),
    Case("data-json-not-an-array", [*TRAIN, "data.train={tmp}/d.json"], 1, ["d.json"],
         write("d.json", json.dumps(ALPACA_ROW))),
    Case("data-json-truncated", [*TRAIN, "data.train={tmp}/d.json"], 1, ["d.json"],
         write("d.json", json.dumps([ALPACA_ROW] * 3)[:-20])),
    Case("data-parquet-corrupt", [*TRAIN, "data.train={tmp}/d.parquet"], 1, ["d.parquet"],
         write("d.parquet", b"PAR1" + b"\0" * 64)),
    Case("data-csv-without-the-column", [*CLASSIFY_TRAIN, "data.train={tmp}/d.csv"], 1, ["d.csv", "text"],
         write("d.csv", "sentence,label\n1 vs 2,second\n2 vs 1,first\n")),
    Case("data-csv-ragged-row", [*CLASSIFY_TRAIN, "data.train={tmp}/d.csv"], 1, ["d.csv"],
         write("d.csv", "text,label\n1 vs 2,second\n2 vs 1,first\n3 vs 1,first,extra,more\n")),
    Case("data-directory-without-data", [*TRAIN, "data.train={tmp}/dir"], 1, ["data.train", "dir"],
         write("dir/readme.xyz", "nothing")),
    Case("alpaca-missing-output", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2", "output"],
         jsonl("d.jsonl", [ALPACA_ROW, {"instruction": "Add 2 and 2.", "input": ""}])),
    Case("alpaca-output-not-a-string", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:1", "output"],
         jsonl("d.jsonl", [{"instruction": "Add", "input": "", "output": 3}])),
    Case("alpaca-field-renamed-wrongly", [*TRAIN, "data.output_field=answer"], 1, ["answer"]),
    Case("chat-unknown-role", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl:1", "role 'asistant'", "expected one of"],
         jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "hello"}]}])),
    # Preference data and objectives
    Case("preference-missing-rejected", [*TRAIN, "data.format=preference", "data.train={tmp}/p.jsonl"], 1,
         ["p.jsonl:2", "missing field 'rejected'"],
         jsonl("p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4"}])),
    Case("preference-chosen-equals-rejected", [*TRAIN, "data.format=preference", "data.train={tmp}/p.jsonl"], 1,
         ["p.jsonl:1", "the same response"], jsonl("p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}])),
    Case("preference-empty-response", [*TRAIN, "data.format=preference", "data.train={tmp}/p.jsonl"], 1,
         ["p.jsonl:1", "'rejected' is empty"], jsonl("p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": " "}])),
    Case("preference-alpaca-rows", [*TRAIN, "data.format=preference"], 1,
         ["arithmetic_alpaca.jsonl:1", "missing field 'chosen'"]),
    Case("unpaired-label-not-a-boolean", [*TRAIN, "data.format=unpaired_preference", "data.train={tmp}/k.jsonl"], 1,
         ["k.jsonl:1", "'label' must be true"], jsonl("k.jsonl", [{"prompt": "1+1=", "completion": "2", "label": "yes"}])),
    Case("dpo-on-instruction-data", [*TRAIN, "train.objective=dpo"], 2, ["train.objective=dpo", "data.format"]),
    Case("orpo-with-a-reference", [*TRAIN, "data.format=preference", "train.objective=orpo",
                                   "preference.reference=copy"], 2, ["preference.reference", "uses no reference"]),
    Case("dpo-adapters-off-without-adapters", [*TRAIN, "data.format=preference",
                                               "preference.reference=adapters_disabled"], 2,
         ["preference.reference=adapters_disabled", "peft.method"]),
    Case("chat-messages-not-a-list", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl:1", "messages"], jsonl("chat.jsonl", [{"messages": "hello"}])),
    Case("chat-message-without-content", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl:1"], jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])),
    Case("chat-no-assistant-turn", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl"], jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 20)),
    Case("chat-missing-messages-field", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl:1", "messages"], jsonl("chat.jsonl", [{"conversation": []}])),
    Case("text-missing-field", [*TRAIN, "data.format=text", "data.train={tmp}/t.jsonl"], 1, ["t.jsonl:1", "text"],
         jsonl("t.jsonl", [{"body": "hello"}])),
    Case("text-field-not-a-string", [*TRAIN, "data.format=text", "data.train={tmp}/t.jsonl"], 1, ["t.jsonl:1", "text"],
         jsonl("t.jsonl", [{"text": {"nested": 1}}])),
    Case("classification-unknown-label", [*CLASSIFY_TRAIN, "data.train={tmp}/d.csv", "data.labels=[first,second]"],
         1, ["d.csv", "third"], write("d.csv", "text,label\n1 vs 2,second\n3 vs 1,first\n2 vs 2,third\n")),
    Case("classification-empty-label", [*CLASSIFY_TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2", "label"],
         jsonl("d.jsonl", [{"text": "1 vs 2", "label": "second"}, {"text": "3 vs 1", "label": None},
                           {"text": "3 vs 1", "label": "first"}])),
    Case("classification-one-class", [*CLASSIFY_TRAIN, "data.train={tmp}/d.jsonl"], 1,
         ["data.label_field", "'first'", "at least two classes"],
         jsonl("d.jsonl", [{"text": f"{i} vs 0", "label": "first"} for i in range(40)])),
    Case("classification-one-label-named", [*CLASSIFY_TRAIN, "data.labels=[first]"], 1, ["data.labels", "one class"]),
    Case("every-row-dropped", [*TRAIN, "data.train={tmp}/d.jsonl", "data.max_seq_len=8"], 1,
         ["data.train", "no usable training examples", "raise it"],
         jsonl("d.jsonl", [{"instruction": "x " * 50 + str(i), "input": "", "output": "y " * 50} for i in range(30)])),
    Case("validation-file-missing", [*TRAIN, "data.validation={tmp}/v.jsonl"], 1, ["data.validation", "v.jsonl"]),
    Case("sql-source-without-query", [*TRAIN, "data.train=[{url: 'sqlite:///{tmp}/db.sqlite'}]"], 2,
         ["data.train", "query"]),
    Case("sql-env-variable-unset", [*TRAIN, "data.train=[{url: 'postgresql://u:${DTRAIN_TEST_UNSET_PW}@127.0.0.1/db', "
                                            "query: 'select 1'}]"], 1, ["DTRAIN_TEST_UNSET_PW", "is not set"]),
    Case("sql-table-missing", [*TRAIN, "data.train=[{url: 'sqlite:///{tmp}/db.sqlite', query: 'select * from rows'}]"],
         1, ["db.sqlite", "no such table: rows"], write("db.sqlite", b"")),
]


def gpt2_config(**change) -> Make:
    """tmp/gpt2/config.json alone: a GPT-2-style config (n_embd, n_inner: null), which is all the
    estimate reads."""
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": None, "n_positions": 512,
              "vocab_size": 260, "bos_token_id": 1, "eos_token_id": 2, **change}
    return write("gpt2/config.json", json.dumps(config))


def gpt2_model(n_positions: int) -> Make:
    """tmp/gpt2: a tiny GPT-2 (a learned position table of n_positions) with the tiny model's tokenizer."""
    def make(tmp: Path, model: Path, run: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=n_positions, vocab_size=260,
                                   bos_token_id=1, eos_token_id=2)).save_pretrained(tmp / "gpt2")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model / name, tmp / "gpt2" / name)
    return make


ESTIMATES = [
    Case("sequences-longer-than-the-position-table", [*TRAIN, "model.path={tmp}/gpt2", "data.max_seq_len=512"], 2,
         ["data.max_seq_len=512", "256 positions", "256 or less"], gpt2_model(256)),
    Case("estimate-gpt2-heads-do-not-divide", ["estimate", str(TINY), "model.path={tmp}/gpt2"], 2,
         ["model.path", "divisible by num_heads"], gpt2_config(n_head=5)),
    Case("estimate-gpt2-null-layers", ["estimate", str(TINY), "model.path={tmp}/gpt2"], 2,
         ["model.path", "n_layer"], gpt2_config(n_layer=None)),
    Case("estimate-classification-without-a-head", ["estimate", str(CLASSIFY), "model.path={tmp}/gpt2"], 2,
         ["model.task=classification", "no sequence-classification model for codegen"],
         write("gpt2/config.json", json.dumps({"model_type": "codegen", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                               "rotary_dim": 8, "vocab_size": 260}))),
    Case("estimate-gpt2-freeze-too-many-layers", ["estimate", str(TINY), "model.path={tmp}/gpt2", "freeze.layers=5"],
         2, ["freeze.layers=5", "2 transformer blocks"], gpt2_config()),
    Case("estimate-config-truncated", ["estimate", str(TINY), "model.path={tmp}/gpt2"], 2,
         ["model.path", "config.json", "not valid JSON"], write("gpt2/config.json", '{"model_type": "gpt2", "n_')),
    Case("estimate-mfu-above-one", ["estimate", str(TINY), "--mfu", "1.5"], 2, ["--mfu 1.5", "fraction"]),
    Case("estimate-zero-gpus", ["estimate", str(TINY), "--gpus", "0"], 2, ["--gpus", "at least 1"]),
    Case("estimate-typo", ["estimate", str(TINY), "peft.methd=lora"], 2, ["`peft.methd`", "did you mean"]),
    Case("dry-run-gpt2-classification-with-alpaca", ["train", str(TINY), "model.path={tmp}/gpt2",
                                                     "model.task=classification", "--dry-run"], 2,
         ["data.format='alpaca' does not fit model.task='classification'"], gpt2_config()),
    Case("dry-run-missing-data", ["train", str(TINY), "data.train={tmp}/none.jsonl", "--dry-run"], 1,
         ["the dry run failed at data paths", "none.jsonl"], never=["Traceback"]),
]

MODEL_DIRS = [
    Case("model-path-missing", [*TRAIN, "model.path={tmp}/no-model"], 2, ["model.path", "no-model", "preset"]),
    Case("model-path-is-a-file", [*TRAIN, "model.path={tmp}/m.bin"], 2, ["model.path", "m.bin"], write("m.bin", "x")),
    Case("model-dir-empty", [*TRAIN, "model.path={tmp}/empty"], 2, ["model.path", "config.json"],
         lambda tmp, model, run: (tmp / "empty").mkdir()),
    Case("model-config-truncated", [*TRAIN, "model.path={tmp}/model"], 2,
         ["model.path", "config.json", "not valid JSON"], model_copy(truncate("config.json", 40))),
    Case("model-config-a-list", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "config.json"],
         model_copy(overwrite("config.json", "[1, 2]"))),
    Case("model-config-no-model-type", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "model_type"],
         model_copy(edit_json("config.json", lambda c: c.pop("model_type")))),
    Case("model-type-unknown", [*TRAIN, "model.path={tmp}/model"], 2,
         ["model.path", "model_type 'llama9'", "does not know"],
         model_copy(edit_json("config.json", lambda c: c.update(model_type="llama9")))),
    Case("model-config-bad-field", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "model config", "not a multiple of the number of attention heads"],
         model_copy(edit_json("config.json", lambda c: c.update(num_attention_heads=5)))),
    Case("model-weights-missing", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "weights", "safetensors"],
         model_copy(remove("model.safetensors"))),
    Case("model-weights-truncated", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "weights"],
         model_copy(truncate("model.safetensors", 100))),
    Case("model-weights-garbage", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "weights"],
         model_copy(overwrite("model.safetensors", b"\0" * 4096))),
    Case("model-weights-another-shape", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "q_proj"],
         model_copy(_weights_of_another_shape)),
    Case("model-shard-index-names-missing-file", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path"],
         model_copy(lambda p: (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors") or
                    (p / "model.safetensors.index.json").write_text(json.dumps(
                        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})))),
    Case("tokenizer-missing", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "tokenizer"],
         model_copy(remove("tokenizer.json", "tokenizer_config.json"))),
    Case("tokenizer-json-corrupt", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "tokenizer"],
         model_copy(truncate("tokenizer.json", 50))),
    Case("tokenizer-config-corrupt", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "tokenizer"],
         model_copy(truncate("tokenizer_config.json", 10))),
    Case("tokenizer-larger-than-the-model", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "660 tokens", "embeds only 260"],
         model_copy(_tokenizer_vocab_grows)),
    Case("tokenizer-dir-missing", [*TRAIN, "model.tokenizer={tmp}/no-tok"], 2, ["model.tokenizer", "no-tok"]),
    Case("tokenizer-dir-without-tokenizer", [*TRAIN, "model.tokenizer={tmp}/tok"], 2, ["model.tokenizer", "tok"],
         write("tok/readme.txt", "nothing here")),
    Case("preset-unknown", [*TRAIN, "model.path=tiny-llama3"], 2, ["model.path", "tiny-llama3"]),
    Case("device-cuda-without-cuda", [*TRAIN, "parallel.device=cuda"], 2, ["parallel.device=cuda", "no CUDA device"]),
]

CHECKPOINTS = [
    Case("resume-path-is-a-file", [*TRAIN, "--resume", "{tmp}/ckpt"], 2, ["checkpoint.resume", "ckpt"],
         write("ckpt", "x")),
    Case("resume-dir-without-manifest", [*TRAIN, "--resume", "{tmp}/ckpt"], 1, ["checkpoint.resume", "{tmp}/ckpt", "manifest"],
         write("ckpt/dcp/.metadata", "x")),
    Case("resume-manifest-not-json", [*TRAIN, "--resume", f"{COPY}/checkpoints/step_00000002"], 1,
         ["step_00000002", "manifest is not valid JSON"],
         run_copy(in_every_checkpoint(overwrite("manifest.json", "{not json")))),
    Case("resume-manifest-other-version", [*TRAIN, "--resume", f"{COPY}/checkpoints/step_00000002"], 1,
         ["step_00000002", "another dtrain version"],
         run_copy(in_every_checkpoint(edit_json("manifest.json", lambda m: m.update(format=99))))),
    Case("resume-explicit-checksum-mismatch", [*TRAIN, "--resume", f"{COPY}/checkpoints/step_00000002"], 1,
         ["step_00000002", "checksum mismatch"],
         run_copy(in_every_checkpoint(flip_a_byte("trainer_state.pt")))),
    Case("resume-explicit-shard-missing", [*TRAIN, "--resume", f"{COPY}/checkpoints/step_00000002"], 1,
         ["step_00000002", "missing"], run_copy(in_every_checkpoint(lambda c: (c / first_shard(c)).unlink()))),
    Case("resume-auto-every-checkpoint-corrupt", RESUME_COPY, 1,
         ["every checkpoint", "is damaged", "nothing was changed"],
         run_copy(in_every_checkpoint(flip_a_byte("trainer_state.pt")))),
    Case("resume-another-training-task", [*RESUME_COPY, "model.task=classification", "data.format=classification",
                                          "data.train=examples/data/compare_classification.csv"], 1,
         ["different model or adapter"], run_copy(lambda run: None)),
    Case("consolidate-corrupt-checkpoint",
         ["checkpoint", "consolidate", f"{COPY}/checkpoints/step_00000002", "--out", "{tmp}/m"], 1,
         ["step_00000002"], run_copy(in_every_checkpoint(flip_a_byte("trainer_state.pt")))),
    Case("consolidate-into-existing-dir",
         ["checkpoint", "consolidate", f"{COPY}/checkpoints/step_00000002", "--out", "{tmp}/m"], 1, ["{tmp}/m"],
         both(run_copy(lambda run: None), write("m/keep.txt", "mine"))),
    Case("export-run-without-final-or-checkpoints", ["export", COPY, "--out", "{tmp}/m"], 1,
         ["neither final/ nor a complete checkpoint"], run_copy(remove("final", "checkpoints"))),
    Case("eval-run-without-model", ["eval", COPY, str(TINY)], 1, [COPY], run_copy(remove("final", "checkpoints"))),
]

TUNE_YAML = REPO / "examples" / "tiny_tune.yaml"
NO_RAY = ["Started a local Ray instance", "ray.init"]  # the search fails before Ray starts
TUNE = [str(TUNE_YAML), "model.path={model}", "tune.storage_dir={tmp}/searches", "train.max_steps=8"]
LIBRARIES = [
    Case("optim-betas-out-of-range", ["config", "show", str(TINY), "optim.betas=[1.5,0.9]"], 2,
         ["`optim.betas`", "override 'optim.betas=[1.5,0.9]'", "beta1=1.5", "[0.9, 0.999]"]),
    Case("optim-betas-in-yaml", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`optim.betas`", "beta2=1.2"],
         write("c.yaml", "optim:\n  betas: [0.9, 1.2]\n")),
    Case("optim-lr-infinite", ["config", "show", str(TINY), "optim.lr=.inf"], 2, ["`optim.lr`", "finite number"]),
    Case("peft-target-module-missing", [*TRAIN, "peft.method=lora", "peft.target_modules=[q_proj,value]"], 2,
         ["peft.target_modules", "no module named 'value'", "q_proj, k_proj, v_proj", "all-linear"]),
    Case("peft-target-module-not-linear", [*TRAIN, "peft.method=lora", "peft.target_modules=[input_layernorm]"], 2,
         ["peft.target_modules", "'input_layernorm' is a LlamaRMSNorm", "q_proj"]),
    Case("peft-target-modules-bare-string", ["config", "show", str(TINY), "peft.method=lora",
                                             "peft.target_modules=q_proj"], 2,
         ["`peft.target_modules`", "peft.target_modules=[q_proj]"]),
    Case("deepspeed-json-unknown-nested-key", ["train", str(TINY), "--nproc", "2", "parallel.strategy=deepspeed",
                                               "parallel.deepspeed_config={tmp}/ds.json", "output_dir={out}"], 2,
         ["parallel.deepspeed_config", "ds.json", "`zero_optimization.overlap_com` (line 4)",
          "did you mean `overlap_comm`"],
         write("ds.json", '{\n  "zero_optimization": {\n    "stage": 2,\n    "overlap_com": true\n  }\n}\n'),
         never=["torch.distributed.run", "[rank"]),  # refused before torchrun starts
    Case("deepspeed-json-top-level-typo", ["config", "show", str(TINY), "parallel.strategy=deepspeed",
                                           "parallel.deepspeed_config={tmp}/ds.json"], 2,
         ["ds.json", "unknown key `gradient_clippping` (line 3)", "did you mean `gradient_clipping`",
          "ignore it silently"],
         write("ds.json", '{\n  "zero_optimization": {"stage": 2},\n  "gradient_clippping": 1.0\n}\n')),
    Case("deepspeed-json-bad-value", [*TRAIN, "parallel.strategy=deepspeed", "parallel.deepspeed_config={tmp}/ds.json"],
         2, ["ds.json", "`zero_optimization.offload_param.device` (line 4)", "'none', 'cpu' or 'nvme'", "'gpu'"],
         write("ds.json", '{\n  "zero_optimization": {\n    "stage": 3,\n    "offload_param": {"device": "gpu"}\n'
                          '  }\n}\n')),
    # python -m dtrain.tune: a data error is found before Ray starts
    Case("tune-data-bad-json-line", [*TUNE, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2", "not valid JSON"],
         write("d.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n'),
         module="dtrain.tune", never=NO_RAY),
    Case("tune-data-missing", [*TUNE, "data.train={tmp}/none.jsonl"], 1, ["data.train", "none.jsonl"],
         module="dtrain.tune", never=NO_RAY),
    Case("tune-searched-data-file-broken", [*TUNE, "tune.algorithm=grid",
                                            "tune.search_space={data.train: {grid: ['{tmp}/a.jsonl']}}"], 1,
         ["a.jsonl", "tune.search_space"], write("a.jsonl", "{oops\n"), module="dtrain.tune", never=NO_RAY),
    Case("tune-without-a-search", [str(TINY), "output_dir={out}"], 2, ["tune"], module="dtrain.tune", never=NO_RAY),
    Case("tune-typo", [str(TUNE_YAML), "tune.num_sample=3"], 2, ["`tune.num_sample`", "did you mean"],
         module="dtrain.tune", never=NO_RAY),
]

ENVIRONMENT = [
    Case("cache-dir-is-a-file", TRAIN, 1, ["cache", "DTRAIN_CACHE", "writable"], write("cachefile", "x"),
         env={"DTRAIN_CACHE": "{tmp}/cachefile"}),
    Case("cache-dir-read-only", TRAIN, 1, ["cache", "Read-only file system", "DTRAIN_CACHE"], env={"DTRAIN_CACHE": "{ro}"}),
    Case("cache-key-read-only", [*TRAIN, "data.cache_dir={ro}/c"], 1, ["data.cache_dir"]),
    Case("ddp-world-without-rendezvous", [*TRAIN, "parallel.strategy=ddp"], 1, ["MASTER_ADDR"],
         env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
    Case("debug-env-garbage-is-not-debug", ["train", "{tmp}/nope.yaml"], 2, ["config file not found"],
         env={"DTRAIN_DEBUG": "yes please"}),
]

# Against the finished run itself: nothing of it may change.
AGAINST_THE_RUN = [
    Case("resume-with-bad-data", [*RESUME_RUN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:1"],
         write("d.jsonl", "{not json}\n"), targets_run=True),
    Case("fresh-run-into-a-finished-run", ["train", str(TINY), "model.path={model}", "output_dir={run}"], 2,
         ["already holds checkpoints", "--resume auto"], targets_run=True),
    Case("resume-with-another-adapter", [*RESUME_RUN, "peft.method=lora"], 1,
         ["different model or adapter", "peft.method"], targets_run=True),
    Case("resume-with-another-model", [*RESUME_RUN, "model.path={tmp}/model"], 2, ["model.path", "do not fit"],
         model_copy(edit_json("config.json", lambda c: c.update(intermediate_size=96))), targets_run=True),
    Case("resume-with-a-typo", [*RESUME_RUN, "optim.lrr=1"], 2, ["`optim.lrr`"], targets_run=True),
    Case("resume-with-missing-model", [*RESUME_RUN, "model.path={tmp}/gone"], 2, ["model.path", "gone"],
         targets_run=True),
    Case("resume-with-cuda", [*RESUME_RUN, "parallel.device=cuda"], 2, ["no CUDA device"], targets_run=True),
    Case("resume-with-early-stopping-and-no-validation", [*RESUME_RUN, "data.val_ratio=0",
                                                          "eval.early_stopping.patience=1"], 2,
         ["eval.early_stopping.patience"], targets_run=True),
    Case("export-into-the-run", ["export", "{run}", "--out", "{run}"], 1, ["{run}"], targets_run=True),
    Case("eval-run-with-missing-config", ["eval", "{run}", "{tmp}/nope.yaml"], 2, ["nope.yaml"], targets_run=True),
    Case("eval-run-with-bad-override", ["eval", "{run}", str(TINY), "eval.max_batches=0"], 2, ["`eval.max_batches`"],
         targets_run=True),
]

HAND_WRITTEN = (CONFIG_FILES + OVERRIDES + COMBINATIONS + ARGUMENTS + OUTPUT_DIRS + DATA_FILES + MODEL_DIRS
                + CHECKPOINTS + LIBRARIES + ESTIMATES + ENVIRONMENT + AGAINST_THE_RUN)
CASES = schema_cases() + HAND_WRITTEN


# --------------------------------------------------------------------------------------
# Running them


@pytest.fixture(scope="module")
def cli():
    return fork_server()


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A read-only file system (a tmpfs mounted ro; the tests run as root, whom permissions do not stop)."""
    mount = tmp_path_factory.mktemp("read-only")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "dtrain-test-ro", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a read-only tmpfs (the tests need root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run of the tiny model with a checkpoint per step (trained in this process)."""
    from dtrain.config import load_config
    from dtrain.train import train

    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, base_overrides(tiny_model_dir, run) + ["train.max_steps=2", "checkpoint.every_steps=1",
                                                                   "checkpoint.keep_last=2"]))
    return run


def fill(arg: str, tmp: Path, model: Path, run: Path, ro: Path) -> str:
    # (not str.format: arguments such as "{a: 1}" are YAML flow mappings)
    for name, value in (("{tmp}", tmp), ("{model}", model), ("{out}", tmp / "out"), ("{run}", run), ("{ro}", ro)):
        arg = arg.replace(name, str(value))
    return arg


def run_case(cli: ForkServer | None, case: Case, tmp: Path, model: Path, run: Path, ro: Path) -> subprocess.CompletedProcess:
    """`python -m dtrain ARGV` for the case (through the fork server, or, without one, a fresh interpreter)."""
    case.make(tmp, model, run)
    argv = [fill(a, tmp, model, run, ro) for a in case.argv]
    env = user_environment()
    env.update({k: fill(v, tmp, model, run, ro) for k, v in case.env.items()})
    if cli is not None:
        return cli.run(case.module, argv, env, tmp)
    return subprocess.run([sys.executable, "-m", case.module, *argv], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def check(case: Case, proc: subprocess.CompletedProcess, tmp: Path, run: Path) -> None:
    err = proc.stderr
    assert "Traceback" not in err, f"{case.id}: a traceback:\n{err[-3000:]}"
    assert proc.returncode == case.code, f"{case.id}: exit {proc.returncode}, expected {case.code}:\n{err[-3000:]}"
    assert "error: " in err, f"{case.id}: no error line:\n{err[-3000:]}"
    for text in case.says:
        text = text.replace("{tmp}", str(tmp)).replace("{run}", str(run))
        assert text in err, f"{case.id}: {text!r} not in:\n{err[-3000:]}"
    for text in case.never:
        assert text not in proc.stdout + err, f"{case.id}: {text!r} in the output:\n{(proc.stdout + err)[-3000:]}"


def verdict(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}" + (" traceback" if "Traceback" in proc.stderr else "")


@pytest.mark.parametrize("case", [c for c in CASES if not c.targets_run], ids=lambda c: c.id)
def test_bad_input_ends_in_one_clear_error(case, cli, tmp_path, tiny_model_dir, finished_run, read_only_dir,
                                           record_property):
    proc = run_case(cli, case, tmp_path, tiny_model_dir, finished_run, read_only_dir)
    record_property("bad_input_verdict", verdict(proc))
    check(case, proc, tmp_path, finished_run)
    assert not Path("/tmp/dtrain-pwned").exists()


def test_failed_commands_change_nothing_of_a_finished_run(cli, tmp_path, tiny_model_dir, finished_run, read_only_dir,
                                                         record_property):
    before = tree_digest(finished_run)
    assert any(name.endswith("manifest.json") for name in before) and "config.yaml" in before
    for case in (c for c in CASES if c.targets_run):
        work = tmp_path / case.id
        work.mkdir()
        proc = run_case(cli, case, work, tiny_model_dir, finished_run, read_only_dir)
        record_property(f"bad_input_verdict:{case.id}", verdict(proc))
        check(case, proc, work, finished_run)
        assert tree_digest(finished_run) == before, f"{case.id} changed the run directory"


# A sample of the classes (config, output dir, data, model, checkpoint), run by a fresh interpreter as
# well: the fork server answers the same.
PARITY = ["config-duplicate-key", "output-dir-read-only", "chat-unknown-role", "model-type-unknown",
          "resume-auto-every-checkpoint-corrupt"]


def test_the_fork_server_answers_as_python_m_dtrain(cli, tmp_path, tiny_model_dir, finished_run, read_only_dir):
    by_id = {c.id: c for c in CASES}
    for case_id in PARITY:
        case = by_id[case_id]
        answers = []
        for server in (cli, None):
            work = tmp_path / f"{case_id}-{'fork' if server else 'fresh'}"
            work.mkdir()
            proc = run_case(server, case, work, tiny_model_dir, finished_run, read_only_dir)
            error_lines = [line.replace(str(work), "WORK") for line in proc.stderr.splitlines()
                           if line.startswith("error:")]
            answers.append((proc.returncode, error_lines))
        assert answers[0] == answers[1], f"{case_id}: fork server {answers[0]} vs python -m dtrain {answers[1]}"
        assert answers[0][1], f"{case_id}: no error line"
