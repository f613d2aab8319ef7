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
from dtrain.schema import ConfigError

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
    sections = [f"`{key}` must be a JSON object (got {json.dumps(ds[key])})"
                for key in ("zero_optimization", "bf16", "fp16") if key in ds and not isinstance(ds[key], dict)]
    if sections:
        raise ValueError(f"{where}: " + "; ".join(sections) + ', e.g. "zero_optimization": {"stage": 2}')
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


# --------------------------------------------------------------------------------------
# The JSON against DeepSpeed's own schema, at config time

# Top-level keys read outside DeepSpeedConfig (by deepspeed.initialize), or left out of the check below.
_READ_ELSEWHERE = {"sequence_parallel_size", "data_parallel_size", "train_batch_size"}


class _ReadKeys(dict):
    """A dict that records which keys are asked for (get, [], in, keys() membership): DeepSpeed reads
    its top-level keys one by one and ignores the others, so a key it never asks for is unknown."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()  # (a copy.copy of this dict shares it)

    def get(self, key: Any, *default: Any) -> Any:
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self.read.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().setdefault(key, default)

    def keys(self) -> Any:
        return _ReadKeysView(self)


class _ReadKeysView:
    def __init__(self, owner: _ReadKeys):
        self.owner = owner

    def __contains__(self, key: Any) -> bool:
        return key in self.owner

    def __iter__(self) -> Any:
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return len(self.owner)


def _deepspeed_key_names() -> set[str]:
    """Every string constant of DeepSpeed's config modules: names it may read somewhere else."""
    import importlib

    names: set[str] = set()
    for module in ("deepspeed.runtime.constants", "deepspeed.runtime.zero.constants",
                   "deepspeed.elasticity.constants", "deepspeed.autotuning.constants", "deepspeed.profiling.constants",
                   "deepspeed.runtime.swap_tensor.constants", "deepspeed.runtime.data_pipeline.constants",
                   "deepspeed.compression.constants", "deepspeed.nebula.constants", "deepspeed.monitor.constants",
                   "deepspeed.runtime.model_checkpointing.constants", "deepspeed.comm.constants"):
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - another DeepSpeed version: fewer names, a stricter check
            continue
        names |= {v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str)}
    return names


def _json_line(spec: str | dict[str, Any], path: list[str]) -> str:
    """':LINE' of the key at `path` in the JSON file `spec` (each key searched after its parent), or ''."""
    if isinstance(spec, dict) or not path:
        return ""
    try:
        text = Path(spec).read_text()
    except OSError:
        return ""
    pos = -1
    for key in path:
        pos = text.find(json.dumps(key), pos + 1)
        if pos < 0:
            return ""
    return f":{text.count(chr(10), 0, pos) + 1}"


def _locate(ds: dict[str, Any], loc: tuple, key_in_parent: bool) -> list[str] | None:
    """The full path in the JSON of a pydantic error's location inside one of its sections."""
    loc = [str(p) for p in loc]

    def has(node: Any, parts: list[str]) -> bool:
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False
        return True

    parts = loc if key_in_parent else loc[:-1]
    found = [key for key, value in ds.items() if isinstance(value, dict) and has(value, parts)]
    return [found[0], *loc] if len(found) == 1 else None


