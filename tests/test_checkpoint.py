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


def test_resume_tag_prefers_the_checkpoint_reported_to_ray_when_complete(tmp_path):
    from ray.train import Checkpoint

    from trainer.checkpoint import COMPLETE
    from trainer.checkpoint import resume_tag

    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        (root / f"step_{step:06d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:06d}" / COMPLETE).touch()
    assert resume_tag(None, str(root)) == ("step_000008", "the newest complete checkpoint in the output folder")
    reported = Checkpoint.from_directory(str(root / "step_000004"))
    assert resume_tag(reported, str(root)) == ("step_000004", "the checkpoint reported to Ray")
    torn = Checkpoint.from_directory(str(root / "step_000012"))  # reported, then torn: not used
    assert resume_tag(torn, str(root))[0] == "step_000008"
    elsewhere = tmp_path / "other" / "step_000004"
    elsewhere.mkdir(parents=True)
    (elsewhere / COMPLETE).touch()
    assert resume_tag(Checkpoint.from_directory(str(elsewhere)), str(root))[0] == "step_000008"
