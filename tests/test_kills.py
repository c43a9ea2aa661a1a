"""Kills a user's cluster produces, on the real stack (launch/train.py: Ray Train, 2 workers, DeepSpeed
ZeRO-3, fp32 on CPU), each followed by the same command again:

- every process of the run SIGKILLed at once (driver, Ray's head processes, Ray's workers: a node
  that loses power) at a random step, and the newest complete checkpoint then torn (its COMPLETE
  marker gone, a file cut to a few bytes, `latest` still naming it);
- the same while the driver builds the fused injection op for the first time (its compilers die too),
  and again, in the run that built it, at a random step before the first checkpoint.

Each run of the same command must exit 0 within a bound (nothing waits on what the kill left: a lock,
a half-built op, a torn checkpoint) and end with the uninterrupted run's per-step losses and
bit-identical export (conftest's `trained_run`, the reference shared with test_resume.py)."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, copy_prepared
from test_resume import _cmd, _export_bytes, _losses
from trainer.job.checkpoint import COMPLETE, LATEST, find_latest

pytestmark = pytest.mark.slow  # launch/train.py trainings in subprocesses (Ray, ZeRO-3), killed and run again

# The same command again, from the kill to exit 0. Measured on a 2-core box shared with other test
# runs: ~2-4 min to resume and finish (Ray start, setup, the rest of 24 steps, export, evaluation).
RERUN_BOUND_S = 600
COMPILERS = {"ninja", "c++", "g++", "cc1plus", "gcc", "as", "ld"}


def _start(out, log, env=None):
    """launch/train.py in a session of its own: every process it starts (Ray's included) carries its sid.
    Each test's first run starts in a folder holding the reference's data and assets (copy_prepared):
    the kills are the subject, not the data build."""
    with open(log, "w") as f:
        return subprocess.Popen(_cmd(out), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tail(log, n=4000):
    with open(log, errors="replace") as f:
        return f.read()[-n:]


def _steps(out):
    steps = []
    try:
        with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
            for line in f:
                try:
                    steps.append(json.loads(line)["step"])
                except ValueError:  # the line being written
                    pass
    except FileNotFoundError:
        pass
    return steps


def _wait(proc, what, ready, log, timeout=900):
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}:\n{_tail(log)}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s:\n{_tail(log)}"
        time.sleep(0.05)


def _run_processes(proc):
    """Every process of the run, dead or alive: the members of the driver's session (Ray's head processes
    share its process group; Ray's workers each have a group of their own, in the same session; both
    keep the session when re-parented) and the driver's descendants (in case one made a session of its own)."""
    found = {}
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == proc.pid:
                found[pid] = psutil.Process(pid)
        except (OSError, psutil.Error):
            pass
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            found.setdefault(p.pid, p)
    except psutil.Error:
        pass
    return found


def _alive(procs):
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _power_off(proc):
    """SIGKILL every process of the run at once, as when its node loses power. They are first all stopped
    (SIGSTOP, repeated until no new process appears), so that none forks, reaps, restarts a worker or
    writes a file between the first kill and the last. Returns the number of processes killed."""
    os.killpg(proc.pid, signal.SIGSTOP)
    stopped = {}
    while True:
        new = {pid: p for pid, p in _run_processes(proc).items() if pid not in stopped}
        if not new:
            break
        for p in new.values():
            try:
                p.send_signal(signal.SIGSTOP)
            except psutil.Error:
                pass
        stopped.update(new)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in stopped.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while _alive(stopped.values()) or _alive(_run_processes(proc).values()):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {_alive(stopped.values())}"
        time.sleep(0.1)
    return len(stopped)


def _same_command_again(out, log, bound, env=None):
    """Run the same command in a fresh process; it must exit 0 within `bound` s. (log text, seconds)"""
    t0 = time.monotonic()
    proc = _start(out, log, env)
    try:
        rc = proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        _power_off(proc)
        pytest.fail(f"the same command again did not end within {bound} s:\n{_tail(log)}")
    took = time.monotonic() - t0
    text = _tail(log, 10**9)
    assert rc == 0, f"exit {rc} after {took:.0f} s:\n{text[-4000:]}"
    print(f"\nthe same command again: exit 0 in {took:.0f} s (bound {bound} s)")
    return text, took


def _assert_ends_as_reference(out, reference):
    assert _losses(out) == _losses(reference)  # every step once, the same loss, bit for bit
    assert _export_bytes(out) == _export_bytes(reference)
    ckpts = os.path.join(out, "checkpoints")
    torn = [t for t in os.listdir(ckpts) if t.startswith("step_") and not os.path.exists(os.path.join(ckpts, t, COMPLETE))]
    assert not torn, f"torn checkpoints left: {torn}"


def _killed_at_step(out, log, step, env=None, also=lambda: True, what=""):
    """Start the command, wait for `step` (and `also`), then power everything off. Returns the log text."""
    proc = _start(out, log, env)
    try:
        _wait(proc, f"step {step}{what}", lambda: max(_steps(out), default=0) >= step and also(), log)
        killed = _power_off(proc)
    finally:
        if proc.poll() is None:
            _power_off(proc)
    print(f"\nkilled {killed} processes at step {max(_steps(out))} (aimed at {step})")
    assert killed >= 4  # the driver, Ray's head processes and both workers were among them
    return _tail(log, 10**9)


