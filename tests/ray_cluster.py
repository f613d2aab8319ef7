"""A real Ray head for the tests, private to them: run as

    unshare --net python tests/ray_cluster.py WORKDIR STEPS.json

inside a fresh network namespace (whose only interface is loopback), it starts `ray start --head`,
runs each step (an argv list) with RAY_API_SERVER_ADDRESS pointing at the head's job server,
stops every Ray process it started, by pid, and writes WORKDIR/cluster.json: how the start went,
each step's exit code, time and log file, the Ray pids and which of them were still running at
the end. Ray binds to the host's address whatever its flags say, and `ray stop` would kill every
Ray process on the machine: the namespace keeps all of it on 127.0.0.1, and membership of the
namespace says exactly which processes are this cluster's.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DASHBOARD_PORT = 8265
JOB_SERVER = f"http://127.0.0.1:{DASHBOARD_PORT}"


def bring_up_loopback() -> None:
    """`ip link set lo up`, without needing iproute2: a new network namespace starts with lo down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def add_loopback_address(address: str) -> None:
    """Give lo a second address (`ip addr add ADDRESS/8 dev lo label lo:1`, by ioctl). glibc's
    getaddrinfo(AI_ADDRCONFIG), which SLURM's daemons use to listen, finds no IPv4 address while
    127.0.0.1 is the only one; any other address, even on lo, makes it answer. Still only lo exists."""
    siocsifaddr, siocsifnetmask = 0x8916, 0x891C

    def ifreq(addr: str) -> bytes:
        return struct.pack("16sH2s4s8x", b"lo:1", socket.AF_INET, b"\0\0", socket.inet_aton(addr))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, siocsifaddr, ifreq(address))
        fcntl.ioctl(s, siocsifnetmask, ifreq("255.0.0.0"))


def only_loopback(pid: int | str = "self") -> bool:
    """Whether the process's network namespace has no interface but lo: a private one made by
    `unshare --net`, never the host's (/proc/PID/net/dev lists the namespace's interfaces)."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":", 1)[0].strip() for line in lines] == ["lo"]


def namespace_pids(netns: str = "/proc/self/ns/net") -> list[int]:
    """Every process except this one in the network namespace `netns` (a /proc/PID/ns/net path;
    by default this process's own): the cluster's processes."""
    target = os.readlink(netns)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.readlink(entry / "ns" / "net") == target:
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return sorted(pids)


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """Stop the given processes in the order `ray stop` uses (raylet, then the others, the GCS
    last: a GCS gone first leaves the rest waiting for it): SIGTERM, SIGKILL after grace_s.
    Returns those still running at the end."""
    def kind(pid: int) -> int:
        cmd = command_line(pid)
        return 0 if "/raylet/raylet" in cmd else 2 if "/gcs/gcs_server" in cmd else 1

    for bucket in (0, 1, 2):
        group = [p for p in pids if kind(p) == bucket]
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            alive = [p for p in group if _running(p)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                alive = [p for p in alive if _running(p)]
            if not alive:
                break
    return [p for p in pids if _running(p)]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; whoever adopted it reaps it


def still_running(processes: list[dict]) -> list[int]:
    """Which of the recorded {pid, start} processes still run (a reused pid does not count)."""
    return [p["pid"] for p in processes if _running(p["pid"]) and process_start_time(p["pid"]) == p["start"]]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


def ray_logs(temp_dir: Path) -> str:
    logs = temp_dir / "session_latest" / "logs"
    parts = [f"--- {name}\n{tail(logs / name)}" for name in
             ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err", "dashboard.log", "dashboard.err")
             if (logs / name).exists()]
    return "\n".join(parts) or f"(no Ray logs under {logs})"


def start_head(temp_dir: Path, num_cpus: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).with_name("ray")  # the ray of this interpreter's environment
    return subprocess.run(
        [str(ray), "start", "--head", f"--num-cpus={num_cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
         "--port=6379", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)


def wait_for_job_server(deadline_s: float = 60.0) -> bool:
    """`ray start` returns before the job server answers: poll it."""
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{JOB_SERVER}/api/version", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def main(workdir: Path, steps: list[list[str]], num_cpus: int) -> int:
    report: dict = {"started": False, "steps": []}
    # Stopping "every process in this namespace" is only right in a private one.
    if not only_loopback():
        raise SystemExit("tests/ray_cluster.py must run in its own network namespace: unshare --net python ...")
    bring_up_loopback()
    # Short (Unix socket paths are limited to 107 bytes) and private (not /tmp/ray, another user's).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # The head's processes run this interpreter (jobs start `python`, found on PATH); token auth is
    # off for this private cluster, and the clients (ray_submit) see the same setting.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        t0 = time.monotonic()
        started = start_head(temp_dir, num_cpus, env)
        report["ray_start_output"] = started.stdout[-3000:] + started.stderr[-3000:]
        ready = started.returncode == 0 and wait_for_job_server()
        report["ray_start_s"] = round(time.monotonic() - t0, 1)
        report["ray_pids"] = [{"pid": p, "start": process_start_time(p)} for p in namespace_pids()]
        if not ready:
            report["start_error"] = (f"ray start exited {started.returncode}, job server ready: {ready}\n"
                                     f"{report['ray_start_output']}\n{ray_logs(temp_dir)}")
            return 1
        report["started"] = True
        (workdir / "cluster.json").write_text(json.dumps(report, indent=1))  # pids known, should we die
        for i, argv in enumerate(steps):
            log = workdir / f"step{i}.log"
            t0 = time.monotonic()
            with open(log, "w") as out:
                rc = subprocess.run(argv, env={**env, "RAY_API_SERVER_ADDRESS": JOB_SERVER}, stdout=out,
                                    stderr=subprocess.STDOUT).returncode
            report["steps"].append({"argv": argv, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                                    "log": str(log)})
        return 0
    finally:
        pids = namespace_pids()
        report["ray_pids"] = [{"pid": p, "start": process_start_time(p)} for p in pids]
        t0 = time.monotonic()
        report["left_running"] = stop(pids)
        report["stop_s"] = round(time.monotonic() - t0, 1)
        if report["left_running"] or not report["started"]:
            report["ray_logs"] = ray_logs(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        (workdir / "cluster.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    workdir, steps_file = Path(sys.argv[1]), Path(sys.argv[2])
    sys.exit(main(workdir, json.loads(steps_file.read_text()), num_cpus=int(os.environ.get("RAY_TEST_CPUS", "2"))))
