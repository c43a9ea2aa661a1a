"""Pretrain a SASRec on the same training samples as the LLM (history -> next item, softmax
cross-entropy over all items), keep the epoch with the best validation HR@10, then freeze it.
The SRec never sees a validation or test target."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from trainer.srec.sasrec import SASRec, left_pad

log = logging.getLogger(__name__)


@torch.no_grad()
def hit_rate(model: SASRec, samples: list[dict], k: int = 10) -> float:
    """Full-ranking HR@k: the share of samples whose target is among the k highest-scored items."""
    model.eval()
    hits = 0
    for i in range(0, len(samples), 512):
        chunk = samples[i:i + 512]
        x = left_pad([s["history"] for s in chunk], model.config["max_len"], model.num_items)
        topk = model.scores(x).topk(k, dim=-1).indices
        hits += (topk == torch.as_tensor([s["target"] for s in chunk])[:, None]).any(-1).sum().item()
    return hits / max(1, len(samples))


def pretrain_sasrec(splits: dict[str, list[dict]], num_items: int, *, hidden: int, blocks: int, heads: int,
                    max_len: int, dropout: float, epochs: int, lr: float, batch_size: int, seed: int,
                    patience: int = 3) -> tuple[SASRec, dict]:
    """Train on the training samples (history -> target, softmax over all items), keep the epoch with
    the best validation HR@10, return the frozen model and a report."""
    torch.manual_seed(seed)
    model = SASRec(num_items, hidden=hidden, blocks=blocks, heads=heads, max_len=max_len, dropout=dropout)
    train = [s for s in splits["train"] if s["history"]]
    val = [s for s in splits.get("val", []) if s["history"]]
    x = left_pad([s["history"] for s in train], max_len, num_items)
    y = torch.as_tensor([s["target"] for s in train])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad = -1.0, None, 0
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model.scores(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        hr = hit_rate(model, val, 10)
        history.append({"epoch": epoch, "loss": total / len(x), "val_hr@10": hr})
        log.info("srec epoch %d  loss %.4f  val HR@10 %.4f", epoch, total / len(x), hr)
        if hr > best:
            best, best_state, bad = hr, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    test = [s for s in splits.get("test", []) if s["history"]]
    return model, {"best_val_hr@10": best, "test_hr@10": hit_rate(model, test, 10), "epochs": history}
