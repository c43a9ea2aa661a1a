"""Which failures of a job's workers a restart can fix, and which end the run at once.

    with fatal_errors():            # around a job's function on each worker (trainer/train_loop.py)
        ...                         # an error no restart can fix leaves as WorkerFatalError (one line)
    fatal_error_of(training_failed) # on the driver (trainer/job/ray_cluster.py): that line, or None

Ray Train's FailureConfig restarts the whole worker group after any failure. That is right for a lost
worker (a preempted node, a SIGKILL, an out-of-memory kill: the actor dies) and for the collateral errors
of the ranks that were talking to it (gloo or NCCL errors, connection resets), but not for an error the
same workers would meet again: a config DeepSpeed refuses, a corrupt file, a full disk. Retrying those
reloads the base (minutes for a 7B) and prints the same traceback max_failures + 1 times. So on the
workers such an error becomes WorkerFatalError, whose message is one line saying what, where and on
which rank, and the driver ends the run with it without a retry.

Fatal: the error types below (raised by our checks, the file readers, DeepSpeed's assertions, safetensors,
an out-of-memory error of the GPU's allocator) and OSErrors of the file system whose cause stays (no space,
read-only, permission, missing file). Not fatal, so retried: everything else, in particular RuntimeError,
torch.distributed's errors and connection errors (a peer died), and anything a dying actor brings
(RayActorError, on the driver).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import traceback

FATAL_TYPES = (ValueError, TypeError, KeyError, IndexError, AssertionError, NotImplementedError, ImportError)
FATAL_OS_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
FATAL_TYPE_NAMES = {"SafetensorError",  # a cut-short or damaged weight file
                    "OutOfMemoryError"}  # torch's (CUDA): the same batch at the same step needs the same memory
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR,
                errno.ENOTDIR, errno.EFBIG, errno.ENAMETOOLONG}


class Unrecoverable(Exception):
    """Mixed into this project's own errors that no restart can fix but whose type says otherwise
    (trainer/data/loader.py CorruptShard is a RuntimeError, as callers catch it)."""


class WorkerFatalError(Exception):
    """An error no restart of the workers can fix; its message is the one line the user sees."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # Ray sends it to the driver pickled
        return (self.__class__, (self.message,))


def _is_distributed(e: BaseException) -> bool:
    """torch.distributed's own errors (a peer that died or hung): a restart can fix them."""
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed
        return False
    return isinstance(e, DistError)


def is_fatal(e: BaseException) -> bool:
    """Whether the same workers would meet `e` again after a restart (module docstring)."""
    if isinstance(e, (WorkerFatalError, Unrecoverable)):
        return True
    if _is_distributed(e) or isinstance(e, (ConnectionError, TimeoutError)):
        return False
    if type(e).__name__ in FATAL_TYPE_NAMES:
        return True
    if isinstance(e, OSError):
        return e.errno in FATAL_ERRNOS or isinstance(e, FATAL_OS_TYPES)
    return isinstance(e, FATAL_TYPES)


def one_line(e: BaseException) -> str:
    """The exception's type and message on one line (DeepSpeed's bare asserts say where they were raised)."""
    text = " ".join(str(e).split())
    if not text:
        frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        text = f"raised at {frame.filename}:{frame.lineno} in {frame.name}" if frame else "(no message)"
    return f"{type(e).__name__}: {text}"


def _rank() -> str:
    """This worker's rank in its Ray Train job (else the environment's RANK, else '?')."""
    try:
        import ray.train

        return str(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - outside a Ray Train worker
        return os.environ.get("RANK", "?")


@contextlib.contextmanager
def fatal_errors(traceback_dir: str | None = None):
    """Turn an error no restart can fix into WorkerFatalError, a line without its traceback (Ray would print
    that on every worker); the whole traceback is written to traceback_dir/failure-rank<r>.txt when given."""
    try:
        yield
    except WorkerFatalError:
        raise
    except Exception as e:
        if not is_fatal(e):
            raise
        rank = _rank()
        message = f"{one_line(e)} (rank {rank} on {socket.gethostname()}"
        if traceback_dir:
            path = os.path.join(traceback_dir, f"failure-rank{rank}.txt")
            try:
                os.makedirs(traceback_dir, exist_ok=True)
                with open(path, "w") as f:
                    f.write("".join(traceback.format_exception(e)))
                message += f"; traceback: {path}"
            except OSError:  # a full disk may be the error itself: the line goes without the file
                pass
        raise WorkerFatalError(message + ")") from None


def fatal_error_of(failure: BaseException) -> str | None:
    """The message of the first WorkerFatalError among a failed Ray Train run's worker errors, or None."""
    if isinstance(failure, WorkerFatalError):
        return failure.message
    errors = getattr(failure, "worker_failures", None) or {}
    for rank in sorted(errors):
        error = errors[rank]
        if isinstance(error, WorkerFatalError):
            return error.message
    return None
