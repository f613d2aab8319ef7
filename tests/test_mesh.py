"""Device-mesh parallelism on this CPU machine: 4 processes, gloo, real torchrun.

One torchrun job trains HSDP (replicate 2 x shard 2), FSDP x tensor parallel (shard 2 x tensor 2),
tensor parallel with data replicas (replicate 2 x tensor 2) and FSDP x sequence parallel (shard 2
x sequence 2, also on packed rows), full and LoRA, for 10 steps on the same global batch as one
process (and FSDP x TP for Mistral, Qwen2, GPT-NeoX and Phi-3); the tests compare every loss and the
evaluation with that process's run. Tensor parallel includes sequence parallel for the norms (dtrain/parallel/tensor.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ALPACA, REPO
from test_distributed import LORA, check_counted_communication, torchrun

from dtrain.config import ConfigError, load_config
from dtrain.parallel.mesh import ParallelDims
from dtrain.train import train

STEPS = 10
GLOBAL_BATCH = 8
MESHES = {  # name: (overrides, data-parallel size)
    "hsdp": (["parallel.mesh.replicate=2", "parallel.mesh.shard=2"], 4),
    "fsdp_tp": (["parallel.mesh.shard=2", "parallel.mesh.tensor=2"], 2),
    "tp": (["parallel.mesh.replicate=2", "parallel.mesh.shard=1", "parallel.mesh.tensor=2"], 2),
    "sp": (["parallel.mesh.shard=2", "parallel.mesh.sequence=2"], 2),
}


PACKED = ["data.packing=true"]
# The runs whose second step's collectives are counted (dist_worker "count"), for the estimate.
COUNTED = [*MESHES, *(f"{name}_lora" for name in MESHES), "fsdp_tp_lora_ac", "sp_packed"]
PREFERENCE_DATA = REPO / "examples" / "data" / "arithmetic_preference.jsonl"


def base(model_dir: Path, cache: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={ALPACA}", "data.format=alpaca", "data.max_seq_len=256",
            f"train.max_steps={STEPS}", "train.log_every=1", "optim.lr=2e-3", "schedule.warmup_steps=2",
            "eval.max_batches=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "seed=7", f"data.cache_dir={cache}", "model.logits_chunk_tokens=96"]


# The other families with a tensor-parallel plan: Mistral (Llama's plan), Qwen2 (biased q, k, v),
# GPT-NeoX (fused head-major qkv, parallel residual, biases everywhere) and Phi-3 (fused [q | k | v]
# and [gate | up], GQA), untied, with the byte tokenizer.
ARCHITECTURES = {
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5,
                                       tie_word_embeddings=False)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)),
}
# Phi-3 under FSDP x TP saves its step 5, which one process and FSDP x TP again resume.
PHI3_CHECKPOINT = ["checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def architecture_dirs(tmp_path_factory) -> dict[str, Path]:
    import torch
    import transformers

    from dtrain.presets import byte_tokenizer

    dirs = {}
    for name, (cls, kwargs) in ARCHITECTURES.items():
        path = dirs[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        config = getattr(transformers, cls)(vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    return dirs


def architecture_run(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "parallel.strategy=fsdp", *MESHES["fsdp_tp"][0],
            f"train.micro_batch_size={GLOBAL_BATCH // MESHES['fsdp_tp'][1]}"]


@pytest.fixture(scope="module")
def four_processes(tiny_model_dir, architecture_dirs, tmp_path_factory):
    """The module's one 4-process job: each mesh, full and LoRA (and FSDP x TP with LoRA and
    activation checkpointing; FSDP x TP of the other families, Phi-3's saved at step 5 and resumed
    from it), then the reshard chain's 4-process shapes; the mesh runs count their second step's
    collectives (COUNTED). Returns its directory and each rank's results by run."""
    out = tmp_path_factory.mktemp("mesh")
    runs = {}
    for name, (overrides, data_parallel) in MESHES.items():
        mesh = ["parallel.strategy=fsdp", *overrides, f"train.micro_batch_size={GLOBAL_BATCH // data_parallel}"]
        runs[name] = mesh
        runs[f"{name}_lora"] = mesh + LORA
    runs["fsdp_tp_lora_ac"] = runs["fsdp_tp_lora"] + ["model.gradient_checkpointing=true"]
    runs["sp_packed"] = runs["sp"] + PACKED  # (flattened: the example boundaries cross the slices)
    runs["qwen2_fsdp_tp_lora"] = architecture_run(architecture_dirs["qwen2"]) + LORA
    runs["mistral_fsdp_tp"] = architecture_run(architecture_dirs["mistral"])
    runs["gpt_neox_fsdp_tp"] = architecture_run(architecture_dirs["gpt_neox"])
    runs["phi3_fsdp_tp"] = architecture_run(architecture_dirs["phi3"]) + PHI3_CHECKPOINT + [f"output_dir={out / 'phi3'}"]
    runs["phi3_fsdp_tp_lora"] = architecture_run(architecture_dirs["phi3"]) + LORA
    runs["phi3_fsdp_tp_resumed"] = architecture_run(architecture_dirs["phi3"]) + [
        f"checkpoint.resume={phi3_step_5(out)}", f"output_dir={out / 'phi3-resumed'}"]
    runs.update(chain_runs(out / "chain", processes=4))
    ranks = torchrun({"base": base(tiny_model_dir, out / "cache"), "dump": True, "runs": runs,
                      "count": {"step": 2, "runs": COUNTED}}, out, nproc=4)
    return out, ranks


