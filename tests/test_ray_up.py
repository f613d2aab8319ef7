"""Ray's cluster launcher for real, with launchers/cloud/onprem.yaml: `ray up` over SSH to two hosts
(Debian's sshd in private namespaces on this machine, tests/ray_up_cluster.py), the worker joining,
`python -m launchers.ray_submit` of the tiny run on 2 workers (one per node), its metrics and
checkpoint, then `ray down`; nothing of the test left running. And the cloud YAMLs: aws.yaml and
gcp.yaml differ from onprem.yaml only where a provider must (provider, node types, SSH user) and in
the address of their shared storage."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from ray_up_cluster import HEAD_IP, WORKER_IP, SshHosts

CLOUD = REPO / "launchers" / "cloud"


def active_nodes(status: str) -> int:
    """The count of active nodes in `ray status` output."""
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in status else ""
    return sum(int(line.split()[0]) for line in active.splitlines() if line.split() and line.split()[0].isdigit())


@pytest.mark.slow
def test_ray_up_submit_and_ray_down_on_two_ssh_hosts():
    for tool in ("sshd", "rsync", "ssh-keygen", "unshare", "nsenter"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.fail(f"{tool} is missing (tests/system-packages.sh installs openssh-server, rsync, util-linux)")
    seconds = {}
    with SshHosts() as hosts:
        t0 = time.monotonic()
        up = hosts.client("ray_up", ["ray", "up", "-y", "--no-config-cache", str(hosts.cluster_yaml)], timeout=300)
        seconds["ray up"] = time.monotonic() - t0
        assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
        # The head's autoscaler starts the worker over SSH: wait until both nodes are in.
        t0, status = time.monotonic(), ""
        while time.monotonic() - t0 < 180 and active_nodes(status) < 2:
            time.sleep(2)
            status = hosts.client("ray_status", ["ray", "status", f"--address={HEAD_IP}:6379"], timeout=60).stdout
        seconds["worker joins"] = time.monotonic() - t0
        assert active_nodes(status) == 2, status[-3000:]
        nodes = hosts.client("ray_nodes", ["python", "-c", f"import ray; ray.init(address='{HEAD_IP}:6379', logging_level='ERROR'); "
                                           "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"])
        assert str(sorted([HEAD_IP, WORKER_IP])) in nodes.stdout, nodes.stdout + nodes.stderr

        out = Path("/mnt/shared/run")  # as the hosts see it: tmp_path/hosts/shared/shared/run here
        t0 = time.monotonic()
        submit = hosts.client("submit", [
            "python", "-m", "launchers.ray_submit", "--address", "http://127.0.0.1:8265", "examples/tiny_alpaca.yaml",
            # 2 CPUs per worker, as many as each host has: one rank on each host
            "parallel.strategy=ddp", "ray.num_workers=2", "ray.cpus_per_worker=2", "train.max_steps=4",
            "eval.every_steps=4", "logging.tensorboard=false", "logging.progress_bar=false", f"output_dir={out}"], timeout=600)
        seconds["submit"] = time.monotonic() - t0
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-6000:]
        ranks = re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d)", submit.stdout + submit.stderr)
        assert sorted(ip for ip, _ in set(ranks)) == [HEAD_IP, WORKER_IP], ranks  # one rank on each host
        run = hosts.shared / "shared" / "run"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r][-1] == 4 and any("eval_loss" in r for r in records)
        checkpoint = run / "checkpoints" / "step_00000004"
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and len(list((checkpoint / "dcp").glob("*.distcp"))) == 2
        assert (run / "final" / "model.safetensors").is_file()

        t0 = time.monotonic()
        down = hosts.client("ray_down", ["ray", "down", "-y", str(hosts.cluster_yaml)], timeout=300)
        seconds["ray down"] = time.monotonic() - t0
        assert down.returncode == 0, (down.stdout + down.stderr)[-6000:]
        head_left = [p for p in hosts.members()["head"] if re.search(r"raylet|gcs_server|ray/dashboard|default_worker", p)]
        assert head_left == [], head_left  # ray down stopped the head's Ray
        inits, work = [h.init_pid for h in hosts.hosts], hosts.work
    # Stopping the hosts stopped everything else in them, sshd and what Ray left on the worker
    # (Ray's local provider runs `ray stop` on the head only; see the README).
    assert all(not Path(f"/proc/{pid}").exists() for pid in inits) and not work.exists()
    print("ray up / submit / ray down on 2 SSH hosts: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


def shared_part(name: str) -> dict:
    """A cluster YAML without what a provider must set itself, and with SHARED_NFS's value blanked."""
    config = yaml.safe_load((CLOUD / name).read_text())
    for key in ("provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        config.pop(key, None)
    config["setup_commands"] = [re.sub(r"SHARED_NFS=[^;]*;", "SHARED_NFS=...;", c) for c in config["setup_commands"]]
    return config


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yamls_differ_from_the_on_premise_one_only_in_the_provider(name):
    assert shared_part(name) == shared_part("onprem.yaml")
    onprem = yaml.safe_load((CLOUD / "onprem.yaml").read_text())
    assert onprem["provider"]["type"] == "local" and "available_node_types" not in onprem
