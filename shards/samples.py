"""Interactions -> time-ordered sequences -> leave-one-out splits -> LLaRA next-item samples.

A sample is a plain dict:
    {"user": int, "history": [item, ...], "target": item, "candidates": [item x 20]}
with dense item ids 0..num_items-1 (the vocabulary maps raw ids to dense ones). The next-item
splits (leave_one_out, user_split) and the time split (global_time_split, with the ratings) are
Windows: sequences of such dicts made when read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shards.interactions import Interactions, as_table

SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("loo", "sliding", "time")  # data.split: leave_one_out, user_split, global_time_split
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


def build_vocab(interactions, items) -> dict:
    """Dense ids for the items that appear in `items`; users keep their order of first appearance."""
    raw_ids = sorted({int(i) for i, *_ in items})
    dense = {raw: d for d, raw in enumerate(raw_ids)}
    by_raw = {int(i): rest for i, *rest in items}
    return {
        "raw_item_ids": raw_ids,
        "titles": [by_raw[r][0] for r in raw_ids],
        "genres": [by_raw[r][1] if len(by_raw[r]) > 1 else "" for r in raw_ids],
        "dense": dense,
    }


_BLOCK = 1 << 20  # rows mapped at a time (dense_items, user_sequences): temporaries of ~8 MB, not the table's length


def dense_items(interactions, dense: dict[int, int], source: str = "interactions", order=None) -> np.ndarray:
    """Each interaction's item as its dense id (int32), in file order or in `order` (row indices); mapped a
    block of rows at a time, so nothing of the table's length is made but the result. An item the items
    table lacks is an error naming the record (the first such in the file)."""
    table = as_table(interactions)
    raw = np.fromiter(dense, np.int64, len(dense))
    ids = np.fromiter(dense.values(), np.int64, len(dense))
    by_raw = np.argsort(raw)
    raw, ids = raw[by_raw], ids[by_raw]
    n = len(table)
    out, first_unknown = np.empty(n, np.int32), n
    for a in range(0, n, _BLOCK):
        rows = slice(a, a + _BLOCK) if order is None else order[a:a + _BLOCK]
        items = table.item[rows]
        at = np.minimum(np.searchsorted(raw, items), max(len(raw) - 1, 0))
        unknown = raw[at] != items if len(raw) else np.ones(len(items), bool)
        if unknown.any():
            first_unknown = min(first_unknown, a + int(np.argmax(unknown)) if order is None else int(rows[unknown].min()))
        out[a:a + _BLOCK] = ids[at]
    if first_unknown < n:
        raise ValueError(f"{source}: record {first_unknown + 1} names item {int(table.item[first_unknown])}, "
                         "which is not in the items table")
    return out


def user_sequences(interactions, dense: dict[int, int], source: str = "interactions") -> dict[int, np.ndarray]:
    """Group by user, sort by (timestamp, original order), map raw item ids to dense ones. Each user's
    sequence is an int32 array, a view into one array holding them all (4 bytes an interaction). Besides
    the table and the result it holds one sort order (8 bytes an interaction) and blocks of rows."""
    table = as_table(interactions)
    order = np.lexsort((table.timestamp, table.user))  # user, then time; lexsort is stable: then file order
    items = dense_items(table, dense, source, order)
    starts, users, last = [], [], None
    for a in range(0, len(order), _BLOCK):  # where each user's run begins, a block of the sorted users at a time
        block = table.user[order[a:a + _BLOCK]]
        begins = _run_starts(block)
        if last is not None and block[0] == last:
            begins = begins[1:]  # the run goes on from the block before
        starts.append(a + begins)
        users.append(block[begins])
        last = block[-1]
    del order
    starts = np.concatenate(starts).tolist() if starts else []
    users = np.concatenate(users).tolist() if users else []
    ends = starts[1:] + [len(items)]
    return {u: items[a:b] for u, a, b in zip(users, starts, ends)}


def _run_starts(grouped: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in `grouped` (values already grouped, e.g. sorted)."""
    return np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(grouped) else np.zeros(0, np.int64)


