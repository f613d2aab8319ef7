"""A real SLURM cluster on this host, for tests: munge, MariaDB, slurmdbd, slurmctld and two
slurmd (nodes n1 and n2, 1 CPU each), all from Debian's packages (slurm-wlm, munge, slurmdbd,
mariadb-server), with every config, socket, log and state file under one temporary directory.
Clients and jobs find it through SLURM_CONF (`cluster.env`).

The cluster lives in a private network namespace whose only interface is loopback (held open by
a `sleep` started with `unshare --net`; every daemon and client enters it with `nsenter`): what
its jobs start, a Ray cluster included (Ray binds to the host's address whatever its flags say),
can reach nothing but 127.0.0.1, and no port can clash with the host's.

    with SlurmCluster() as cluster:
        cluster.run("sbatch", "--wait", "job.sh")           # run inside the namespace
        subprocess.run(cluster.command("python", "-m", "launchers.slurm", ...), env=cluster.env)

Every daemon runs in the foreground as our child and is stopped by its pid; so are the job
processes left behind: every process in the namespace, and any carrying this cluster's SLURM_CONF.

By hand, for experiments:  python tests/slurm_cluster.py   (prints the SLURM_CONF to export;
Ctrl-C or SIGTERM stops the cluster).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from polling import wait_for
from ray_cluster import namespace_pids, only_loopback

CLUSTER_NAME = "dtraintest"
NODES = ("n1", "n2")
DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sacctmgr")


NETNS_EXEC = Path(__file__).with_name("netns_exec.py")
# The namespace is the cluster's own: SLURM's and MariaDB's usual ports are free in it.
CTLD_PORT, DBD_PORT, DB_PORT, FIRST_NODE_PORT = 6817, 6819, 3306, 6821
CLONE_NEWNET = 0x40000000
# On lo too, so that SLURM's daemons can listen (see ray_cluster.add_loopback_address).
SECOND_ADDRESS = "127.0.0.2"


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which daemon and shows its log."""


def in_namespace(netns: str, fn):
    """fn() called in a thread that has entered the network namespace `netns` (a namespace is a
    per-thread property; the rest of this process stays where it is)."""
    import ctypes
    import threading

    outcome: dict = {}

    def enter_and_call() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                outcome["error"] = OSError(ctypes.get_errno(), f"setns({netns})")
                return
        finally:
            os.close(fd)
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_call)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def port_open(netns: str, port: int) -> bool:
    def connect() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    return in_namespace(netns, connect)