@pytest.fixture(scope="module")
def mesh_runs(four_processes):
    return four_processes[1]


def phi3_step_5(out: Path) -> Path:
    return out / "phi3" / "checkpoints" / "step_00000005"


@pytest.fixture(scope="module")
def mesh_singles(tiny_model_dir, architecture_dirs, four_processes, tmp_path_factory):
    """The references: one process, micro-batch 8 (the same global batch); and one process
    resuming Phi-3's FSDP x TP checkpoint."""
    out = tmp_path_factory.mktemp("mesh-single")
    phi3 = f"model.path={architecture_dirs['phi3']}"
    references = {"single": [], "single_lora": LORA, "single_packed": PACKED,
                  "qwen2_single_lora": [f"model.path={architecture_dirs['qwen2']}", *LORA],
                  "mistral_single": [f"model.path={architecture_dirs['mistral']}"],
                  "gpt_neox_single": [f"model.path={architecture_dirs['gpt_neox']}"],
                  "phi3_single": [phi3], "phi3_single_lora": [phi3, *LORA],
                  "phi3_single_resumed": [phi3, f"checkpoint.resume={phi3_step_5(four_processes[0])}"]}
    return {name: train(load_config(None, base(tiny_model_dir, out / "cache") + [
        f"train.micro_batch_size={GLOBAL_BATCH}", *extra, f"output_dir={out / name}"]))
        for name, extra in references.items()}


@pytest.mark.slow
@pytest.mark.parametrize("run", [*MESHES, *(f"{name}_lora" for name in MESHES), "fsdp_tp_lora_ac", "sp_packed",
                                 "mistral_fsdp_tp", "qwen2_fsdp_tp_lora", "gpt_neox_fsdp_tp", "phi3_fsdp_tp",
                                 "phi3_fsdp_tp_lora"])