def kcore_filter(interactions, k: int) -> Interactions:
    """Drop users and items with fewer than k interactions, repeatedly, until none is left."""
    table = as_table(interactions)
    keep = np.ones(len(table), bool)
    while k > 1:
        rows = np.flatnonzero(keep)
        ok = np.ones(len(rows), bool)
        for column in (table.user[rows], table.item[rows]):
            _, which, counts = np.unique(column, return_inverse=True, return_counts=True)
            ok &= counts[which] >= k
        if ok.all():
            break
        keep[rows[~ok]] = False
    return table if keep.all() else table.take(keep)


class Windows(Sequence):
    """The samples of one split, each made when it is read: sample i is user users[i]'s item at
    positions[i] with the history_len items before it, as the plain dict of the module docstring
    (with its "position"). Holds two integers per sample and the users' sequences, not the samples:
    a split of millions stays small (the shard build streams it, shards/build.py). With `ratings` (each
    user's ratings in the order of their sequence: the time split) a sample also has "history_ratings" and
    "rating"."""

    def __init__(self, sequences: dict[int, list[int]], history_len: int, users, positions, ratings=None):
        self.sequences, self.history_len, self.ratings = sequences, history_len, ratings
        self.users, self.positions = _compact(users), _compact(positions)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        user, t = int(self.users[i]), int(self.positions[i])
        seq = self.sequences[user]
        history = seq[max(0, t - self.history_len):t]
        sample = {"user": user, "history": history.tolist() if isinstance(history, np.ndarray) else history,
                  "target": int(seq[t]), "position": t}
        if self.ratings is not None:
            rated = self.ratings[user]
            sample["history_ratings"], sample["rating"] = rated[max(0, t - self.history_len):t].tolist(), rated[t].item()
        return sample


def _compact(values) -> np.ndarray:
    """values as int32 where they fit (4 bytes a sample, not 8), else int64."""
    values = np.asarray(values, dtype=np.int64)
    fits = not len(values) or (values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max)
    return values.astype(np.int32) if fits else values


def _ranges(users: np.ndarray, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """(user, position) for position in range(start, stop) of each user, users in the order given; start
    and stop are per user (arrays) or one number. Built as arrays: no Python object per sample, and one
    temporary array of the samples' length besides the two returned."""
    start = np.broadcast_to(np.asarray(start, np.int64), users.shape)
    counts = np.maximum(np.asarray(stop, np.int64) - start, 0)
    positions = np.arange(int(counts.sum()), dtype=np.int64)
    positions += np.repeat(start - (np.cumsum(counts) - counts), counts)  # minus where each user's run begins
    return np.repeat(users, counts), positions


def _users_and_lengths(sequences, users=None) -> tuple[np.ndarray, np.ndarray]:
    users = list(sequences) if users is None else users
    return np.asarray(users, np.int64), np.asarray([len(sequences[u]) for u in users], np.int64)


def leave_one_out(sequences: dict[int, list[int]], history_len: int) -> dict[str, Windows]:
    """Last item -> test, second-last -> val, every earlier position with a history -> train."""
    users, lengths = _users_and_lengths(sequences)
    users, lengths = users[lengths >= 3], lengths[lengths >= 3]
    pairs = {"train": _ranges(users, 1, lengths - 2), "val": (users, lengths - 2), "test": (users, lengths - 1)}
    return {s: Windows(sequences, history_len, *pairs[s]) for s in SPLITS}


def sample_candidates(sample: dict, num_items: int, num_candidates: int, seed: int, split: str) -> list[int]:
    """The target plus `num_candidates - 1` distinct negatives outside history and target, shuffled.

    The generator is keyed by (seed, split, user, position), so a sample's candidates are the same
    on every run and independent of the order in which samples are built.
    """
    excluded = set(sample["history"]) | {sample["target"]}
    if num_items - len(excluded) < num_candidates - 1:
        raise ValueError(
            f"user {sample['user']}: only {num_items - len(excluded)} items are outside the history, "
            f"{num_candidates - 1} negatives are needed"
        )
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], sample["user"], sample["position"]])
    negatives: list[int] = []
    while len(negatives) < num_candidates - 1:
        for item in rng.integers(0, num_items, size=2 * num_candidates).tolist():
            if item not in excluded:
                excluded.add(item)
                negatives.append(item)
                if len(negatives) == num_candidates - 1:
                    break
    candidates = negatives + [sample["target"]]
    rng.shuffle(candidates)
    return [int(c) for c in candidates]


