"""Reference adapter injection: the embedding lookup with behaviour rows written at the slots.

    out[b, t] = behaviour[slot_map[b, t]]   where slot_map[b, t] >= 0
              = weight[token_ids[b, t]]     elsewhere

Plain torch ops (a lookup, a gather and a `where`), differentiable with respect to `weight` and
`behaviour`. It is the ground truth the fused kernels are compared with, the model's injection with
model.injection=reference, and the fused op's kernel on devices with none of their own. write_rows
is its second half: the behaviour rows written into an embedding output that is already made (a
base whose input embedding does more than a lookup, trainer/model/hybrid_embedding.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inject_reference(token_ids: torch.Tensor, weight: torch.Tensor, slot_map: torch.Tensor,
                     behaviour: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    if slot_map.shape != token_ids.shape:
        raise ValueError(f"slot_map {tuple(slot_map.shape)} must have the shape of token_ids {tuple(token_ids.shape)}")
    if slot_map.numel() and int(slot_map.max()) >= behaviour.shape[0]:
        raise IndexError(f"slot_map names behaviour row {int(slot_map.max())}, only {behaviour.shape[0]} rows given")
    return write_rows(F.embedding(token_ids, weight, padding_idx=padding_idx), slot_map, behaviour)


def write_rows(embedded: torch.Tensor, slot_map: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """embedded [B, T, H] with behaviour[slot_map[b, t]] at the slots (slot_map >= 0), every other row as it was."""
    if slot_map.numel() and int(slot_map.max()) >= behaviour.shape[0]:
        raise IndexError(f"slot_map names behaviour row {int(slot_map.max())}, only {behaviour.shape[0]} rows given")
    rows = behaviour.to(embedded.dtype)[slot_map.clamp(min=0)]
    return torch.where((slot_map >= 0).unsqueeze(-1), rows, embedded)
