"""Ranking, once for every evaluation: the LLM's candidates scored by likelihood, the baselines on the
same candidates (trainer/evaluation/evaluate.py), and the SRec's own protocols (trainer/model/srec/metrics.py).

    ranks = target_ranks(scores, target_index)   # [B]: 0-based rank of each row's target
    ranking_metrics(ranks, hr_at=(1, 5), ndcg_at=(5,))   # {"samples", "hr@1", "hr@5", "ndcg@5"}

The tie rule, everywhere: a tie counts against the target for the entries listed before it (a sample's
candidates are in a seeded random order, so this is fair; over a whole catalogue "before" is a lower
item id). NDCG@K with one relevant item is 1 / log2(rank + 2) when rank < K, else 0.

The baselines are scorers like an SRec (`pad`, `scores` over every item): Popularity, how often each
item is a training target; Random, uniform scores from a seeded generator.
"""

from __future__ import annotations

import numpy as np
import torch


def target_ranks(scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target (its column target_index) among the row's scores, ties
    counting against it for the columns before it."""
    t = scores.gather(1, target_index[:, None])
    before = torch.arange(scores.shape[1], device=scores.device)[None] < target_index[:, None]
    return (scores > t).sum(1) + ((scores == t) & before).sum(1)


def ranking_metrics(ranks: torch.Tensor, hr_at=(1, 5), ndcg_at=(5,)) -> dict:
    """HR@K (the share of ranks below K) and NDCG@K over 0-based ranks, with the number of samples."""
    r = torch.as_tensor(ranks).double()
    out = {"samples": len(r)}
    for k in hr_at:
        out[f"hr@{k}"] = float((r < k).double().mean()) if len(r) else 0.0
    for k in ndcg_at:
        out[f"ndcg@{k}"] = float(((r < k).double() / torch.log2(r + 2)).mean()) if len(r) else 0.0
    return out


class Popularity:
    """Scores every item by how often it is a training target (LLaRA's sliding windows make every
    interaction of a training user a target once)."""

    def __init__(self, train_targets, num_items: int):
        counts = np.bincount(np.asarray(list(train_targets), dtype=np.int64), minlength=num_items)
        self.counts = torch.as_tensor(counts[:num_items], dtype=torch.float32)

    def pad(self, histories):  # the history is not read
        return torch.zeros(len(histories), 1, dtype=torch.long), torch.as_tensor([len(h) for h in histories])

    def scores(self, history, lengths):
        return self.counts.expand(len(history), -1)


class Random:
    """Uniform random scores for every item, from a generator seeded once."""

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = num_items
        self.gen = torch.Generator().manual_seed(seed)

    def pad(self, histories):  # the history is not read
        return torch.zeros(len(histories), 1, dtype=torch.long), torch.as_tensor([len(h) for h in histories])

    def scores(self, history, lengths):
        return torch.rand(len(history), self.num_items, generator=self.gen)
