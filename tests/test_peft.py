"""LoRA variants end to end: QLoRA (4-bit NF4 base) and DoRA train on CPU, and the saved
adapter reloads onto a freshly loaded base with the trained model's logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import probe_ids
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dtrain.model import keep_4bit_training_kernel
from dtrain.train import train

STEPS = 40


def assert_learns(losses):
    """On the tiny random base, 40 steps take the loss from ~5.6 to ~5.0 (r=16, lr=2e-2)."""
    assert sum(losses[-5:]) / 5 < losses[0] - 0.4, [round(x, 3) for x in losses]


@pytest.mark.slow
def test_qlora_trains_and_the_adapter_reloads_on_a_freshly_quantised_base(make_config, tmp_path, final_spy,
                                                                           tiny_model_dir):
    out = tmp_path / "run"
    result = train(make_config("peft.method=qlora", "peft.r=16", "optim.lr=2e-2", f"train.max_steps={STEPS}",
                               output_dir=out))
    assert len(result.train_losses) == STEPS
    assert_learns(result.train_losses)  # through the 4-bit base

    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
    # The base the user would load: the same directory, quantised afresh with the same settings.
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization,
                                                device_map={"": "cpu"})
    assert base.is_loaded_in_4bit
    keep_4bit_training_kernel(base)  # compare like with like: the kernel training used
    model = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits.float()
    torch.testing.assert_close(logits, final_spy["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dora_trains_and_reloads(make_config, tmp_path, final_spy, tiny_model_dir):
    out = tmp_path / "run"
    result = train(make_config("peft.method=dora", "peft.r=16", "optim.lr=2e-2", f"train.max_steps={STEPS}",
                               output_dir=out))
    assert_learns(result.train_losses)
    assert json.loads((out / "final" / "adapter_config.json").read_text())["use_dora"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final").eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, final_spy["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train(make_config, tmp_path, optimizer):
    out = tmp_path / "run"
    result = train(make_config(f"optim.name={optimizer}", "optim.lr=3e-3", f"train.max_steps={STEPS}",
                               output_dir=out))
    assert_learns(result.train_losses)


@pytest.mark.slow
def test_qlora_resumes_exactly(make_config, tmp_path):
    """Saving a checkpoint must not disturb the 4-bit base (bitsandbytes' CPU backend changes a
    layer's outputs when it is serialised): 4 steps + resume 4 equals 8 uninterrupted steps."""
    common = ("peft.method=qlora", "optim.lr=2e-2", "train.max_steps=8", "checkpoint.every_steps=4", "peft.dropout=0",
              "eval.every_steps=2")  # evaluating (no grad) is what lays the 4-bit weights out for the CPU kernel
    whole = train(make_config(*common, output_dir=tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_00000004",
                    tmp_path / "resumed" / "checkpoints" / "step_00000004")
    resumed = train(make_config(*common, "checkpoint.resume=auto", output_dir=tmp_path / "resumed"))
    assert resumed.train_losses == pytest.approx(whole.train_losses[4:], abs=1e-6, rel=0)
    assert resumed.final_metrics["eval_loss"] == pytest.approx(whole.final_metrics["eval_loss"], abs=1e-6, rel=0)
