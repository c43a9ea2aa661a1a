"""`ray job submit -- python launch/train.py` against a real Ray cluster started as README says
(RAY_AUTH_MODE=token, the token in ~/.ray/auth_token of a HOME of the test's own, `ray start --head` on
loopback): refused without the token or with a wrong one; with README's setting an elastic job
(train.min_workers) trains with 2 workers on a two-node cluster, loses a node and goes on with the
worker left, resuming the 2-worker checkpoint on 1, to the end."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL, copy_prepared, free_port, kill_processes_matching, naming, on_gcs_port

pytestmark = pytest.mark.slow  # starts a Ray cluster (ray start) and submits a training job


@pytest.fixture
def ray_cluster(request):
    """A head node of `request.param` CPUs (2 by default): (ray executable, env, dashboard URL, GCS port)."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    home = os.path.join(temp, "home")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")  # built ops reused
    env = dict(os.environ, HOME=home, XDG_CACHE_HOME=cache, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    # README: the token once per user, readable by that user only
    r = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.umask(0o077))
    token = os.path.join(home, ".ray", "auth_token")
    assert r.returncode == 0 and os.path.getsize(token) > 0, r.stderr
    assert os.stat(token).st_mode & 0o077 == 0
    port, dash = free_port(), free_port()
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--num-cpus={getattr(request, 'param', 2)}", "--include-dashboard=true", f"--temp-dir={temp}",
             "--dashboard-agent-listen-port=0"]  # README: Ray's fixed 52365 may be another cluster's on this machine
    held = _held(52365)  # Ray's default agent port, taken as by another cluster on this machine (a local training's)
    try:
        r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield ray, env, f"http://127.0.0.1:{dash}", port
    finally:
        held.close()
        kill_processes_matching(naming(temp))  # not `ray stop`: it stops every Ray cluster of this user on the machine
        kill_processes_matching(on_gcs_port(port))  # the head's Ray client server names only the GCS
        shutil.rmtree(temp, ignore_errors=True)


def _held(port):
    """A socket listening on `port` (the caller closes it), unless something else listens there already. Ray's dashboard agent takes
    52365 unless told otherwise; where that port is taken its job server is off, and `ray job submit` answers
    "No available agent to submit job" for as long as the cluster lives (README's --dashboard-agent-listen-port=0)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        s.listen()
    except OSError:
        pass  # taken already: the same for the test
    return s


def _kill_tree(proc):
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)



def test_a_local_start_is_a_cluster_of_its_own_beside_a_running_one(ray_cluster):
    """launch/train.py without ray.address starts its own cluster even where `ray start` left one running on
    the machine (ray.init with no address would join the newest it finds: another job's, another user's)."""
    ray, env, _, port = ray_cluster
    # what `ray start` writes where ray.init looks for the newest cluster (RAY_TMPDIR/ray: /tmp/ray by default)
    tmp = os.path.dirname(env["HOME"])
    os.makedirs(os.path.join(tmp, "ray"))
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(f"127.0.0.1:{port}")
    env = dict(env, RAY_TMPDIR=tmp)
    # and its processes ask their own cluster when they use Ray's state API (Ray Train's PlacementGroupCleaner
    # asks it every second whether the run's controller is alive; asked of the other cluster, the answer is no)
    probe = """import json, os, ray
from trainer.job.ray_cluster import connect
connect(None, 1, 128, False)

@ray.remote(num_cpus=0)
class Probe:
    def ask(self):
        from ray.util.state import get_actor
        me = get_actor(ray.get_runtime_context().get_actor_id(), timeout=60)
        return os.environ.get("RAY_ADDRESS"), me.state if me else None

