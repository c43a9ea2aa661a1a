"""A real SLURM on this machine for tests: munge, slurmctld and one slurmd per fake node, started
from Debian's packages with a generated slurm.conf, stopped by pid (see
../shared/notes/slurm-on-one-machine.md for the facts this relies on)."""

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
AuthInfo=cred_expire=10
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
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
        if self.fake:
            nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={17001 + i} "
                              f"CPUs={self.cpus} RealMemory=8000 State=UNKNOWN" for i, n in enumerate(self.fake))
        else:
            nodes = f"NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN"
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(CONF.format(host=self.host, base=self.base, ctld_port=16817, d_port=16818, nodes=nodes))
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

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM each daemon by the pid in its pid file, then wait until they are gone (their ports free)."""
        pids = []
        for name in os.listdir(self.base):
            if name.endswith(".pid"):
                try:
                    pid = int(open(os.path.join(self.base, name)).read().strip())
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
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
