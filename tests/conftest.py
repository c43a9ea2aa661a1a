import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SMALL = ["data.synthetic.num_users=120", "data.synthetic.num_items=120", "srec.epochs=3", "data.samples_per_shard=300"]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A prepared run folder (tokenizer, tiny Llama, shards, SASRec) on a small synthetic set, made once per
    pytest run (the other xdist worker waits on the lock, then prepare() finds it made). Tests only read it."""
    from filelock import FileLock

    from configs.schema import load_config
    from trainer.data.prepare import prepare

    root = run_wide_dir(tmp_path_factory)
    with FileLock(str(root / "small_run.lock")):
        cfg = load_config(None, [f"output_dir={root / 'small_run'}", *SMALL])
        return cfg, prepare(cfg)


# One trained run shared by the tests that need one (test_eval, test_resume's reference): 24 steps,
# 2 Ray workers, ZeRO-3, checkpoints every 6 steps, evaluation of the first 16 test samples.
TRAINED_STEPS = 24
TRAINED_ARGS = [*SMALL, "train.num_workers=2", "train.zero_stage=3", f"train.max_steps={TRAINED_STEPS}",
                "train.checkpoint_every=6", "train.log_every=3", "eval.max_samples=16", "eval.batch_size=8",
                "train.max_failures=1"]


def run_wide_dir(tmp_path_factory):
    """A folder every process of this pytest run shares: under pytest-xdist (`-n 2`, README's command) each
    worker has a base temp of its own inside the run's; without it, the base temp itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Made once per pytest run: the first xdist worker that needs it trains, the other waits on the lock.
    Tests read it or copy from it; launch/eval.py's outputs (test_eval) are the only files added to it."""
    from filelock import FileLock

    root = run_wide_dir(tmp_path_factory)
    out = root / "trained" / "run"
    with FileLock(str(root / "trained.lock")):
        if not (out.parent / "train.stdout").exists():
            out.parent.mkdir(exist_ok=True)
            r = subprocess.run([sys.executable, "launch/train.py", f"output_dir={out}", *TRAINED_ARGS], cwd=REPO,
                               capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, r.stderr[-4000:]
            (out.parent / "train.stderr").write_text(r.stderr)  # for tests/test_e2e.py: what the user saw
            (out.parent / "train.stdout").write_text(r.stdout)  # last: its presence says the run succeeded
    return out


def copy_prepared(run, out):
    """A new output folder with `run`'s data and assets (shards, tokenizer, tiny Llama, SRec and the stamp
    they were made under): launch/train.py with the same data, model and SRec config reuses them instead of
    building the shards and pretraining the SRec again (~30-50 s a run here). For tests whose subject is
    what happens after that (kills, resume, the schedulers); the data build itself is tested from scratch
    by trained_run, test_e2e and tests/test_shards.py."""
    import shutil

    os.makedirs(out, exist_ok=True)
    for name in ("assets", "data"):
        shutil.copytree(os.path.join(run, name), os.path.join(out, name))
    return out


def pytest_collection_modifyitems(items):
    """Tests that need a Ray training are slow (pytest.ini): every test using `trained_run`, directly or
    through another fixture. Other slow tests carry @pytest.mark.slow or a module-level `pytestmark`."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    # slow tests first (a stable sort): with `-n 2` the long ones start early and the short ones fill the
    # gaps at the end, instead of one worker finishing a long test alone
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def wait_for_step(out, step, proc, timeout=600):
    """Wait until the run in `out` (launch/train.py in `proc`) has logged optimizer step `step`."""
    path = os.path.join(out, "logs", "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before the step was reached"
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(step)


@contextlib.contextmanager
def ray_as_the_product_starts_it(address: str | None = None, num_cpus: int = 2, object_store_mb: int = 256):
    """Ray in this test process as launch/*.py start it (trainer/job/ray_cluster.py connect): a local cluster of
    its own, or `address`, with the project's runtime env, whose worker setup hook points every worker
    process (Ray Train's controller and placement-group cleaner included) at its own cluster: a test cluster
    beside another test's cannot be reached by it. Token authentication off, as for ray.cluster_utils'
    clusters (the product's token is tested in test_ray_auth.py); the environment is restored afterwards."""
    import ray

    from trainer.job.ray_cluster import connect

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    try:
        connect(address, num_cpus, object_store_mb, use_gpu=False, auth="disabled")
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from ray._raylet import Config

        Config.initialize("")  # Ray's cached config follows the restored environment


def free_port() -> int:
    """A TCP port nothing listens on now (for a daemon a test starts; another may take it before it does)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naming(text: str):
    """A command-line part that contains `text` (a Ray cluster's temp folder)."""
    return lambda part: text in part


def on_gcs_port(port: int):
    """A command-line part that names the GCS at `port`: a GCS's own --gcs_server_port, or an address
    ending in :port (raylets, the head's Ray client server, whose command lines name nothing else of theirs)."""
    return lambda part: part.endswith(f":{port}") or part == f"--gcs_server_port={port}"


def processes_matching(match) -> list:
    """The live processes with a command-line part for which `match` holds (naming, on_gcs_port)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(match(part) for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def kill_processes_matching(match) -> None:
    """SIGKILL processes_matching(match) and their descendants: a Ray cluster a test started (`ray stop`
    would stop every Ray cluster of this user on the machine, other tests' too)."""
    import psutil

    procs = {}
    for p in processes_matching(match):
        try:
            for q in [p, *p.children(recursive=True)]:
                procs[q.pid] = q
        except psutil.NoSuchProcess:
            pass
    for q in procs.values():
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=30)


def ray_logs(text: str, chars: int = 1500) -> str:
    """The tails of gcs_server.out and raylet.out of the local Ray cluster a run started (its log names the
    folder: "Ray's logs for this cluster: ..."), for an assertion message when Ray itself failed."""
    import re

    found = re.findall(r"Ray's logs for this cluster: (\S+)", text)
    tails = []
    for name in ("gcs_server.out", "raylet.out"):
        path = os.path.join(found[-1], name) if found else ""
        if os.path.isfile(path):
            tails.append(f"--- {path}\n" + open(path, errors="replace").read()[-chars:])
    return "\n".join(tails)


def sigterm_at_step(cmd: list[str], out, step: int) -> str:
    """Run launch/train.py (`cmd`, writing to `out`) until `step` is logged, then SIGTERM worker 0: the
    step in flight is finished and checkpointed and the driver exits 75 (asserted). Returns its output."""
    import signal

    proc, log_path = start_logged(cmd, out)
    try:
        wait_for_step(out, step, proc)
        os.kill(int((out / "logs" / "worker_0.pid").read_text()), signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 75, log[-4000:]
    return log


def start_logged(cmd: list[str], out):
    """Popen of `cmd` with stdout and stderr in a file beside `out` (a pipe that nobody reads while the
    test waits would fill and stop the run): (process, the log's path)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
    with open(log_path, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True), log_path


# ---- processes the suite leaves behind (issue: a SLURM test cluster's slurmd outlived its test and joined the
# next test's cluster). Listed at the end of the run by the controlling process; none is the aim.

SUITE_DAEMONS = ("slurmctld", "slurmd", "munged", "gcs_server", "raylet")


def _suite_daemons() -> dict:
    """{pid: command} of the live SLURM, munge and Ray daemons on this machine."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or not cmdline:
            continue
        if os.path.basename(cmdline[0]) in SUITE_DAEMONS:
            found[p.pid] = " ".join(cmdline)[:160]
    return found


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controlling process (or a run without xdist)
        config.daemons_before = _suite_daemons()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput") or not hasattr(config, "daemons_before"):
        return
    deadline = time.time() + 20  # daemons told to stop may take a moment to go
    while True:
        left = {pid: cmd for pid, cmd in _suite_daemons().items() if pid not in config.daemons_before}
        if not left or time.time() > deadline:
            break
        time.sleep(1)
    terminalreporter.write_line(f"SLURM, munge and Ray daemons left by the suite: {len(left)}")
    for pid, cmd in sorted(left.items()):
        terminalreporter.write_line(f"  pid {pid}: {cmd}")


def synthetic(**settings):
    """The default data.synthetic section (configs/llara_default.yaml) with `settings` over it, unchecked
    (shards/synthetic.py's own checks then speak)."""
    from omegaconf import OmegaConf

    from configs.schema import DEFAULT

    return OmegaConf.merge(OmegaConf.load(DEFAULT).data.synthetic, settings)


def srec_section(**settings):
    """The default srec section (configs/llara_default.yaml) with `settings` over it, unchecked
    (trainer/model/srec/pretrain.py's own checks then speak)."""
    from omegaconf import OmegaConf

    from configs.schema import DEFAULT

    return OmegaConf.merge(OmegaConf.load(DEFAULT).srec, settings)