def test_every_mesh_matches_one_process(mesh_runs, mesh_singles, run):
    family = next((name for name in ARCHITECTURES if run.startswith(name)), None)
    prefix = f"{family}_" if family else ""
    kind = "_lora" if "lora" in run else "_packed" if "packed" in run else ""
    reference = mesh_singles[f"{prefix}single{kind}"]
    got = mesh_runs[0][run]
    assert "config_error" not in got, got
    assert len(reference.train_losses) == len(got["losses"]) == STEPS
    assert reference.train_losses[-1] < reference.train_losses[0] - 0.3  # it learns: the curves say something
    for step, (a, b) in enumerate(zip(reference.train_losses, got["losses"]), start=1):
        assert b == pytest.approx(a, abs=1e-5, rel=0), f"{run} step {step}: {b} vs single {a}"
    for key in ("eval_loss", "eval_examples"):
        assert got["final"][key] == pytest.approx(reference.final_metrics[key], abs=1e-5, rel=0), (run, key)
    for rank in mesh_runs[1:]:  # every rank logs the same global loss
        assert rank[run]["losses"] == got["losses"]


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_of_fused_projections_resumes_on_one_process_and_on_the_mesh(mesh_runs,
                                                                                                 mesh_singles):
    """Phi-3's qkv_proj and gate_up_proj are held with their rows interleaved by rank under tensor
    parallel; its checkpoint holds them (and their Adam moments) in the model's own order: one
    process and FSDP x TP each resume step 5 and go on as their uninterrupted runs."""
    for resumed, uninterrupted in ((mesh_singles["phi3_single_resumed"].train_losses,
                                    mesh_singles["phi3_single"].train_losses),
                                   (mesh_runs[0]["phi3_fsdp_tp_resumed"]["losses"], mesh_runs[0]["phi3_fsdp_tp"]["losses"])):
        assert len(resumed) == STEPS - 5
        assert resumed == pytest.approx(uninterrupted[5:], abs=1e-6, rel=0)


