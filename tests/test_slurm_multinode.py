"""The N-node sbatch script on a real SLURM with two fake nodes (`slurmd -N n1`, `slurmd -N n2` on
this host, see ../shared/notes/slurm-on-one-machine.md): it starts a Ray head on n1 and a Ray worker
node on n2 with srun, waits until both joined, trains with one training worker per Ray node, and
shuts Ray down. Both fake nodes share this machine's CPUs; what is tested is the orchestration."""

import json
import os
import re
import shutil
import sys
import time

import pytest

import slurm_cluster
from conftest import REPO, SMALL

pytestmark = pytest.mark.slow  # starts SLURM daemons and trains on a two-node Ray cluster

ARGS = [*SMALL, "train.max_steps=8", "train.checkpoint_every=4", "train.log_every=2", "eval.max_samples=8",
        "eval.batch_size=8"]


@pytest.fixture(scope="module")
def slurm2():
    yield from slurm_cluster.running("slurm2", fake_nodes=["n1", "n2"], cpus=1)


def test_two_node_script_trains_on_a_two_node_ray_cluster(slurm2, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    slurm2.env.update(LLMREC_REPO=REPO, LLMREC_PYTHON=sys.executable,
                      LLMREC_RAY=shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray"),
                      LLMREC_RAY_PORT="6399")
    r = slurm2.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}",
                   f"--chdir={REPO}", os.path.join(REPO, "launch", "slurm", "train_multinode.sbatch"),
                   "configs/llara_default.yaml", str(out), *ARGS, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    t0 = time.time()
    while slurm2.job_state(job)[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() - t0 < 1200, "job did not finish in 20 minutes:\n" + (log.read_text()[-3000:] if log.exists() else "")
        time.sleep(2)
    text = log.read_text()
    assert slurm2.job_state(job)[0] == "COMPLETED", text[-4000:]
    assert "Ray head on n1" in text and "2 nodes" in text
    assert "Ray nodes alive: 2 of 2" in text, text[-4000:]
    nodes = dict(re.findall(r"rank (\d) of 2 on Ray node (\w+)", text))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], text[-4000:]  # one training worker per node
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert (out / "export" / "projector.safetensors").exists()
