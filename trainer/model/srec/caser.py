"""Caser (Tang & Wang, 2018): horizontal and vertical convolutions over the L x d matrix of the
last L items' embeddings. The user embedding of the paper is left out: samples here carry no
user id the SRec could know at test time for unseen users, and LLaRA's prompts need none."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.srec.common import SRec, init_item_table


class Caser(SRec):
    def __init__(self, num_items: int, hidden: int = 64, max_len: int = 10, n_h: int = 16, n_v: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.config = {"arch": "caser", "num_items": num_items, "hidden": hidden, "max_len": max_len,
                       "n_h": n_h, "n_v": n_v, "dropout": dropout}
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        init_item_table(self.item_emb, num_items)
        self.vertical = nn.Conv2d(1, n_v, (max_len, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, n_h, (h, hidden)) for h in range(1, max_len + 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(n_v * hidden + n_h * max_len, hidden)

    def user_state(self, history: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.item_emb(history).unsqueeze(1)  # [B, 1, L, d]; padding rows are zero
        v = self.vertical(x).flatten(1)
        h = [F.relu(conv(x)).squeeze(3).max(dim=2).values for conv in self.horizontal]
        return F.relu(self.fc(self.dropout(torch.cat([v, *h], dim=1))))
