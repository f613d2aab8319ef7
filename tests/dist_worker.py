"""Several dtrain trainings in one torchrun job (on CPU, start-up dominates a 2-process run).

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py SPEC.json OUT_DIR

SPEC.json: {"base": [overrides], "runs": {name: [overrides]}}; each run trains in
OUT_DIR/<name>. Every rank writes OUT_DIR/rank<r>.json with, per run: the losses, final
metrics and state bytes `train` returned, how many times this rank built the prepared
data, or the configuration error. Any other exception ends the job with its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import dtrain.data.pipeline as pipeline
from dtrain.config import ConfigError, load_config
from dtrain.parallel.distributed import destroy_process_group
from dtrain.train import train

# Count data builds (not cache hits) per rank: the main rank builds, the others read.
builds = {"n": 0}
_real_build = pipeline.build


def _counting_build(*args, **kwargs):
    builds["n"] += 1
    return _real_build(*args, **kwargs)


pipeline.build = _counting_build


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    results = {}
    for name, overrides in spec["runs"].items():
        before = builds["n"]
        try:
            cfg = load_config(None, spec["base"] + overrides + [f"output_dir={out / name}"])
        except ConfigError as exc:
            results[name] = {"config_error": str(exc)}
            continue
        result = train(cfg)
        results[name] = {"losses": result.train_losses, "final": result.final_metrics,
                         "state_bytes": result.state_bytes, "data_builds": builds["n"] - before}
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    destroy_process_group()


if __name__ == "__main__":
    main()