@pytest.mark.slow
@pytest.mark.parametrize("run", [*MESHES, *(f"{name}_lora" for name in MESHES)])
def test_the_estimate_of_each_mesh_is_the_state_each_rank_holds(mesh_runs, tiny_model_dir, tmp_path, run):
    """`dtrain estimate`'s resident parameter and optimizer bytes per device for the mesh rows
    (weights split by tensor parallel, then sharded over the shard dimension; replicated across
    replicas) against what rank 0 holds after training (`state_bytes`: local shards, optimizer
    tensors of dim > 0)."""
    from dtrain.estimate import RunShape, StrategySpec, model_shape, strategy_memory

    overrides, _ = MESHES[run.removesuffix("_lora")]
    cfg = load_config(None, base(tiny_model_dir, tmp_path / "cache") + ["parallel.strategy=fsdp", *overrides]
                      + (LORA if "lora" in run else []))
    mesh = cfg.parallel.mesh
    spec = StrategySpec(run, "fsdp", "sharded", replicate=mesh.replicate, tensor=mesh.tensor, sequence=mesh.sequence)
    shape = model_shape(cfg)
    memory = strategy_memory(shape, RunShape(world=4), spec)
    adam_steps = 4 * sum(1 for p in shape.params if p.trainable)  # (0-dim "step" tensors: not in state_bytes)
    estimated = {"parameters": memory.weights - memory.gathered, "optimizer": memory.optimizer - adam_steps}
    assert estimated == mesh_runs[0][run]["state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("run", COUNTED)
def test_the_estimated_communication_of_each_mesh_is_what_its_collectives_send(four_processes, run):
    """`dtrain estimate`'s bytes per device and step (estimate.sharded_communication) against the
    bytes each rank's collectives sent in the run's second step (benchmarks/mesh_comm.py's count:
    c10d's and DTensor's collectives, as ring algorithms send them), for that step's batch shape."""
    check_counted_communication(*four_processes, run)


def test_the_mesh_is_laid_out_replicate_major_and_tensor_minor():
    dims = ParallelDims.from_config(replicate=2, shard=-1, tensor=2, world_size=8)
    assert dims.sizes == (("dp_replicate", 2), ("dp_shard", 2), ("tp", 2))
    assert dims.describe() == "replicate 2 x shard 2 x tensor 2"
    assert dims.dp_size == 4
    # Ranks 0 and 1 are one tensor-parallel pair (one node): the same slice of the data.
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [dims.is_data_leader(r) for r in range(8)] == [True, False] * 4
    assert ParallelDims.from_config(1, -1, 1, 4).sizes == (("dp_shard", 4),)  # the default: FSDP as before
    for sizes, world, says in (((2, 3, 1), 4, "2 x shard 3 x tensor 1 = 6 processes, but this run has 4"),
                               ((3, -1, 1), 4, "replicate 3 x tensor 1 = 3 does not divide the 4 processes")):
        with pytest.raises(ValueError, match=says):
            ParallelDims.from_config(*sizes, world_size=world)


@pytest.mark.parametrize(("overrides", "says"), [
    (["parallel.strategy=ddp", "parallel.mesh.tensor=2"],
     "parallel.mesh (replicate x shard x tensor) with parallel.strategy=ddp is not supported"),
    (["parallel.strategy=fsdp", "parallel.mesh.tensor=2", "peft.method=dora"], "peft.method=dora with parallel.mesh"),
    (["parallel.strategy=fsdp", "parallel.mesh.tensor=2", "eval.generation.enabled=true"],
     "eval.generation.enabled with parallel.mesh.tensor=2"),
    (["parallel.strategy=fsdp", "parallel.mesh.shard=0"], "parallel.mesh.shard"),
    (["parallel.strategy=fsdp", "parallel.mesh.sequence=2", "parallel.mesh.tensor=2"],
     "parallel.mesh.sequence=2 with parallel.mesh.tensor=2 is not supported yet"),
    (["parallel.strategy=fsdp", "parallel.mesh.sequence=2", "eval.generation.enabled=true"],
     "eval.generation.enabled with parallel.mesh.sequence=2"),
    (["parallel.strategy=fsdp", "parallel.mesh.sequence=2", f"data.train={PREFERENCE_DATA}", "data.format=preference"],
     "parallel.mesh.sequence=2 with train.objective=dpo is not supported"),
])
def test_impossible_meshes_are_refused_when_the_config_is_loaded(tiny_model_dir, tmp_path, overrides, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, base(tiny_model_dir, tmp_path / "cache") + overrides)


@pytest.mark.slow
def test_a_mesh_that_does_not_fit_the_processes_stops_every_rank_before_any_work(tiny_model_dir, tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("train", "examples/tiny_alpaca.yaml", "--nproc", "2", *base(tiny_model_dir, tmp_path / "cache"),
                   "parallel.strategy=fsdp", "parallel.mesh.replicate=2", "parallel.mesh.shard=2", f"output_dir={out}")
    says = ("parallel.mesh: replicate 2 x shard 2 x tensor 1 = 4 processes, but this run has 2 (nodes x processes "
            "per node); change the sizes, or set parallel.mesh.shard=-1")
    assert proc.returncode == 2 and f"[rank 0] error: {says}" in proc.stderr and f"[rank 1] error: {says}" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_fused_projection_is_held_so_that_each_rank_s_share_holds_its_share_of_every_part():
    import torch

    from dtrain.parallel.tensor import file_order, interleaved_rows, model_order

    order = interleaved_rows((4, 2, 2), 2)  # [q | k | v] over 2 ranks: [q0 q1 k0 v0 | q2 q3 k1 v1]
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    weight = torch.randn(8, 3)
    held = model_order(weight, order, weight)
    assert torch.equal(held[:4], weight[[0, 1, 4, 6]]) and torch.equal(file_order(held, order), weight)


def test_a_tensor_degree_that_does_not_divide_the_heads_is_refused(tmp_path):
    from transformers import LlamaConfig, Phi3Config, PhiConfig

    from dtrain.parallel.tensor import plan_for

    llama = LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    assert plan_for(llama, 2).fan_in == ("self_attn.o_proj", "mlp.down_proj")
    with pytest.raises(ConfigError, match="parallel.mesh.tensor=4 does not divide the model's num_key_value_heads=2"):
        plan_for(llama, 4)
    with pytest.raises(ConfigError, match="no tensor-parallel plan for model type 'phi'"):
        plan_for(PhiConfig(), 2)
    with pytest.raises(ConfigError, match=r"parallel.mesh.tensor=2 does not divide mlp.gate_up_proj's parts \[99, 99\]"):
        plan_for(Phi3Config(num_attention_heads=4, num_key_value_heads=2, intermediate_size=99), 2)


# --------------------------------------------------------------------------------------
# Resharding across mesh shapes: one run saved as FSDP x TP 2 x 2, resumed as HSDP 2 x 2, then
# FSDP over 2 processes, then sequence parallel over 2, then one process; every resume restores
# the parameters and the Adam moments exactly, and the whole curve is the uninterrupted run's.

CHAIN = [  # (name, processes, overrides, last step)
    ("fsdp_tp", 4, ["parallel.strategy=fsdp", "parallel.mesh.shard=2", "parallel.mesh.tensor=2",
                    "train.micro_batch_size=4"], 2),
    ("hsdp", 4, ["parallel.strategy=fsdp", "parallel.mesh.replicate=2", "parallel.mesh.shard=2",
                 "train.micro_batch_size=2"], 4),
    ("fsdp", 2, ["parallel.strategy=fsdp", "train.micro_batch_size=4"], 6),
    ("sp", 2, ["parallel.strategy=fsdp", "parallel.mesh.sequence=2", "train.micro_batch_size=8"], 8),
    ("single", 1, ["train.micro_batch_size=8"], 10),
]


# Each run of the chain stops at its own max_steps, which a decaying schedule would stretch to: a
# constant one after the warmup gives every step the uninterrupted run's LR. (Every checkpoint
# kept: the first shape's is exported by a test.)
CHAIN_SETTINGS = ["checkpoint.every_steps=2", "checkpoint.keep_last=5", "eval.every_steps=2", "schedule.name=constant"]


def chain_runs(run: Path, processes: int) -> dict[str, list[str]]:
    """The chain's shapes that run on `processes` processes, each resuming the directory the last left."""
    return {f"chain-{name}": [*CHAIN_SETTINGS, *overrides, f"train.max_steps={last}",
                   *(["checkpoint.resume=auto"] if last > 2 else []), f"output_dir={run}"]
            for name, count, overrides, last in CHAIN if count == processes}


@pytest.fixture(scope="module")
def reshard_chain(four_processes, tiny_model_dir):
    """The chain's 4-process shapes ran in the module's job; then FSDP on 2 processes, then one
    process (here, dumping its values as the workers do); and the uninterrupted run."""
    from dist_worker import dumps

    out, _ = four_processes
    run, common = out / "chain", base(tiny_model_dir, out / "cache")
    torchrun({"base": common, "dump": True, "runs": chain_runs(run, processes=2)}, out / "job2", nproc=2)
    with dumps():
        for overrides in chain_runs(run, processes=1).values():
            train(load_config(None, [*common, *overrides]))
    uninterrupted = train(load_config(None, [*common, *CHAIN_SETTINGS, "train.micro_batch_size=8",
                                             f"train.max_steps={CHAIN[-1][3]}", f"output_dir={out / 'uninterrupted'}"]))
    return run, uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4, 6, 8], ids=["fsdp_tp-to-hsdp", "hsdp-to-fsdp2", "fsdp2-to-sp2", "sp2-to-single"])
