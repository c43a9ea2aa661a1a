"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence.

Item ids are dense 0..num_items-1; `num_items` itself is the padding id (LLaRA's convention), so the
embedding table has num_items + 1 rows and the padding row is zero.

The trainer uses two methods, shared by every SRec:
    item_vectors(item_ids)        -> [N, hidden]  the behaviour vector of each item (its embedding row)
    user_state(history, lengths)  -> [B, hidden]  the sequence-level state after the last item
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


class SASRecBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.Dropout(dropout))

    def forward(self, x, causal_mask, keep):
        q = self.attn_norm(x)
        h, _ = self.attn(q, x, x, attn_mask=causal_mask, need_weights=False)
        x = q + h
        x = x + self.ffn(self.ffn_norm(x))
        return x * keep


class SASRec(nn.Module):
    def __init__(self, num_items: int, hidden: int = 64, blocks: int = 1, heads: int = 1,
                 max_len: int = 10, dropout: float = 0.1):
        super().__init__()
        self.config = {"arch": "sasrec", "num_items": num_items, "hidden": hidden, "blocks": blocks,
                       "heads": heads, "max_len": max_len, "dropout": dropout}
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        nn.init.normal_(self.item_emb.weight, std=hidden ** -0.5)  # unit-norm rows: sane initial logits
        nn.init.normal_(self.pos_emb.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[num_items].zero_()

    @property
    def hidden(self) -> int:
        return self.item_emb.embedding_dim

    def item_vectors(self, item_ids: torch.Tensor) -> torch.Tensor:
        if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.num_items):
            raise IndexError(f"item id out of range: got [{int(item_ids.min())}, {int(item_ids.max())}], "
                             f"the SRec knows items 0..{self.num_items - 1}")
        return self.item_emb(item_ids)

    def sequence_output(self, history: torch.Tensor) -> torch.Tensor:
        """history: [B, L] left-padded with num_items. Returns [B, L, hidden]."""
        L = history.shape[1]
        x = self.item_emb(history) * self.hidden ** 0.5
        x = x + self.pos_emb(torch.arange(L, device=history.device))[None]
        keep = (history != self.num_items).unsqueeze(-1).to(x.dtype)
        x = self.dropout(x) * keep
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=history.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.final_norm(x)

    def user_state(self, history: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """State after the last item. With left padding the last position is always the last item."""
        return self.sequence_output(history)[:, -1]

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Next-item logits over all items: [B, num_items]."""
        return self.user_state(history) @ self.item_emb.weight[: self.num_items].T


def left_pad(histories: list[list[int]], max_len: int, pad_id: int) -> torch.Tensor:
    out = torch.full((len(histories), max_len), pad_id, dtype=torch.long)
    for b, h in enumerate(histories):
        h = h[-max_len:]
        if h:
            out[b, max_len - len(h):] = torch.as_tensor(h, dtype=torch.long)
    return out


def save_srec(model: SASRec, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=1)


def load_srec(path: str) -> SASRec:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.pop("arch") != "sasrec":
        raise ValueError(f"{path}: unknown SRec architecture")
    model = SASRec(**cfg)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model


def srec_hash(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()
