"""The LLM's input embedding, replaced by one that writes behaviour tokens into its output.

`HybridEmbedding` holds the LLM's own embedding Parameter (the same tensor, not a copy) and the
trainable adapter. It is installed with `model.set_input_embeddings(...)`, so
`get_input_embeddings()` keeps working for transformers and peft.

Per batch, the training step arms it with `inject(slot_map, item_vectors)`: the next forward whose
input ids have the slot map's shape runs the adapter once over the batch's unique items and writes
adapter(item_vectors)[slot_map[b, t]] at every position with slot_map >= 0, in one fused op
(trainer/kernels/inject.py; `injection="reference"` uses the plain-torch reference). Any other
forward (text-only steps, the one-token decode steps of generation) is a plain lookup, so text-only
steps cost what a plain embedding costs.

User token (data.user_token, beyond LLaRA; off by default, and then `user_adapter` does not exist):
`inject(slot_map, item_vectors, user_states)` makes the behaviour rows
[adapter(item_vectors); user_adapter(user_states)], and the slot map indexes that matrix (a sample's
[UserEmb] position holds U + b); the same fused op writes both kinds. A second adapter, not the item
adapter, maps user states: an SRec's user_state is a sequence-level output (SASRec's last position
after its blocks and final norm, GRU4Rec's hidden state, Caser's convolution features; LLaRA's
SASRec scores items through one more linear layer on it, so its state is not even dot-product
compatible with its item rows) that lives in another space than the item embeddings, even where
the two share a width; one projector for both would have to serve two input distributions, and
the LLM could not tell a user row from an item row.

Under DeepSpeed ZeRO-3 the weight is partitioned (shape (0,) outside forward); reading it inside
this module's forward gives the full tensor because DeepSpeed gathers a module's parameters around
its forward. No GatheredParameters is used here (it fails inside forward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.kernels.inject import inject_fused
from trainer.kernels.reference import inject_reference

INJECTIONS = {"fused": inject_fused, "reference": inject_reference}


class Adapter(nn.Module):
    """LLaRA's projector: Linear(srec_dim -> llm_dim), GELU, Linear(llm_dim -> llm_dim)."""

    def __init__(self, srec_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(srec_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class HybridEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, adapter: Adapter, injection: str = "fused",
                 user_adapter: Adapter | None = None):
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"model.injection={injection!r}: expected fused or reference")
        self.injection = injection
        self.weight = embedding.weight  # the LLM's own Parameter
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.adapter = adapter
        self.user_adapter = user_adapter  # only with data.user_token
        self._armed: tuple | None = None

    @contextlib.contextmanager
    def inject(self, slot_map: torch.Tensor, item_vectors: torch.Tensor, user_states: torch.Tensor | None = None):
        """Within the block, forwards over ids shaped like slot_map get behaviour tokens at its slots.

        With a user adapter, `user_states` [B', srec_dim] is required (text-only steps pass a zero
        row, as for the items, so the user adapter's gradient is an exact zero); without one it must
        be None."""
        if (user_states is None) != (self.user_adapter is None):
            raise ValueError("user_states must be given exactly when the model has a user adapter (data.user_token): "
                             f"user adapter {'present' if self.user_adapter is not None else 'absent'}, "
                             f"user_states {'missing' if user_states is None else 'given'}")
        self._armed = (slot_map, item_vectors, user_states)
        try:
            yield
        finally:
            self._armed = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._armed is None or self._armed[0].shape != input_ids.shape:
            return F.embedding(input_ids, self.weight, self.padding_idx)
        slot_map, item_vectors, user_states = self._armed
        dtype = self.adapter.fc1.weight.dtype
        behaviour = self.adapter(item_vectors.to(dtype))  # once per unique item
        if user_states is not None:  # rows U.. : one per sample
            behaviour = torch.cat([behaviour, self.user_adapter(user_states.to(dtype))])
        return INJECTIONS[self.injection](input_ids, self.weight, slot_map, behaviour, self.padding_idx)
