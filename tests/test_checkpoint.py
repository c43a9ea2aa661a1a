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


def test_prune_keeps_the_newest_complete_and_drops_torn_older_ones(tmp_path):
    from trainer.checkpoint import prune

    for step, complete in ((4, True), (8, False), (12, True), (16, True), (20, False)):
        _ckpt(tmp_path, f"step_{step:06d}", complete)
    # step 8 torn by a kill, the run fell back to step 4 and went on; step 20 torn by the last kill
    assert prune(str(tmp_path), keep_last=2) == ["step_000004", "step_000008"]
    assert sorted(os.listdir(tmp_path)) == ["step_000012", "step_000016", "step_000020"]
    assert find_latest(str(tmp_path)) == "step_000016"  # never the torn one
    assert prune(str(tmp_path), keep_last=0) == []  # 0: keep every complete one


def test_a_mid_epoch_resume_with_another_sample_order_is_refused():
    """Mid-epoch the rest of the order depends on data.length_grouping, micro_batch and grad_accum."""
    import pytest

    from trainer.config import load_config, to_dict
    from trainer.train_loop import check_epoch_order

    old = to_dict(load_config(None, []))
    old["data"].pop("length_grouping")  # a checkpoint from before the key: read as 0 (off)
    grouped = load_config(None, ["data.length_grouping=8"])
    with pytest.raises(ValueError, match=r"mid-epoch and was written with data.length_grouping=0 \(now 8\)"):
        check_epoch_order(grouped, {"position": 160, "config": old}, "step_000010")
    check_epoch_order(grouped, {"position": 0, "config": old}, "step_000010")  # an epoch boundary: any order
    check_epoch_order(load_config(None, []), {"position": 160, "config": old}, "step_000010")  # unchanged
    with pytest.raises(ValueError, match=r"train.micro_batch=8 \(now 4\)"):
        check_epoch_order(load_config(None, ["train.micro_batch=4"]), {"position": 160, "config": old}, "step_000010")