print(json.dumps([ray.cluster_resources().get("CPU"), ray.get_runtime_context().gcs_address, *ray.get(Probe.remote().ask.remote())]))
"""
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cpus, gcs, worker_address, state = json.loads(r.stdout.strip().splitlines()[-1])
    assert cpus == 1 and not gcs.endswith(f":{port}")  # its own 1-CPU cluster, not the 2-CPU head at `port`
    assert worker_address == gcs and state == "ALIVE", (worker_address, state, r.stderr[-3000:])


@pytest.mark.parametrize("ray_cluster", [1], indirect=True)  # a head of 1 CPU, a second node of 1 CPU
def test_ray_job_submit_needs_the_token_and_an_elastic_job_goes_on_when_a_node_is_lost(ray_cluster, trained_run, tmp_path):
    """Outsiders (no token, a wrong one) cannot submit; README's `ray job submit -- python launch/train.py`
    with train.min_workers=1 trains on both nodes, loses the second node (SIGKILL of its processes) and
    goes on with the worker left to the end, resuming the 2-worker checkpoint on 1."""
    from conftest import TRAINED_ARGS, wait_for_step

    ray, env, address, port = ray_cluster
    # another user's shell: no token mode, or a token that is not this cluster's
    for name, outsider in (("no token", {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}),
                           ("wrong token", dict(env, RAY_AUTH_TOKEN="0" * 64))):
        r = subprocess.run([ray, "job", "submit", "--address", address, "--", "python", "-c", "print('OUTSIDER' + '-RAN')"],
                           env=outsider, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "OUTSIDER-RAN" not in r.stdout + r.stderr, name
        assert "auth" in (r.stdout + r.stderr).lower(), (name, (r.stdout + r.stderr)[-2000:])
    node = subprocess.Popen([ray, "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--dashboard-agent-listen-port=0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    job = None
    try:
        probe = (f"import ray, time; ray.init(address='127.0.0.1:{port}', logging_level='ERROR')\n"
                 "for _ in range(120):\n    n = sum(x['Alive'] for x in ray.nodes())\n    if n >= 2: break\n    time.sleep(1)\nprint(n)")
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert r.stdout.strip().endswith("2"), r.stdout + r.stderr[-2000:]
        out = copy_prepared(trained_run, tmp_path / "run")  # the data build is not the subject
        args = [a for a in TRAINED_ARGS if not a.startswith(("train.max_failures", "train.checkpoint_every"))]
        runtime_env = json.dumps({"excludes": [".git", "runs", "*.tar"]})
        cmd = [ray, "job", "submit", "--address", address, "--working-dir", REPO, "--runtime-env-json", runtime_env, "--",
               "python", "launch/train.py", f"output_dir={out}", *args, "train.min_workers=1", "train.max_failures=3",
               "train.checkpoint_every=4", "train.sample_log=true"]
        for _ in range(12):  # the head's job agent may still be starting: Ray says to try again later
            job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            while job.poll() is None and not (out / "logs" / "metrics.jsonl").exists():
                time.sleep(0.5)
            ended = job.stdout.read() if job.poll() is not None else ""
            if "No available agent to submit job" not in ended:
                break
            time.sleep(5)
        try:
            wait_for_step(out, 5, job)  # a checkpoint at step 4
        except AssertionError:
            raise AssertionError(f"`ray job submit` ended with {job.poll()}:\n{(ended or job.stdout.read())[-4000:]}")
        _kill_tree(node)  # the second node is lost, with the worker on it
        log, _ = job.communicate(timeout=1200)
    finally:
        for p in (node, job):
            if p is not None and p.poll() is None:
                _kill_tree(p)
    assert job.returncode == 0, log[-4000:]
    assert "joining the Ray cluster" in log and "succeeded" in log.lower()
    import re

    resized = re.search(r"resize at step (\d+): 2 -> 1 workers; global batch 16 = micro 8 x accumulation 2 x 1 workers", log)
    assert resized, log[-4000:]
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 24
    at = int(resized.group(1))
    assert [r["world_size"] for r in records] == [2] * at + [1] * (24 - at)
    keys = [k for name in os.listdir(out / "logs" / "samples")
            for line in open(out / "logs" / "samples" / name) for k in json.loads(line)["keys"]]
    assert len(keys) == len(set(keys)) == 24 * 16  # inside the epoch: each sample once across the loss
    m = json.loads((out / "eval" / "final_test" / "metrics.json").read_text())
    assert m["step"] == 24 and 0 <= m["generate"]["hr@1_of_valid"] <= 1 and 0 <= m["generate"]["valid_ratio"] <= 1
