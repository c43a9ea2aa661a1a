"""The N-node sbatch script on a real SLURM with two fake nodes (`slurmd -N n1`, `slurmd -N n2` on
this host, see ../shared/notes/slurm-on-one-machine.md): it starts a Ray head on n1 and a Ray worker
node on n2 with srun, waits until both joined, trains with one training worker per Ray node, and
shuts Ray down. Both fake nodes share this machine's CPUs; what is tested is the orchestration, and
that the cluster admits only the job: a client without the job's token (or with another) is refused
while the job trains, and the token is in no log and gone when the job ends."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import REPO, SMALL, copy_prepared

pytestmark = pytest.mark.slow  # starts SLURM daemons and trains on a two-node Ray cluster

ARGS = [*SMALL, "train.max_steps=8", "train.checkpoint_every=4", "train.log_every=2", "eval.max_samples=8",
        "eval.batch_size=8"]


@pytest.fixture(scope="module")
def slurm2():
    yield from slurm_cluster.running("slurm2", fake_nodes=["n1", "n2"], cpus=1)


def test_two_node_script_trains_on_a_two_node_ray_cluster(slurm2, trained_run, tmp_path):
    out, log = copy_prepared(trained_run, tmp_path / "run"), tmp_path / "job.out"  # the data build is not the subject
    slurm2.env.update(LLMREC_REPO=REPO, LLMREC_PYTHON=sys.executable,
                      LLMREC_RAY=shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray"),
                      LLMREC_RAY_PORT="6399")
    r = slurm2.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}",
                   f"--chdir={REPO}", os.path.join(REPO, "launch", "slurm", "train_multinode.sbatch"),
                   "configs/llara_default.yaml", str(out), *ARGS, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    t0 = time.time()
    while not (log.exists() and "Ray nodes alive: 2 of 2" in log.read_text()):
        assert slurm2.job_state(job)[0] not in done and time.time() - t0 < 600, log.read_text()[-3000:] if log.exists() else ""
        time.sleep(1)
    text = log.read_text()
    head = re.search(r"Ray head on n1 \(([\d.]+:\d+)\)", text).group(1)
    token_file = re.search(r"a new token for this job in (\S+),", text).group(1)
    token = open(token_file).read().strip()
    assert len(token) >= 32 and os.stat(token_file).st_mode & 0o077 == 0
    outsiders = {"no token": {"RAY_AUTH_MODE": "disabled"}, "another token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}
    for name, auth in outsiders.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        c = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{head}'); print('JOINED')"],
                           env=dict(env, **auth), capture_output=True, text=True, timeout=180)
        assert c.returncode != 0 and "JOINED" not in c.stdout, name
        assert "InvalidAuthToken" in c.stderr, (name, c.stderr[-2000:])
    while slurm2.job_state(job)[0] not in done:
        assert time.time() - t0 < 1200, "job did not finish in 20 minutes:\n" + (log.read_text()[-3000:] if log.exists() else "")
        time.sleep(2)
    text = log.read_text()
    assert slurm2.job_state(job)[0] == "COMPLETED", text[-4000:]
    assert not os.path.exists(token_file) and token not in text  # removed at the end, never logged
    assert "Ray head on n1" in text and "2 nodes" in text
    assert "Ray nodes alive: 2 of 2" in text, text[-4000:]
    nodes = dict(re.findall(r"rank (\d) of 2 on Ray node (\w+)", text))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], text[-4000:]  # one training worker per node
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert (out / "export" / "projector.safetensors").exists()
