"""Errors that the libraries raise on a user's input (peft's target modules, torch's optimizer
arguments, DeepSpeed's JSON schema, a bad data file under Ray Tune) end in dtrain's own message
naming the config key, the file (and line) and the fix: mostly at config time, before any work."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO

from dtrain.config import ConfigError, load_config
from dtrain.schema import OptimConfig, PeftConfig

TINY = REPO / "examples" / "tiny_alpaca.yaml"
TUNE_YAML = REPO / "examples" / "tiny_tune.yaml"
DS = ["parallel.strategy=deepspeed"]
LINEAR_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------------------
# optim.*: torch's argument checks, in the schema


@pytest.mark.parametrize("override, says", [
    ("optim.betas=[1.5,0.9]", ["beta1=1.5", ">= 0 and < 1"]),
    ("optim.betas=[0.9,1.0]", ["beta2=1.0"]),
    ("optim.betas=[-0.1,0.999]", ["beta1=-0.1"]),
    ("optim.lr=.inf", ["finite"]),
    ("optim.eps=.nan", ["finite"]),
    ("optim.weight_decay=.inf", ["finite"]),
    ("optim.eps=-1e-8", ["greater than 0"]),
    ("optim.weight_decay=-0.1", ["greater than or equal to 0"]),
])
def test_optimizer_arguments_torch_refuses_are_config_errors_naming_the_key(override, says):
    msg = config_error(None, [override])
    key = override.split("=")[0]
    assert f"`{key}` (override {override!r})" in msg
    for text in says:
        assert text in msg, msg


def test_bad_betas_in_yaml_name_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""\
        optim:
          lr: 1.0e-3
          betas: [0.9, 1.2]
        """))
    msg = config_error(path)
    assert f"`optim.betas` ({path}:3)" in msg and "beta2=1.2" in msg and "[0.9, 0.999]" in msg


def test_good_betas_still_load():
    assert load_config(None, ["optim.betas=[0.0,0.95]"]).optim.betas == (0.0, 0.95)


def test_what_the_optimizer_still_refuses_is_a_config_error_naming_optim():
    from dtrain.optim import build_optimizer

    # (past the schema, as a config built without validation would be)
    cfg = OptimConfig.model_construct(**{**OptimConfig().model_dump(), "betas": (1.5, 0.9)})
    with pytest.raises(ConfigError, match=r"optim\.betas=\[1\.5, 0\.9\].*Invalid beta parameter at index 0"):
        build_optimizer(torch.nn.Linear(4, 4), cfg)


# --------------------------------------------------------------------------------------
# peft.target_modules against the model


@pytest.fixture(scope="module")
def make_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    return lambda: AutoModelForCausalLM.from_config(config)


def peft_error(model, **peft) -> str:
    from dtrain.peft import apply_peft

    with pytest.raises(ConfigError) as info:
        apply_peft(model, PeftConfig(method="lora", **peft), "causal_lm")
    return str(info.value)


def test_target_modules_the_model_lacks_are_named_with_its_linear_layers(make_model):
    msg = peft_error(make_model(), target_modules=["query", "value"])
    assert "peft.target_modules=['query', 'value']" in msg
    assert "no module named 'query', 'value'" in msg
    assert LINEAR_NAMES in msg and "all-linear" in msg


def test_one_misspelt_target_among_good_ones_is_refused_too(make_model):
    # (peft itself drops it silently: those layers would get no adapter)
    msg = peft_error(make_model(), target_modules=["q_proj", "v_prj"])
    assert "no module named 'v_prj'" in msg and "'q_proj'" not in msg.split("named", 1)[1].split(";")[0]


def test_a_target_that_is_not_a_linear_layer_is_named_with_its_type(make_model):
    msg = peft_error(make_model(), target_modules=["input_layernorm"])
    assert "'input_layernorm' is a LlamaRMSNorm (model.layers.0.input_layernorm)" in msg
    assert "peft.target_modules" in msg and LINEAR_NAMES in msg
    msg = peft_error(make_model(), target_modules=["self_attn"])
    assert "'self_attn' is a LlamaAttention" in msg


def test_good_targets_still_build_the_adapter(make_model):
    from dtrain.peft import apply_peft

    for targets in (["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj"], "all-linear"):
        model = apply_peft(make_model(), PeftConfig(method="lora", target_modules=targets), "causal_lm")
        assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("override, says", [
    ("peft.target_modules=q_proj", "peft.target_modules=[q_proj]"),
    ("peft.target_modules=[]", "the list is empty"),
    ("peft.r=0", "greater than or equal to 1"),
])
def test_peft_values_wrong_for_any_model_fail_at_config_time(override, says):
    msg = config_error(None, ["peft.method=lora", override])
    assert f"`{override.split('=')[0]}` (override {override!r})" in msg and says in msg, msg


# --------------------------------------------------------------------------------------
# parallel.deepspeed_config against DeepSpeed's own schema, at config time


def ds_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ds.json"
    path.write_text(textwrap.dedent(text))
    return f"parallel.deepspeed_config={path}"


