"""Graceful stops: a signal asks the run to finish its current optimizer step, checkpoint and exit.

- The driver (launch/train.py) handles SIGTERM and SIGUSR1 by writing <output_dir>/STOP.
- Each Ray worker process handles SIGUSR1 itself (installed at process start by Ray's
  `worker_process_setup_hook`, the only place a worker's main thread runs our code). SIGTERM to a
  worker is Ray's: its own handler ends the worker; the run then restarts from the newest
  checkpoint (train.max_failures) and, resume being exact, ends where an uninterrupted run ends.
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
_requested = {"signal": None}


def _on_signal(signum, frame):
    _requested["signal"] = signum


def install_worker_handlers() -> None:
    """Ray's worker_process_setup_hook: runs in each worker process's main thread at start."""
    signal.signal(signal.SIGUSR1, _on_signal)


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
