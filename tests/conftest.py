"""Shared fixtures: a tiny local model directory, configs for fast runs, and a CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ALPACA = EXAMPLES / "data" / "arithmetic_alpaca.jsonl"
CHAT = EXAMPLES / "data" / "arithmetic_chat.jsonl"
TEXT = EXAMPLES / "data" / "arithmetic_text.jsonl"
CLASSIFICATION = EXAMPLES / "data" / "compare_classification.csv"

torch.set_num_threads(1)  # the suite's numbers must not depend on the thread count
# ... nor those of the processes it starts. pytest-xdist runs one worker per core (pyproject's
# addopts): a process with more threads than its share only oversubscribes the cores.
os.environ["OMP_NUM_THREADS"] = "1"


# pytest-xdist gives each worker whole files (--dist loadfile): a module's fixtures, the reference
# runs and clusters, are built once. The modules that take minutes on 2 cores go out first, longest
# first (--no-loadscope-reorder keeps this order), so that no worker is left with them at the end.
LONGEST_FIRST = ["test_checkpoints", "test_distributed", "test_tune", "test_slurm_tune", "test_slurm", "test_ray", "test_ray_up",
                 "test_dryrun"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # (stable: file order kept)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def cluster():
    """A real SLURM cluster of two nodes (tests/slurm_cluster.py), in a private network namespace,
    one per test module that asks for it (xdist runs two such modules side by side)."""
    from slurm_cluster import ClusterError, SlurmCluster

    # A SIGTERM to pytest (a CI timeout, say) unwinds like Ctrl-C, so that the daemons are stopped.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with SlurmCluster() as running:
            # Jobs run this checkout (launchers/ is not installed) and find the cluster by SLURM_CONF.
            running.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            yield running
    except ClusterError as exc:
        pytest.fail(f"the test SLURM cluster did not start: {exc}", pytrace=False)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Prepared-data caches go to a temporary directory, never the user's ~/.cache (subprocesses inherit it)."""
    os.environ["DTRAIN_CACHE"] = str(tmp_path_factory.mktemp("dtrain-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the byte tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dtrain.presets import byte_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-2l")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=260, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def base_overrides(model_dir: Path, output_dir: Path) -> list[str]:
    """Overrides for a fast, quiet run of the tiny model on the shipped alpaca data."""
    return [
        f"model.path={model_dir}",
        f"data.train={ALPACA}",
        "data.format=alpaca",
        "data.max_seq_len=320",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        f"output_dir={output_dir}",
    ]


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    """make_config("optim.lr=1e-3", ...) -> a validated Config for a fast run in tmp_path/run."""
    from dtrain.config import load_config

    def make(*overrides: str, output_dir: Path | None = None):
        return load_config(None, base_overrides(tiny_model_dir, output_dir or tmp_path / "run") + list(overrides))

    return make


def arithmetic_prompts(n: int, seed: int = 7) -> list[dict]:
    """Prompts with answers (data.format=prompt), for GRPO."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"prompt": f"{a} + {b} = ", "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class ForkServer:
    """tests/cli_forkserver.py: `python -m dtrain ARGV` without paying for the interpreter's start
    and dtrain's imports each time (~6 s of CPU on the CI machine); one per pytest worker."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_forkserver.py")], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, module: str, argv: list[str], env: dict[str, str], work: Path, cwd: Path = REPO,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """`python -m MODULE ARGV` (MODULE: dtrain or dtrain.tune) in a child forked for it; its
        output goes through files in `work`."""
        out, err = work / ".stdout", work / ".stderr"
        request = {"argv": argv, "module": module, "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the fork server died"
        code = json.loads(reply)["code"]
        proc = subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))
        out.unlink(), err.unlink()
        return proc

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# The variables an in-process test of this worker may leave behind (a single-process group
# describes itself in them), and DTRAIN_DEBUG: a command a test runs gets a user's shell.
NOT_A_USERS = ("DTRAIN_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def user_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_A_USERS}


_FORK_SERVER: list[ForkServer] = []  # this worker's, started on first use


def fork_server() -> ForkServer:
    if not _FORK_SERVER:
        _FORK_SERVER.append(ForkServer())
    return _FORK_SERVER[0]


@pytest.fixture(scope="session", autouse=True)
def _stop_the_fork_server():
    yield
    while _FORK_SERVER:
        _FORK_SERVER.pop().close()


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m dtrain ARGS` as a user would run it, through this worker's fork server (the same
    code after the imports: tests/test_bad_inputs.py compares it with a fresh interpreter);
    returns the completed process (text output)."""
    import tempfile

    env = {**user_environment(), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="run-cli-") as work:
        return fork_server().run("dtrain", list(args), env, Path(work), cwd=cwd, timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path: to show that a command changed nothing."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(out: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl (each step logged once)."""
    by_step = {}
    for record in read_metrics(out):
        if "loss" in record:
            assert record["step"] not in by_step, f"step {record['step']} logged twice"
            by_step[record["step"]] = record["loss"]
    return by_step


def eval_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}


def probe_ids():
    from dtrain.presets import byte_tokenizer

    return byte_tokenizer()("Add the numbers.\n12 + 30\n", return_tensors="pt")["input_ids"]


@pytest.fixture
def final_spy(monkeypatch):
    """Logits of the trained model on probe_ids(), taken just before save_final_model writes it."""
    import dtrain.train as train_mod

    seen: dict[str, torch.Tensor] = {}
    original = train_mod.save_final_model

    def spy(model, state_dict, tokenizer, cfg, out):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe_ids()).logits.float().clone()
        model.train()
        return original(model, state_dict, tokenizer, cfg, out)

    monkeypatch.setattr(train_mod, "save_final_model", spy)
    return seen


# tests/test_bad_inputs.py records each bad input's verdict (exit code, traceback or not); the
# summary counts them. (A hook on the controller: with pytest-xdist, the reports carry them here.)
_BAD_INPUT_VERDICTS: dict[str, int] = {}


def pytest_runtest_logreport(report):
    if report.when == "call":
        for key, verdict in report.user_properties:
            if key.startswith("bad_input_verdict"):
                _BAD_INPUT_VERDICTS[verdict] = _BAD_INPUT_VERDICTS.get(verdict, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if _BAD_INPUT_VERDICTS:
        counts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(_BAD_INPUT_VERDICTS.items()))
        terminalreporter.write_line(f"bad inputs through the CLI: {sum(_BAD_INPUT_VERDICTS.values())} ({counts})")
