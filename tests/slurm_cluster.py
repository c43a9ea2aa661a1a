"""A real SLURM on this machine for tests: munged, slurmctld and one slurmd per fake node, started
from Debian's packages with a generated slurm.conf (see ../shared/notes/slurm-on-one-machine.md for
the facts this relies on).

Each test cluster is its own: its own munged (its socket in a folder of its own, named in slurm.conf's
AuthInfo, which SLURM's daemons and clients read), and ports nothing listened on when it started (two
clusters at once, as pytest-xdist runs test_slurm.py beside test_slurm_multinode.py, never share one,
and a slurmd left by an earlier cluster cannot register with a new slurmctld). Its daemons are stopped
whatever happens to the test, a start that failed halfway included: by the pids in their pid files,
then every process still naming this cluster's files (SIGKILL after a grace period)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

CONF = """ClusterName=ci
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket={munge_socket}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=300
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_ports(n: int) -> list[int]:
    """n TCP ports nothing listened on just now, all different."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def available() -> str | None:
    """None when SLURM can be started here, else the reason it cannot."""
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (.ci/run installs Debian's slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test SLURM runs its daemons as root"
    return None


class Slurm:
    def __init__(self, base: str, fake_nodes: list[str] | None = None, cpus: int = 2):
        self.base = base
        self.host = socket.gethostname().split(".")[0]
        self.fake = fake_nodes
        self.cpus = cpus
        self.env = dict(os.environ, SLURM_CONF=os.path.join(base, "slurm.conf"))
        self.munge_dir = f"/run/munge-{os.path.basename(base)}"
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")

    def start(self) -> None:
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        if subprocess.run(["getent", "hosts", self.host], capture_output=True).returncode != 0:
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {self.host}\n")
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
            os.chmod("/etc/munge/munge.key", 0o400)
        # this cluster's munged, in a folder the munge user owns (the test's base folder is root's, 0700)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", self.munge_dir], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force", f"--socket={self.munge_socket}",
                        f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.munge_dir}/munged.log",
                        f"--seed-file={self.munge_dir}/munged.seed"], check=True)
        ctld_port, d_port, *node_ports = _free_ports(2 + len(self.fake or []))
        if self.fake:
            nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                              f"CPUs={self.cpus} RealMemory=8000 State=UNKNOWN" for n, port in zip(self.fake, node_ports))
        else:
            nodes = f"NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN"
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(CONF.format(host=self.host, base=self.base, ctld_port=ctld_port, d_port=d_port, nodes=nodes,
                                munge_socket=self.munge_socket))
        subprocess.run(["slurmctld", "-f", self.env["SLURM_CONF"]], env=self.env, check=True)
        for n in self.fake or [None]:
            cmd = ["slurmd", "-f", self.env["SLURM_CONF"]] + (["-N", n] if n else [])
            subprocess.run(cmd, env=self.env, check=True)
        for _ in range(60):
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() and all(s.strip() == "idle" for s in r.stdout.split()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: {r.stdout} {r.stderr}")

    def names_this_cluster(self, part: str) -> bool:
        """Whether a command-line part names this cluster's slurm.conf or munge socket (conftest.processes_matching)."""
        return self.env["SLURM_CONF"] in part or self.munge_socket in part

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM each daemon by the pid in its pid file, wait until they are gone (their ports free), then
        SIGKILL whatever of this cluster is still there (a daemon whose pid file was never written)."""
        from conftest import kill_processes_matching

        pids = []
        for folder in (self.base, self.munge_dir):
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if name.endswith(".pid"):
                    try:
                        pid = int(open(os.path.join(folder, name)).read().strip())
                        os.kill(pid, 15)
                        pids.append(pid)
                    except (ValueError, ProcessLookupError, FileNotFoundError):
                        pass
        deadline = time.time() + timeout
        for pid in pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        kill_processes_matching(self.names_this_cluster)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def run(self, *args, **kw):
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, **kw)

    def job_state(self, job_id: str) -> tuple[str, int]:
        r = self.run("scontrol", "show", "job", job_id)
        fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", 0))


def running(prefix: str, **kwargs):
    """A pytest fixture body: skip with the reason when SLURM cannot start here, else yield a started
    Slurm (its files in a fresh /tmp/<prefix>* folder) and stop it afterwards."""
    import pytest

    why = available()
    if why:
        pytest.skip(why)
    cluster = Slurm(tempfile.mkdtemp(prefix=prefix, dir="/tmp"), **kwargs)
    try:
        cluster.start()  # inside: a start that fails halfway still stops what it started
        yield cluster
    finally:
        cluster.stop()
