import numpy as np
import torch

from shards.build import load_manifest
from trainer.data import SplitReader, collate


def _readers(paths, world, micro=4, seed=0):
    manifest = load_manifest(paths["data"])
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    return [SplitReader(paths["data"], shards, r, world, micro, seed, shuffle=True) for r in range(world)]


def _keys(batches):
    return [s["key"] for b in batches for s in b]


def test_ranks_disjoint_equal_and_cover_the_epoch(small_run):
    _, paths = small_run
    readers = _readers(paths, world=2)
    per_rank = [list(r.rank_batches(epoch=0)) for r in readers]
    assert len(per_rank[0]) == len(per_rank[1]) == readers[0].batches_per_epoch()
    keys = [set(_keys(b)) for b in per_rank]
    assert not keys[0] & keys[1]
    n = readers[0].num_samples
    assert len(keys[0] | keys[1]) == readers[0].batches_per_epoch() * 2 * 4 > n - 2 * 4


def test_order_seeded_by_epoch(small_run):
    _, paths = small_run
    r = _readers(paths, world=1)[0]
    e0, e0b, e1 = (_keys(list(r.rank_batches(e)))[:50] for e in (0, 0, 1))
    assert e0 == e0b and e0 != e1


def test_resume_position_gives_the_rest_in_order(small_run):
    _, paths = small_run
    for r in _readers(paths, world=2):
        full = _keys(list(r.rank_batches(epoch=3)))
        start = 5 * 2 * 4  # five batches of each rank consumed
        rest = _keys(list(r.rank_batches(epoch=3, start=start)))
        assert rest == full[5 * 4:]


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
