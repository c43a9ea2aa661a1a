"""Which failures of the workers end a run at once (trainer/job/failures.py), and a full disk while
checkpointing on the real stack: one line naming the folder and the space a checkpoint needs, no restart."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed

from conftest import REPO, SMALL, copy_prepared
from trainer.job.checkpoint import NoSpaceForCheckpoint
from trainer.data.loader import CorruptShard
from trainer.job.failures import WorkerFatalError, fatal_error_of, fatal_errors, is_fatal


@pytest.mark.parametrize("error, fatal", [
    (ValueError("train.deepspeed: refused"), True),
    (AssertionError(), True),  # DeepSpeed's bare asserts (a dtype mix under ZeRO-3)
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EROFS, "Read-only file system"), True),
    (FileNotFoundError("model.safetensors"), True),
    (CorruptShard("shard train-00000.tar is truncated or corrupt"), True),
    (NoSpaceForCheckpoint("no space left"), True),
    (type("SafetensorError", (Exception,), {})("incomplete metadata"), True),
    (RuntimeError("something a restart may fix"), False),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),  # a peer died
    (torch.distributed.DistBackendError("gloo: connection closed by peer"), False),
    (TimeoutError("a collective timed out"), False),
])
def test_what_a_restart_cannot_fix(error, fatal):
    assert is_fatal(error) is fatal


def test_a_fatal_error_leaves_the_worker_as_one_line_with_its_traceback_in_a_file(tmp_path):
    def deep():
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_000003/x.pt")

    with pytest.raises(WorkerFatalError) as caught:
        with fatal_errors(str(tmp_path)):
            deep()
    message = caught.value.message
    assert "\n" not in message and message.startswith("OSError: [Errno 28] No space left on device")
    assert f"traceback: {tmp_path}/failure-rank" in message
    written = next(tmp_path.glob("failure-rank*.txt")).read_text()
    assert "in deep" in written and "No space left on device" in written
    assert caught.value.__cause__ is None  # what Ray prints is the line, not the chain
    with pytest.raises(RuntimeError, match="may fix"):  # anything else passes through as it was
        with fatal_errors(str(tmp_path)):
            raise RuntimeError("a restart may fix this")


def test_the_driver_finds_the_fatal_line_among_the_workers_errors():
    from ray.train import WorkerGroupError

    failure = WorkerGroupError("failed", {1: RuntimeError("connection closed"),
                                          0: WorkerFatalError("ValueError: bad (rank 0 on node-a)")})
    assert fatal_error_of(failure) == "ValueError: bad (rank 0 on node-a)"
    assert fatal_error_of(WorkerGroupError("failed", {0: RuntimeError("a lost peer")})) is None
    import pickle

    assert pickle.loads(pickle.dumps(WorkerFatalError("x"))).message == "x"  # Ray sends it pickled


def test_rays_tracebacks_of_a_fatal_error_are_dropped_and_others_kept():
    from trainer.job.console import RAY_TRACEBACK_LOGGERS, quiet_known_noise

    quiet_known_noise()
    logger = logging.getLogger(RAY_TRACEBACK_LOGGERS[0])
    fatal = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Error in training function:\n...\n"
                              "trainer.job.failures.WorkerFatalError: OSError: no space", None, None)
    other = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Error in training function:\n...\n"
                              "RuntimeError: connection closed", None, None)
    assert not logger.filter(fatal) and logger.filter(other)


def _mount_tmpfs(folder, size: str) -> str | None:
    """Mount a small tmpfs at folder; None, or why it cannot be done here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a small file system needs root"
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount refused here: {r.stderr.strip()}"


@pytest.mark.slow  # launch/train.py with Ray
def test_a_full_disk_while_checkpointing_ends_the_run_at_once_saying_where_and_how_much(small_run, tmp_path):
    """The checkpoints folder on a 1 MB file system: the first checkpoint (~7 MB) cannot be written. The run
    ends with exit 1 and one line naming the folder, the space a checkpoint needs and what is free, without
    a restart (train.max_failures=2 would have tried twice more); the part written has no COMPLETE."""
    _, paths = small_run
    out = copy_prepared(paths.output_dir, tmp_path / "run")
    checkpoints = out / "checkpoints"
    why = _mount_tmpfs(checkpoints, "1m")
    if why:
        pytest.skip(why)
    try:
        r = subprocess.run([sys.executable, "launch/train.py", f"output_dir={out}", *SMALL, "train.num_workers=2",
                            "train.max_steps=6", "train.checkpoint_every=3", "train.max_failures=2"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr[-4000:]
        assert (f"error: NoSpaceForCheckpoint: no space left on the device of {checkpoints} while writing checkpoint "
                "step_000003: a checkpoint needs about ") in errors[0]
        assert "MB (estimated from the trained parameters)" in errors[0] and "MB are free there" in errors[0]
        assert "Traceback" not in r.stderr and "starting them again" not in r.stderr  # no restart, no traceback
        assert not (checkpoints / "step_000003" / "COMPLETE").exists()
        trace = errors[0].split("traceback: ")[1].rstrip(")")
        assert "NoSpaceForCheckpoint" in open(trace).read()
        assert json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True)
