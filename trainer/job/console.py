"""Console lines that read as failures but are not about the user's run, and what removes them.

    quiet_known_noise()      # in the driver (before the first Ray Train job) and first thing on every worker
    keep_own_lines_whole()   # first thing in a driver: before Ray is imported

Each entry below names the library call behind the line and why our code cannot avoid it otherwise.
The filters are as narrow as the warnings module allows (message, category and the module that
warns); anything else, from the same libraries too, still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# transformers 5 renamed PreTrainedModel.is_gradient_checkpointing to is_activation_checkpointing and
# warns (FutureWarning, from transformers.modeling_utils) whenever the old name is read
GRADIENT_CHECKPOINTING_WARNING = "`is_gradient_checkpointing` is deprecated"
GRADIENT_CHECKPOINTING_MODULE = "transformers.modeling_utils"

# Ray Train's switch for its PreemptionWatcher actor (ray.train.v2._internal.constants)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# Ray Train 2.60's loggers that print a worker's exception with its traceback: the worker's "Error in
# training function:" and the controller's "[FailurePolicy] RAISE/RETRY ... Error: ..."
RAY_TRACEBACK_LOGGERS = ("ray.train.v2._internal.util", "ray.train.v2._internal.execution.failure_handling.default")
FATAL_ERROR_NAME = "WorkerFatalError"  # trainer/job/failures.py

# The project's own lines, as its logging writes them ("<date> <time> trainer.x: ..."), and the token
# Ray's own default never folds (ray._private.ray_constants)
OWN_LINES = r"^\S+ \S+ (trainer|launch|shards)[\w.]*: |__ray_testing_never_deduplicate__"


def keep_own_lines_whole() -> None:
    """Ray's driver holds back a worker's line that differs from another worker's only in words with
    digits ("rank 1 of 2 on Ray node 5e1f.. (n2)") and prints it 5 s later, or never if the driver
    ends first (seen: a 2-node SLURM job's rank-1 line lost). The project's lines say which worker and
    node did what, so they pass whole; Ray's own repeated lines are still folded. Ray reads
    RAY_DEDUP_LOGS_ALLOW_REGEX when it is imported, so this runs first in a driver; a value the user
    set is kept."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", OWN_LINES)


class _DropFatalTracebacks(logging.Filter):
    """Drops a record about a WorkerFatalError: its one line reaches the driver, which prints it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += type(record.exc_info[1]).__name__ + str(record.exc_info[1])
        return FATAL_ERROR_NAME not in text


def quiet_known_noise() -> None:
    """Drop the known noise of the stack in this process; call it once, before models are built and
    before TorchTrainer.fit(). Calling it again does no harm."""
    # 1. "FutureWarning: `is_gradient_checkpointing` is deprecated ... Use `is_activation_checkpointing`",
    #    once per process that builds the LoRA model (every worker). Not our call: peft 0.21.2's
    #    PeftModel.__init__ (reached by get_peft_model and PeftModel.from_pretrained) runs
    #    `getattr(model, "is_gradient_checkpointing", True)` on the base model. Our code never reads the
    #    property and has no other way into peft; remove this once peft reads the new name.
    warnings.filterwarnings("ignore", message=re.escape(GRADIENT_CHECKPOINTING_WARNING), category=FutureWarning,
                            module=re.escape(GRADIENT_CHECKPOINTING_MODULE) + r"\Z")
    # 2. "(TrainController) ... E ... core_worker.cc: Actor with class name: 'PreemptionWatcher' ... has
    #    constructor arguments in the object store and max_restarts > 0", once per run. Ray Train 2.60
    #    starts a PreemptionWatcher actor (max_restarts=-1) for each worker group and hands it the
    #    workers' actor handles; Ray's core worker logs that ERROR for any restartable actor whose
    #    arguments hold references other than detached actors' (ray-project/ray#53727), here a false
    #    alarm, written to the controller's stderr and forwarded to the driver (log_to_driver). The
    #    watcher turns a node-drain notice into ray.train.get_preemption_info() on the workers and a
    #    grace window in the controller before the restart; this trainer reads no drain notice (it
    #    checkpoints on SIGTERM/SIGUSR1, trainer/job/signals.py), and without the watcher a drained node's
    #    workers still die and Ray Train restarts them from the last reported checkpoint. So it is not
    #    started: one actor process less, and no error line. Ray reads the switch in the driver at
    #    fit() and passes it on to the controller; RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 brings it back.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # 3. A worker's error that no restart can fix (trainer/job/failures.py WorkerFatalError) printed with its
    #    traceback by Ray Train, once by the worker and once by the controller, each forwarded to the
    #    driver; the driver prints the error's one line itself, and the whole traceback is in the file the
    #    line names (trainer/job/ray_cluster.py). Only records about WorkerFatalError are dropped; a failure a
    #    restart may fix still shows Ray's lines.
    for name in RAY_TRACEBACK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFatalTracebacks) for f in logger.filters):
            logger.addFilter(_DropFatalTracebacks())
