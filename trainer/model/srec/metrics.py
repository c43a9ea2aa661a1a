"""Evaluation of a sequential recommender, three protocols side by side.

- full ranking: the target's rank among all items; HR@K and NDCG@K, K = 1, 5, 10, 20. With
  `mask_history` (the default, as RecBole and the ICLRec/CL4SRec line) the items of the user's history
  are left out of the ranking (a target that is also in the history then cannot be hit, as there);
  without it every item is ranked, the user's own history too (what this project reported before
  issue 25, and what LLaRA's PROVENANCE figures for its SASRecs are)
- LLaRA's 20 candidates: HR@1 among the sample's candidates (the same seeded candidates as the shards)
- the SASRec paper's protocol: the target against 100 negatives drawn uniformly from the items the
  user has not interacted with (history and target excluded); HR@10 and NDCG@10

Scorers: any SRec (`pad`, `scores(history, lengths)`), or the popularity and random baselines of
trainer/evaluation/ranking.py, which also ranks and computes HR and NDCG for every protocol here.
"""

from __future__ import annotations


import numpy as np
import torch

from trainer.evaluation.ranking import ranking_metrics, target_ranks

KS = (1, 5, 10, 20)


def protocol(mask_history: bool) -> str:
    """The full-ranking protocol's name, as every report writes it."""
    return "history masked" if mask_history else "history ranked"


@torch.no_grad()
def evaluate(scorer, samples: list[dict], num_items: int, candidates: list[list[int]] | None = None,
             seed: int = 0, batch_size: int = 512, n_sampled: int = 100, mask_history: bool = True) -> dict:
    """Every protocol of this module for `scorer` (an SRec, or a baseline of trainer/evaluation/ranking.py)
    on the samples; ranks and metrics by trainer/evaluation/ranking.py (its tie rule: over the catalogue a
    tie counts against the target for lower item ids; among sampled negatives the target is listed first)."""
    if hasattr(scorer, "eval"):
        scorer.eval()
    rng = np.random.default_rng([seed, 100])
    full_ranks, cand_ranks, sampled_ranks = [], [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        x, lengths = scorer.pad([s["history"] for s in chunk])
        scores = scorer.scores(x, lengths).float()
        targets = torch.as_tensor([s["target"] for s in chunk])
        full = scores
        if mask_history:  # the user's own history is not ranked (the other protocols read `scores`)
            full = scores.clone()
            for b, s in enumerate(chunk):
                full[b, list(s["history"])] = float("-inf")
        rank = target_ranks(full, targets)
        if mask_history:  # a target that is in its own history is never hit (its score is -inf)
            rank = torch.where(full.gather(1, targets[:, None]).squeeze(1) == float("-inf"), num_items, rank)
        full_ranks.append(rank)
        if candidates is not None:
            cand = torch.as_tensor(candidates[i:i + batch_size])
            present = (cand == targets[:, None]).any(1)
            r = target_ranks(scores.gather(1, cand), (cand == targets[:, None]).long().argmax(1))
            cand_ranks.append(torch.where(present, r, cand.shape[1]))  # a target missing from its candidates: no hit
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
            sampled = scores[b, [s["target"], *neg]][None]
            sampled_ranks.append(target_ranks(sampled, torch.zeros(1, dtype=torch.long)))

    def ranks(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    full_m = ranking_metrics(ranks(full_ranks), hr_at=KS, ndcg_at=KS)
    out = {k: v for k, v in full_m.items() if k != "samples"}
    if candidates is not None:
        out["cand20_hr@1"] = ranking_metrics(ranks(cand_ranks), hr_at=(1,), ndcg_at=())["hr@1"]
    sampled_m = ranking_metrics(ranks(sampled_ranks), hr_at=(10,), ndcg_at=(10,))
    out["sampled100_hr@10"], out["sampled100_ndcg@10"] = sampled_m["hr@10"], sampled_m["ndcg@10"]
    out["samples"] = len(samples)
    out["full_ranking"] = protocol(mask_history)
    return out


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per model, one column per metric."""
    cols = [c for c in next(iter(rows.values())) if c not in ("samples", "full_ranking")]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