def user_split(sequences: dict[int, list[int]], history_len: int, seed: int, ratios=(0.8, 0.1, 0.1)) -> dict[str, Windows]:
    """LLaRA's sliding windows: users are split 8:1:1 by a seeded permutation; every position of a
    training user's sequence (with a non-empty history) is a training sample; a validation or test
    user gives one sample, their last item with the history before it."""
    users, lengths = _users_and_lengths(sequences, sorted(sequences))
    order = np.random.default_rng([seed, 11]).permutation(len(users))
    n_train = int(round(ratios[0] * len(users)))
    n_val = int(round(ratios[1] * len(users)))
    rank = np.empty(len(users), np.int64)
    rank[order] = np.arange(len(users))  # each user's place in the permutation
    role = (rank >= n_train).astype(np.int64) + (rank >= n_train + n_val)  # 0 train, 1 val, 2 test
    out = {}
    for code, split in enumerate(SPLITS):
        mine = (role == code) & (lengths > 1)
        u, n = users[mine], lengths[mine]
        pairs = _ranges(u, 1, n) if split == "train" else (u, n - 1)
        out[split] = Windows(sequences, history_len, *pairs)
    return out


def global_time_split(interactions, dense: dict[int, int], history_len: int, ratios=(0.8, 0.1, 0.1)) -> dict[str, Windows]:
    """ReLLa's split: all interactions ordered by time (ties in file order) and cut 8:1:1; a sample's target
    is one interaction, its history the user's previous interactions (from any earlier period) with their
    ratings. Every interaction but each user's first is a sample. Built as arrays (Windows over each
    user's time-ordered items and ratings): no Python object per sample."""
    table = as_table(interactions)
    n = len(table)
    order = np.argsort(table.timestamp, kind="stable")  # time, then file order
    users, items, ratings = table.user[order], dense_items(table, dense, order=order), table.rating[order]
    del order  # each temporary goes as soon as it is used (BENCHMARKS.md, "Shard build": the time split's load peak)
    by_user = np.argsort(users, kind="stable")  # each user's interactions together, in time order
    grouped = users[by_user]
    starts = _run_starts(grouped)
    counts = np.diff(np.r_[starts, n])
    index = np.int32 if n < 2**31 else np.int64
    position = np.empty(n, index)  # each interaction's place in its user's sequence
    position[by_user] = np.arange(n, dtype=index) - np.repeat(starts.astype(index), counts)
    item_seq, rating_seq = items[by_user], ratings[by_user]
    del items, ratings, by_user
    heads, starts, counts = grouped[starts].tolist(), starts.tolist(), counts.tolist()
    del grouped
    sequences = {u: item_seq[a:a + c] for u, a, c in zip(heads, starts, counts)}
    user_ratings = {u: rating_seq[a:a + c] for u, a, c in zip(heads, starts, counts)}
    cut1, cut2 = int(ratios[0] * n), int((ratios[0] + ratios[1]) * n)
    out = {}
    for split, (lo, hi) in zip(SPLITS, ((0, cut1), (cut1, cut2), (cut2, n))):
        k = lo + np.flatnonzero(position[lo:hi] > 0)  # a sample needs a history
        out[split] = Windows(sequences, history_len, users[k], position[k], user_ratings)
    return out
