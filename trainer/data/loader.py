"""Stream tokenized samples from webdataset shards, split across ranks and loader workers, and
collate them into batches.

Order. For epoch e the shards of a split are visited in an order drawn from (seed, e), and the
samples inside each shard in an order drawn from (seed, e, shard). That gives one global sequence
of N samples per epoch, the same on every rank, every run and every world size.

Exactly once. The epoch is padded up to a multiple of the global batch (world_size x micro_batch
x grad_accum) with *filler* samples (a copy of an epoch sample marked `filler`, whose labels are
all ignored), so every sample is seen exactly once per epoch and every rank takes the same
number of micro-batches: ceil(N / global batch) x grad_accum. No rank waits in a collective.

Ranks. From a start position p, rank r of W takes the global samples p + r, p + r + W, ... Rank
r's b-th micro-batch is the samples p + (b x W + r) x micro ... of that stride; together the ranks
cover every sample from p on, once.

Position. A reader's position is the number of global samples (fillers included) consumed in the
epoch; the trainer checkpoints it. A resumed reader skips exactly those (whole shards by their
manifest counts, without reading them), so the rest comes in the same order as in an
uninterrupted run. Because the global order does not depend on the world size, a resume on a
different number of ranks re-splits the remainder correctly, each sample once (the trainer keeps the
global batch, so the epoch's padded length and step count stay; trainer/job/checkpoint.py accumulation_at).

Length grouping (data.length_grouping = N > 0; 0 = off: the order above, exactly). The order above is
cut into windows of N global batches. Inside a window the samples are sorted by token count (stable:
ties keep the order above) and cut into micro-steps of W x micro_batch samples (one micro-batch of
every rank); a micro-step is laid out so that each rank's micro-batch is a contiguous run of the sorted
lengths (rank r takes every W-th sample, so the sorted samples r x micro ... go to r, r + W, ...;
interleaved, every rank would span the whole run). The micro-steps are then shuffled by a generator
seeded by (seed, epoch, window), so lengths do not rise through the window and an optimizer step still
mixes lengths; the epoch's last, partial micro-step stays last, before the fillers. That is again one
global order per epoch, a function of (seed, epoch, the samples' lengths, N, W x micro_batch, global
batch) and not of the rank or the start position, so exactly once, equal steps and the resume above
hold as they are (a resume mid-epoch must keep N, micro_batch and the global batch; after a resume on
another worker count the rest of the epoch keeps the old W's layout, `order_world`: the same global order,
split over the new ranks, each rank's micro-batch then no longer one contiguous run). The
lengths are the records' first int32 (T), read when a window's shards are read, which the epoch does
anyway: no extra pass. A window's records (N x global batch samples) are held in memory; a resume
skips whole windows without reading them.

Loader workers. With k DataLoader workers, worker w decodes and collates the micro-batches
b = w, w + k, ... of its rank; the DataLoader returns them round-robin, i.e. in order.
Every rank reads every shard's bytes, but decodes only its own samples.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from trainer.job.failures import Unrecoverable


class CorruptShard(Unrecoverable, RuntimeError):
    """A shard that is cut short or does not match its manifest: a restart would read the same bytes."""


def iter_tar(path: str):
    """Yield (member name, bytes) of a plain tar file such as webdataset's TarWriter writes.

    A small reader of the ustar layout (512-byte headers, octal sizes, checksums; pax and GNU
    extension headers skipped), about 20x faster per member than going through `tarfile`. A header
    with a wrong checksum, a member cut short, or a missing end-of-archive marker raises, naming the
    shard. webdataset itself reads the same files (tests/test_shards.py checks both agree).
    """
    with open(path, "rb") as f:
        data = f.read()
    off, n = 0, len(data)
    while True:
        if off + 512 > n:
            raise CorruptShard(f"shard {path} is truncated or corrupt: it ends inside a tar header at byte {off}")
        header = data[off:off + 512]
        if header == b"\0" * 512:
            return  # end-of-archive marker
        try:
            size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
            stored = int(header[148:156].rstrip(b"\0 ").decode() or "0", 8)
        except ValueError:
            raise CorruptShard(f"shard {path} is truncated or corrupt: bad tar header at byte {off}") from None
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise CorruptShard(f"shard {path} is truncated or corrupt: tar header checksum mismatch at byte {off}")
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        off += 512
        if off + size > n:
            raise CorruptShard(f"shard {path} is truncated or corrupt: member {name} is cut short")
        if header[156:157] in (b"0", b"\0"):
            yield (prefix + "/" + name if prefix else name), data[off:off + size]
        off += (size + 511) // 512 * 512


def _raw_records(path: str):
    """Group a shard's members into webdataset records: {"__key__": key, ext: bytes, ...}."""
    rec: dict = {}
    for name, payload in iter_tar(path):
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        key, ext = (name[:dot], name[dot + 1:]) if dot > 0 else (name, "")
        if rec and rec["__key__"] != key:
            yield rec
            rec = {}
        rec["__key__"] = key
        rec[ext] = payload
    if rec:
        yield rec


