"""The one place that starts or joins Ray and runs a function on Ray Train workers.

    connect(address, num_cpus, object_store_mb, use_gpu)     # launch/train.py, launch/eval.py
    run_on_workers(fn, config, workers, cpus_per_worker, use_gpu, storage_path, name, ...)

Every job (training, evaluation, SUBR's item embeddings) goes through these two, so every worker
process gets the same setup: the SIGUSR1/SIGTERM handlers (trainer/signals.py, installed by Ray's
worker_process_setup_hook), DeepSpeed's CPU accelerator on CPU runs, OMP_WAIT_POLICY passed on, and
the worker-side console filter (trainer/console.py).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def worker_runtime_env(use_gpu: bool) -> dict:
    """What every Ray worker process starts with."""
    env_vars = {}
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("OMP_WAIT_POLICY"):  # a 2-core box needs PASSIVE (../shared/notes/cpu-stack.md)
        env_vars["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    return {"worker_process_setup_hook": "trainer.signals.install_worker_handlers", "env_vars": env_vars}


def connect(address: str | None, num_cpus: int, object_store_mb: int, use_gpu: bool) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS, as `ray job submit` sets it) or start a local
    one with `num_cpus` CPUs and an object store of `object_store_mb`. A second call does nothing."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = worker_runtime_env(use_gpu)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env)
    else:
        log.info("starting a local Ray cluster with %d CPUs", num_cpus)
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, runtime_env=env)


def run_on_workers(fn, config: dict, workers: int, cpus_per_worker: int, use_gpu: bool, storage_path: str,
                   name: str, max_failures: int = 0):
    """Run fn(config) on `workers` Ray Train workers (a GPU each with use_gpu) and wait for them; Ray
    restarts them up to max_failures times (-1: without limit). Ray Train keeps its run state in
    storage_path/name, a folder of its own per call (name made unique with the time and this process):
    no job's state, nor Ray's bookkeeping of checkpoints, is ever read back by another. The jobs keep
    their checkpoints themselves (trainer/checkpoint.py). Ray must be connected (connect)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.console import quiet_known_noise

    quiet_known_noise()  # before fit(): Ray Train reads its switches in the driver

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=os.path.abspath(storage_path),
                             name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()


def setup_worker_process(use_gpu: bool, threads: int) -> None:
    """The first thing a job's function does on each worker: DeepSpeed's accelerator, torch's threads,
    and a console that shows the run's own lines (the libraries' info lines and known noise dropped)."""
    import warnings

    import torch

    from trainer.console import quiet_known_noise

    quiet_known_noise()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(threads)))
    # torch 2.13 warns on every gloo all_gather/reduce_scatter (../shared/notes/cpu-stack.md)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("ray", "ray.train", "deepspeed", "DeepSpeed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per worker and model load
    # some of Ray's loggers are named by their file's path (Ray Train's "Reporting training result ..."
    # line on every report), so no name above covers them: their info lines are dropped by where they come from
    import ray

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.pathname.startswith(ray_dir))
