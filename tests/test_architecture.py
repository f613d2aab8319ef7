"""The shape of the code, checked: no import cycles, no strategy names compared outside
dtrain/parallel/, Ray and submitit only at the edges, registries equal to the schema's allowed
values, a loop short enough to read, a new objective as one module plus two one-line edits, and
config validation without the model stack."""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

from conftest import ALPACA, REPO

PACKAGE = REPO / "dtrain"


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _skipped(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (runs as the __main__ module, not as this one) and
    `if TYPE_CHECKING:` (never runs) hold no imports of the module itself."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


def imported(path: Path, name: str) -> set[str]:
    """What a module imports, anywhere in it (functions included), as dotted names."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def visit(node: ast.AST) -> None:
        if _skipped(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it makes Python run: the one named, and the packages
    above it (their __init__ runs first) unless the importer is inside them already."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for target in imported(path, name):
            if target not in mods or target == name or name.startswith(target + "."):
                continue  # (a package above the importer is already running its __init__)
            edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):
                ancestor = ".".join(parts[:i])
                if ancestor in mods and not (name == ancestor or name.startswith(ancestor + ".")):
                    edges.add(ancestor)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["dtrain.train"]  # the walk sees the package
    assert "dtrain.parallel" in graph["dtrain.config"]  # the rules are asked of the strategies ...
    assert not any(m.startswith("dtrain.parallel") for m in graph["dtrain.schema"])  # ... not the schema
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself, on two modules that import each other (inside functions, as lazy imports do)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def strategy_names() -> set[str]:
    from dtrain.schema import ParallelConfig

    return set(typing.get_args(ParallelConfig.model_fields["strategy"].annotation))


def name_comparisons(source: str, names: set[str]) -> list[str]:
    """Comparisons (==, !=, in, not in) of anything with a literal strategy name."""
    found = []

    def is_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e) for e in node.elts)
        return False

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(is_name(n) for n in [node.left, *node.comparators]):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_parallel_package_compares_a_strategy_name():
    names = strategy_names()
    assert names == {"single", "ddp", "fsdp", "deepspeed"}
    assert name_comparisons('if strategy.name in ("fsdp", "x"): pass\nok = kind == "deepspeed"', names) == [
        "line 1: strategy.name in ('fsdp', 'x')", "line 2: kind == 'deepspeed'"]  # the check has teeth
    found = {str(path.relative_to(REPO)): hits for name, path in modules().items()
             if not name.startswith("dtrain.parallel") and (hits := name_comparisons(path.read_text(), names))}
    assert found == {}


def test_only_the_ray_subpackage_imports_ray_or_submitit():
    """Statically, every import anywhere in a module (the runtime check is test_ray.py's)."""
    offenders = {}
    for name, path in modules().items():
        if name == "dtrain.ray" or name.startswith("dtrain.ray."):
            continue
        edges = {t for t in imported(path, name) if t.split(".")[0] in ("ray", "submitit")}
        if edges:
            offenders[name] = sorted(edges)
    assert offenders == {}
    assert any(t.split(".")[0] == "ray" for t in imported(PACKAGE / "ray" / "tune.py", "dtrain.ray.tune"))


def test_validating_a_config_and_the_ray_side_processes_load_no_model_code():
    """A bad config fails before any model code loads (torch only), and the processes Ray starts to
    drive a search or a Ray Train run (the trial's function, the train controller) import the
    modules they unpickle without transformers, datasets or DeepSpeed: a fresh interpreter, as they are."""
    heavy = ("transformers", "datasets", "deepspeed", "peft", "bitsandbytes")
    code = ("import sys; import dtrain.cli, dtrain.config, dtrain.ray.tune, dtrain.ray.train, dtrain.train_state; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import sys, dtrain.train; print('transformers' in sys.modules)"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.stdout.strip() == "True", proc.stderr[-3000:]  # (the check has teeth: training loads them)


def test_registries_are_the_schemas_allowed_values():
    from dtrain.objectives import OBJECTIVES
    from dtrain.parallel import STRATEGIES
    from dtrain.schema import TrainConfig

    assert set(STRATEGIES) == strategy_names()
    assert set(typing.get_args(TrainConfig.model_fields["objective"].annotation)) == {"auto", *OBJECTIVES}
    for name, cls in STRATEGIES.items():
        assert cls.name == name
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and cls.data_formats


def test_the_step_and_the_loop_fit_on_one_screen():
    from dtrain.train import train, train_step

    step, loop = (len(inspect.getsource(fn).splitlines()) for fn in (train_step, train))
    print(f"train_step: {step} lines, train: {loop} lines")
    assert step <= 45 and loop <= 70


# --------------------------------------------------------------------------------------
# A new objective: its own module, one registration, one allowed value


EXAMPLE = '''"""Next-token loss plus PaLM's z-loss (Chowdhery et al., 2022): 1e-4 x log(Z)^2 per trained token
keeps the softmax normaliser Z near 1, which stabilises large-vocabulary training."""

import torch

from dtrain.data.formats import IGNORE_INDEX
from dtrain.objectives.causal_lm import CausalLM


class ZLoss(CausalLM):
    name = "z_loss"

    def loss(self, model, batch):
        logits, labels = self.predict(model, batch)
        log_z = torch.logsumexp(logits, dim=-1)[labels != IGNORE_INDEX]
        return self.loss_of(logits, labels) + 1e-4 * (log_z**2).sum()
'''
EDITS = [  # (file, old, new) besides the new module: the registration (its import and its entry), the value
    ("dtrain/objectives/__init__.py", "from dtrain.objectives.distillation import TASKS, Distillation\n",
     "from dtrain.objectives.distillation import TASKS, Distillation\nfrom dtrain.objectives.z_loss import ZLoss\n"),
    ("dtrain/objectives/__init__.py", "(CausalLM, Classification, Distillation, DPO, IPO, SimPO, ORPO, KTO, RewardModel, GRPO)}",
     "(CausalLM, Classification, Distillation, DPO, IPO, SimPO, ORPO, KTO, RewardModel, GRPO, ZLoss)}"),
    ("dtrain/schema.py", '"reward_model", "grpo"] = Field(', '"reward_model", "grpo", "z_loss"] = Field('),
]

TRAIN_BOTH = '''
import json, sys
from dtrain.config import load_config
from dtrain.train import train
losses = {}
for objective in ("causal_lm", "z_loss"):
    cfg = load_config(None, sys.argv[1:] + [f"train.objective={objective}", f"output_dir=runs/{objective}"])
    losses[objective] = train(cfg).train_losses
print("LOSSES " + json.dumps(losses))
'''


def test_a_new_objective_is_a_module_one_registration_and_one_allowed_value(tiny_model_dir, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "dtrain", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "dtrain" / "objectives" / "z_loss.py").write_text(EXAMPLE)
    diff = []
    for rel, old, new in EDITS:
        path = copy / rel
        before = path.read_text()
        assert before.count(old) == 1, (rel, old)
        path.write_text(before.replace(old, new))
        diff += difflib.unified_diff(before.splitlines(), path.read_text().splitlines(), rel, rel, n=0, lineterm="")
    print("\n".join(diff))
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 5  # import and registration in objectives/, the Literal's line replaced

    overrides = [f"model.path={tiny_model_dir}", f"data.train={ALPACA}", "data.max_seq_len=256", "train.max_steps=2",
                 "train.micro_batch_size=4", "optim.lr=0", "eval.max_batches=1", "eval.worst_examples=0",
                 "logging.tensorboard=false", "logging.progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    proc = subprocess.run([sys.executable, "-c", TRAIN_BOTH, *overrides], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads(proc.stdout.split("LOSSES ", 1)[1])
    for plain, z in zip(losses["causal_lm"], losses["z_loss"]):
        # The same batches and weights (lr 0): z-loss adds 1e-4 x log(Z)^2 per token, log(Z) ~ ln(260).
        assert 0.5e-4 * 5.0**2 < z - plain < 2e-4 * 7.0**2, (z, plain)

    # Without the allowed value the config names the key and the values it takes.
    unpatched = subprocess.run([sys.executable, "-m", "dtrain", "config", "show", "examples/tiny_alpaca.yaml",
                                "train.objective=z_loss"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert unpatched.returncode == 2 and "`train.objective`" in unpatched.stderr
