"""GRU4Rec (Hidasi et al., 2016): a GRU over the item sequence; the state after the last item,
projected to the item space, scores every item by dot product."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.model.srec.common import SRec, init_item_table, right_align


class GRU4Rec(SRec):
    def __init__(self, num_items: int, hidden: int = 64, layers: int = 1, max_len: int = 10, dropout: float = 0.1):
        super().__init__()
        self.config = {"arch": "gru4rec", "num_items": num_items, "hidden": hidden, "layers": layers,
                       "max_len": max_len, "dropout": dropout}
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        init_item_table(self.item_emb, num_items)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, hidden)

    def user_state(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.item_emb(right_align(history, lengths)))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.out(h[-1])
