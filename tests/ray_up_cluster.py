"""Two SSH "hosts" on this machine for Ray's cluster launcher (`ray up` / `ray down` with
launchers/cloud/onprem.yaml), private to one test:

    with SshHosts() as hosts:
        hosts.client("ray_up", ["ray", "up", "-y", str(hosts.cluster_yaml)])

Each host is a network + PID + mount + UTS namespace whose first process is this module's `init`:
it brings lo up, takes its host name (resolved by its /etc/hosts), makes the host's private
mounts, starts Debian's sshd in the foreground and, on SIGTERM, stops every process of its PID
namespace. The two hosts' network namespaces are joined by
a veth pair and nothing else: the head is 10.254.0.1, the worker 10.254.0.2, and nothing outside
the two can be reached or reach them. (Not two loopback addresses of one namespace: Ray finds a
node's address from the route to a public address, and takes 127.0.0.1 for "this machine"; with
one routing table both hosts would find the same.) The PID namespace is what makes `ray stop`
(which `ray up` and `ray down` run over SSH, and which kills Ray processes by name) see only that
host's processes; the mounts give each host its own home (~/dtrain, ~/venv, ~/ray_bootstrap_*),
/tmp and /run, and both the same /mnt, the "shared storage" (output_dir goes to /mnt/shared).

~/venv in each home links to the venv running the tests: the YAML's install commands find torch,
dtrain and Ray there and skip the installs (they run on a real node's first `ray up`). The throwaway
SSH keys are made per test. The clients (`ray up`, `ray status`, the job submit, `ray down`) run in
the head's namespaces (`nsenter`), like an operator's machine that reaches the hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ONPREM_YAML = REPO / "launchers" / "cloud" / "onprem.yaml"
HEAD_IP, WORKER_IP = "10.254.0.1", "10.254.0.2"  # on the veth pair between the two hosts
NAMES = {"head": "dtrain-head", "worker": "dtrain-worker"}
# Each host's /etc/hosts, as a cluster's DNS would answer: gloo (torch.distributed) reaches a rank
# at the address its host's name resolves to.
HOSTS_FILE = f"127.0.0.1 localhost\n{HEAD_IP} {NAMES['head']}\n{WORKER_IP} {NAMES['worker']}\n"
VENV = Path(sys.prefix)  # the tests' virtual environment
PATH = f"{VENV / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey {keys}/host_ed25519
PidFile {host}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AuthorizedKeysFile {keys}/client_ed25519.pub
MaxStartups 100:30:200
MaxSessions 100
"""


# ---- inside a host's namespaces (the init, PID 1) ----------------------------------------


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def private_mounts(host: Path, shared: Path) -> None:
    """This host's own /root, /tmp, /run and /etc/hosts; /mnt is the same directory on both hosts.
    `unshare --mount` made every mount private: nothing propagates back to the machine's own namespace."""
    home = host / "home"
    # The venv's interpreter may live under the real /root (pyenv): keep it visible, read-only.
    base = Path(os.path.realpath(VENV / "bin" / "python"))
    if base.is_relative_to("/root"):
        top = Path("/root") / base.relative_to("/root").parts[0]
        (home / top.name).mkdir(exist_ok=True)
        mount("--bind", str(top), str(home / top.name))
        mount("-o", "remount,bind,ro", str(home / top.name))
    mount("--rbind", str(home), "/root")
    # A checkout (or its virtual environment) under /tmp stays where it is: its top directory is
    # bound into this host's own /tmp before that replaces the machine's.
    for path in (REPO, VENV):
        if path.is_relative_to("/tmp"):
            top = Path("/tmp") / path.relative_to("/tmp").parts[0]
            (host / "tmp" / top.name).mkdir(exist_ok=True)
            mount("--bind", str(top), str(host / "tmp" / top.name))
    mount("--rbind", str(host / "tmp"), "/tmp")
    mount("--bind", str(shared), "/mnt")
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    Path("/run/sshd").mkdir(mode=0o755)
    (host / "hosts").write_text(HOSTS_FILE)
    mount("--bind", str(host / "hosts"), "/etc/hosts")


def own_processes() -> list[int]:
    """This PID namespace's processes other than the init (/proc is the namespace's own)."""
    return sorted(int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid())


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def init(host: Path, shared: Path) -> int:
    from ray_cluster import bring_up_loopback, only_loopback, stop

    if os.getpid() != 1 or not only_loopback():
        raise SystemExit("the init must be PID 1 of fresh namespaces: unshare --net --pid --fork --mount --mount-proc")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    bring_up_loopback()
    socket.sethostname(NAMES[host.name])
    private_mounts(host, shared)
    with open(host / "sshd.log", "ab") as log:
        subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(host / "sshd_config")], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT)
    ready = False
    deadline = time.monotonic() + 20
    while not ready and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", 22), timeout=1).close()
            ready = True
        except OSError:
            time.sleep(0.1)
    (host / "ready.json").write_text(json.dumps({"ok": ready}))
    while ready and not stopping:
        time.sleep(0.2)
        reap()
    # Ray's order (raylets first, the GCS last), SIGKILL after 10 s; what is left when the init
    # exits, the kernel kills with the PID namespace.
    stop(own_processes())
    reap()
    return 0


