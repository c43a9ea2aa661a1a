"""Graceful stops: a signal asks the run to finish its current optimizer step, checkpoint and exit.

- The driver (launch/train.py) handles SIGTERM and SIGUSR1 by writing <output_dir>/STOP.
- Each Ray worker process handles SIGUSR1 and SIGTERM itself, installed at process start by Ray's
  `worker_process_setup_hook` (the only place a worker's main thread runs our code). Ray installs
  its own SIGTERM handler (it exits the worker) after that hook, through
  `ray._private.utils.set_sigterm_handler`; the hook wraps that function so that while a training
  loop runs, the first SIGTERM asks for a stop like SIGUSR1, and a second SIGTERM, or one outside
  training, goes to Ray's handler. If a Ray version lacks that function, SIGTERM to a worker stays
  Ray's (the worker ends; the run restarts from the newest checkpoint and resumes exactly).
- At every optimizer-step boundary the ranks agree (all_reduce MAX) on whether any of them saw a
  request, so they stop at the same step.
A stopped run writes <output_dir>/PREEMPTED and the driver exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written; run the same command again to resume
STOP_FILE = "STOP"
PREEMPTED_FILE = "PREEMPTED"
_requested = {"signal": None, "training": False}


def _on_signal(signum, frame):
    _requested["signal"] = signum


def training(active: bool) -> None:
    """Mark this worker process as inside the training loop (SIGTERM then asks for a graceful stop)."""
    _requested["training"] = active


def install_worker_handlers() -> None:
    """Run in each Ray worker process's main thread at start (trainer.job.ray_cluster.on_worker_process_start,
    Ray's worker_process_setup_hook)."""
    signal.signal(signal.SIGUSR1, _on_signal)
    try:
        import ray._private.utils as ray_utils  # lazy: only where a cluster is used

        ray_set = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):
        return

    def set_sigterm_handler(ray_handler):
        def handler(signum, frame):
            if _requested["training"] and _requested["signal"] is None:
                _requested["signal"] = signum  # finish the step, checkpoint, stop
            else:
                ray_handler(signum, frame)

        ray_set(handler)

    ray_utils.set_sigterm_handler = set_sigterm_handler


def requested(output_dir: str) -> bool:
    return _requested["signal"] is not None or os.path.exists(os.path.join(output_dir, STOP_FILE))


def install_driver_handlers(output_dir: str) -> None:
    def handler(signum, frame):
        _requested["signal"] = signum
        with open(os.path.join(output_dir, STOP_FILE), "w") as f:
            f.write(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, handler)


def clear(output_dir: str) -> None:
    for name in (STOP_FILE, PREEMPTED_FILE):
        try:
            os.remove(os.path.join(output_dir, name))
        except FileNotFoundError:
            pass