_GROUPING = 0x6C656E67  # tags the window generator's seed apart from the shards' (seed, epoch, shard)


def record_length(rec: dict, path: str = "") -> int:
    """A raw record's token count T (the first int32 of its llara.bin) without decoding it."""
    try:
        return int.from_bytes(rec["llara.bin"][:4], "little", signed=True)
    except KeyError:
        raise CorruptShard(f"shard {path} is truncated or corrupt: record {rec.get('__key__')} "
                           "has no llara.bin") from None


def decode(rec: dict, path: str = "") -> dict:
    """A record's `llara.bin` (int32: T, S, prompt_len, input_ids[T], label_mask[T], slot_pos[S],
    slot_item[S] [, user_pos, history_len]) as arrays; `meta.json` is kept as bytes and parsed on
    first use (see `meta`). With the user-token trailer the sample also has `user_pos` and `history`
    (its history items: the first history_len slot items)."""
    try:
        a = np.frombuffer(rec["llara.bin"], dtype="<i4")
        T, S, prompt_len = int(a[0]), int(a[1]), int(a[2])
        n = 3 + 2 * T + 2 * S
        if len(a) not in (n, n + 2):
            raise ValueError(f"{len(a)} int32 values, the header says {n} (or {n + 2} with the user token)")
        sample = {"key": rec["__key__"], "input_ids": a[3:3 + T], "label_mask": a[3 + T:3 + 2 * T],
                  "slot_pos": a[3 + 2 * T:3 + 2 * T + S], "slot_item": a[3 + 2 * T + S:n], "prompt_len": prompt_len,
                  "meta_json": rec["meta.json"]}
        if len(a) == n + 2:
            user_pos, hist_len = int(a[n]), int(a[n + 1])
            if not (0 <= user_pos < prompt_len and 0 < hist_len <= S):
                raise ValueError(f"user slot at {user_pos} with {hist_len} history items is out of range")
            sample["user_pos"], sample["history"] = user_pos, sample["slot_item"][:hist_len]
        return sample
    except (KeyError, ValueError) as e:
        raise CorruptShard(f"shard {path} is truncated or corrupt: record {rec.get('__key__')} is incomplete "
                           f"({type(e).__name__}: {e})") from e


def meta(sample: dict) -> dict:
    """The sample's user, history, candidates, target and template (parsed from JSON once)."""
    if "meta" not in sample:
        sample["meta"] = json.loads(sample["meta_json"])
    return sample["meta"]


def read_shard(path: str, expected: int | None = None):
    """Yield the decoded samples of one shard, in order; with `expected`, a shorter shard raises."""
    n = 0
    for rec in _raw_records(path):
        yield decode(rec, path)
        n += 1
    if expected is not None and n != expected:
        raise CorruptShard(f"shard {path} is truncated or corrupt: it holds {n} samples, the manifest says {expected}")


