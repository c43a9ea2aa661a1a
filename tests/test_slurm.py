"""The one-node sbatch script on a real SLURM (slurmctld + slurmd from Debian's packages): the job is
requeued mid-run (SIGTERM to the job), checkpoints, comes back by itself, resumes, and ends with the
same trained weights as an uninterrupted run of the same configuration."""

import json
import os
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import REPO, TRAINED_ARGS, TRAINED_STEPS, copy_prepared

# slow: runs the sbatch scripts (bash subprocesses) and starts SLURM daemons; one xdist worker runs every SLURM test (the daemons' ports are fixed)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def slurm():
    yield from slurm_cluster.running("slurm")


def _export(out):
    ex = os.path.join(out, "export")
    return [open(os.path.join(ex, n), "rb").read() for n in ("projector.safetensors", "lora/adapter_model.safetensors")]


def _wait(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(1)
    raise TimeoutError(what)


def test_requeued_job_resumes_and_matches_an_uninterrupted_run(slurm, trained_run, tmp_path):
    """The uninterrupted run is conftest's trained_run (the same TRAINED_ARGS); the job starts in a folder
    holding its data and assets (copy_prepared): the requeue is the subject."""
    out, log = copy_prepared(trained_run, tmp_path / "run"), tmp_path / "job.out"
    slurm.env["LLMREC_REPO"], slurm.env["LLMREC_PYTHON"] = REPO, sys.executable
    r = slurm.run("sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}",
                  os.path.join(REPO, "launch", "slurm", "train_1node.sbatch"), "configs/llara_default.yaml", str(out),
                  *TRAINED_ARGS, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    metrics = out / "logs" / "metrics.jsonl"
    _wait(lambda: metrics.exists() and '"step": 8' in metrics.read_text(), 900, "step 8")
    assert slurm.run("scontrol", "requeue", job).returncode == 0
    _wait(lambda: slurm.job_state(job)[0] == "COMPLETED", 1500, f"job {job} to complete")
    state, restarts = slurm.job_state(job)
    text = log.read_text()
    assert restarts >= 1, text[-3000:]
    assert "received TERM" in text and "resumed from step_" in text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, TRAINED_STEPS + 1))
    assert _export(out) == _export(trained_run)


def test_outside_sbatch_the_scripts_say_so():
    """Run with bash instead of sbatch: a message and exit 2, not `set -u`'s "unbound variable"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("train_1node.sbatch", "train_multinode.sbatch"):
        script = os.path.join(REPO, "launch", "slurm", name)
        r = subprocess.run(["bash", script, "configs/llara_default.yaml", "out"], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "submit this script with sbatch" in r.stderr, (name, r.stderr)


def test_missing_config_and_unwritable_output_fail_before_ray(slurm, tmp_path):
    script = os.path.join(REPO, "launch", "slurm", "train_1node.sbatch")
    env = dict(os.environ, SLURM_JOB_ID="0", SLURM_SUBMIT_DIR=REPO)
    r = subprocess.run(["bash", script, "nope.yaml", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "config nope.yaml not found" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run(["bash", script, "configs/llara_default.yaml", str(blocker / "out")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "is not writable" in r.stderr


def test_a_gpu_allocation_makes_one_gpu_worker_per_gpu(tmp_path):
    """SLURM_GPUS_ON_NODE (set by --gpus-per-node / --gres=gpu:N) turns the one-node script to
    train.use_gpu=true with a worker per GPU. Here the node has no GPU, so the run is refused by
    launch/train.py's check, which shows the script asked for 2 GPU workers (no SLURM needed)."""
    script = os.path.join(REPO, "launch", "slurm", "train_1node.sbatch")
    env = dict(os.environ, SLURM_JOB_ID="0", SLURM_SUBMIT_DIR=REPO, SLURM_GPUS_ON_NODE="2",
               LLMREC_PYTHON=sys.executable)
    r = subprocess.run(["bash", script, "configs/llara_default.yaml", str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert "2 GPU(s) on this node: train.use_gpu=true, one training worker per GPU" in r.stdout
    assert r.returncode != 0
    assert "train.use_gpu=true asks for 2 workers with a GPU each, the Ray cluster has 0 GPU(s)" in r.stderr + r.stdout


@pytest.mark.parametrize("script", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_a_gpu_count_that_is_not_a_number_is_refused(script, tmp_path):
    """Not silently a CPU run: the scripts read SLURM_GPUS_ON_NODE as a count or stop (no SLURM needed)."""
    env = dict(os.environ, SLURM_JOB_ID="0", SLURM_SUBMIT_DIR=REPO, SLURM_GPUS_ON_NODE="a100:2",
               SLURM_JOB_NODELIST="localhost", LLMREC_HEAD_IP="127.0.0.1", LLMREC_PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm", script), "configs/llara_default.yaml",
                        str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "SLURM_GPUS_ON_NODE=a100:2 is not a GPU count" in r.stderr


def test_an_unknown_ray_auth_choice_stops_the_multinode_script_before_ray(tmp_path):
    """LLMREC_RAY_AUTH is token or disabled; anything else stops the script (exit 2) before a token is made or
    Ray starts (no SLURM needed)."""
    env = dict(os.environ, SLURM_JOB_ID="0", SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NODELIST="localhost",
               LLMREC_HEAD_IP="127.0.0.1", LLMREC_PYTHON=sys.executable, LLMREC_RAY_AUTH="off")
    out = tmp_path / "o"
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm", "train_multinode.sbatch"),
                        "configs/llara_default.yaml", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "LLMREC_RAY_AUTH=off (expected token or disabled)" in r.stderr
    assert not (out / ".ray_auth").exists() and "Ray head" not in r.stdout
