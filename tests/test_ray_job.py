"""`ray job submit -- python launch/train.py` against a real Ray cluster started with `ray start --head`
on loopback; the job trains with 2 workers and ZeRO-3 and writes its metrics."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, SMALL

pytestmark = pytest.mark.slow  # starts a Ray cluster (ray start) and submits a training job


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        yield ray, env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains(ray_cluster, tmp_path):
    ray, env, address = ray_cluster
    out = tmp_path / "run"
    runtime_env = json.dumps({"excludes": [".git", "runs", "*.tar"]})
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", REPO, "--runtime-env-json", runtime_env, "--",
           "python", "launch/train.py", f"output_dir={out}", *SMALL, "train.max_steps=10", "train.checkpoint_every=5",
           "eval.max_samples=8", "eval.batch_size=8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "joining the Ray cluster" in log and "succeeded" in log.lower()
    m = json.loads((out / "eval" / "test_metrics.json").read_text())
    assert m["step"] == 10 and 0 <= m["hr@1_of_valid"] <= 1 and 0 <= m["valid_ratio"] <= 1
    assert (out / "checkpoints" / "step_000010" / "COMPLETE").exists()
