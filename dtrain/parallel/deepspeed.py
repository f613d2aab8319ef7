"""DeepSpeed ZeRO stages 1, 2 and 3 (optionally with CPU offload), driven by a JSON config.

The JSON (a file in ds_configs/ or an inline mapping) says how to shard: ZeRO stage,
offload, buckets. What dtrain's config already says (micro-batch size, accumulation,
clipping, precision) is filled in from it: a JSON value of "auto" (or none) takes dtrain's,
an equal value is fine, and a different one is a configuration error naming both, so
the two can never disagree. dtrain builds the optimizer and the LR schedule itself.

The engine owns the optimizer step (clipping, overflow check, zeroing the gradients) and
its own checkpoint format; the loop drives it through the same interface as the others.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import nn
from torch.optim import Optimizer

from dtrain.parallel.distributed import Distributed
from dtrain.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from dtrain.schema import Config

ENGINE_DIR, ENGINE_TAG = "deepspeed", "state"


def _read_json(spec: str | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(spec, dict):
        return copy.deepcopy(spec), "inline parallel.deepspeed_config"
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"parallel.deepspeed_config: {spec} is not a file (see ds_configs/ for examples)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"parallel.deepspeed_config: {spec}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"parallel.deepspeed_config: {spec} must hold a JSON object")
    return data, str(spec)


def resolve_deepspeed_config(cfg: "Config", world_size: int | None, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run, with dtrain's values filled in and conflicts refused.

    `world_size` and `hidden_size` are known only at run time; without them (config
    validation) the checks that need them are left for later."""
    ds, origin = _read_json(cfg.parallel.deepspeed_config)
    where = f"parallel.deepspeed_config ({origin})"
    problems = []
    for section, dtrain_keys in (("optimizer", "optim.*"), ("scheduler", "schedule.*")):
        if section in ds:
            problems.append(f"remove its `{section}` section: dtrain builds the {section} from {dtrain_keys}")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") not in (1, 2, 3):
        problems.append(f"zero_optimization.stage must be 1, 2 or 3 (got {zero.get('stage')!r}); "
                        "for plain data parallelism use parallel.strategy=ddp")

    def fill(key: str, value: Any, dtrain_key: str, dtrain_value: Any, node: dict = ds) -> None:
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value:
            problems.append(f"{key}={json.dumps(current)} conflicts with {dtrain_key}={dtrain_value}")

    t = cfg.train
    fill("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", t.micro_batch_size)
    fill("gradient_accumulation_steps", t.grad_accum_steps, "train.grad_accum_steps", t.grad_accum_steps)
    if world_size is not None:
        fill("train_batch_size", t.micro_batch_size * t.grad_accum_steps * world_size,
             "train.micro_batch_size x train.grad_accum_steps x world size",
             f"{t.micro_batch_size} x {t.grad_accum_steps} x {world_size}")
    fill("gradient_clipping", cfg.optim.grad_clip or 0.0, "optim.grad_clip", cfg.optim.grad_clip)
    bf16 = ds.setdefault("bf16", {})
    fill("enabled", t.precision == "bf16", "train.precision", t.precision, node=bf16)
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        problems.append(f"fp16.enabled=true conflicts with train.precision={t.precision} (dtrain trains in fp32 or bf16)")
    ds.setdefault("fp16", {})["enabled"] = False
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems)
                         + '. Write "auto" in the JSON to take dtrain\'s value, or make the two equal.')

    if hidden_size is not None:  # the buckets Hugging Face's integration derives from the width
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    if any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        ds["zero_force_ds_cpu_optimizer"] = False  # dtrain's torch AdamW steps the offloaded fp32 state
    ds.setdefault("steps_per_print", 1 << 30)  # dtrain logs; keep DeepSpeed's own step log quiet
    return ds