class SlurmCluster:
    def __init__(self, root: Path | None = None):
        # A short path: the munge socket path must fit in sun_path (108 bytes).
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.ctld_port, self.dbd_port, self.db_port = CTLD_PORT, DBD_PORT, DB_PORT
        self.node_ports = [FIRST_NODE_PORT + i for i in range(len(NODES))]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._anchor: subprocess.Popen | None = None  # the process that holds the namespace open
        self.netns = ""  # its /proc/PID/ns/net, once started

    def command(self, *argv: str) -> list[str]:
        """argv as a command line that runs inside the cluster's network namespace."""
        return ["nsenter", f"--net={self.netns}", "--", *argv]

    # ---- life cycle --------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
        if missing:
            raise ClusterError(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge slurmdbd "
                               "mariadb-server; .ci/run does it)")
        if os.geteuid() != 0:
            raise ClusterError("the test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
        for sub in ("etc", "munge", "db", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._enter_private_network()
        self._write_configs()
        self._start_munge()
        self._start_mariadb()
        self._start_slurmdbd()
        self._start_slurmctld()
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        if not wait_for(lambda: len(self._idle_nodes()) == len(NODES), timeout=30):
            raise ClusterError(f"nodes did not come up idle: sinfo says {self.run('sinfo', '-N', check=False).stdout}"
                               + self._logs("slurmd-n1", "slurmd-n2", "slurmctld"))

    def stop(self) -> None:
        """Cancel every job, stop what is left of them, then the daemons (newest first), by pid."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._procs):
            self.run("scancel", "--full", "--user", "root", check=False)
            wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), timeout=15)
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._procs.clear()
        self._kill_strays()
        if self._anchor is not None:
            self._anchor.kill()
            self._anchor.wait(timeout=10)
            self._anchor = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _enter_private_network(self) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            raise ClusterError("unshare and nsenter (util-linux) are needed to keep the cluster on a private network")
        self._anchor = subprocess.Popen(["unshare", "--net", sys.executable, str(NETNS_EXEC), "--second-address",
                                         SECOND_ADDRESS, "sleep", "infinity"],
                                        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        pid = self._anchor.pid
        # netns_exec brings loopback up, then becomes `sleep`: from then on the namespace is ready.
        if not wait_for(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
                        or self._anchor.poll() is not None, timeout=20) or self._anchor.poll() is not None:
            raise ClusterError(f"unshare --net failed: {self._anchor.stderr.read().decode(errors='replace')}")
        self.netns = f"/proc/{pid}/ns/net"
        if not only_loopback(pid) or os.readlink(self.netns) == os.readlink("/proc/self/ns/net"):
            raise ClusterError("the cluster's network namespace is not a private one")

    def _kill_strays(self) -> None:
        """slurmstepd and job processes outlive slurmd: every process left in the namespace (a
        private one: checked again, so that the host's processes are never touched) and any that
        carries this cluster's SLURM_CONF."""
        mine = []
        if self.netns and only_loopback(self._anchor.pid):
            pids = set(namespace_pids(self.netns)) - {self._anchor.pid}
            mine += [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid != os.getpid() and proc not in mine and proc.environ().get("SLURM_CONF") == str(self.conf):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        for proc in mine:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=10)

    # ---- helpers for tests -------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(*cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once it is forgotten."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout.strip()
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def sacct_states(self, job_id: str, settle_s: float = 30.0) -> list[str]:
        """The job's allocation states as accounting recorded them (one per run, requeues included).
        slurmctld sends a job's end to slurmdbd asynchronously, so a job scontrol already shows as
        ended can still read RUNNING in sacct for a moment: wait (up to settle_s) for that to pass."""
        deadline = time.monotonic() + settle_s
        while True:
            out = self.run("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State", check=False).stdout
            states = [line.split()[0] for line in out.splitlines() if line.strip()]
            if (states and states[-1] not in ("PENDING", "RUNNING")) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- daemons -----------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        # Its own session: a Ctrl-C on the test run reaches pytest, which then stops us in order.
        proc = subprocess.Popen(self.command(*cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self._procs.append((name, proc))
        return proc

    def _logs(self, *names: str) -> str:
        text = ""
        for name in names:
            for suffix in ("log", "out"):
                path = self.root / "log" / f"{name}.{suffix}"
                if path.exists():
                    text += f"\n--- {path} (tail) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        return text

    def _alive(self, name: str) -> None:
        for n, proc in self._procs:
            if n == name and proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}" + self._logs(name))

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        d = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={d}/munged.pid", f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={d}/munged.seed"])
        if not wait_for(self.munge_socket.exists, timeout=10):
            self._alive("munged")
            raise ClusterError("munged did not create its socket" + self._logs("munged"))

    def _start_mariadb(self) -> None:
        data = self.root / "db" / "data"
        init = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                               "--auth-root-authentication-method=normal", "--skip-test-db"],
                              capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        # skip-grant-tables: a throwaway database on loopback, so slurmdbd needs no account in it.
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
                                 "--bind-address=127.0.0.1", f"--port={self.db_port}",
                                 f"--socket={self.root}/db/mysqld.sock", f"--pid-file={self.root}/db/mysqld.pid",
                                 f"--log-error={self.root}/log/mariadbd.log", "--skip-grant-tables",
                                 "--innodb-buffer-pool-size=32M", "--skip-log-bin", "--innodb-lock-wait-timeout=900"])
        if not wait_for(lambda: port_open(self.netns, self.db_port), timeout=60):
            self._alive("mariadbd")
            raise ClusterError("mariadbd is not listening" + self._logs("mariadbd"))

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        if not wait_for(lambda: port_open(self.netns, self.dbd_port), timeout=60):
            self._alive("slurmdbd")
            raise ClusterError("slurmdbd is not listening" + self._logs("slurmdbd"))
        # Register the cluster before slurmctld connects, so that its jobs are recorded at once.
        add = self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME, check=False)
        if add.returncode != 0 and "already exists" not in add.stdout + add.stderr:
            raise ClusterError(f"sacctmgr add cluster failed: {add.stdout}{add.stderr}" + self._logs("slurmdbd"))

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        if not wait_for(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") >= 1, timeout=30):
            self._alive("slurmctld")
            raise ClusterError("slurmctld does not answer scontrol ping" + self._logs("slurmctld"))

    def _idle_nodes(self) -> list[str]:
        for name in ("slurmctld", "slurmd-n1", "slurmd-n2"):
            self._alive(name)
        return self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).stdout.split()

    # ---- configuration -----------------------------------------------------------------

    def _write_configs(self) -> None:
        r = self.root
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        nodes = "".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=1 RealMemory=4000\n"
                        for n, p in zip(NODES, self.node_ports))
        self.conf.write_text(f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire bounds how long a requeued job waits before it may start again.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.dbd_port}
# For slurmdbd connections the munge socket is given here, not by AuthInfo.
AccountingStoragePass={self.munge_socket}
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
{nodes}PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "etc" / "plugstack.conf").write_text("")
        dbd = r / "etc" / "slurmdbd.conf"  # next to slurm.conf, where slurmdbd looks for it
        dbd.write_text(f"""\
{auth}DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={r}/state/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it may hold a password)


def main() -> None:
    # SIGTERM too: a background job (`python tests/slurm_cluster.py &`) ignores SIGINT.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}\n(Ctrl-C or SIGTERM stops the cluster)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
