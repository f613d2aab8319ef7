"""What a run writes into output_dir besides its checkpoints and metrics: config.yaml, the final
model (final/), a preset's random base (base_model/) and the worst validation examples.

Directories are written beside their final name and renamed into place, so a crash leaves
either the old one or the new one, never half of either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain import checkpoint as ckpt
from dtrain.presets import is_preset
from dtrain.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dtrain.schema import Config


def check_output_dir(cfg: "Config", resuming: bool) -> Path:
    """output_dir, created if new, once it is known to be usable: a writable directory, and one
    that holds no other run's checkpoints unless this run resumes. Writes nothing into it: a run's
    files are written by write_config once every check of the run's setup has passed."""
    out = Path(cfg.output_dir)
    if not resuming and ckpt.list_checkpoints(ckpt.checkpoint_root(out)):
        raise ConfigError(
            f"output_dir {out} already holds checkpoints of another run: resume it with --resume auto, "
            "or choose a new output_dir (nothing was overwritten)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output_dir {out}: {_first_file(out)} is a file, not a directory; "
                          "choose another output_dir") from None
    except OSError as exc:  # read-only file system, permissions
        raise ConfigError(f"output_dir {out}: cannot create it ({exc.strerror}); choose a writable output_dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: not writable (read-only file system or permissions); "
                          "choose a writable output_dir")
    return out


def write_config(cfg: "Config", out: Path) -> None:
    """The run's config.yaml (without secrets: Config.to_yaml)."""
    ckpt.write_text_atomic(out / "config.yaml", cfg.to_yaml())


def _first_file(path: Path) -> Path:
    """The first component of `path` (itself included) that exists and is not a directory."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an older `dst` is removed only afterwards."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_preset_base(model: "nn.Module", tokenizer: Any, out: Path) -> Path:
    """A preset's random base exists nowhere else: save it (before LoRA wraps it) so the
    adapter in final/ can be reloaded onto it."""
    base_dir, tmp = out / "base_model", out / ".base_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, base_dir)
    return base_dir


def save_final_model(model: "nn.Module", state_dict: dict[str, "torch.Tensor"], tokenizer: Any, cfg: "Config",
                     out: Path) -> Path:
    """save_pretrained the full model, or for LoRA the adapter (pointing at its base).

    `state_dict` holds the full tensors gathered by the strategy (sharded strategies keep
    only a piece of each parameter in `model` itself)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.peft.method != "none":
        base = (out / "base_model").resolve() if is_preset(cfg.model.path) else cfg.model.path
        model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, final)
    return final


def write_worst_examples(path: Path, examples: list[dict[str, Any]]) -> None:
    """The validation examples with the highest loss, as the model saw and answered them."""
    lines = ["# Validation examples with the highest loss", "",
             "`predicted`: the model's most likely token at each position of the expected output "
             "(teacher-forced), or its class.", ""]
    for ex in examples:
        lines += [f"## example {ex['index']} (loss {ex['loss']})", "", "input:", "", "```", ex["input"], "```", "",
                  "expected:", "", "```", ex["expected"], "```", "", "predicted:", "", "```", ex["predicted"], "```", ""]
    path.write_text("\n".join(lines))