def test_each_resume_across_mesh_shapes_restores_the_state_exactly(reshard_chain, step):
    import torch

    run, _ = reshard_chain
    saved = torch.load(run / f"values_saved_{step}.pt", weights_only=True)
    loaded = torch.load(run / f"values_loaded_{step}.pt", weights_only=True)
    assert saved.keys() == loaded.keys() and any(k.startswith("exp_avg/") for k in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.slow
def test_a_checkpoint_of_a_2d_mesh_consolidates_into_one_model(reshard_chain, tmp_path):
    """`dtrain checkpoint consolidate` (export) of FSDP x TP's step 2: blocks sharded over both
    dimensions, the embeddings over the data one: a plain model with the training weights."""
    import torch
    from safetensors.torch import load_file

    from dtrain.export import export

    run, _ = reshard_chain
    model_dir = export(run / "checkpoints" / "step_00000002", tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    saved = {k.removeprefix("param/"): v for k, v in torch.load(run / "values_saved_2.pt", weights_only=True).items()
             if k.startswith("param/")}
    assert saved.keys() - weights.keys() <= {"lm_head.weight"}  # (tied: written once)
    for name, tensor in weights.items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.slow
def test_the_resharded_run_is_the_uninterrupted_one(reshard_chain):
    from dtrain.tracking import read_metrics

    run, uninterrupted = reshard_chain
    records = read_metrics(run)
    curve = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, CHAIN[-1][3] + 1))
    assert curve == pytest.approx(uninterrupted.train_losses, abs=1e-6, rel=0)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in read_metrics(run.parent / "uninterrupted")
                                   if "eval_loss" in r], abs=1e-6, rel=0)
