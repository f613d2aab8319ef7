"""Strategy configuration: impossible combinations and DeepSpeed JSON conflicts fail at
config time, naming both values and the fix."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from dtrain.config import ConfigError, load_config
from dtrain.parallel.deepspeed import resolve_deepspeed_config

DS = ["parallel.strategy=deepspeed"]


def ds_file(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return f"parallel.deepspeed_config={path}"


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_resolve_from_dtrain_values(name):
    cfg = load_config(None, DS + [f"parallel.deepspeed_config={REPO}/ds_configs/{name}.json",
                                  "train.micro_batch_size=4", "train.grad_accum_steps=3", "optim.grad_clip=0.5",
                                  "train.precision=bf16"])
    ds = resolve_deepspeed_config(cfg, world_size=8, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    if zero["stage"] == 3:
        assert zero["stage3_param_persistence_threshold"] == 640
    assert ds.get("zero_force_ds_cpu_optimizer") is (False if "offload" in name else None)


def test_inline_deepspeed_config_and_no_clipping():
    cfg = load_config(None, DS + ["parallel.deepspeed_config={zero_optimization: {stage: 2}}", "optim.grad_clip=null"])
    ds = resolve_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("json_value, override, expected", [
    ({"train_micro_batch_size_per_gpu": 4}, "train.micro_batch_size=8",
     "train_micro_batch_size_per_gpu=4 conflicts with train.micro_batch_size=8"),
    ({"gradient_accumulation_steps": 2}, "train.grad_accum_steps=1",
     "gradient_accumulation_steps=2 conflicts with train.grad_accum_steps=1"),
    ({"gradient_clipping": 1.0}, "optim.grad_clip=0.3", "gradient_clipping=1.0 conflicts with optim.grad_clip=0.3"),
    ({"bf16": {"enabled": True}}, "train.precision=fp32", "enabled=true conflicts with train.precision=fp32"),
    ({"fp16": {"enabled": True}}, "train.precision=bf16", "fp16.enabled=true conflicts with train.precision=bf16"),
    ({"optimizer": {"type": "AdamW"}}, "optim.lr=1e-4", "remove its `optimizer` section"),
    ({"scheduler": {"type": "WarmupLR"}}, "optim.lr=1e-4", "remove its `scheduler` section"),
])
def test_deepspeed_json_that_disagrees_with_dtrain_is_refused(tmp_path, json_value, override, expected):
    message = error_of(*DS, ds_file(tmp_path, {"zero_optimization": {"stage": 2}, **json_value}), override)
    assert expected in message
    assert "parallel.deepspeed_config" in message and 'Write "auto"' in message


def test_deepspeed_train_batch_size_is_checked_against_the_world_size(tmp_path):
    cfg = load_config(None, DS + [ds_file(tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 1}}),
                                  "train.micro_batch_size=4"])
    assert resolve_deepspeed_config(cfg, world_size=8)["train_batch_size"] == 32
    with pytest.raises(ValueError, match=r"train_batch_size=32 conflicts with .*world size=4 x 1 x 2"):
        resolve_deepspeed_config(cfg, world_size=2)


@pytest.mark.parametrize("data, expected", [
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage must be 1, 2 or 3 (got 0)"),
    ({}, "zero_optimization.stage must be 1, 2 or 3 (got None)"),
    ('{"zero_optimization": {"stage": 2},\n  "bf16": {enabled: true}}', "ds.json:2: not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_deepspeed_files_name_the_problem(tmp_path, data, expected):
    assert expected in error_of(*DS, ds_file(tmp_path, data))


def test_missing_deepspeed_config_is_named():
    assert "parallel.strategy=deepspeed needs parallel.deepspeed_config" in error_of(*DS)
    assert "ds_configs/nope.json is not a file" in error_of(*DS, "parallel.deepspeed_config=ds_configs/nope.json")
    assert "only used with parallel.strategy=deepspeed" in error_of(
        "parallel.strategy=ddp", "parallel.deepspeed_config=ds_configs/zero2.json")


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero3.json", "peft.method=qlora"],
     "use parallel.strategy=fsdp"),
    (["parallel.strategy=fsdp", "optim.name=adamw_8bit"], "optim.name=adamw_8bit (bitsandbytes) with parallel.strategy=fsdp"),
    (["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero2.json", "model.compile=true"],
     "model.compile=true is not supported with parallel.strategy=deepspeed"),
    (["parallel.device=cpu", "model.attn_implementation=flash_attention_2"], "flash_attention_2 needs a CUDA device"),
    (["parallel.strategy=deepspeed", "parallel.deepspeed_config=ds_configs/zero2.json", "optim.l1=1e-4"],
     "optim.l1 is not supported with parallel.strategy=deepspeed"),
    (["parallel.strategy=tp"], "`parallel.strategy`"),
])
def test_impossible_combinations_fail_at_config_time(overrides, expected):
    assert expected in error_of(*overrides)


def test_cli_nproc_validates_the_config_before_starting_processes(tmp_path):
    proc = run_cli("train", str(REPO / "examples" / "tiny_alpaca.yaml"), "--nproc", "2",
                   "parallel.strategy=deepspeed", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs parallel.deepspeed_config" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr and not (tmp_path / "out").exists()