# ---- from the test ------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def namespace_members(init_pid: int) -> list[str]:
    """Every process in the PID namespace whose init is init_pid, as 'pid: command' (init included)."""
    try:
        namespace = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == namespace:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry.name}: {cmd[:160]}")
            except OSError:
                pass
    return found


class Host:
    """One SSH host: `unshare` -> its init (PID 1 of the new namespaces) -> sshd."""

    def __init__(self, work: Path, role: str):
        self.role, self.host = role, work / role
        for sub in ("home", "tmp"):
            (self.host / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.host / "tmp", 0o1777)
        (self.host / "home" / "venv").symlink_to(VENV)
        keys = work / "keys"
        (self.host / "sshd_config").write_text(SSHD_CONFIG.format(keys=keys, host=self.host))
        argv = ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "--uts", "--kill-child", sys.executable,
                str(Path(__file__).resolve()), "init", str(self.host), str(work / "shared")]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        self.unshare = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.host / "init.log", "ab"),
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not (self.host / "ready.json").exists():
            if self.unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{role} host did not start: {(self.host / 'init.log').read_text()[-3000:]}")
            time.sleep(0.1)
        kids = children(self.unshare.pid)
        self.init_pid = kids[0] if kids else None
        if not json.loads((self.host / "ready.json").read_text())["ok"] or self.init_pid is None:
            raise RuntimeError(f"{role} sshd did not come up: {(self.host / 'sshd.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the init, which stops its namespace's processes; if it does not end, SIGKILL
        to unshare (--kill-child: the init dies, and with it the whole PID namespace)."""
        if self.init_pid:
            try:
                os.kill(self.init_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.unshare.kill()
            self.unshare.wait(timeout=30)


class SshHosts:
    """The head and the worker host, the throwaway keys, and the cluster YAML: onprem.yaml with
    only its provider (the two addresses) and auth (root, the throwaway key) filled in. Their
    directory is under /var/tmp, not /tmp (which each host replaces with its own), and is removed
    at the end."""

    def __init__(self):
        self.work = Path(tempfile.mkdtemp(prefix="dtrain-ssh-hosts-", dir="/var/tmp"))
        self.hosts: list[Host] = []
        self.cluster_yaml = self.work / "cluster.yaml"
        self.shared = self.work / "shared"  # /mnt on both hosts

    def __enter__(self) -> "SshHosts":
        keys = self.work / "keys"
        keys.mkdir()
        (self.work / "logs").mkdir()
        (self.shared / "shared").mkdir(parents=True)
        for name in ("host_ed25519", "client_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dtrain-test-{name}",
                            "-f", str(keys / name)], check=True)
        config = yaml.safe_load(ONPREM_YAML.read_text())
        config["provider"].update(head_ip=HEAD_IP, worker_ips=[WORKER_IP])
        config["auth"] = {"ssh_user": "root", "ssh_private_key": str(keys / "client_ed25519")}
        self.cluster_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            self.hosts.append(Host(self.work, "head"))
            self.hosts.append(Host(self.work, "worker"))
            self.connect(*self.hosts)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def connect(head: Host, worker: Host) -> None:
        """A veth pair made directly inside the two hosts' network namespaces (never in this one),
        each end with its address and a default route through it: Ray's node address is the
        source address of the route to a public one (no packet is sent)."""
        subprocess.run(["ip", "link", "add", "dth0", "netns", str(head.init_pid), "type", "veth", "peer", "name",
                        "dtw0", "netns", str(worker.init_pid)], check=True, capture_output=True)
        for host, device, address in ((head, "dth0", HEAD_IP), (worker, "dtw0", WORKER_IP)):
            for cmd in (["ip", "addr", "add", f"{address}/24", "dev", device], ["ip", "link", "set", device, "up"],
                        ["ip", "route", "add", "default", "dev", device]):
                subprocess.run(["nsenter", "-t", str(host.init_pid), "--net", "--", *cmd], check=True,
                               capture_output=True)

    def stop(self) -> None:
        for host in reversed(self.hosts):
            host.stop()
        self.hosts = []
        shutil.rmtree(self.work, ignore_errors=True)

    def log(self, name: str) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def head(self) -> Host:
        return self.hosts[0]

    def members(self) -> dict[str, list[str]]:
        return {h.role: namespace_members(h.init_pid) for h in self.hosts}

    def client(self, name: str, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """argv from the head's namespaces, in this checkout, with a clean environment; its output
        in logs/NAME.log and returned."""
        env = {"PATH": PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               # (see onprem.yaml: the v2 autoscaler never starts the local provider's workers)
               "RAY_UP_enable_autoscaler_v2": "0"}
        cmd = ["nsenter", "-t", str(self.head.init_pid), "--net", "--pid", "--mount", f"--wd={REPO}", "--",
               "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        (self.work / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
        return proc


if __name__ == "__main__":
    if sys.argv[1] == "init":
        sys.exit(init(Path(sys.argv[2]), Path(sys.argv[3])))