def test_sigkill_of_every_process_at_a_random_step_and_a_torn_newest_checkpoint_then_the_same_command_resumes_exactly(
        trained_run, tmp_path):
    """Everything SIGKILLed at a random step after checkpoint step_000012 was complete (between checkpoints,
    on one, or while step_000018 is written); then the newest complete checkpoint is torn after the fact (its
    COMPLETE marker gone, its largest file cut to 8 bytes, `latest` still naming it). The same command must
    never use it, resume from the one before, write the torn one again whole and end as the reference."""
    out = copy_prepared(trained_run, tmp_path / "run")
    ckpts = out / "checkpoints"
    kill_at = random.Random(os.getpid()).randint(13, 20)
    _killed_at_step(out, tmp_path / "killed.log", kill_at, also=lambda: find_latest(str(ckpts)) is not None,
                    what=" and a complete checkpoint")
    newest = find_latest(str(ckpts))
    assert newest in ("step_000012", "step_000018"), newest
    older = f"step_{int(newest[5:]) - 6:06d}"  # checkpoint_every=6, keep_last=2: the one before is still there
    assert (ckpts / older / COMPLETE).exists(), sorted(os.listdir(ckpts))
    torn = ckpts / newest
    (torn / COMPLETE).unlink()
    files = [p for p in torn.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(8)
    (ckpts / LATEST).write_text(newest)

    text, _ = _same_command_again(out, tmp_path / "again.log", RERUN_BOUND_S)
    assert f"resumed from {older}" in text, f"killed at step {kill_at}, {newest} torn:\n{text[-3000:]}"
    assert f"resumed from {newest}" not in text
    assert f"checkpoint {newest}: DeepSpeed's files" in text  # written again (step_000012 is then deleted at
    if newest == "step_000018":                                  # step 24 by train.keep_last=2)
        assert (torn / COMPLETE).exists() and victim.stat().st_size == size  # whole
    _assert_ends_as_reference(out, trained_run)


def test_sigkill_during_the_first_build_of_the_op_then_before_the_first_checkpoint_then_the_same_command_trains(
        trained_run, tmp_path):
    """Everything SIGKILLed while the driver compiles the fused injection op for the first time; the same
    command builds it (taking the dead builder's lock at once) and is SIGKILLed again at a random step before
    the first checkpoint; the same command once more starts over (nothing to resume) and ends as the
    reference, the killed runs' log lines gone (each step once)."""
    kernels = tmp_path / "kernels"  # empty: the driver must build the op before anything else
    kernels.mkdir()
    env = dict(os.environ, LLMREC_KERNEL_DIR=str(kernels))
    out = copy_prepared(trained_run, tmp_path / "run")
    log = tmp_path / "killed.log"
    proc = _start(out, log, env)

    def compiling():
        if not glob.glob(str(kernels / "*" / "build-*")):
            return False
        for p in _run_processes(proc).values():
            try:
                if p.name() in COMPILERS:
                    return True
            except psutil.Error:
                pass
        return False

    try:
        _wait(proc, "the op's build", compiling, log, timeout=600)
        time.sleep(random.Random(os.getpid()).uniform(0, 5))  # somewhere in the compile
        assert not glob.glob(str(kernels / "*" / "llmrec_inject.so")), "the build ended before the kill"
        killed = _power_off(proc)
    finally:
        if proc.poll() is None:
            _power_off(proc)
    print(f"\nkilled {killed} processes during the build")
    assert "building the fused injection op" in _tail(log, 10**9)
    (folder,) = glob.glob(str(kernels / "llmrec_inject-*"))
    # what the kill left: the lock file (its flock died with the driver) and the dead builder's folder
    assert os.path.exists(os.path.join(folder, "build.lock"))
    left = glob.glob(os.path.join(folder, "build-*"))
    assert left and not os.path.exists(os.path.join(folder, "llmrec_inject.so"))

    kill_at = random.Random(os.getpid()).randint(1, 5)  # checkpoint_every=6: nothing to resume from
    text = _killed_at_step(out, tmp_path / "killed_again.log", kill_at, env)
    # it took the lock at once (nobody alive held it): no "waiting for <holder>, which is building ..." line
    assert "which is building the fused injection op" not in text and "still waiting" not in text, text[-3000:]
    assert "building the fused injection op" in text and "built the fused injection op" in text
    assert os.path.exists(os.path.join(folder, "llmrec_inject.so"))
    assert not any(os.path.exists(d) for d in left)  # the dead builder's folder was cleared
    assert find_latest(str(out / "checkpoints")) is None, "a checkpoint was completed before the kill"

    text, _ = _same_command_again(out, tmp_path / "again.log", RERUN_BOUND_S, env)
    assert "resumed from" not in text and "building the fused injection op" not in text  # the op built before
    _assert_ends_as_reference(out, trained_run)  # started over: the killed runs' log lines are gone, each step once
