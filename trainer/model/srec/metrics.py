"""Evaluation of a sequential recommender, three protocols side by side.

- full ranking: the target's rank among all items; HR@K and NDCG@K, K = 1, 5, 10, 20. With
  `mask_history` (the default, as RecBole and the ICLRec/CL4SRec line) the items of the user's history
  are left out of the ranking (a target that is also in the history then cannot be hit, as there);
  without it every item is ranked, the user's own history too (what this project reported before
  issue 25, and what LLaRA's PROVENANCE figures for its SASRecs are)
- LLaRA's 20 candidates: HR@1 among the sample's candidates (the same seeded candidates as the shards)
- the SASRec paper's protocol: the target against 100 negatives drawn uniformly from the items the
  user has not interacted with (history and target excluded); HR@10 and NDCG@10

Scorers: any SRec (`scores(history, lengths)`), plus the popularity and random baselines below.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.model.srec.common import left_pad

KS = (1, 5, 10, 20)


class Popularity:
    """Scores every item by its number of occurrences as a training target or in a training history."""

    def __init__(self, train_samples: list[dict], num_items: int):
        counts = np.zeros(num_items)
        for s in train_samples:
            counts[s["target"]] += 1
        self.counts = torch.as_tensor(counts, dtype=torch.float32)
        self.num_items, self.max_len = num_items, 10

    def pad(self, histories):
        return left_pad(histories, self.max_len, self.num_items)

    def scores(self, history, lengths):
        return self.counts.expand(len(history), -1)


class Random:
    def __init__(self, num_items: int, seed: int = 0):
        self.num_items, self.max_len = num_items, 10
        self.gen = torch.Generator().manual_seed(seed)

    def pad(self, histories):
        return left_pad(histories, self.max_len, self.num_items)

    def scores(self, history, lengths):
        return torch.rand(len(history), self.num_items, generator=self.gen)


def _rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: the number of items scored strictly higher."""
    t = scores.gather(1, targets[:, None])
    return (scores > t).sum(1)


def protocol(mask_history: bool) -> str:
    """The full-ranking protocol's name, as every report writes it."""
    return "history masked" if mask_history else "history ranked"


@torch.no_grad()
def evaluate(scorer, samples: list[dict], num_items: int, candidates: list[list[int]] | None = None,
             seed: int = 0, batch_size: int = 512, n_sampled: int = 100, mask_history: bool = True) -> dict:
    if hasattr(scorer, "eval"):
        scorer.eval()
    rng = np.random.default_rng([seed, 100])
    sums = {f"hr@{k}": 0.0 for k in KS} | {f"ndcg@{k}": 0.0 for k in KS}
    sums |= {"cand20_hr@1": 0.0, "sampled100_hr@10": 0.0, "sampled100_ndcg@10": 0.0}
    n = len(samples)
    for i in range(0, n, batch_size):
        chunk = samples[i:i + batch_size]
        x, lengths = scorer.pad([s["history"] for s in chunk])
        scores = scorer.scores(x, lengths).float()
        targets = torch.as_tensor([s["target"] for s in chunk])
        full = scores
        if mask_history:  # the user's own history is not ranked (the other protocols read `scores`)
            full = scores.clone()
            for b, s in enumerate(chunk):
                full[b, list(s["history"])] = float("-inf")
        rank = _rank(full, targets)
        if mask_history:  # a target that is in its own history is never hit (its score is -inf)
            rank = torch.where(full.gather(1, targets[:, None]).squeeze(1) == float("-inf"), num_items, rank)
        for k in KS:
            hit = rank < k
            sums[f"hr@{k}"] += hit.sum().item()
            sums[f"ndcg@{k}"] += (hit.float() / torch.log2(rank.float() + 2)).sum().item()
        if candidates is not None:
            cand = torch.as_tensor(candidates[i:i + batch_size])
            cs = scores.gather(1, cand)
            best = cand.gather(1, cs.argmax(1, keepdim=True)).squeeze(1)
            sums["cand20_hr@1"] += (best == targets).sum().item()
        for b, s in enumerate(chunk):  # SASRec's protocol: 100 negatives the user never touched
            seen = set(s["history"]) | {s["target"]}
            want = min(n_sampled, num_items - len(seen))  # a tiny catalogue has fewer than 100 to offer
            neg = []
            while len(neg) < want:
                for c in rng.integers(0, num_items, size=2 * n_sampled).tolist():
                    if c not in seen:
                        neg.append(c)
                        seen.add(c)
                        if len(neg) == want:
                            break
            r = int((scores[b, neg] > scores[b, s["target"]]).sum())
            if r < 10:
                sums["sampled100_hr@10"] += 1
                sums["sampled100_ndcg@10"] += 1 / math.log2(r + 2)
    out = {k: v / n if n else 0.0 for k, v in sums.items()}
    if candidates is None:
        out.pop("cand20_hr@1")
    out["samples"] = n
    out["full_ranking"] = protocol(mask_history)
    return out


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per model, one column per metric."""
    cols = [c for c in next(iter(rows.values())) if c not in ("samples", "full_ranking")]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
