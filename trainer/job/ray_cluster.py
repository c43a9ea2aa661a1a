"""The one place that starts or joins Ray and runs a function on Ray Train workers.

    connect(address, num_cpus, object_store_mb, use_gpu, auth)     # launch/train.py, launch/eval.py
    run_on_workers(fn, config, workers, cpus_per_worker, use_gpu, storage_path, name, ...)

Every job (training, evaluation, SUBR's item embeddings) goes through these two, so every worker
process gets the same setup (on_worker_process_start, Ray's worker_process_setup_hook): the SIGUSR1/SIGTERM
handlers (trainer/job/signals.py), RAY_ADDRESS naming its own cluster; and DeepSpeed's CPU accelerator on CPU
runs, OMP_WAIT_POLICY passed on, and the worker-side console filter (trainer/job/console.py).

Authentication (ray.auth): every cluster this module starts or joins uses Ray's token authentication
(RAY_AUTH_MODE=token) unless ray.auth=disabled, which is unsafe on a shared network: a Ray cluster
without it runs any code that any client reaching its ports sends, as this user. The token comes from
where Ray looks for it: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (the multi-node sbatch
script makes one per job), else ~/.ray/auth_token, which a local cluster creates (readable by this user
only) when it is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import stat
import time
import torch
import warnings

from trainer.job.console import quiet_known_noise
from trainer.job.failures import fatal_error_of, fatal_errors
from trainer.job.signals import install_worker_handlers

log = logging.getLogger(__name__)


def worker_runtime_env(use_gpu: bool) -> dict:
    """What every Ray worker process starts with."""
    env_vars = {}
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("OMP_WAIT_POLICY"):  # a 2-core box needs PASSIVE (../shared/notes/cpu-stack.md)
        env_vars["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    return {"worker_process_setup_hook": "trainer.job.ray_cluster.on_worker_process_start", "env_vars": env_vars}


def on_worker_process_start() -> None:
    """Ray's worker_process_setup_hook: runs first in every worker process of the job (Ray Train's
    controller and its helper actors included).

    RAY_ADDRESS is set to the cluster the process belongs to. Ray Train 2.60's PlacementGroupCleaner actor
    asks Ray's state API every second whether the run's controller is alive, and that API, without an
    address, takes the cluster named in /tmp/ray/ray_current_cluster (the last `ray start` on the machine:
    another job's or user's cluster, or one that is gone), else any GCS process it finds. Measured here with
    another cluster on the machine: a "Found multiple active Ray instances ... Connecting to latest cluster"
    line every second, the cleaner asking the other cluster, finding no such controller and ending itself
    (had the run's placement group been registered by then, it would have removed it: the workers with it);
    with a stale file, 40-s timeouts and a 12-s wait with a traceback at the end of every run."""
    import ray  # lazy: only where a cluster is used

    quiet_known_noise()  # the controller's lines too
    install_worker_handlers()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def default_token_file() -> str:
    """Where Ray reads its token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def _private_file(path: str) -> None:
    """A token file anyone but its owner can read is tightened to 0600 (Ray writes its own with the umask)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("Ray token file %s was readable by others (mode %o): now 0600", path, mode)


def token_source(starting: bool, address: str | None = None) -> str:
    """Make sure Ray finds a token and say where it is. Starting a local cluster without any token
    creates ~/.ray/auth_token (0600); joining one without a token is an error that says what to export."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or default_token_file()
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        _private_file(path)
        return path
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={path}: no token there (missing or empty file)")
    if not starting:
        raise ValueError(f"ray.auth=token: no Ray token to join the cluster at {address}: export RAY_AUTH_TOKEN_PATH="
                         f"<that cluster's token file> (the multi-node sbatch script makes one per job) or put the "
                         f"token in {path}; a cluster started without authentication needs ray.auth=disabled "
                         f"(unsafe on a shared network)")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    made = f"{path}.{os.getpid()}.tmp"  # written whole, then linked in: a reader never sees a half-written token
    descriptor = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(made, path)  # fails if another process starting a cluster at the same moment made one first
        log.info("made a Ray token for this user's clusters: %s (readable by you only)", path)
    except FileExistsError:
        log.info("Ray token: %s (made by another process starting a cluster at the same time)", path)
    finally:
        os.unlink(made)
    return path


def set_auth_mode(auth: str, starting: bool, address: str | None = None) -> None:
    """RAY_AUTH_MODE for this process and every Ray process it starts, from ray.auth ("token" or
    "disabled"); with "token", a token Ray will find (token_source)."""
    previous = os.environ.get("RAY_AUTH_MODE")
    if previous and previous != auth:
        log.warning("RAY_AUTH_MODE=%s in the environment replaced by ray.auth=%s", previous, auth)
    if auth == "disabled":
        log.warning("Ray token authentication is OFF (ray.auth=disabled): any client that reaches this cluster's "
                    "ports can run code as you. Unsafe on a shared network.")
    else:
        log.info("Ray token authentication on; token: %s", token_source(starting, address))
    os.environ["RAY_AUTH_MODE"] = auth
    # Ray caches its config (the auth mode in it) at import: read it again, as Ray's own code does when it
    # turns token mode on for a new local cluster (ray._private.authentication, Ray 2.60)
    from ray._raylet import Config  # lazy: only where a cluster is used

    Config.initialize("")


def connect(address: str | None, num_cpus: int, object_store_mb: int, use_gpu: bool, auth: str = "token") -> None:
    """Join the cluster at `address` (else RAY_ADDRESS, as `ray job submit` sets it) or start a local
    one with `num_cpus` CPUs and an object store of `object_store_mb`, with Ray's token authentication
    unless auth="disabled" (module docstring). A second call does nothing."""
    import ray  # lazy: only where a cluster is used

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    set_auth_mode(auth, starting=not address, address=address)
    env = worker_runtime_env(use_gpu)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env)
    else:
        log.info("starting a local Ray cluster with %d CPUs", num_cpus)
        # address="local": a cluster of our own even where another is running on this machine (`ray start`,
        # another job's, another user's). Without an address ray.init would join the newest one it finds in
        # /tmp/ray, and refuse num_cpus there
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, runtime_env=env)
        log.info("Ray's logs for this cluster: %s", _logs_dir())


