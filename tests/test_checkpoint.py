import os

from trainer.job.checkpoint import COMPLETE, LATEST, find_latest


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
    from trainer.job.checkpoint import prune

    for step, complete in ((4, True), (8, False), (12, True), (16, True), (20, False)):
        _ckpt(tmp_path, f"step_{step:06d}", complete)
    # step 8 torn by a kill, the run fell back to step 4 and went on; step 20 torn by the last kill
    assert prune(str(tmp_path), keep_last=2) == ["step_000004", "step_000008"]
    assert sorted(os.listdir(tmp_path)) == ["step_000012", "step_000016", "step_000020"]
    assert find_latest(str(tmp_path)) == "step_000016"  # never the torn one
    assert prune(str(tmp_path), keep_last=0) == []  # 0: keep every complete one


def test_a_mid_epoch_resume_with_another_sample_order_is_refused():
    """Mid-epoch the rest of the order depends on data.length_grouping, micro_batch and the global batch
    (the worker count may change: a resize keeps the global batch)."""
    import pytest

    from configs.schema import load_config, to_dict
    from trainer.train_loop import check_epoch_order

    old = to_dict(load_config(None, []))  # 2 workers x micro 8 x accumulation 1: global batch 16
    old["data"].pop("length_grouping")  # a checkpoint from before the key: read as 0 (off)
    state = {"position": 160, "config": old, "world_size": 2}
    grouped = load_config(None, ["data.length_grouping=8"])
    with pytest.raises(ValueError, match=r"mid-epoch and was written with data.length_grouping=0 \(now 8\)"):
        check_epoch_order(grouped, state, "step_000010", 2)
    check_epoch_order(grouped, {**state, "position": 0}, "step_000010", 2)  # an epoch boundary: any order
    check_epoch_order(load_config(None, []), state, "step_000010", 2)  # unchanged
    check_epoch_order(load_config(None, ["train.grad_accum=2"]), state, "step_000010", 1)  # a resize: 8 x 2 x 1
    with pytest.raises(ValueError, match=r"global batch 16 \(now 32\)"):
        check_epoch_order(load_config(None, ["train.grad_accum=2"]), state, "step_000010", 2)
    with pytest.raises(ValueError, match=r"train.micro_batch=8 \(now 4\)"):
        check_epoch_order(load_config(None, ["train.micro_batch=4", "train.grad_accum=2"]), state, "step_000010", 2)


def test_a_resize_keeps_the_checkpoints_global_batch_or_names_the_worker_counts_that_work():
    import pytest

    from trainer.job.checkpoint import accumulation_at
    from configs.schema import load_config, to_dict

    old = to_dict(load_config(None, ["train.micro_batch=4", "train.grad_accum=3"]))  # 2 x 4 x 3 = 24
    state = {"world_size": 2, "config": old}
    train = load_config(None, ["train.micro_batch=4", "train.grad_accum=3", "train.num_workers=1"]).train
    assert [accumulation_at(train, w, state, "step_000006") for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert accumulation_at(train, 1) == 3  # no checkpoint: the configuration's 4 x 3 x 1
    with pytest.raises(ValueError, match=r"checkpoint step_000006 \(written by 2 workers\) cannot resume on 4 workers: "
                                         r"global batch 24 cannot be split .* that work with micro_batch 4: 1, 2, 3, 6"):
        accumulation_at(train, 4, state, "step_000006")
    explicit = load_config(None, ["train.micro_batch=4", "train.global_batch=8", "train.num_workers=1"]).train
    with pytest.raises(ValueError, match=r"written with global batch 24; a resume on another number of workers keeps "
                                         r"it \(train.global_batch=8 was given\)"):
        accumulation_at(explicit, 1, state, "step_000006")
