"""Bad inputs, each run through the CLI as a subprocess, as a user would: the exit code (2 for a bad
config or input, 1 for a failed run), dtrain's own `error:` line naming the key, file or path, and
no traceback. The terminal summary counts the verdicts (conftest). A second test hashes a finished
run directory, runs every failing command that targets it, and finds nothing of it changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import ALPACA, CHAT, REPO, base_overrides

TINY = REPO / "examples" / "tiny_alpaca.yaml"


@dataclass
class Case:
    """argv with {model} {out} {tmp} {run} filled in; `make(tmp, model)` writes the bad input."""

    id: str
    argv: list[str]
    code: int
    says: list[str]  # each must appear in stderr
    make: Callable[[Path, Path], None] = lambda tmp, model: None
    targets_run: bool = False  # a failing command pointed at a finished run directory
    env: dict[str, str] = field(default_factory=dict)


def write(rel: str, content: str | bytes) -> Callable[[Path, Path], None]:
    def make(tmp: Path, model: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def model_copy(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """A copy of the tiny model directory at tmp/model, then `edit(copy)`."""
    def make(tmp: Path, model: Path) -> None:
        shutil.copytree(model, tmp / "model")
        edit(tmp / "model")
    return make


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep])
    return edit


def remove(*names: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for name in names:
            (path / name).unlink()
    return edit


def set_model_type(value: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = value
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


TRAIN = ["train", str(TINY), "model.path={model}", "output_dir={out}", "train.max_steps=2",
         "logging.tensorboard=false", "logging.progress_bar=false"]
RESUME_RUN = ["train", str(TINY), "model.path={model}", "output_dir={run}", "train.max_steps=2",
              "logging.tensorboard=false", "logging.progress_bar=false", "--resume", "auto"]

CASES = [
    # The config file itself
    Case("config-missing", ["train", "{tmp}/nope.yaml"], 2, ["config file not found", "nope.yaml"]),
    Case("config-not-yaml", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:3", "not valid YAML"],  # (where YAML notices)
         write("c.yaml", "model:\n  path: [unclosed\n")),
    Case("config-top-level-list", ["train", "{tmp}/c.yaml"], 2, ["c.yaml", "top level must be a mapping"],
         write("c.yaml", "- model\n- data\n")),
    Case("config-not-utf8", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "not UTF-8"],
         write("c.yaml", b"seed: 1\noutput_dir: caf\xe9\n")),
    Case("config-show-not-utf8", ["config", "show", "{tmp}/c.yaml"], 2, ["c.yaml:1", "not UTF-8"],
         write("c.yaml", b"\xff\xfeseed: 1\n")),
    Case("config-duplicate-key", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:4", "`optim.lr` is given twice", "line 2"],
         write("c.yaml", "optim:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\n")),
    Case("config-duplicate-section", ["config", "show", "{tmp}/c.yaml"], 2, ["c.yaml:3", "`train` is given twice"],
         write("c.yaml", "train:\n  max_steps: 3\ntrain:\n  epochs: 1\n")),
    Case("config-typo-key", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`optim.lrr`", "did you mean `optim.lr`"],
         write("c.yaml", "optim:\n  lrr: 0.1\n")),
    Case("config-bad-type", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`optim.lr`", "'fast'"],
         write("c.yaml", "optim:\n  lr: fast\n")),
    Case("config-bad-choice", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`parallel.strategy`", "'fsdp3'"],
         write("c.yaml", "parallel:\n  strategy: fsdp3\n")),
    Case("labels-empty", ["train", "{tmp}/c.yaml"], 2, ["c.yaml:2", "`data.labels`", "at least 1"],
         write("c.yaml", "data:\n  labels: []\n")),
    # Overrides and arguments
    Case("override-no-equals", ["train", str(TINY), "optim.lr"], 2, ["optim.lr", "key=value"]),
    Case("override-unknown-key", ["train", str(TINY), "optim.learning_rate=1e-3"], 2,
         ["`optim.learning_rate`", "override"]),
    Case("override-bad-value", ["config", "show", str(TINY), "train.max_steps=-3"], 2, ["`train.max_steps`", "-3"]),
    Case("nproc-zero", ["train", str(TINY), "--nproc", "0"], 2, ["--nproc 0", "at least 1"]),
    Case("resume-not-a-dir", [*TRAIN, "--resume", "{tmp}/nowhere"], 2, ["checkpoint.resume", "nowhere"]),
    # Output directories
    Case("output-dir-is-a-file", TRAIN, 2, ["output_dir", "is a file", "choose another output_dir"],
         write("out", "not a directory")),
    Case("output-dir-below-a-file", [*TRAIN, "output_dir={tmp}/file/run"], 2, ["output_dir", "file", "is a file"],
         write("file", "x")),
    # Data files (found when the data is read: exit code 1, as for a failed run)
    Case("data-missing", [*TRAIN, "data.train={tmp}/none.jsonl"], 1, ["data.train", "none.jsonl"]),
    Case("data-bad-json-line", [*TRAIN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:2", "data.on_error=skip"],
         write("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')),
    Case("chat-unknown-role", [*TRAIN, "data.format=chat", "data.train={tmp}/chat.jsonl"], 1,
         ["chat.jsonl:1", "role 'asistant'", "expected one of"],
         write("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "asistant", "content": "hello"}]}) + "\n")),
    # Model directories
    Case("model-path-missing", [*TRAIN, "model.path={tmp}/no-model"], 2, ["model.path", "no-model", "preset"]),
    Case("model-config-truncated", [*TRAIN, "model.path={tmp}/model"], 2,
         ["model.path", "config.json", "not valid JSON"], model_copy(truncate("config.json", 40))),
    Case("model-type-unknown", [*TRAIN, "model.path={tmp}/model"], 2,
         ["model.path", "model_type 'llama9'", "does not know"], model_copy(set_model_type("llama9"))),
    Case("model-weights-missing", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "weights", "safetensors"],
         model_copy(remove("model.safetensors"))),
    Case("model-weights-truncated", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "weights"],
         model_copy(truncate("model.safetensors", 100))),
    Case("tokenizer-missing", [*TRAIN, "model.path={tmp}/model"], 2, ["model.path", "tokenizer"],
         model_copy(remove("tokenizer.json", "tokenizer_config.json"))),
    Case("tokenizer-dir-missing", [*TRAIN, "model.tokenizer={tmp}/no-tok"], 2, ["model.tokenizer", "no-tok"]),
    # Devices
    Case("device-cuda-without-cuda", [*TRAIN, "parallel.device=cuda"], 2, ["parallel.device=cuda", "no CUDA device"]),
    # Other commands
    Case("consolidate-not-a-checkpoint", ["checkpoint", "consolidate", "{tmp}", "--out", "{tmp}/m"], 2,
         ["not a checkpoint directory"]),
    Case("generate-not-a-model", ["generate", "{tmp}", "--prompt", "hi"], 2, ["not a model directory", "final/"]),
    Case("report-not-a-run", ["report", "{tmp}"], 2, ["metrics.jsonl", "run directory"]),
    # Against a finished run: nothing of it may change
    Case("resume-with-bad-data", [*RESUME_RUN, "data.train={tmp}/d.jsonl"], 1, ["d.jsonl:1"],
         write("d.jsonl", "{not json}\n"), targets_run=True),
    Case("fresh-run-into-a-finished-run", ["train", str(TINY), "model.path={model}", "output_dir={run}"], 2,
         ["already holds checkpoints", "--resume auto"], targets_run=True),
    Case("resume-with-another-adapter", [*RESUME_RUN, "peft.method=lora"], 1,
         ["different model or adapter", "peft.method"], targets_run=True),
]


def fill(arg: str, tmp: Path, model: Path, run: Path | None) -> str:
    return arg.format(tmp=tmp, model=model, out=tmp / "out", run=run)


def run_case(case: Case, tmp: Path, model: Path, run: Path | None = None) -> subprocess.CompletedProcess:
    case.make(tmp, model)
    argv = [fill(a, tmp, model, run) for a in case.argv]
    env = {**os.environ, **case.env}
    env.pop("DTRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dtrain", *argv], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def check(case: Case, proc: subprocess.CompletedProcess) -> None:
    err = proc.stderr
    assert "Traceback" not in err, f"{case.id}: a traceback:\n{err[-3000:]}"
    assert proc.returncode == case.code, f"{case.id}: exit {proc.returncode}, expected {case.code}:\n{err[-3000:]}"
    assert "error: " in err, f"{case.id}: no error line:\n{err[-3000:]}"
    for text in case.says:
        assert text in err, f"{case.id}: {text!r} not in:\n{err[-3000:]}"


@pytest.mark.parametrize("case", [c for c in CASES if not c.targets_run], ids=lambda c: c.id)
def test_bad_input_ends_in_one_clear_error(case, tmp_path, tiny_model_dir, record_property):
    proc = run_case(case, tmp_path, tiny_model_dir)
    record_property("bad_input_verdict", f"exit {proc.returncode}" + (" traceback" if "Traceback" in proc.stderr else ""))
    check(case, proc)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_commands_change_nothing_of_a_finished_run(tmp_path, tiny_model_dir, record_property):
    from dtrain.config import load_config
    from dtrain.train import train

    run = tmp_path / "run"
    train(load_config(None, base_overrides(tiny_model_dir, run) + ["train.max_steps=2", "checkpoint.every_steps=1"]))
    before = tree_hashes(run)
    assert any(name.endswith("manifest.json") for name in before) and "config.yaml" in before
    for case in (c for c in CASES if c.targets_run):
        work = tmp_path / case.id
        work.mkdir()
        proc = run_case(case, work, tiny_model_dir, run)
        record_property(f"bad_input_verdict:{case.id}", f"exit {proc.returncode}")
        check(case, proc)
        assert tree_hashes(run) == before, f"{case.id} changed the run directory"
