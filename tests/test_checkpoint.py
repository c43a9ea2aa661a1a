import os

from trainer.checkpoint import COMPLETE, LATEST, find_latest


def _ckpt(root, tag, complete=True):
    os.makedirs(root / tag)
    (root / tag / "model_states.pt").write_bytes(b"x")
    if complete:
        (root / tag / COMPLETE).write_text("")


def test_find_latest_skips_torn_checkpoints(tmp_path):
    assert find_latest(str(tmp_path / "none")) is None
    _ckpt(tmp_path, "step_000010")
    _ckpt(tmp_path, "step_000020")
    (tmp_path / LATEST).write_text("step_000020")
    assert find_latest(str(tmp_path)) == "step_000020"
    _ckpt(tmp_path, "step_000030", complete=False)  # killed while writing: no marker, `latest` not moved
    assert find_latest(str(tmp_path)) == "step_000020"
    (tmp_path / LATEST).write_text("step_000030")  # even a marker pointing at a torn one is not trusted
    assert find_latest(str(tmp_path)) == "step_000020"
