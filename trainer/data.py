"""Stream tokenized samples from webdataset shards, split across ranks, and collate them into batches.

Order. For epoch e the shards of a split are visited in an order drawn from (seed, e), and the
samples inside each shard in an order drawn from (seed, e, shard). That gives one global sequence
of samples per epoch, the same on every rank and every run. Rank r of W takes the global samples
r, r + W, r + 2W, ... so ranks are disjoint and together cover the epoch. Each rank takes the same
number of batches: floor(N / (W * micro_batch)); the remaining < W * micro_batch samples of an
epoch are not used in that epoch (a different subset each epoch, since the order changes).

Position. A reader's position is the number of global samples already consumed in the epoch; the
trainer checkpoints it, and a resumed reader skips exactly those (whole shards by their manifest
counts, without reading them), so the remaining samples come in the same order as in an
uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds


def _identity(urls):
    return urls


def read_shard(path: str):
    """Yield decoded samples of one tar shard; a truncated or corrupt shard raises naming it."""
    ds = wds.WebDataset(path, shardshuffle=False, nodesplitter=_identity, workersplitter=_identity, empty_check=False)
    try:
        for rec in ds:
            yield {
                "key": rec["__key__"],
                "input_ids": np.load(io.BytesIO(rec["input_ids.npy"]), allow_pickle=False),
                "label_mask": np.load(io.BytesIO(rec["label_mask.npy"]), allow_pickle=False),
                "slot_pos": np.load(io.BytesIO(rec["slot_pos.npy"]), allow_pickle=False),
                "slot_item": np.load(io.BytesIO(rec["slot_item.npy"]), allow_pickle=False),
                "meta": json.loads(rec["meta.json"]),
            }
    except Exception as e:  # webdataset raises tarfile/KeyError/ValueError variants
        raise RuntimeError(f"shard {path} is truncated or corrupt: {type(e).__name__}: {e}") from e


@dataclass
class SplitReader:
    """The global sample order of one split, for one epoch, and this rank's part of it."""

    data_dir: str
    shards: list[dict]  # manifest entries of this split
    rank: int
    world_size: int
    micro_batch: int
    seed: int
    shuffle: bool

    @property
    def num_samples(self) -> int:
        return sum(s["count"] for s in self.shards)

    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.world_size * self.micro_batch)

    def _order(self, epoch: int):
        shard_order = list(range(len(self.shards)))
        if self.shuffle:
            shard_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        return shard_order

    def global_samples(self, epoch: int, start: int = 0):
        """Yield (global index, sample) of the epoch from global index `start` on."""
        g = 0
        for s in self._order(epoch):
            count = self.shards[s]["count"]
            if g + count <= start:  # skip a whole shard without reading it
                g += count
                continue
            samples = list(read_shard(os.path.join(self.data_dir, self.shards[s]["name"])))
            if len(samples) != count:
                raise RuntimeError(f"shard {self.shards[s]['name']} holds {len(samples)} samples, the manifest says {count}")
            inner = range(count)
            if self.shuffle:
                inner = np.random.default_rng([self.seed, epoch, s]).permutation(count).tolist()
            for i in inner:
                if g >= start:
                    yield g, samples[i]
                g += 1

    def rank_batches(self, epoch: int, start: int = 0):
        """Yield this rank's micro-batches (lists of samples) of the epoch, from global position `start`.

        `start` must be a batch boundary (a multiple of world_size * micro_batch), which is what
        the trainer checkpoints.
        """
        step = self.world_size * self.micro_batch
        if start % step:
            raise ValueError(f"reader position {start} is not a multiple of world_size*micro_batch={step}")
        end = self.batches_per_epoch() * step
        batch = []
        for g, sample in self.global_samples(epoch, start):
            if g >= end:
                break
            if g % self.world_size == self.rank:
                batch.append(sample)
                if len(batch) == self.micro_batch:
                    yield batch
                    batch = []


def collate(samples: list[dict], pad_token_id: int, left_pad: bool = False, prompt_only: bool = False) -> dict:
    """Pad a list of samples into tensors.

    Returns input_ids, attention_mask, labels (-100 off the answer), slot_map [B, T] (-1 or the row of
    `unique_items` whose behaviour vector fills that position) and unique_items [U].
    With prompt_only, the answer is cut off (for generation), and left_pad puts padding on the left.
    """
    seqs = []
    for s in samples:
        n = s["meta"]["prompt_len"] if prompt_only else len(s["input_ids"])
        seqs.append((s["input_ids"][:n], s["label_mask"][:n]))
    T = max(len(ids) for ids, _ in seqs)
    B = len(samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    slot_map = torch.full((B, T), -1, dtype=torch.long)
    all_items = np.concatenate([s["slot_item"] for s in samples]) if B else np.zeros(0, dtype=np.int64)
    unique_items, inverse = np.unique(all_items, return_inverse=True)
    k = 0
    for b, ((ids, mask), s) in enumerate(zip(seqs, samples)):
        off = T - len(ids) if left_pad else 0
        n = len(ids)
        input_ids[b, off:off + n] = torch.from_numpy(ids.astype(np.int64))
        attention[b, off:off + n] = 1
        lab = torch.from_numpy(ids.astype(np.int64))
        lab[torch.from_numpy(mask[:n] == 0)] = -100
        labels[b, off:off + n] = lab
        nslots = len(s["slot_item"])
        slot_map[b, torch.from_numpy(s["slot_pos"].astype(np.int64)) + off] = torch.from_numpy(inverse[k:k + nslots].astype(np.int64))
        k += nslots
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "slot_map": slot_map, "unique_items": torch.from_numpy(unique_items.astype(np.int64))}