class DeepSpeed(Distributed):
    name = "deepspeed"
    shards_optimizer_state = True
    supports_qlora = False
    engine_checkpoint = True

    def __init__(self, cfg: "Config"):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() and cfg.parallel.device != "cpu"
                              else "cpu")
        super().__init__(cfg.parallel, lambda world: ParallelDims.of(dp_shard=world))
        self.cfg = cfg
        self.stage = resolve_deepspeed_config(cfg, world_size=None)["zero_optimization"]["stage"]
        self.universal: Path | None = None  # a universal-format copy to resume from
        # DeepSpeed calls collectives torch has renamed, once per step: not the user's concern.
        for old in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            warnings.filterwarnings("ignore", message=rf".*`torch\.distributed\.{old}` is deprecated", category=FutureWarning)

    @classmethod
    def from_config(cls, cfg: "Config") -> "DeepSpeed":
        return cls(cfg)

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        if cfg.peft.method == "qlora":
            raise ValueError(
                "peft.method=qlora with parallel.strategy=deepspeed is not supported: DeepSpeed's engine "
                "checkpoint cannot serialise bitsandbytes' 4-bit weights. For QLoRA use parallel.strategy=fsdp "
                "(shards the 4-bit base), ddp or single; or keep deepspeed with peft.method=lora")
        if cfg.parallel.deepspeed_config is None:
            raise ValueError("parallel.strategy=deepspeed needs parallel.deepspeed_config: a JSON file such as "
                             "ds_configs/zero2.json, or an inline mapping with zero_optimization.stage")
        if cfg.model.compile:
            raise ValueError("model.compile=true is not supported with parallel.strategy=deepspeed; "
                             "use ddp or fsdp to compile, or set model.compile=false")
        resolve_deepspeed_config(cfg, world_size=None)  # conflicts with train.* / optim.* are errors now
        if cfg.optim.l1:
            raise ValueError("optim.l1 is not supported with parallel.strategy=deepspeed (its gradients live inside the "
                             "engine); use ddp or fsdp for an L1 penalty, or optim.weight_decay")
        if cfg.checkpoint.async_save:
            raise ValueError("checkpoint.async_save=true is not supported with parallel.strategy=deepspeed (its engine "
                             "writes its own checkpoint synchronously); set checkpoint.async_save=false")

    @classmethod
    def memory_layout(cls, cfg: "Config") -> tuple[int, bool]:
        zero = resolve_deepspeed_config(cfg, world_size=None).get("zero_optimization", {})
        offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
        return zero.get("stage"), offload

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        import deepspeed

        ds_config = resolve_deepspeed_config(self.cfg, self.comm.world_size, getattr(model.config, "hidden_size", None))
        if self.universal is not None:
            ds_config["checkpoint"] = {"load_universal": True}
        self.has_frozen = any(not p.requires_grad for p in model.parameters())
        # Build the model normally and let initialize() partition it: building inside
        # zero.Init would initialise the weights differently from every other strategy.
        optimizer = make_optimizer(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
        return engine, optimizer

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        ds_config = resolve_deepspeed_config(self.cfg, self.comm.world_size, getattr(model.config, "hidden_size", None))
        if ds_config["zero_optimization"]["stage"] < 3:
            return model.to(self.device).eval()  # stages 1/2 keep whole parameters anyway
        import deepspeed

        # ZeRO-3 inference: an engine without optimizer partitions the teacher like the student.
        for key in ("gradient_clipping", "zero_force_ds_cpu_optimizer"):
            ds_config.pop(key, None)
        ds_config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
        engine.eval()  # (DeepSpeedEngine.train() returns None, so eval() cannot be chained)
        return engine

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        model.set_gradient_accumulation_boundary(enabled)
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        # The loop already normalises the loss over the whole accumulation step.
        model.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, model: nn.Module, optimizer: Optimizer, max_norm: float | None,
                       skip: bool = False, l1: float = 0.0) -> tuple[float, bool]:
        # (optim.l1 is refused for deepspeed at config time: the gradients live in the engine)
        # The engine clips (gradient_clipping), skips the update on an inf/NaN gradient
        # (a NaN loss gives NaN gradients) and zeroes the gradients.
        model.step()
        norm = model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(model.was_step_applied()) and not skip

    def full_state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        if trainable_only:
            import deepspeed

            params = self.trainable_parameters(model)
            # ZeRO-3 holds a partition of each: gather them whole while copying them out.
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                                   enabled=self.stage == 3):
                return {name: p.detach().cpu().clone() for name, p in params.items()} if self.comm.is_main else {}
        if self.stage == 3:
            # Gathers the partitions module by module onto rank 0 (what HF's integration uses).
            state = model._zero3_consolidated_16bit_state_dict()
            return {k: v.cpu() for k, v in state.items()} if self.comm.is_main else {}
        return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()} if self.comm.is_main else {}

    def save_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path, async_save: bool = False) -> None:
        # (async_save is refused for deepspeed at config time)
        model.save_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG, client_state={}, save_latest=False,
                              exclude_frozen_parameters=self.has_frozen)

    def checkpoint_info(self) -> dict[str, Any]:
        return {"zero_stage": self.stage}

    def prepare_resume(self, path: Path, manifest: dict[str, Any]) -> None:
        """Engine checkpoints load only at the world size that wrote them; for another one,
        convert to DeepSpeed's universal format (once, next to the checkpoint) and load that.
        DeepSpeed unpickles its files unrestricted: each is first proven plain data (safe_load)."""
        from dtrain.safe_load import refuse_unsafe_files

        refuse_unsafe_files(path / ENGINE_DIR, self.comm)
        if manifest["world_size"] == self.comm.world_size:
            return
        universal = path.parent / f".universal-{path.name}"
        if self.comm.is_main and not (universal / "latest_universal").is_file():
            stage = manifest["zero_stage"]
            tmp = path.parent / f".tmp-universal-{path.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(path / ENGINE_DIR / ENGINE_TAG), "--output_folder", str(tmp / ENGINE_TAG),
                   "--num_extract_workers", "1", "--num_merge_workers", "1"]
            if stage in (1, 2):
                cmd.append("--inject_missing_state")  # stages 1/2 lack state the universal loader expects
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"converting {path} (world size {manifest['world_size']}) to DeepSpeed's universal "
                                   f"format for world size {self.comm.world_size} failed:\n{done.stderr[-3000:]}")
            os.rename(tmp, universal)
        self.comm.barrier()
        refuse_unsafe_files(universal, self.comm)  # (a directory beside the checkpoint: not covered by its manifest)
        self.universal = universal

    def load_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path) -> None:
        source = self.universal if self.universal is not None else path / ENGINE_DIR
        loaded, _ = model.load_checkpoint(str(source), tag=ENGINE_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=not self.has_frozen)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the engine checkpoint in {source}")

    def state_bytes(self, model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
        params = list(model.module.parameters())
        # ZeRO-3 keeps only this rank's partition (ds_tensor); the full tensor is a placeholder.
        local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
        zero = model.optimizer
        # The fp32 master partitions (stage 3 swaps them into the inner optimizer's
        # param_groups only while it steps), plus the inner optimizer's state.
        masters = (getattr(zero, "fp32_partitioned_groups_flat", None)
                   or getattr(zero, "single_partition_of_fp32_groups", None) or [])
        state = [t for per_param in zero.optimizer.state.values() for t in per_param.values()
                 if torch.is_tensor(t) and t.dim() > 0]
        return {"parameters": sum(t.numel() * t.element_size() for t in local),
                "optimizer": sum(t.numel() * t.element_size() for t in masters + state)}


def read_model_state(engine_dir: Path, exclude_frozen: bool) -> dict[str, torch.Tensor]:
    """The trainable weights of an engine checkpoint as full fp32 CPU tensors, in one process:
    DeepSpeed's zero_to_fp32 reassembles every rank's fp32 master partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dtrain.safe_load import scan_torch_files

    scan_torch_files(sorted(engine_dir.rglob("*.pt")))  # zero_to_fp32 unpickles them unrestricted
    state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_TAG,
                                                     exclude_frozen_parameters=exclude_frozen)
    return {name: tensor.float() for name, tensor in state.items()}