def _logs_dir() -> str:
    """The started cluster's log folder (gcs_server.out, raylet.out, ...): where to look when Ray itself fails.
    Ray 2.60 has no public call for it."""
    try:
        from ray._private.worker import global_worker  # lazy: only where a cluster is used

        return global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API: a log line is not worth a failed start
        return "unknown (see Ray's temp folder, /tmp/ray by default)"


def run_on_workers(fn, config: dict, workers: int | tuple[int, int], cpus_per_worker: int, use_gpu: bool,
                   storage_path: str, name: str, max_failures: int = 0):
    """Run fn(config) on `workers` Ray Train workers (a GPU each with use_gpu) and wait for them.

    Failures (trainer/job/failures.py): an error no restart can fix (a config DeepSpeed refuses, a corrupt
    file, a full disk) ends the job at once with JobFailed, whose message is the worker's one line; any
    other failure (a lost worker or node, and the errors of the ranks that were talking to it) starts
    the workers again, up to max_failures times (-1: without limit), each resuming from the job's newest
    checkpoint. The restarts are made here, each a new Ray Train run, and not by Ray's FailureConfig,
    which cannot tell the two apart; Ray still waits out a preemption itself. workers=(min, max): Ray
    Train's elastic mode, as many as the cluster has room for in that range, fewer after a lost node,
    more again when room appears. Ray Train keeps its run state in storage_path/name-<time>-<pid>, a
    folder of its own per run: no job's state, nor Ray's bookkeeping of checkpoints, is ever read back
    by another. The jobs keep their checkpoints themselves (trainer/job/checkpoint.py). Ray must be
    connected (connect)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError  # lazy: only where a cluster is used
    from ray.train.torch import TorchTrainer  # lazy: only where a cluster is used

    quiet_known_noise()  # before fit(): Ray Train reads its switches in the driver

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    restarts = 0
    while True:
        trainer = TorchTrainer(
            train_loop_per_worker=functools.partial(_guarded, fn, os.path.abspath(storage_path), use_gpu, cpus_per_worker),
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(storage_path=os.path.abspath(storage_path),
                                 name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{restarts}",
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            return trainer.fit()
        except TrainingFailedError as e:
            fatal = fatal_error_of(e)
            if fatal is not None:
                raise JobFailed(fatal) from None
            restarts += 1
            if max_failures != -1 and restarts > max_failures:
                raise
            log.warning("the %s workers failed (%s): starting them again from the newest checkpoint, restart %d of %s",
                        name, " ".join(str(e).split())[:300], restarts, "unlimited" if max_failures == -1 else max_failures)


class JobFailed(RuntimeError):
    """A job's workers met an error that no restart can fix; the message is the one line to show."""


def _guarded(fn, traceback_dir: str, use_gpu: bool, threads: int, config):
    """What each worker runs: the process set up (setup_worker_process), then fn, with the errors no restart
    can fix made WorkerFatalError, whose one line names the file its whole traceback went to
    (traceback_dir/failure-rank<r>.txt)."""
    setup_worker_process(use_gpu, threads)
    with fatal_errors(traceback_dir):
        return fn(config)


def setup_worker_process(use_gpu: bool, threads: int) -> None:
    """The first thing each worker of a job does (run_on_workers): DeepSpeed's accelerator, torch's threads,
    and a console that shows the run's own lines (the libraries' info lines and known noise dropped)."""
    quiet_known_noise()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(threads)))
    # torch 2.13 warns on every gloo all_gather/reduce_scatter (../shared/notes/cpu-stack.md)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("ray", "ray.train", "deepspeed", "DeepSpeed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging  # lazy: heavy to import

    transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per worker and model load
    # some of Ray's loggers are named by their file's path (Ray Train's "Reporting training result ..."
    # line on every report), so no name above covers them: their info lines are dropped by where they come from
    import ray  # lazy: only where a cluster is used

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.pathname.startswith(ray_dir))
