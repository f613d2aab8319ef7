"""Distributed strategies on this CPU machine: 2 processes, gloo, real torchrun.

One torchrun job trains every strategy (and its LoRA variant) for 20 steps on the same
global batch, then the configuration matrix; the tests below compare each loss curve with the single-process run,
check the saved adapters, the per-rank memory and that only the main rank built the data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, REPO, arithmetic_prompts, read_metrics, write_jsonl
from safetensors.torch import load_file

from dtrain import checkpoint as ckpt
from dtrain.config import load_config
from dtrain.train import train

sys.path.append(str(REPO / "benchmarks"))  # (mesh_comm: the collectives' counter; last: its scripts shadow nothing)

STEPS = 20
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero1.json"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero2.json"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero3.json"],
}
# The LM head and the loss in chunks of 96 positions (model.logits=auto chunks the tiny Llama's
# head): several chunks per micro-batch, in every run of this module.
CHUNKS = "model.logits_chunk_tokens=96"
FULL_LOGITS = ["model.logits=full"]
# LoRA dropout draws per-rank random numbers, which no other world size can reproduce.
LORA = ["peft.method=lora", "peft.dropout=0", "optim.lr=1e-2"]


def common(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={ALPACA}", "data.format=alpaca", "data.max_seq_len=256",
            f"train.max_steps={STEPS}", "train.log_every=1", "optim.lr=2e-3", "schedule.warmup_steps=2",
            "eval.max_batches=4", "logging.tensorboard=false", "logging.progress_bar=false", "seed=7",
            CHUNKS]


def torchrun(spec: dict, out: Path, *, nproc: int = 2, timeout: float = 900, env: dict | None = None) -> list[dict]:
    """Run tests/dist_worker.py under torchrun; returns each rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "dist_worker.py"), str(spec_file), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def distributed_runs(tiny_model_dir, tmp_path_factory):
    """One torchrun job (2 processes) for every distributed run of this module: the strategy
    runs, then the configuration matrix. Returns (output root, each rank's results by run)."""
    out = tmp_path_factory.mktemp("distributed")
    strategies = common(tiny_model_dir) + ["train.micro_batch_size=4", f"data.cache_dir={out / 'cache'}"]
    runs = {}
    for name, overrides in STRATEGIES.items():
        runs[name] = strategies + overrides
        runs[f"{name}_lora"] = strategies + overrides + LORA
    runs.update({name: matrix_base(tiny_model_dir, out / "matrix-cache") + overrides
                 for name, overrides in matrix(tiny_model_dir).items()})
    runs.update({f"{objective}-{strategy}{suffix}": preference_run(tiny_model_dir, out / "preference-cache", objective,
                                                                   micro_batch=2, extra=STRATEGIES[strategy] + lora)
                 for objective in PREFERENCE for strategy in ("ddp", "fsdp", "zero3")
                 for suffix, lora in (("", []), ("_lora", LORA))})
    runs.update({f"{strategy}-distill-lora_full_logits": matrix_base(tiny_model_dir, out / "matrix-cache")
                 + STRATEGIES[strategy] + TECHNIQUES["distill-lora"](tiny_model_dir) + FULL_LOGITS
                 for strategy in ("ddp", "fsdp", "zero3")})
    write_jsonl(out / "prompts.jsonl", arithmetic_prompts(96))
    runs.update({f"grpo-{strategy}{suffix}": grpo_run(tiny_model_dir, out, micro_batch=8, extra=STRATEGIES[strategy] + lora)
                 for strategy in ("ddp", "fsdp", "zero3") for suffix, lora in (("", []), ("_lora", LORA))})
    runs.update({f"grpo-{strategy}_packed": grpo_run(tiny_model_dir, out, micro_batch=8,
                                                     extra=[*STRATEGIES[strategy], "data.packing=true"])
                 for strategy in ("fsdp", "zero3")})
    runs["dpo-fsdp-precomputed"] = preference_run(tiny_model_dir, out / "preference-cache", "dpo", micro_batch=2,
                                                  extra=STRATEGIES["fsdp"] + ["preference.precompute_reference=true"])
    runs["dpo-fsdp_qlora"] = preference_run(tiny_model_dir, out / "preference-cache", "dpo", micro_batch=2,
                                            extra=STRATEGIES["fsdp"] + ["peft.method=qlora", "peft.dropout=0"])
    counted = [*STRATEGIES, *(f"{name}_lora" for name in STRATEGIES)]  # (their second step's collectives)
    return out, torchrun({"base": [], "runs": runs, "count": {"step": 2, "runs": counted}}, out)


