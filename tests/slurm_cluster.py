"""A real SLURM cluster on this host, for tests: munge, MariaDB, slurmdbd, slurmctld and two
slurmd (nodes n1 and n2, 1 CPU each), all from Debian's packages (slurm-wlm, munge, slurmdbd,
mariadb-server), all listening on 127.0.0.1, with every config, socket, log and state file under
one temporary directory. Clients and jobs find it through SLURM_CONF (`cluster.env`).

    with SlurmCluster() as cluster:
        cluster.run("sbatch", "--wait", "job.sh")

Every daemon runs in the foreground as our child and is stopped by its pid; so are the job
processes left behind (found by their SLURM_CONF, which only this cluster's processes carry).

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

CLUSTER_NAME = "dtraintest"
NODES = ("n1", "n2")
DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sacctmgr")


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which daemon and shows its log."""


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()




def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class SlurmCluster:
    def __init__(self, root: Path | None = None):
        # A short path: the munge socket path must fit in sun_path (108 bytes).
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.ctld_port, self.dbd_port, self.db_port, *self.node_ports = free_ports(3 + len(NODES))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []

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
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_strays(self) -> None:
        """slurmstepd and job processes outlive slurmd; they all carry this cluster's SLURM_CONF."""
        mine = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == str(self.conf):
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
        proc = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)
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
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
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
        if not wait_for(lambda: port_open(self.db_port), timeout=60):
            self._alive("mariadbd")
            raise ClusterError("mariadbd is not listening" + self._logs("mariadbd"))

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        if not wait_for(lambda: port_open(self.dbd_port), timeout=60):
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