@dataclass
class SplitReader:
    """The global sample order of one split, for one epoch, and one rank's part of it."""

    data_dir: str
    shards: list[dict]  # manifest entries of this split
    rank: int
    world_size: int
    micro_batch: int
    seed: int
    shuffle: bool
    grad_accum: int = 1
    length_grouping: int = 0  # 0: off; N: sort by length inside windows of N global batches (module docstring)
    order_world: int = 0  # the worker count whose micro-step layout the grouped order follows (0: world_size)

    def __post_init__(self):
        if self.length_grouping < 0:
            raise ValueError(f"length_grouping={self.length_grouping}: expected 0 (off) or a number of global batches")

    @property
    def num_samples(self) -> int:
        return sum(s["count"] for s in self.shards)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def padded_length(self) -> int:
        """Samples per epoch including fillers: N rounded up to a multiple of the global batch."""
        return -(-self.num_samples // self.global_batch) * self.global_batch

    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (a multiple of grad_accum)."""
        return self.padded_length() // (self.world_size * self.micro_batch)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def _shard_records(self, epoch: int, s: int) -> tuple[list[dict], str]:
        """Shard s's raw records in the epoch's order inside the shard, and its path."""
        count = self.shards[s]["count"]
        path = os.path.join(self.data_dir, self.shards[s]["name"])
        records = list(_raw_records(path))
        if len(records) != count:
            raise CorruptShard(f"shard {path} is truncated or corrupt: it holds {len(records)} samples, "
                               f"the manifest says {count}")
        inner = np.random.default_rng([self.seed, epoch, s]).permutation(count).tolist() if self.shuffle else range(count)
        return [records[i] for i in inner], path

    def global_records(self, epoch: int, start: int = 0):
        """Yield (global index, raw record, shard path) of the epoch from `start` on, fillers at the end."""
        if self.length_grouping:
            yield from self._grouped_records(epoch, start)
            return
        g = 0
        first = None
        for s in self._order(epoch):
            count = self.shards[s]["count"]
            if g + count <= start and first is not None:  # skip a whole shard without reading it
                g += count
                continue
            records, path = self._shard_records(epoch, s)
            for rec in records:
                if first is None:
                    first = (rec, path)
                if g >= start:
                    yield g, rec, path
                g += 1
        for g in range(max(g, start), self.padded_length()):
            yield g, {**first[0], "__filler__": True}, first[1]

    def _grouped_records(self, epoch: int, start: int):
        """global_records with length grouping: the same samples and fillers, grouped window by window."""
        order = self._order(epoch)
        counts = [self.shards[s]["count"] for s in order]
        ends = np.cumsum(counts).tolist()  # where the k-th shard of the order ends in the ungrouped order
        n, window, step = self.num_samples, self.length_grouping * self.global_batch, self._layout_world() * self.micro_batch
        loaded: dict[int, tuple[list[dict], str]] = {}  # k -> the k-th shard's records (the current window's)

        def shard(k: int) -> tuple[list[dict], str]:
            if k not in loaded:
                loaded[k] = self._shard_records(epoch, order[k])
            return loaded[k]

        for w0 in range(start // window * window, n, window):  # a resume skips whole windows unread
            w1 = min(w0 + window, n)
            k0, k1 = bisect.bisect_right(ends, w0), bisect.bisect_left(ends, w1)
            for k in [k for k in loaded if k < k0]:
                del loaded[k]
            items = []  # (record, path) of the window in the ungrouped order
            for k in range(k0, k1 + 1):
                records, path = shard(k)
                begin = ends[k] - counts[k]
                items += [(rec, path) for rec in records[max(w0, begin) - begin:min(w1, ends[k]) - begin]]
            ranked = np.argsort([record_length(rec, path) for rec, path in items], kind="stable")
            full = len(ranked) // step  # whole micro-steps; a partial one (the epoch's end) stays last
            blocks = (np.random.default_rng([self.seed, epoch, w0 // window, _GROUPING]).permutation(full)
                      if self.shuffle else range(full))
            grouped = [i for b in blocks for i in self._deal(ranked[b * step:(b + 1) * step])]
            grouped += self._deal(ranked[full * step:])
            for i in range(max(start - w0, 0), len(grouped)):
                yield (w0 + i, *items[grouped[i]])
        if max(n, start) < self.padded_length():
            records, path = shard(next(k for k, c in enumerate(counts) if c))  # the filler: the epoch's first
            for g in range(max(n, start), self.padded_length()):               # sample, as when off
                yield g, {**records[0], "__filler__": True}, path

    def _layout_world(self) -> int:
        return self.order_world or self.world_size

    def _deal(self, run: np.ndarray) -> list[int]:
        """Lay a length-sorted run of one micro-step (W x micro samples, fewer at the epoch's end) out so
        that each rank's micro-batch is a contiguous part of it: rank r takes the positions r, r + W, ...,
        so the sorted samples r x micro ... go there (interleaved, every rank would span the whole run)."""
        W = self._layout_world()
        slots = [i * W + r for r in range(W) for i in range(len(run)) if i * W + r < len(run)]
        out = [0] * len(run)
        for slot, i in zip(slots, run.tolist()):
            out[slot] = i
        return out

    def rank_batches(self, epoch: int, start: int = 0, worker: int = 0, num_workers: int = 1):
        """Yield this rank's micro-batches (lists of decoded samples) from global position `start`.

        With loader workers, worker w yields only the micro-batches b with b % num_workers == w.
        """
        W, M = self.world_size, self.micro_batch
        if start % W:
            raise ValueError(f"reader position {start} is not a multiple of the world size {W}")
        batch, b = [], 0
        for g, rec, path in self.global_records(epoch, start):
            if (g - start) % W != self.rank:
                continue
            if b % num_workers == worker:
                sample = decode(rec, path)
                sample["filler"] = bool(rec.get("__filler__"))
                batch.append(sample)
            if ((g - start) // W + 1) % M == 0:
                if batch:
                    yield batch
                batch, b = [], b + 1
        if batch:
            yield batch


class RankStream(torch.utils.data.IterableDataset):
    """This rank's collated micro-batches of one epoch from a position, for a torch DataLoader."""

    def __init__(self, reader: SplitReader, epoch: int, start: int, pad_token_id: int):
        self.reader, self.epoch, self.start, self.pad_token_id = reader, epoch, start, pad_token_id

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info else (0, 1)
        for samples in self.reader.rank_batches(self.epoch, self.start, w, k):
            yield collate(samples, self.pad_token_id)


def rank_loader(reader: SplitReader, epoch: int, start: int, pad_token_id: int, num_workers: int = 0):
    # its own generator: creating an iterator must not draw from the global RNG, which the
    # checkpoint restores and the model's dropout uses (a resumed run must draw what the original drew)
    return torch.utils.data.DataLoader(RankStream(reader, epoch, start, pad_token_id), batch_size=None,
                                       num_workers=num_workers, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(reader.seed))


def collate(samples: list[dict], pad_token_id: int, left_pad: bool = False, prompt_only: bool = False) -> dict:
    """Pad a list of samples into tensors.

    Returns input_ids, attention_mask, labels (-100 off the answer and on fillers), slot_map [B, T]
    (-1, or the row of `unique_items` whose behaviour vector fills that position), unique_items [U]
    and the keys of the real (non-filler) samples. With prompt_only the answer is cut off (for
    generation); left_pad puts the padding on the left.

    Samples with a user slot (data.user_token) also give `histories` (B lists of item ids); the
    behaviour rows are then [U unique items; B user states] and sample b's [UserEmb] position maps
    to row U + b. A batch mixes both kinds only by mistake: that raises.
    """
    lengths = [s["prompt_len"] if prompt_only else len(s["input_ids"]) for s in samples]
    B, T = len(samples), max(lengths)
    input_ids = np.full((B, T), pad_token_id, dtype=np.int64)
    attention = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), -100, dtype=np.int64)
    slot_map = np.full((B, T), -1, dtype=np.int64)
    all_items = np.concatenate([s["slot_item"] for s in samples])
    unique_items, inverse = np.unique(all_items, return_inverse=True)
    with_user = sum("user_pos" in s for s in samples)
    if with_user not in (0, B):
        raise ValueError(f"{with_user} of {B} samples have a user slot: shards built with and without "
                         "data.user_token are mixed")
    U = len(unique_items)
    k = 0
    for b, (s, n) in enumerate(zip(samples, lengths)):
        off = T - n if left_pad else 0
        ids = s["input_ids"][:n]
        input_ids[b, off:off + n] = ids
        attention[b, off:off + n] = 1
        if not s.get("filler"):  # a filler pads the epoch: it is seen but never learned from
            labels[b, off:off + n] = np.where(s["label_mask"][:n] == 1, ids, -100)
        nslots = len(s["slot_item"])
        slot_map[b, s["slot_pos"] + off] = inverse[k:k + nslots]
        k += nslots
        if with_user:
            slot_map[b, s["user_pos"] + off] = U + b
    out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
           "labels": torch.from_numpy(labels), "slot_map": torch.from_numpy(slot_map),
           "unique_items": torch.from_numpy(unique_items.astype(np.int64)),
           "keys": [s["key"] for s in samples if not s.get("filler")],
           # per sample (fillers too): the prompt's length, the true item and the candidates (S-DPO's negatives)
           "sample_keys": [s["key"] for s in samples], "prompt_lens": [int(s["prompt_len"]) for s in samples],
           "targets": [meta(s).get("target") for s in samples], "candidates": [meta(s).get("candidates") for s in samples]}
    if with_user:
        out["histories"] = [s["history"].tolist() for s in samples]
    return out


def user_states(srec, batch: dict, device) -> torch.Tensor:
    """One srec.user_state call over a user-token batch's histories (left-padded by srec.pad):
    [B, hidden], the behaviour rows U.. that the batch's [UserEmb] slots point at."""
    if "histories" not in batch:
        raise ValueError("the model has a user adapter (data.user_token=true) but the batch has no user slots: "
                         "were the shards built without data.user_token?")
    history, lengths = srec.pad(batch["histories"])
    return srec.user_state(history.to(device), lengths.to(device))