@pytest.fixture(scope="module")
def strategy_runs(distributed_runs):
    """Every strategy, full and LoRA, 20 steps, 2 processes x micro-batch 4 (global batch 8)."""
    out, ranks = distributed_runs
    names = [*STRATEGIES, *(f"{name}_lora" for name in STRATEGIES)]
    return out, [{name: rank[name] for name in rank if name in names} for rank in ranks]


@pytest.fixture(scope="module")
def single_runs(tiny_model_dir, tmp_path_factory):
    """The references: one process, micro-batch 8 (the same global batch); and the same
    without the chunked loss."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for name, extra in (("single", []), ("single_lora", LORA), ("single_full_logits", FULL_LOGITS)):
        cfg = load_config(None, common(tiny_model_dir) + ["train.micro_batch_size=8", *extra,
                                                          f"output_dir={out / name}"])
        results[name] = train(cfg)
    return out, results


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_loss_curve_matches_single_process(strategy_runs, single_runs, strategy, lora):
    _, ranks = strategy_runs
    _, singles = single_runs
    suffix = "_lora" if lora else ""
    reference = singles["single" + suffix]
    got = ranks[0][strategy + suffix]
    assert len(reference.train_losses) == len(got["losses"]) == STEPS
    assert reference.train_losses[-1] < reference.train_losses[0] - 0.5  # it learns, so the curves say something
    # Step 1 depends only on the initial weights (ZeRO-3 included) and the batch.
    for step, (a, b) in enumerate(zip(reference.train_losses, got["losses"]), start=1):
        assert b == pytest.approx(a, abs=1e-5, rel=0), f"{strategy}{suffix} step {step}: {b} vs single {a}"
    assert got["final"]["eval_loss"] == pytest.approx(reference.final_metrics["eval_loss"], abs=1e-5, rel=0)
    assert ranks[1][strategy + suffix]["losses"] == got["losses"]  # every rank logs the global loss


@pytest.mark.slow
@pytest.mark.parametrize("run", [*STRATEGIES, *(f"{name}_lora" for name in STRATEGIES)])
def test_the_estimated_communication_is_what_the_collectives_send(distributed_runs, run):
    """`dtrain estimate`'s bytes per device and step for DDP, FSDP and ZeRO-1/2/3 against the bytes
    each rank's collectives sent in the run's second step (benchmarks/mesh_comm.py's count)."""
    check_counted_communication(*distributed_runs, run)


def check_counted_communication(out: Path, ranks: list[dict], run: str) -> None:
    """Every rank's counted bytes (dist_worker "count") within 1% of the estimate for `run` of the
    torchrun job in `out`, at that step's batch shape (also tests/test_mesh.py's)."""
    from mesh_comm import estimated

    spec = json.loads((out / "spec.json").read_text())
    cfg = load_config(None, spec["base"] + spec["runs"][run])
    for rank, results in enumerate(ranks):
        counted = results[run]["collectives"]
        assert sum(counted["sent"].values()) == pytest.approx(estimated(cfg, len(ranks), counted["micro_batches"]),
                                                              rel=0.01), (rank, counted)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", *STRATEGIES])
def test_chunked_logits_equal_full_logits_under_every_strategy(strategy_runs, single_runs, strategy):
    # Every strategy's run with the LM head and the loss in chunks against the whole logits
    # computed in one process: the loss at every one of the 20 steps (so the weights after each
    # update) and the evaluation. ZeRO-3 gathers the head's weight for the chunks.
    _, ranks = strategy_runs
    _, singles = single_runs
    chunked = singles["single"] if strategy == "single" else ranks[0][strategy]
    full = singles["single_full_logits"]
    chunked_losses = chunked.train_losses if strategy == "single" else chunked["losses"]
    chunked_final = chunked.final_metrics if strategy == "single" else chunked["final"]
    assert len(chunked_losses) == len(full.train_losses) == STEPS
    assert chunked_losses == pytest.approx(full.train_losses, abs=1e-5, rel=0), strategy
    for key, value in full.final_metrics.items():
        if isinstance(value, float):  # (perplexity = exp(loss): its own scale)
            assert chunked_final[key] == pytest.approx(value, abs=1e-5, rel=1e-6), (strategy, key)


@pytest.mark.slow
@pytest.mark.parametrize("run", [*(f"{strategy}-distill-lora" for strategy in ("ddp", "fsdp", "zero3")),
                                 "dpo-fsdp", "dpo-zero3"])
def test_distillation_and_dpo_chunked_equal_full_logits(distributed_runs, preference_singles, run):
    # A distilling teacher's head is copied out of FSDP's and ZeRO-3's gathered weights (against
    # the same strategy without chunks); DPO's full fine-tuning recomputes the chunks in backward
    # (against one process without chunks).
    _, ranks = distributed_runs
    chunked = ranks[0][run]
    if run.startswith("dpo-"):
        full = {"losses": preference_singles["dpo_full_logits"].train_losses,
                "final": preference_singles["dpo_full_logits"].final_metrics}
    else:
        full = ranks[0][f"{run}_full_logits"]
    assert "config_error" not in chunked and "config_error" not in full, (chunked, full)
    assert len(chunked["losses"]) == len(full["losses"]) > 1
    assert chunked["losses"] == pytest.approx(full["losses"], abs=1e-5, rel=0), run
    for key, value in full["final"].items():
        if isinstance(value, float):
            assert chunked["final"][key] == pytest.approx(value, abs=1e-5, rel=1e-6), (run, key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_lora_saves_a_complete_adapter(strategy_runs, single_runs, strategy):
    """Sharded strategies must gather the adapter before writing it (a naive save_pretrained
    under ZeRO-3 writes empty tensors): final/ must hold the training weights, whole."""
    out, _ = strategy_runs
    single_out, _ = single_runs
    run = out / f"{strategy}_lora"
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    # The same weights, reassembled independently from the run's last sharded checkpoint.
    trained = {name.replace(".default", ""): t for name, t in ckpt.read_model_state(ckpt.find_resumable(run)).items()
               if "lora_" in name}
    assert len(adapter) > 0 and adapter.keys() == trained.keys()
    for name, tensor in adapter.items():
        assert tensor.numel() > 0 and tensor.shape == trained[name].shape, name
        torch.testing.assert_close(tensor, trained[name], atol=1e-7, rtol=0)
    # ... and they are the single-process run's adapter, up to 20 steps of fp32 round-off.
    reference = load_file(single_out / "single_lora" / "final" / "adapter_model.safetensors")
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sharded_strategies_hold_about_half_the_state_of_ddp(strategy_runs):
    """Per-rank parameter + optimizer bytes, as each strategy reports them, with 2 ranks.

    FSDP shards exactly what DDP holds: half. ZeRO-3 halves the parameters and the optimizer
    state too, but DeepSpeed also keeps an fp32 master copy of the parameters (a separate
    allocation even in fp32 training), itself sharded: half of (DDP's state + one copy)."""
    _, ranks = strategy_runs
    for rank in ranks:
        ddp, fsdp, zero3 = (rank[name]["state_bytes"] for name in ("ddp", "fsdp", "zero3"))
        assert ddp["optimizer"] == 2 * ddp["parameters"]  # AdamW: two moments per parameter
        assert 0.45 < sum(fsdp.values()) / sum(ddp.values()) < 0.55, (fsdp, ddp)
        # Norm weights (below stage3_param_persistence_threshold) stay whole on every rank.
        assert 0.5 <= zero3["parameters"] / ddp["parameters"] < 0.55, (zero3, ddp)
        assert zero3["optimizer"] == pytest.approx((ddp["optimizer"] + ddp["parameters"]) / 2, rel=0.05), (zero3, ddp)
        # ZeRO-1/2 shard only optimizer state and masters: parameters stay whole.
        assert rank["zero2"]["state_bytes"]["parameters"] == ddp["parameters"]
        assert rank["zero2"]["state_bytes"]["optimizer"] == pytest.approx(zero3["optimizer"], rel=0.05)


@pytest.mark.slow
def test_data_is_prepared_once_by_the_main_rank(strategy_runs):
    out, ranks = strategy_runs
    first = next(iter(ranks[0]))
    assert ranks[0][first]["data_builds"] == 1 and ranks[1][first]["data_builds"] == 0
    assert all(r[name]["data_builds"] == 0 for r in ranks for name in list(r)[1:])  # then the cache serves all
    entries = [p for p in (out / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1


# --------------------------------------------------------------------------------------
# Configuration matrix: every strategy x peft x precision trains two steps or is refused
# up front with a message; nothing fails later.

PEFTS = ["none", "lora", "dora", "qlora"]
PRECISIONS = ["fp32", "bf16"]
REFUSED = {("zero1", "qlora"), ("zero2", "qlora"), ("zero3", "qlora")}
FEW_GRAPHS = ["train.micro_batch_size=1", "train.grad_accum_steps=4", "data.val_ratio=0"]
# Switches that change the strategy's code path, each trained once.
EXTRAS = {
    "fsdp-cpu_offload": ["parallel.strategy=fsdp", "parallel.fsdp.cpu_offload=true"],
    "fsdp-keep_gathered-ac-lora": ["parallel.strategy=fsdp", "parallel.fsdp.reshard_after_forward=false",
                                   "model.gradient_checkpointing=true", "peft.method=lora"],
    "ddp-ac": ["parallel.strategy=ddp", "model.gradient_checkpointing=true"],
    # Compiled blocks with LoRA, FSDP2 and the chunked loss at once (compiling costs ~1 min here);
    # LoRA dropout off: compiled code draws its random numbers differently. Each block compiles once
    # per kind of input it meets, so these two train on fewer kinds: single sequences (no padding
    # mask: 1 x 4 per step instead of 2 x 2) and no validation split (no graphs without gradients).
    "ddp-lora-no_dropout": ["parallel.strategy=ddp", "peft.method=lora", "peft.dropout=0", *FEW_GRAPHS],
    "fsdp-compile-lora": ["parallel.strategy=fsdp", "model.compile=true", "peft.method=lora", "peft.dropout=0",
                          *FEW_GRAPHS],
    "fsdp-ac-offload": ["parallel.strategy=fsdp", "model.gradient_checkpointing=true",
                        "model.activation_offloading=true"],
    "ddp-adamw_8bit": ["parallel.strategy=ddp", "optim.name=adamw_8bit"],
    "ddp-paged_adamw_8bit-qlora": ["parallel.strategy=ddp", "optim.name=paged_adamw_8bit", "peft.method=qlora"],
    "zero2_offload": ["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero2_offload.json"],
    "zero3_offload-lora": ["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero3_offload.json",
                           "peft.method=lora"],
}


def matrix_base(model_dir: Path, cache: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={ALPACA}", "data.format=alpaca", "data.max_seq_len=256",
            "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.log_every=1",
            "eval.max_batches=1", "logging.tensorboard=false", "logging.progress_bar=false",
            f"data.cache_dir={cache}", CHUNKS]


def matrix(model_dir: Path) -> dict[str, list[str]]:
    """The matrix's runs: every strategy x peft x precision, the switches, the techniques."""
    runs = {f"{s}-{peft}-{prec}": STRATEGIES[s] + [f"peft.method={peft}", f"train.precision={prec}"]
            for s in STRATEGIES for peft in PEFTS for prec in PRECISIONS}
    runs.update(EXTRAS)
    runs.update({f"{strategy}-{name}": STRATEGIES[strategy] + overrides(model_dir)
                 for name, overrides in TECHNIQUES.items() for strategy in ("ddp", "fsdp", "zero3")
                 if not (strategy == "zero3" and name == "l1")})
    return runs


@pytest.fixture(scope="module")
def matrix_runs(distributed_runs, tiny_model_dir):
    _, ranks = distributed_runs
    return {name: ranks[0][name] for name in matrix(tiny_model_dir)}


# Fine-tuning techniques under each strategy (the teacher is sharded like the student).
TECHNIQUES = {
    "distill-lora": lambda model_dir: [f"distill.teacher={model_dir}", "distill.alpha=0.7", "peft.method=lora",
                                       "peft.dropout=0"],
    "freeze-llrd-smoothing": lambda model_dir: ["freeze.layers=1", "freeze.embeddings=true", "optim.layer_decay=0.7",
                                                "optim.groups=[{pattern: '*.mlp.*', lr_scale: 0.5}]",
                                                "train.label_smoothing=0.1"],
    "l1": lambda model_dir: ["optim.l1=1e-4"],
    "generate": lambda model_dir: ["eval.generation.enabled=true", "eval.generation.max_examples=5",
                                   "eval.generation.batch_size=2", "eval.generation.max_new_tokens=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "technique"), [
    (strategy, technique) for strategy in ("fsdp", "zero3") for technique in TECHNIQUES
    if not (strategy == "zero3" and technique == "l1")])  # (refused at config time: test_parallel_config)
def test_techniques_under_sharded_strategies_match_ddp(matrix_runs, strategy, technique):
    name = f"{strategy}-{technique}"
    got, reference = matrix_runs[name], matrix_runs[f"ddp-{technique}"]
    assert "config_error" not in got, got
    assert got["losses"] == pytest.approx(reference["losses"], abs=1e-5, rel=0), name
    for key in ("eval_loss", "eval_exact_match", "eval_contains_answer"):
        if key in reference["final"]:
            assert got["final"][key] == pytest.approx(reference["final"][key], abs=1e-5), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_combination_trains_or_is_refused_up_front(matrix_runs, strategy):
    for peft in PEFTS:
        for prec in PRECISIONS:
            got = matrix_runs[f"{strategy}-{peft}-{prec}"]
            if (strategy, peft) in REFUSED:
                assert "peft.method=qlora with parallel.strategy=deepspeed is not supported" in got["config_error"]
                assert "parallel.strategy=fsdp" in got["config_error"]  # ... and what to use instead
            else:
                assert "config_error" not in got, got
                assert len(got["losses"]) == 2 and all(math.isfinite(x) for x in got["losses"]), (peft, prec, got)


SAME_NUMBERS = {"ddp-ac": "ddp-none-fp32", "fsdp-cpu_offload": "ddp-none-fp32",
                "zero2_offload": "ddp-none-fp32", "fsdp-compile-lora": "ddp-lora-no_dropout",
                "fsdp-ac-offload": "ddp-none-fp32"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXTRAS))
def test_strategy_switches_train(matrix_runs, name):
    got = matrix_runs[name]
    assert "config_error" not in got, got
    assert len(got["losses"]) == 2 and all(math.isfinite(x) for x in got["losses"])
    if name in SAME_NUMBERS:
        # Recomputing activations, compiling or offloading changes where the numbers are
        # computed, not what they are (the chunked loss is on in all of them: model.logits=auto).
        reference = matrix_runs[SAME_NUMBERS[name]]["losses"]
        assert got["losses"] == pytest.approx(reference, abs=1e-4, rel=0), name


@pytest.mark.slow
@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_single_process_combinations_train(tiny_model_dir, tmp_path, peft, precision):
    cfg = load_config(None, matrix_base(tiny_model_dir, tmp_path / "cache")
                      + [f"peft.method={peft}", f"train.precision={precision}", f"output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert len(result.train_losses) == 2 and all(math.isfinite(x) for x in result.train_losses)


# --------------------------------------------------------------------------------------
# Preference objectives: each under DDP, FSDP and ZeRO-3, full and LoRA, equals one process.

PREFERENCE_STEPS = 10
PREFERENCE = {  # objective: what it trains on
    "dpo": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_preference.jsonl'}", "data.format=preference"],
    "ipo": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_preference.jsonl'}", "data.format=preference"],
    "simpo": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_preference.jsonl'}", "data.format=preference"],
    "orpo": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_preference.jsonl'}", "data.format=preference"],
    "kto": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_kto.jsonl'}", "data.format=unpaired_preference"],
    "reward_model": [f"data.train={REPO / 'examples' / 'data' / 'arithmetic_preference.jsonl'}",
                     "data.format=preference", "model.task=reward"],
}


def preference_run(model_dir: Path, cache: Path, objective: str, *, micro_batch: int, extra: list[str]) -> list[str]:
    """A 10-step preference run of `objective`, global batch 4 (pairs, or judged completions). The
    reward model trains at 3e-4: at 1e-2 AdamW turns the rounding noise of near-zero
    gradients into whole steps, and a run accumulating 2 x 2 already differs from 1 x 4 by 3e-4
    in one process (at 1e-3: 1e-7 in the losses, 1.3e-5 in the evaluated rewards)."""
    return [f"model.path={model_dir}", *PREFERENCE[objective], f"train.objective={objective}", "data.max_seq_len=320",
            f"train.max_steps={PREFERENCE_STEPS}", f"train.micro_batch_size={micro_batch}", "train.log_every=1",
            "optim.lr=5e-3", "eval.max_batches=2", "logging.tensorboard=false", "logging.progress_bar=false",
            f"data.cache_dir={cache}", "seed=3", CHUNKS, *extra, *(["optim.lr=3e-4"] if objective == "reward_model" else [])]


@pytest.fixture(scope="module")
def preference_singles(tiny_model_dir, tmp_path_factory):
    """The references: one process, micro-batch 4 (the same global batch)."""
    out = tmp_path_factory.mktemp("preference-single")
    results = {}
    runs = {objective + suffix: (objective, extra) for objective in PREFERENCE
            for suffix, extra in (("", []), ("_lora", LORA))}
    runs["dpo_full_logits"] = ("dpo", FULL_LOGITS)
    for name, (objective, extra) in runs.items():
        run = preference_run(tiny_model_dir, out / "cache", objective, micro_batch=4,
                             extra=[*extra, f"output_dir={out / name}"])
        results[name] = train(load_config(None, run))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("objective", list(PREFERENCE))
def test_preference_objectives_match_single_process(distributed_runs, preference_singles, objective, strategy, lora):
    _, ranks = distributed_runs
    suffix = "_lora" if lora else ""
    reference = preference_singles[objective + suffix]
    got = ranks[0][f"{objective}-{strategy}{suffix}"]
    assert "config_error" not in got, got
    assert len(reference.train_losses) == len(got["losses"]) == PREFERENCE_STEPS
    assert reference.train_losses[-1] != reference.train_losses[0]  # (it trains: the curves say something)
    assert got["losses"] == pytest.approx(reference.train_losses, abs=1e-5, rel=0), f"{objective}-{strategy}{suffix}"
    for key, value in reference.final_metrics.items():
        if isinstance(value, float):  # (rel: fp32's precision on sums of ~20, as the other final metrics here)
            assert got["final"][key] == pytest.approx(value, abs=1e-5, rel=1e-6), key
    assert ranks[1][f"{objective}-{strategy}{suffix}"]["losses"] == got["losses"]


@pytest.mark.slow
def test_a_precomputed_reference_and_qlora_train_under_fsdp(distributed_runs, preference_singles):
    _, ranks = distributed_runs
    precomputed = ranks[0]["dpo-fsdp-precomputed"]
    assert precomputed["losses"] == pytest.approx(preference_singles["dpo"].train_losses, abs=1e-5, rel=0)
    qlora = ranks[0]["dpo-fsdp_qlora"]
    assert "config_error" not in qlora, qlora
    assert len(qlora["losses"]) == PREFERENCE_STEPS and all(math.isfinite(x) for x in qlora["losses"])
    assert qlora["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # the adapters start at zero


# --------------------------------------------------------------------------------------
# GRPO: the same completions, rewards and losses on 2 processes as on one


GRPO_STEPS = 5


def grpo_run(model_dir: Path, out: Path, *, micro_batch: int, extra: list[str]) -> list[str]:
    """5 GRPO steps of 4 prompts x 4 completions (global), two updates per batch of completions and
    the KL to the reference (a sharded frozen copy; with LoRA, the adapters switched off), a reward
    that varies between a random model's completions (whether they hold a digit) and one that does not."""
    return [f"model.path={model_dir}", f"data.train={out / 'prompts.jsonl'}", "data.format=prompt",
            "data.max_seq_len=64", "data.val_ratio=0.1", "data.test_ratio=0", f"data.cache_dir={out / 'grpo-cache'}",
            f"train.max_steps={GRPO_STEPS}", f"train.micro_batch_size={micro_batch}", "train.log_every=1",
            "optim.lr=1e-2", "eval.metric=reward", "eval.max_batches=2", "grpo.num_generations=4",
            "grpo.max_completion_length=6", "grpo.num_iterations=2", "grpo.beta=0.04",
            "grpo.rewards=[{function: exact_answer}, {function: regex_format, name: digit, args: {pattern: '.*[0-9].*'}}]",
            "logging.tensorboard=false", "logging.progress_bar=false", "seed=5", CHUNKS, *extra]


@pytest.fixture(scope="module")
def grpo_singles(distributed_runs, tiny_model_dir):
    """The references: one process, micro-batch 16 (the same global batch)."""
    out, _ = distributed_runs
    runs = {}
    for suffix, extra in (("", []), ("_lora", LORA)):
        run_dir = out / f"grpo-single{suffix}"
        runs[suffix] = (run_dir, train(load_config(None, grpo_run(tiny_model_dir, out, micro_batch=16,
                                                                  extra=[*extra, f"output_dir={run_dir}"]))))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_grpo_samples_scores_and_trains_as_one_process(distributed_runs, grpo_singles, strategy, lora):
    """Seeded per completion, the 2 ranks' rollouts (generated on the sharded model under FSDP2 and
    ZeRO-3) are the single process's: the same rewards, KL and losses at every step."""
    out, ranks = distributed_runs
    suffix = "_lora" if lora else ""
    single_dir, single = grpo_singles[suffix]
    got = ranks[0][f"grpo-{strategy}{suffix}"]
    assert "config_error" not in got, got
    assert len(single.train_losses) == len(got["losses"]) == GRPO_STEPS
    assert got["losses"] == pytest.approx(single.train_losses, abs=1e-5, rel=0)
    expected = [r for r in read_metrics(single_dir) if "reward" in r]
    logged = [r for r in read_metrics(out / f"grpo-{strategy}{suffix}") if "reward" in r]
    assert len(logged) == len(expected) == GRPO_STEPS
    for mine, theirs in zip(logged, expected):
        for key in ("reward", "reward_digit", "reward_std", "kl", "completion_length", "entropy", "clip_ratio_low"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5, rel=0), (mine["step"], key)
    assert len({r["reward"] for r in expected}) > 1 and expected[-1]["kl"] > 0  # (it samples and moves)
    for key, value in single.final_metrics.items():
        if isinstance(value, float):
            assert got["final"][key] == pytest.approx(value, abs=1e-5, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_grpo_packed_with_each_prompt_read_once_trains_as_one_padded_process(distributed_runs, grpo_singles, strategy):
    """data.packing: each rank's prompts once in one row, their completions after them (sdpa_varlen's
    shared prefixes), the reference a sharded copy scored the same way: the single padded run's numbers."""
    out, ranks = distributed_runs
    single_dir, single = grpo_singles[""]
    got = ranks[0][f"grpo-{strategy}_packed"]
    assert "config_error" not in got, got
    assert got["losses"] == pytest.approx(single.train_losses, abs=1e-5, rel=0)
    expected = [r for r in read_metrics(single_dir) if "reward" in r]
    logged = [r for r in read_metrics(out / f"grpo-{strategy}_packed") if "reward" in r]
    assert len(logged) == len(expected) == GRPO_STEPS
    for mine, theirs in zip(logged, expected):
        for key in ("reward", "kl", "completion_length", "entropy"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5, rel=0), (mine["step"], key)
