"""A real single-node SLURM cluster (munge, slurmctld, slurmd) and a real PostgreSQL server, each in a temporary
folder on free ports, started and stopped by the tests.

Nothing under /etc is touched: the cluster's `slurm.conf` is found through `SLURM_CONF`, and its munge daemon is a
private one with its own key and socket. Both need root (slurmd runs jobs as their submitting user; the
PostgreSQL server runs as the `postgres` user), which CI has.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.dagster_dev import free_port

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
READY_TIMEOUT_S = 60


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def slurm_missing() -> str | None:
    """Why a SLURM cluster cannot be started here (None: it can)."""
    missing = [name for name in SLURM_BINARIES if _binary(name) is None]
    if missing:
        return f"SLURM/munge binaries not found: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here (None: it can)."""
    if _postgres_bin() is None:
        return "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    if os.geteuid() != 0:
        return "the test PostgreSQL server is started as the postgres user, which needs root"
    return None


def _wait(condition, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"timed out after {READY_TIMEOUT_S} s waiting for {what}\n{tail}")


def _kill_pid_file(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@dataclass
class SlurmCluster:
    """A running cluster: `env` holds what its clients need (`SLURM_CONF`)."""

    root: Path
    conf: Path
    partition: str

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str) -> str:
        return subprocess.run(command, env={**os.environ, **self.env}, check=True, capture_output=True,
                              text=True).stdout

    def queue(self) -> list[str]:
        """Ids of the jobs in the queue (pending, running, completing)."""
        return self.run("squeue", "--noheader", "--format=%i").split()

    def stop(self) -> None:
        for daemon in ("slurmd", "slurmctld", "munged"):
            _kill_pid_file(self.root / f"{daemon}.pid")
        shutil.rmtree(self.root, ignore_errors=True)


def start_slurm(cpus: int | None = None, memory_mb: int = 8000) -> SlurmCluster:
    """A private munged, slurmctld and slurmd on this host with `cpus` CPUs (default: this machine's cores)."""
    cpus = cpus or os.cpu_count() or 1
    # munged insists that every folder above its socket be searchable by all, so not pytest's 0700 tmp folders.
    root = Path(tempfile.mkdtemp(prefix="spd-slurm-"))
    root.chmod(0o755)
    for folder in ("munge", "state", "spool", "logs"):
        (root / folder).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge.key"
    subprocess.run([_binary("mungekey"), "-c", "-k", str(key), "-b", "1024"], check=True)
    socket_path = root / "munge" / "munge.socket"
    subprocess.run([_binary("munged"), f"--socket={socket_path}", f"--key-file={key}",
                    f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'logs' / 'munged.log'}",
                    f"--seed-file={root / 'munge.seed'}"], check=True)
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=spdtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=3000
ReturnToService=2
MpiDefault=none
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'logs' / 'slurmctld.log'}
SlurmdLogFile={root / 'logs' / 'slurmd.log'}
SchedulerParameters=sched_interval=1
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    cluster = SlurmCluster(root, conf, "debug")
    env = {**os.environ, **cluster.env}
    try:
        subprocess.run([_binary("slurmctld")], env=env, check=True)
        subprocess.run([_binary("slurmd")], env=env, check=True)

        def node_idle() -> bool:
            answer = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env, capture_output=True, text=True)
            return answer.returncode == 0 and answer.stdout.strip() in ("idle", "mix", "alloc")

        _wait(node_idle, "the SLURM node to be idle", root / "logs" / "slurmctld.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class PostgresServer:
    root: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                       check=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.root / "data"),
                        "-l", str(self.root / "log"), "-o", self.options, *args], check=True, capture_output=True)

    @property
    def options(self) -> str:
        return f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"

    def restart(self, down_s: float = 0.0) -> None:
        """`pg_ctl restart` (fast shutdown: open connections are closed); with `down_s`, down that long between."""
        if not down_s:
            self.pg_ctl("-m", "fast", "-w", "restart")
            return
        self.pg_ctl("-m", "fast", "-w", "stop")
        time.sleep(down_s)
        self.pg_ctl("-w", "start")

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.root / "data"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """A PostgreSQL server in a temporary folder, on a free port, trusting local connections."""
    bin_dir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="spd-postgres-"))
    root.chmod(0o755)
    shutil.chown(root, "postgres", "postgres")
    port = free_port()
    server = PostgresServer(root, port, bin_dir)
    as_postgres = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True)
        server.pg_ctl("-w", "start")
    except BaseException:
        server.stop()
        raise
    return server
