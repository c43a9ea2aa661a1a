"""The N-node sbatch script on a real SLURM with two fake nodes (`slurmd -N n1`, `slurmd -N n2` on
this host, see ../shared/notes/slurm-on-one-machine.md): it starts a Ray head on n1 and a Ray worker
node on n2 with srun, waits until both joined, trains with one training worker per Ray node, and
shuts Ray down. Both fake nodes share this machine's CPUs; what is tested is the orchestration, that
the cluster admits only the job (a client without the job's token, or with another, is refused while the
job trains; the token is in no log and gone when the job ends), and a requeue onto fewer nodes: the job,
submitted with --nodes=1-2, is requeued mid-run while n2 is drained, comes back on n1 alone and resumes
its 2-worker checkpoint on 1 worker (issue 24)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

import slurm_cluster
from conftest import REPO, SMALL, copy_prepared, free_port, kill_processes_matching, naming, on_gcs_port, processes_matching

# slow: starts SLURM daemons and trains on a two-node Ray cluster; one xdist worker runs every SLURM test (the
# jobs' Ray heads take a fixed port, LLMREC_RAY_PORT=6399)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

STEPS = 40
ARGS = [*SMALL, f"train.max_steps={STEPS}", "train.checkpoint_every=4", "train.log_every=2", "eval.max_samples=8",
        "eval.batch_size=8", "train.sample_log=true"]


@pytest.fixture(scope="module")
def slurm2():
    yield from slurm_cluster.running("slurm2", fake_nodes=["n1", "n2"], cpus=1)


def _start_bystander(tmp_path):
    """`ray start --head` of this user beside the job (as another job's on a shared node): its temp folder and
    GCS port (the head's Ray client server names only the port)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    r = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
                        "--include-dashboard=false", "--dashboard-agent-listen-port=0", f"--temp-dir={temp}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return temp, port


def _outsider_joins(head: str, env: dict, timeout: float = 120) -> tuple[bool, str]:
    """ray.init from a client with `env` against the job's head: (whether it joined, what it printed). It is
    stopped as soon as the cluster's refusal is printed: Ray's client retries after an InvalidAuthToken, and
    once the job's run ends (the cluster with it) it would wait for a GCS that is gone."""
    with tempfile.TemporaryFile("w+") as err:
        c = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address='{head}'); print('JOINED')"],
                             env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.time() + timeout
        while c.poll() is None and time.time() < deadline:
            err.seek(0)
            if "InvalidAuthToken" in err.read():
                break
            time.sleep(0.2)
        if c.poll() is None:
            c.kill()
        stdout = c.communicate()[0]
        err.seek(0)
        return "JOINED" in stdout, err.read()


def _hold_port(port: int):
    """A socket listening on 127.0.0.1:port, or None where something else already does."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


def _http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_two_node_job_admits_only_itself_and_requeued_onto_one_node_resumes_there(slurm2, trained_run, tmp_path, request):
    out, log = copy_prepared(trained_run, tmp_path / "run"), tmp_path / "job.out"  # the data build is not the subject
    slurm2.env.update(LLMREC_REPO=REPO, LLMREC_PYTHON=sys.executable,
                      LLMREC_RAY=shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray"),
                      LLMREC_RAY_PORT="6399")
    bystander, bystander_port = _start_bystander(tmp_path)  # this user's Ray cluster of another job, on the same machine
    request.addfinalizer(lambda: kill_processes_matching(naming(bystander)))
    request.addfinalizer(lambda: kill_processes_matching(on_gcs_port(bystander_port)))
    taken = _hold_port(8265)  # Ray's dashboard port, as another job's (or test's) Ray holds it: the head moves on
    request.addfinalizer(lambda: taken and taken.close())
    r = slurm2.run("sbatch", "--parsable", "--nodes=1-2", "--cpus-per-task=1", f"--output={log}",
                   f"--chdir={REPO}", os.path.join(REPO, "launch", "slurm", "train_multinode.sbatch"),
                   "configs/llara_default.yaml", str(out), *ARGS, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    t0 = time.time()

    def wait_for(what):
        while not (log.exists() and what in log.read_text()):
            assert slurm2.job_state(job)[0] not in done and time.time() - t0 < 900, log.read_text()[-3000:] if log.exists() else ""
            time.sleep(0.5)

    # a requeue onto fewer nodes: once the 2-node run trains, n2 is drained (its node lost) and the job requeued
    wait_for("Ray nodes alive: 2 of 2")
    first_token = re.search(r"a new token for this job in (\S+),", log.read_text()).group(1)
    metrics = out / "logs" / "metrics.jsonl"
    while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
        assert slurm2.job_state(job)[0] not in done and time.time() - t0 < 900, log.read_text()[-3000:]
        time.sleep(0.5)
    assert slurm2.run("scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=resize-test").returncode == 0
    try:
        # the time limit's warning (#SBATCH --signal=B:USR1@60) to the batch shell: training checkpoints the
        # step in flight while Ray still runs, exits 75, and the script requeues the job
        assert slurm2.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
        wait_for(f"job {job} restart 1: Ray head on n1")
        wait_for("Ray nodes alive: 1 of 1")
        # the restarted run's cluster admits only the job: outsiders are refused while it trains
        text = log.read_text().split(f"job {job} restart 1:")[1]
        head = re.search(r"Ray head on n1 \(([\d.]+:\d+)\)", text).group(1)
        token_file = re.findall(r"a new token for this job in (\S+),", log.read_text())[1]  # restart 1's
        token = open(token_file).read().strip()
        assert token_file != first_token and len(token) >= 32 and os.stat(token_file).st_mode & 0o077 == 0
        outsiders = {"no token": {"RAY_AUTH_MODE": "disabled"}, "another token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}
        for name, auth in outsiders.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
            joined, refusal = _outsider_joins(head, dict(env, **auth))
            assert not joined and "InvalidAuthToken" in refusal, (name, refusal[-2000:])
        # and its dashboard (on the head's loopback, for Ray Train's state queries) wants the token too
        dashboard = "http://" + re.search(r"Ray dashboard on n1 at (127\.0\.0\.1:\d+)", text).group(1)
        assert _http_status(dashboard + "/api/jobs/") == 401
        assert _http_status(dashboard + "/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
        while slurm2.job_state(job)[0] not in done:
            assert time.time() - t0 < 1500, "job did not finish in 25 minutes:\n" + (log.read_text()[-3000:] if log.exists() else "")
            time.sleep(2)
    finally:
        slurm2.run("scontrol", "update", "NodeName=n2", "State=RESUME")
    text = log.read_text()
    assert slurm2.job_state(job) == ("COMPLETED", 1), text[-4000:]
    # Ray down: the job's own processes ended, the other cluster of the same user untouched (no `ray stop`)
    deadline = time.time() + 60
    while processes_matching(on_gcs_port(6399)) and time.time() < deadline:
        time.sleep(1)
    assert not processes_matching(on_gcs_port(6399)), [p.info["cmdline"][:2] for p in processes_matching(on_gcs_port(6399))]
    assert any("gcs_server" in " ".join(p.info["cmdline"] or []) for p in processes_matching(naming(bystander))), "the other cluster was stopped"
    assert not os.path.exists(token_file) and not os.path.exists(first_token) and token not in text  # removed, never logged
    assert "Ray head on n1" in text and "2 nodes" in text and "Ray nodes alive: 2 of 2" in text, text[-4000:]
    # Ray Train's PlacementGroupCleaner reached the head's dashboard: no warning a second, no wait at the end
    assert "Failed to query Ray Train Controller" not in text and "Failed to stop PlacementGroupCleaner" not in text
    nodes = dict(re.findall(r"rank (\d) of 2 on Ray node (\w+)", text))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], text[-4000:]  # one training worker per node
    # the restart: one node, one worker, the 2-worker checkpoint resumed on it
    assert "job " + job + " restart 1: Ray head on n1" in text and "1 nodes" in text and "Ray nodes alive: 1 of 1" in text
    resized = re.search(r"resize at step (\d+): 2 -> 1 workers; global batch 16 = micro 8 x accumulation 2 x 1 workers", text)
    assert resized, text[-4000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    at = int(resized.group(1))
    assert 2 <= at < STEPS / 2, at  # most of the run on the one node left
    assert "received USR1" in text and f"stopped on request after checkpoint step_{at:06d}" in text  # resumed there
    assert [r["world_size"] for r in records] == [2] * at + [1] * (STEPS - at)
    keys = [k for name in os.listdir(out / "logs" / "samples")
            for line in open(out / "logs" / "samples" / name) for k in json.loads(line)["keys"]]
    assert len(keys) == len(set(keys)) == STEPS * 16  # within the epoch: each sample once across the requeue
    assert (out / "export" / "projector.safetensors").exists()


@pytest.mark.parametrize("cause", ["the head's port is taken", "ray cannot start"])
def test_a_cluster_that_cannot_form_ends_the_job_at_once_saying_why(slurm2, tmp_path, cause):
    """Another program (another job's Ray) listens on the head's port: the job stops before starting Ray,
    naming the port and LLMREC_RAY_PORT. A Ray step that ends before the nodes joined (here `ray` is
    /bin/false): the job stops, naming the node. Either within seconds, with exit 1, instead of waiting."""
    import socket

    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    log = tmp_path / "job.out"
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    slurm2.env.update(LLMREC_REPO=REPO, LLMREC_PYTHON=sys.executable, LLMREC_RAY_PORT=str(port if "port" in cause else free_port()),
                      LLMREC_RAY=ray if "port" in cause else shutil.which("false"))
    try:
        r = slurm2.run("sbatch", "--parsable", "--nodes=1", "--cpus-per-task=1", f"--output={log}", f"--chdir={REPO}",
                       os.path.join(REPO, "launch", "slurm", "train_multinode.sbatch"), "configs/llara_default.yaml",
                       str(tmp_path / "run"), *ARGS, cwd=REPO)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        t0 = time.time()
        while slurm2.job_state(job)[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.time() - t0 < 120, "the job still runs after 120 s:\n" + (log.read_text()[-3000:] if log.exists() else "")
            time.sleep(0.5)
    finally:
        holder.close()
    text = log.read_text()
    assert slurm2.job_state(job)[0] == "FAILED", text[-3000:]
    if "port" in cause:
        assert f"error: port {port} on n1" in text and "LLMREC_RAY_PORT" in text, text[-3000:]
    else:
        assert "error: the Ray head on n1 ended before the nodes joined" in text, text[-3000:]
    assert "Ray nodes alive" not in text and not (tmp_path / "run" / "logs").exists()
