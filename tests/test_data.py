import numpy as np
import pytest
import torch

from shards.build import load_manifest
from trainer.data.loader import SplitReader, collate, rank_loader


def _readers(paths, world, micro=4, seed=0, accum=1):
    manifest = load_manifest(paths.data)
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    return [SplitReader(paths.data, shards, r, world, micro, seed, shuffle=True, grad_accum=accum) for r in range(world)]


def _keys(batches, fillers=False):
    return [s["key"] for b in batches for s in b if fillers or not s["filler"]]


@pytest.mark.parametrize("world,micro,accum", [(2, 4, 1), (3, 5, 2), (1, 7, 1)])
def test_every_sample_exactly_once_and_equal_steps(small_run, world, micro, accum):
    _, paths = small_run
    readers = _readers(paths, world, micro, accum=accum)
    per_rank = [list(r.rank_batches(epoch=0)) for r in readers]
    n = readers[0].num_samples
    assert all(len(b) == readers[0].batches_per_epoch() for b in per_rank)  # no rank waits for another
    assert readers[0].batches_per_epoch() % accum == 0
    assert all(len(batch) == micro for b in per_rank for batch in b)
    keys = [k for b in per_rank for k in _keys(b)]
    assert len(keys) == len(set(keys)) == n  # each sample exactly once, none lost
    fillers = sum(s["filler"] for b in per_rank for batch in b for s in batch)
    assert fillers == readers[0].padded_length() - n < world * micro * accum


def test_order_seeded_by_epoch(small_run):
    _, paths = small_run
    r = _readers(paths, world=1)[0]
    e0, e0b, e1 = (_keys(list(r.rank_batches(e)))[:50] for e in (0, 0, 1))
    assert e0 == e0b and e0 != e1


def test_resume_position_gives_the_rest_in_order(small_run):
    _, paths = small_run
    for r in _readers(paths, world=2):
        full = _keys(list(r.rank_batches(epoch=3)), fillers=True)
        start = 5 * 2 * 4  # five batches of each rank consumed
        rest = _keys(list(r.rank_batches(epoch=3, start=start)), fillers=True)
        assert rest == full[5 * 4:]


def test_resume_on_another_world_size_resplits_the_rest(small_run):
    _, paths = small_run
    done = 6 * 2 * 4  # 6 micro-steps on 2 ranks of micro-batch 4
    seen = set(_keys([b for r in _readers(paths, 2) for b in list(r.rank_batches(epoch=1))[:6]]))
    rest = [_keys(list(r.rank_batches(epoch=1, start=done))) for r in _readers(paths, 3)]
    rest_keys = [k for part in rest for k in part]
    n = _readers(paths, 1)[0].num_samples
    assert len(rest_keys) == len(set(rest_keys)) and not seen & set(rest_keys)
    assert len(seen) + len(rest_keys) == n


def test_loader_workers_keep_the_order(small_run):
    _, paths = small_run
    r = _readers(paths, world=2)[1]
    direct = [collate(b, 0)["keys"] for b in r.rank_batches(epoch=0)]
    for workers in (0, 2):
        loaded = [b["keys"] for b in rank_loader(r, 0, 0, pad_token_id=0, num_workers=workers)]
        assert loaded == direct


def test_collate_pads_and_maps_slots(small_run):
    _, paths = small_run
    batch_samples = next(_readers(paths, world=1)[0].rank_batches(0))
    for left in (False, True):
        b = collate(batch_samples, pad_token_id=0, left_pad=left)
        assert b["input_ids"].shape == b["slot_map"].shape == b["labels"].shape
        for i, s in enumerate(batch_samples):
            n = len(s["input_ids"])
            off = b["input_ids"].shape[1] - n if left else 0
            assert torch.equal(b["input_ids"][i, off:off + n], torch.from_numpy(s["input_ids"].astype(np.int64)))
            assert b["attention_mask"][i].sum() == n
            rows = b["slot_map"][i]
            pos = torch.nonzero(rows >= 0).flatten() - off
            assert pos.tolist() == s["slot_pos"].tolist()
            assert b["unique_items"][rows[rows >= 0]].tolist() == s["slot_item"].tolist()
            assert (b["labels"][i] != -100).sum() == s["label_mask"].sum()
        assert len(set(b["unique_items"].tolist())) == len(b["unique_items"])


def test_filler_is_never_learned_from(small_run):
    _, paths = small_run
    batch_samples = next(_readers(paths, world=1)[0].rank_batches(0))
    batch_samples[1] = {**batch_samples[1], "filler": True}
    b = collate(batch_samples, pad_token_id=0)
    assert (b["labels"][1] == -100).all() and (b["labels"][0] != -100).any()
    assert len(b["keys"]) == len(batch_samples) - 1
