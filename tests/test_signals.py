"""The stop-request handlers in one process (the full runs are in test_resume.py and test_slurm.py)."""

import os
import signal

import pytest

from trainer.job import signals


@pytest.fixture
def restore():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    import ray._private.utils as ray_utils

    ray_set = ray_utils.set_sigterm_handler
    yield
    ray_utils.set_sigterm_handler = ray_set
    for s, h in saved.items():
        signal.signal(s, h)
    signals._requested.update(signal=None, training=False)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_driver_writes_the_stop_file(tmp_path, sig, restore):
    signals.install_driver_handlers(str(tmp_path))
    os.kill(os.getpid(), sig)
    assert (tmp_path / signals.STOP_FILE).read_text() == sig.name and signals.requested(str(tmp_path))
    signals.clear(str(tmp_path))
    assert not (tmp_path / signals.STOP_FILE).exists()


def test_sigterm_to_a_worker_stops_training_gracefully_and_is_rays_otherwise(tmp_path, restore):
    import ray._private.utils as ray_utils

    signals.install_worker_handlers()
    ray_exits = []
    ray_utils.set_sigterm_handler(lambda signum, frame: ray_exits.append(signum))  # what Ray's main loop does next
    signals.training(True)
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.requested(str(tmp_path)) and ray_exits == []  # the first one: finish the step, checkpoint
    os.kill(os.getpid(), signal.SIGTERM)
    assert ray_exits == [signal.SIGTERM]  # a second one is Ray's (it ends the worker)
    signals._requested.update(signal=None, training=False)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ray_exits == [signal.SIGTERM] * 2 and not signals.requested(str(tmp_path))  # outside training: Ray's
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.requested(str(tmp_path))
