"""The SASRec variant of LLaRA's released checkpoints (`rec_model/{movielens,steam,lastfm}.pt`),
re-implemented from its documented structure so the released weights load by name and give the
same outputs (see ../shared/data/llara-srec/PROVENANCE.md for the module tree).

Forward (eval): item + positional embedding over a *left-aligned* sequence of state_size items
(padding on the right), padding rows zeroed; ln_1; one attention block whose queries are the
normalised sequence and whose keys/values are the unnormalised one, scores scaled by
1/sqrt(hidden) (not per head), padding keys and future positions masked with -2^32 + 1, rows of
all-zero queries zeroed, residual onto the normalised queries; ln_2; a position-wise FFN of two
1x1 convolutions with residual and LayerNorm; padding zeroed; ln_3; the state at position
len - 1; `s_fc` gives the scores. The behaviour vector of an item is its `item_embeddings` row.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.srec.common import SRec, right_align

_NEG = -(2 ** 32) + 1


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_v = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        B, T, _ = queries.shape
        split = self.hidden // self.heads
        q = torch.cat(torch.split(self.linear_q(queries), split, dim=2), dim=0)
        k = torch.cat(torch.split(self.linear_k(keys), split, dim=2), dim=0)
        v = torch.cat(torch.split(self.linear_v(keys), split, dim=2), dim=0)
        att = torch.bmm(q, k.transpose(1, 2)) / self.hidden ** 0.5
        key_mask = torch.sign(torch.abs(keys.sum(dim=-1))).repeat(self.heads, 1)[:, None, :].expand(-1, T, -1)
        att = torch.where(key_mask == 0, torch.full_like(att, _NEG), att)
        causal = torch.tril(torch.ones(T, T, device=att.device))[None].expand(att.shape[0], -1, -1)
        att = torch.where(causal == 0, torch.full_like(att, _NEG), att)
        att = att.softmax(dim=-1)
        query_mask = torch.sign(torch.abs(queries.sum(dim=-1))).repeat(self.heads, 1)[:, :, None]
        out = torch.bmm(self.dropout(att * query_mask), v)
        out = torch.cat(torch.split(out, B, dim=0), dim=2)
        return out + queries


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Conv1d(hidden, hidden, 1)
        self.w_2 = nn.Conv1d(hidden, hidden, 1)
        self.layer_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = self.w_2(F.relu(self.w_1(x.transpose(1, 2)))).transpose(1, 2)
        return self.layer_norm(self.dropout(out) + x)


class LlaraSASRec(SRec):
    def __init__(self, num_items: int, hidden: int = 64, max_len: int = 10, heads: int = 1, dropout: float = 0.1):
        super().__init__()
        self.config = {"arch": "llara_sasrec", "num_items": num_items, "hidden": hidden, "max_len": max_len,
                       "heads": heads, "dropout": dropout}
        self.num_items = num_items
        self.item_embeddings = nn.Embedding(num_items + 1, hidden)
        self.positional_embeddings = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.ln_3 = nn.LayerNorm(hidden)
        self.mh_attn = _Attention(hidden, heads, dropout)
        self.feed_forward = _FeedForward(hidden, dropout)
        self.s_fc = nn.Linear(hidden, num_items)

    @property
    def item_emb(self) -> nn.Embedding:
        return self.item_embeddings

    def user_state(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        states = right_align(history, lengths)  # LLaRA's layout: left-aligned, padded on the right
        x = self.item_embeddings(states) + self.positional_embeddings(torch.arange(states.shape[1], device=states.device))
        mask = (states != self.num_items).float().unsqueeze(-1)
        x = self.emb_dropout(x) * mask
        h = self.feed_forward(self.ln_2(self.mh_attn(self.ln_1(x), x)))
        h = self.ln_3(h * mask)
        return h[torch.arange(len(lengths), device=h.device), (lengths - 1).clamp(min=0)]

    def scores(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.s_fc(self.user_state(history, lengths))