def _model_fields(title: str, loc: tuple) -> list[str]:
    """The keys DeepSpeed's model `title` accepts at `loc` (its parent): for "did you mean"."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    model = next((c for c in subclasses(DeepSpeedConfigModel) if c.__name__ == title), None)
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, DeepSpeedConfigModel)), None)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _close(key: str, names: Any) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def check_deepspeed_json(cfg: "Config") -> None:
    """The resolved JSON through DeepSpeed's own config parser (CPU only, no process group), so that an
    unknown or mistyped key is a ConfigError naming parallel.deepspeed_config, the file (and line) and
    the key, before any process starts. Without DeepSpeed installed: nothing to check against."""
    spec = cfg.parallel.deepspeed_config
    ds = resolve_deepspeed_config(cfg, world_size=None)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() and cfg.parallel.device != "cpu"
                          else "cpu")  # (else importing DeepSpeed probes for accelerators and says so on stdout)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.utils import logger as ds_logger
    except ImportError:
        return
    from pydantic import ValidationError

    origin = "inline parallel.deepspeed_config" if isinstance(spec, dict) else f"parallel.deepspeed_config ({spec})"
    probe = _ReadKeys(copy.deepcopy(ds))
    probe.pop("train_batch_size", None)  # checked against the world size when it is known
    probe.read.clear()
    level = ds_logger.level
    ds_logger.setLevel("ERROR")  # (its info and deprecation lines go to stdout)
    try:
        DeepSpeedConfig(probe)
    except ValidationError as exc:
        raise ConfigError(explain_deepspeed_error(exc, ds, spec)) from None
    except Exception as exc:  # noqa: BLE001 - its own checks: assertions, DeepSpeedConfigError, ...
        raise ConfigError(f"{origin}: DeepSpeed refuses the config: {_first_line(exc).rstrip('.')}; fix the "
                          "JSON (see ds_configs/ for examples)") from None
    finally:
        ds_logger.setLevel(level)
    known = probe.read | _READ_ELSEWHERE | _deepspeed_key_names()
    unknown = [key for key in ds if key not in known]
    if unknown:
        problems = [f"unknown key `{key}`" + (f" (line {_json_line(spec, [key])[1:]})" if _json_line(spec, [key])
                                              else "") + _close(key, probe.read | _READ_ELSEWHERE)
                    for key in unknown]
        raise ConfigError(f"{origin}: {_end('; '.join(problems))} DeepSpeed would ignore "
                          f"{'it' if len(unknown) == 1 else 'them'} silently: correct or remove "
                          f"{'it' if len(unknown) == 1 else 'them'} (see ds_configs/ for examples)")


def explain_deepspeed_error(exc: Any, ds: dict[str, Any], spec: str | dict[str, Any]) -> str:
    """A pydantic ValidationError of one of DeepSpeed's config sections, as dtrain's message:
    parallel.deepspeed_config, the file:line, each offending key by its full path, and the fix."""
    origin = "inline parallel.deepspeed_config" if isinstance(spec, dict) else f"parallel.deepspeed_config ({spec})"
    problems = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        extra = err["type"] == "extra_forbidden"
        path = _locate(ds, loc, key_in_parent=extra or err["type"] != "missing")
        shown = ".".join(path) if path else ".".join(str(p) for p in loc) + f" (in DeepSpeed's {exc.title})"
        at = _json_line(spec, path) if path else ""
        at = f" (line {at[1:]})" if at else ""
        if extra:
            problems.append(f"unknown key `{shown}`{at}{_close(str(loc[-1]), _model_fields(exc.title, loc[:-1]))}")
        else:
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
            problems.append(f"`{shown}`{at}: {msg}{got}")
    return (f"{origin}: " + _end("; ".join(problems)) + " Fix the JSON (see ds_configs/ for examples, and DeepSpeed's "
            "config documentation for the keys of each section)")


def _end(text: str) -> str:
    return text if text.endswith(("?", ".")) else text + "."


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


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

    def close(self, clean: bool) -> None:
        super().close(clean)
        # DeepSpeed keeps the process groups it cloned in module globals; a later run in this
        # process (a dry run's resume, a test) gets a new default group, which those are not of.
        from deepspeed.utils import groups

        for name, value in vars(groups).items():
            if name.startswith("_") and name.endswith("_GROUP") and value is not None:
                setattr(groups, name, {} if isinstance(value, dict) else None)

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
        check_deepspeed_json(cfg)  # and what DeepSpeed's own parser refuses (or would ignore)
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
        with self._config_errors(ds_config):
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                              dist_init_required=False)
        return engine, optimizer

    @contextlib.contextmanager
    def _config_errors(self, ds_config: dict[str, Any]) -> Any:
        """DeepSpeed's schema errors at initialisation (the values filled in at run time) as ConfigErrors."""
        from pydantic import ValidationError

        try:
            yield
        except ValidationError as exc:
            raise ConfigError(explain_deepspeed_error(exc, ds_config, self.cfg.parallel.deepspeed_config)) from None

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
        with self._config_errors(ds_config):
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
