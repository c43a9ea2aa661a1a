"""Pretrain a SASRec on the training part of each user's sequence (softmax cross-entropy over all
items at every position), keep the epoch with the best validation HR@10, then freeze it.

The training part is the sequence without its last two items (those are the validation and test
targets of the leave-one-out split), so the SRec never sees a validation or test target.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from trainer.srec.sasrec import SASRec, left_pad

log = logging.getLogger(__name__)


def _train_windows(sequences: dict[int, list[int]], max_len: int, pad_id: int):
    inputs, targets = [], []
    for seq in sequences.values():
        train = seq[:-2]
        if len(train) < 2:
            continue
        for end in range(len(train), 1, -max_len):  # cover long sequences in windows of max_len
            window = train[max(0, end - max_len - 1):end]
            inputs.append(window[:-1])
            targets.append(window[1:])
    x = left_pad(inputs, max_len, pad_id)
    y = left_pad(targets, max_len, -100)
    return x, y


@torch.no_grad()
def hit_rate(model: SASRec, sequences: dict[int, list[int]], k: int = 10, which: str = "val") -> float:
    """Full-ranking HR@k on the validation (second-last) or test (last) item of every user."""
    model.eval()
    hist, tgt = [], []
    for seq in sequences.values():
        if len(seq) < 3:
            continue
        cut = len(seq) - (2 if which == "val" else 1)
        hist.append(seq[:cut])
        tgt.append(seq[cut])
    hits = 0
    for i in range(0, len(hist), 512):
        x = left_pad(hist[i:i + 512], model.config["max_len"], model.num_items)
        topk = model.scores(x).topk(k, dim=-1).indices
        hits += (topk == torch.as_tensor(tgt[i:i + 512])[:, None]).any(-1).sum().item()
    return hits / max(1, len(tgt))


def pretrain_sasrec(sequences: dict[int, list[int]], num_items: int, *, hidden: int, blocks: int, heads: int,
                    max_len: int, dropout: float, epochs: int, lr: float, batch_size: int, seed: int,
                    patience: int = 3) -> tuple[SASRec, dict]:
    torch.manual_seed(seed)
    model = SASRec(num_items, hidden=hidden, blocks=blocks, heads=heads, max_len=max_len, dropout=dropout)
    x, y = _train_windows(sequences, max_len, num_items)
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
            out = model.sequence_output(x[idx])
            logits = out @ model.item_emb.weight[:num_items].T
            loss = F.cross_entropy(logits.reshape(-1, num_items), y[idx].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        hr = hit_rate(model, sequences, 10, "val")
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
    return model, {"best_val_hr@10": best, "test_hr@10": hit_rate(model, sequences, 10, "test"), "epochs": history}