def test_misspelt_key_inside_a_deepspeed_section_names_file_line_and_key(tmp_path):
    msg = config_error(None, DS + [ds_file(tmp_path, """\
        {
          "train_micro_batch_size_per_gpu": "auto",
          "zero_optimization": {
            "stage": 2,
            "overlap_com": true
          }
        }
        """)])
    assert f"parallel.deepspeed_config ({tmp_path / 'ds.json'})" in msg
    assert "unknown key `zero_optimization.overlap_com` (line 5)" in msg
    assert "did you mean `overlap_comm`?" in msg and "Fix the JSON" in msg


def test_mistyped_value_inside_a_deepspeed_section_is_named(tmp_path):
    msg = config_error(None, DS + [ds_file(tmp_path, """\
        {"zero_optimization": {"stage": 3,
                               "offload_param": {"device": "gpu"}}}
        """)])
    assert "`zero_optimization.offload_param.device` (line 2)" in msg
    assert "'none', 'cpu' or 'nvme'" in msg and "'gpu'" in msg
    msg = config_error(None, DS + ["parallel.deepspeed_config={zero_optimization: {stage: 2, reduce_bucket_size: lots}}"])
    assert "inline parallel.deepspeed_config" in msg and "`zero_optimization.reduce_bucket_size`" in msg
    assert "'lots'" in msg


def test_misspelt_top_level_deepspeed_key_is_refused_not_ignored(tmp_path):
    msg = config_error(None, DS + [ds_file(tmp_path, """\
        {
          "zero_optimization": {"stage": 2},
          "wall_clock_breakdwn": true
        }
        """)])
    assert "unknown key `wall_clock_breakdwn` (line 3)" in msg and "did you mean `wall_clock_breakdown`?" in msg
    assert "DeepSpeed would ignore it silently" in msg


def test_deepspeed_section_that_is_not_an_object_is_named():
    msg = config_error(None, DS + ["parallel.deepspeed_config={zero_optimization: 2}"])
    assert "`zero_optimization` must be a JSON object (got 2)" in msg


def test_keys_deepspeed_reads_are_accepted():
    spec = ("{zero_optimization: {stage: 2, overlap_comm: true}, wall_clock_breakdown: false, "
            "flops_profiler: {enabled: false}, activation_checkpointing: {partition_activations: false}, "
            "tensorboard: {enabled: false}, train_batch_size: 64, communication_data_type: fp32}")
    load_config(None, DS + [f"parallel.deepspeed_config={spec}"])


def test_schema_errors_at_deepspeed_initialisation_name_the_key():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from dtrain.parallel.deepspeed import explain_deepspeed_error

    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 4096, "overlap_com": True}}
    with pytest.raises(ValidationError) as info:
        DeepSpeedZeroConfig(**ds["zero_optimization"])
    msg = explain_deepspeed_error(info.value, ds, ds)
    assert "inline parallel.deepspeed_config: unknown key `zero_optimization.overlap_com`" in msg


# --------------------------------------------------------------------------------------
# python -m dtrain.tune: a bad data file fails in the driver, before Ray starts


def bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    return path


def test_tune_prepares_the_data_in_the_driver_naming_file_and_line(tmp_path):
    from dtrain.data import DataError
    from dtrain.ray.tune import prepare_data_once

    bad = bad_jsonl(tmp_path)
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        prepare_data_once(load_config(TUNE_YAML, [f"data.train={bad}"]))
    with pytest.raises(DataError, match=rf"data.train: file not found: {tmp_path / 'none.jsonl'}"):
        prepare_data_once(load_config(TUNE_YAML, [f"data.train={tmp_path / 'none.jsonl'}"]))
    # A searched data file: each listed value is prepared too, and named.
    cfg = load_config(TUNE_YAML, [f"tune.search_space={{data.train: {{choice: [{REPO}/examples/data/arithmetic_alpaca.jsonl, {bad}]}}}}"])
    with pytest.raises(DataError, match=rf"{bad}:2: .*\(tune.search_space: data.train='{bad}'\)"):
        prepare_data_once(cfg)


def test_a_trial_that_failed_on_its_data_is_reported_by_file_and_line(tmp_path):
    import traceback

    from ray.exceptions import RayTaskError

    from dtrain.data import DataError
    from dtrain.ray.tune import failure_summary, trial_error

    message = f"{tmp_path}/d.jsonl:2: not valid JSON (Expecting value); set data.on_error=skip to skip"
    try:
        raise DataError(message)
    except DataError as exc:  # what Ray hands back: the worker's traceback around the DataError
        error = RayTaskError("ImplicitFunc.train", traceback.format_exc(), exc).as_instanceof_cause()
    assert trial_error(error) == message
    tune_text = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                             f"dtrain.data.sources.DataError: {message}")  # (Tune's error.txt)
    assert trial_error(tune_text).endswith(message)
    rows = [{"trial_id": "a", "status": "error", "error": message},
            {"trial_id": "b", "status": "error", "error": message}]
    summary = failure_summary(rows, str(tmp_path))
    assert summary.startswith("2 of 2 trials failed") and f"trial a, b: {message}" in summary


# Through the CLI as a subprocess: tests/test_bad_inputs.py (peft-target-module-*, optim-betas-*,
# deepspeed-json-*, tune-data-*), which also checks that no process group or Ray instance is started.
