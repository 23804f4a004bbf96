"""A single-node SLURM cluster on this machine, for tests: munge, MariaDB + slurmdbd (so that sacct and GPU TRES
exist), slurmctld and slurmd, with the node advertising one GPU as a generic resource (a character device standing
in for /dev/nvidia0). Everything lives in one temporary folder and every daemon it started is stopped on exit.

Needs root and Debian's slurm-wlm, slurmdbd, munge and mariadb-server (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

TOOLS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "mariadb-install-db", "sacct", "sbatch")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (also as a context manager)."""

    def __init__(self, root: Path, cpus: int = 8, memory_mb: int = 20000):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus, self.memory_mb = cpus, memory_mb
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []
        self.started_munged = False

    # -- configuration
    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "db", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        gpu = r / "nvidia0"
        if not gpu.exists():
            os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a character device (the one /dev/null is)
        self.ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
        (r / "slurm.conf").write_text(
            f"""ClusterName=ci
SlurmctldHost={self.host}
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
SlurmctldParameters=enable_configless
GresTypes=gpu
ReturnToService=2
MinJobAge=3600
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports["dbd"]}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={gpu}\n")
        dbd = r / "slurmdbd.conf"
        dbd.write_text(
            f"""AuthType=auth/munge
DbdHost=localhost
DbdPort={self.ports["dbd"]}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["mysql"]}
StorageUser=root
StorageLoc=slurm_acct_db
PidFile={r}/slurmdbd.pid
LogFile={r}/slurmdbd.log
"""
        )
        dbd.chmod(0o600)

    # -- lifecycle
    def _run(self, *cmd: str, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}{self.logs()}")
        return proc.stdout

    def _wait(self, what: str, check, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0

    def start(self) -> SlurmCluster:
        r = self.root
        self._write_config()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
            self.started_munged = True
        self._run("mariadb-install-db", "--user=root", f"--datadir={r}/db", "--auth-root-authentication-method=normal", timeout=120)
        self.procs.append(
            subprocess.Popen(
                [
                    "mariadbd",
                    "--user=root",
                    f"--datadir={r}/db",
                    f"--socket={r}/mysql.sock",
                    f"--port={self.ports['mysql']}",
                    "--bind-address=127.0.0.1",
                    f"--pid-file={r}/mysql.pid",
                    "--skip-grant-tables",
                    f"--log-error={r}/mysql.err",
                ],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self._wait(
            "MariaDB", lambda: self._ok("mariadb", "-h", "127.0.0.1", "-P", str(self.ports["mysql"]), "-u", "root", "-e", "select 1")
        )
        self._run("/usr/sbin/slurmdbd")
        self._wait("slurmdbd", lambda: self._ok("sacctmgr", "-n", "list", "cluster"))
        self._run("sacctmgr", "-i", "add", "cluster", "ci")
        self._run("/usr/sbin/slurmctld")
        # Configless slurmd: it fetches slurm.conf and gres.conf from slurmctld and caches them where job steps
        # look when SLURM_CONF is unset (/run/slurm/conf), as the jobstep executor unsets it for its nested srun.
        slurmd_env = {k: v for k, v in self.env.items() if k != "SLURM_CONF"}
        subprocess.run(["/usr/sbin/slurmd", "--conf-server", f"{self.host}:{self.ports['ctld']}"], env=slurmd_env, check=True, timeout=60)
        self._wait("an idle node with a GPU", lambda: "idle gpu:1" in self._run("sinfo", "-h", "-N", "-o", "%T %G"))
        return self

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "slurmdbd"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.started_munged:
            subprocess.run(["pkill", "-x", "munged"], check=False)
        # slurmstepd children of cancelled jobs, if any outlived the daemons
        subprocess.run(["pkill", "-f", f"{self.root}"], check=False)
        cache = Path("/run/slurm/conf")
        if cache.is_symlink() and str(os.readlink(cache)).startswith(str(self.root)):
            cache.unlink()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- records
    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmdbd.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def sacct(self) -> list[dict[str, str]]:
        """SLURM's accounting records of every job (allocations only), as dicts."""
        fields = ["JobID", "JobName", "State", "AllocTRES", "ReqTRES", "Comment", "ExitCode"]
        text = self._run("sacct", "-X", "-a", "-n", "-P", "-S", "2000-01-01", "-o", ",".join(fields))
        return [dict(zip(fields, line.split("|"))) for line in text.splitlines() if line.strip()]
