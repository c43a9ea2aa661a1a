"""What every sequential recommender shares: the padding convention and the trainer's interface.

Histories are passed *left-padded* to the model's max length with the padding id `num_items`
(LLaRA's convention: the embedding table has num_items + 1 rows), with their true lengths:

    item_vectors(item_ids)          -> [N, hidden]   behaviour vector of each item (the LLM's behaviour token)
    user_state(history, lengths)    -> [B, hidden]   sequence-level state after the last item
    scores(history, lengths)        -> [B, num_items] next-item scores over the whole catalogue
"""

from __future__ import annotations

import torch
import torch.nn as nn


def left_pad(histories: list[list[int]], max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last max_len items of each history, left-padded with pad_id. Returns (ids [B, L], lengths [B])."""
    out = torch.full((len(histories), max_len), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(histories), dtype=torch.long)
    for b, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[b, max_len - len(h):] = torch.as_tensor(h, dtype=torch.long)
        lengths[b] = len(h)
    return out, lengths


def right_align(history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Left-padded [B, L] -> left-aligned (padding on the right), same padding ids."""
    L = history.shape[1]
    idx = (torch.arange(L, device=history.device)[None] + (L - lengths)[:, None]) % L
    return history.gather(1, idx)


def init_item_table(table: nn.Embedding, num_items: int) -> None:
    """Rows of unit norm in expectation (sane initial dot-product logits), the padding row zero."""
    nn.init.normal_(table.weight, std=table.embedding_dim ** -0.5)
    with torch.no_grad():
        table.weight[num_items].zero_()


class SRec(nn.Module):
    """Base: the item table is `item_emb` (num_items + 1 rows, the last one padding)."""

    num_items: int
    config: dict

    @property
    def hidden(self) -> int:
        return self.item_emb.embedding_dim

    @property
    def max_len(self) -> int:
        return self.config["max_len"]

    def check_ids(self, item_ids: torch.Tensor) -> None:
        if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.num_items):
            raise IndexError(f"item id out of range: got [{int(item_ids.min())}, {int(item_ids.max())}], "
                             f"the SRec knows items 0..{self.num_items - 1}")

    def item_vectors(self, item_ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(item_ids)
        return self.item_emb(item_ids)

    def scores(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.user_state(history, lengths) @ self.item_emb.weight[: self.num_items].T

    def pad(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(histories, self.max_len, self.num_items)
