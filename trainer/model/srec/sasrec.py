"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence; next-item scores
are the dot product of the last position's state with the item embeddings.

Knobs (srec.*, defaults = the model as it always was here): ffn_inner (the feed-forward's inner size;
0 = hidden, as the SASRec authors' code), activation (relu as the authors; gelu as RecBole and the
ICLRec/CL4SRec line), norm ("pre": the authors' order, LayerNorm before attention and feed-forward, the
attention's query normalised too; "post": LayerNorm after each residual sum, as BERT and RecBole),
attn_dropout (-1 = dropout)."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.model.srec.common import SRec, init_item_table


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}  # srec.activation
NORMS = ("pre", "post")  # srec.norm


class SASRecBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, ffn_inner: int = 0, activation: str = "relu",
                 norm: str = "pre", attn_dropout: float = -1.0):
        super().__init__()
        inner = ffn_inner or hidden
        self.norm = norm
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout if attn_dropout < 0 else attn_dropout,
                                          batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), ACTIVATIONS[activation](), nn.Dropout(dropout),
                                 nn.Linear(inner, hidden), nn.Dropout(dropout))

    def forward(self, x, causal_mask, keep):
        if self.norm == "post":
            h, _ = self.attn(x, x, x, attn_mask=causal_mask, need_weights=False)
            x = self.attn_norm(x + h)
            x = self.ffn_norm(x + self.ffn(x))
            return x * keep
        q = self.attn_norm(x)
        h, _ = self.attn(q, x, x, attn_mask=causal_mask, need_weights=False)
        x = q + h
        x = x + self.ffn(self.ffn_norm(x))
        return x * keep


class SASRec(SRec):
    def __init__(self, num_items: int, hidden: int = 64, blocks: int = 1, heads: int = 1, max_len: int = 10,
                 dropout: float = 0.1, ffn_inner: int = 0, activation: str = "relu", norm: str = "pre",
                 attn_dropout: float = -1.0):
        super().__init__()
        if activation not in ACTIVATIONS or norm not in NORMS:
            raise ValueError(f"srec.activation={activation!r} / srec.norm={norm!r}: expected relu|gelu / pre|post")
        self.config = {"arch": "sasrec", "num_items": num_items, "hidden": hidden, "blocks": blocks,
                       "heads": heads, "max_len": max_len, "dropout": dropout, "ffn_inner": ffn_inner,
                       "activation": activation, "norm": norm, "attn_dropout": attn_dropout}
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, dropout, ffn_inner, activation, norm, attn_dropout)
                                    for _ in range(blocks))
        # post-norm blocks end normalised; the final LayerNorm of the authors' (pre-norm) order is kept for both
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        init_item_table(self.item_emb, num_items)
        nn.init.normal_(self.pos_emb.weight, std=hidden ** -0.5)

    def sequence_output(self, history: torch.Tensor) -> torch.Tensor:
        """history: [B, L] left-padded with num_items. Returns [B, L, hidden]."""
        L = history.shape[1]
        x = self.item_emb(history) * self.hidden ** 0.5
        x = x + self.pos_emb(torch.arange(self.max_len - L, self.max_len, device=history.device))[None]
        keep = (history != self.num_items).unsqueeze(-1).to(x.dtype)
        x = self.dropout(x) * keep
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=history.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.final_norm(x)

    def user_state(self, history: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """With left padding the last position holds the last item."""
        return self.sequence_output(history)[:, -1]
