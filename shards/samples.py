"""Interactions -> time-ordered sequences -> leave-one-out splits -> LLaRA next-item samples.

A sample is a plain dict:
    {"user": int, "history": [item, ...], "target": item, "candidates": [item x 20]}
with dense item ids 0..num_items-1 (the vocabulary maps raw ids to dense ones).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

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


def user_sequences(interactions, dense: dict[int, int], source: str = "interactions") -> dict[int, list[int]]:
    """Group by user, sort by (timestamp, original order), map raw item ids to dense ones."""
    per_user: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for order, (user, item, _rating, ts) in enumerate(interactions):
        if item not in dense:
            raise ValueError(f"{source}: record {order + 1} names item {item}, which is not in the items table")
        per_user[user].append((ts, order, dense[item]))
    return {u: [item for _ts, _o, item in sorted(rows)] for u, rows in sorted(per_user.items())}


def kcore_filter(interactions, k: int):
    """Drop users and items with fewer than k interactions, repeatedly, until none is left."""
    if k <= 1:
        return list(interactions)
    rows = list(interactions)
    while True:
        users, items = defaultdict(int), defaultdict(int)
        for u, i, *_ in rows:
            users[u] += 1
            items[i] += 1
        kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def leave_one_out(sequences: dict[int, list[int]], history_len: int) -> dict[str, list[dict]]:
    """Last item -> test, second-last -> val, every earlier position with a history -> train."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for user, seq in sequences.items():
        if len(seq) < 3:
            continue
        for t in range(1, len(seq)):
            split = "test" if t == len(seq) - 1 else "val" if t == len(seq) - 2 else "train"
            out[split].append({"user": user, "history": seq[max(0, t - history_len):t], "target": seq[t], "position": t})
    return out


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


def user_split(sequences: dict[int, list[int]], history_len: int, seed: int, ratios=(0.8, 0.1, 0.1)) -> dict[str, list[dict]]:
    """LLaRA's sliding windows: users are split 8:1:1 by a seeded permutation; every position of a
    training user's sequence (with a non-empty history) is a training sample; a validation or test
    user gives one sample, their last item with the history before it."""
    users = sorted(sequences)
    order = np.random.default_rng([seed, 11]).permutation(len(users))
    n_train = int(round(ratios[0] * len(users)))
    n_val = int(round(ratios[1] * len(users)))
    role = {}
    for rank, idx in enumerate(order):
        role[users[idx]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for user in users:
        seq = sequences[user]
        positions = range(1, len(seq)) if role[user] == "train" else [len(seq) - 1] if len(seq) > 1 else []
        for t in positions:
            out[role[user]].append({"user": user, "history": seq[max(0, t - history_len):t], "target": seq[t], "position": t})
    return out


def global_time_split(interactions, dense: dict[int, int], history_len: int, ratios=(0.8, 0.1, 0.1)) -> dict[str, list[dict]]:
    """ReLLa's split: all interactions ordered by time and cut 8:1:1; a sample's target is one
    interaction, its history the user's previous interactions (from any earlier period)."""
    rows = sorted(((ts, order, user, dense[item], rating) for order, (user, item, rating, ts) in enumerate(interactions)))
    n = len(rows)
    cut1, cut2 = int(ratios[0] * n), int((ratios[0] + ratios[1]) * n)
    seen: dict[int, list[int]] = defaultdict(list)
    ratings: dict[int, list[float]] = defaultdict(list)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for k, (ts, _order, user, item, rating) in enumerate(rows):
        split = "train" if k < cut1 else "val" if k < cut2 else "test"
        hist = seen[user]
        if hist:
            out[split].append({"user": user, "history": hist[-history_len:], "target": item, "position": len(hist),
                               "history_ratings": ratings[user][-history_len:], "rating": rating})
        hist.append(item)
        ratings[user].append(rating)
    return out
