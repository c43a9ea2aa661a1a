"""The LLM's input embedding, made hybrid: it writes behaviour tokens into its own output.

`hybrid_embedding(embedding, adapter, ...)` turns the base's input embedding into a HybridEmbedding
in place: the same object's state (its weight Parameter, the same tensor, not a copy; its buffers and
attributes) in a class made from the base's own embedding class with HybridEmbedding in front, plus the
trainable adapter. It is installed with `model.set_input_embeddings(...)`, so `get_input_embeddings()`
keeps working for transformers and peft, and its parameters keep their names (`embed_tokens.weight`,
`embed_tokens.adapter.*`).

Exactness: with nothing armed, its forward is the base class's own forward (a plain lookup for
nn.Embedding; the lookup times the family's scale for Gemma 3's scaled embedding; whatever the family
does), so a batch without behaviour tokens gives the unmodified base's logits, bit for bit. With
behaviour tokens armed, every position without a slot holds what the base's embedding gives there:
for a plain nn.Embedding (the common case: Llama, Mistral, Qwen, ...) the fused op makes the lookup and
the writes in one pass; for any other embedding class the base's own forward runs first and the
behaviour rows are written over its output at the slots (trainer/model/kernels/reference.py write_rows). A
base whose input embedding is not an nn.Embedding at all is refused, naming its class.

Per batch, the training step arms it with `inject(slot_map, item_vectors)`: the next forward whose
input ids have the slot map's shape runs the adapter once over the batch's unique items and writes
adapter(item_vectors)[slot_map[b, t]] at every position with slot_map >= 0, in one fused op
(trainer/model/kernels/inject.py; `injection="reference"` uses the plain-torch reference). Any other
forward (text-only steps, the one-token decode steps of generation) is the base's own forward, so
text-only steps cost what the base's embedding costs.

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

from trainer.model.kernels.inject import inject_fused
from trainer.model.kernels.reference import inject_reference, write_rows

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
    """Put in front of the base's embedding class by hybrid_embedding(); never built directly."""

    adapter: Adapter
    user_adapter: Adapter | None
    injection: str
    plain: bool  # the base is nn.Embedding itself, none of its options: the fused op computes exactly its lookup
    _armed: tuple | None

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
            return super().forward(input_ids)  # the base's own embedding
        slot_map, item_vectors, user_states = self._armed
        dtype = self.adapter.fc1.weight.dtype
        behaviour = self.adapter(item_vectors.to(dtype))  # once per unique item
        if user_states is not None:  # rows U.. : one per sample
            behaviour = torch.cat([behaviour, self.user_adapter(user_states.to(dtype))])
        if self.plain:
            return INJECTIONS[self.injection](input_ids, self.weight, slot_map, behaviour, self.padding_idx)
        return write_rows(super().forward(input_ids), slot_map, behaviour)


_CLASSES: dict[type, type] = {}


def _hybrid_class(base: type) -> type:
    """HybridEmbedding in front of `base`, made once per class and kept in this module (so it pickles)."""
    if base not in _CLASSES:
        name = f"Hybrid{base.__name__}"
        cls = type(name, (HybridEmbedding, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _CLASSES[base] = cls
    return _CLASSES[base]


def hybrid_embedding(embedding: nn.Module, adapter: Adapter, injection: str = "fused",
                     user_adapter: Adapter | None = None) -> HybridEmbedding:
    """The base's input embedding made hybrid (module docstring): the same weight, buffers and attributes."""
    if injection not in INJECTIONS:
        raise ValueError(f"model.injection={injection!r}: expected fused or reference")
    if not isinstance(embedding, nn.Embedding):
        kind = type(embedding)
        raise ValueError(f"the base's input embedding is a {kind.__module__}.{kind.__name__}, not a torch.nn.Embedding: "
                         "the trainer cannot write behaviour tokens into it and keep every other position as the "
                         "base computes it; this model family is not supported")
    if isinstance(embedding, HybridEmbedding):
        raise ValueError("the input embedding is hybrid already")
    hybrid = _hybrid_class(type(embedding)).__new__(_hybrid_class(type(embedding)))
    # the embedding's own state, its registries copied (not shared with the module it replaces)
    hybrid.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in embedding.__dict__.items()})
    hybrid.injection = injection
    hybrid.plain = (type(embedding) is nn.Embedding and embedding.max_norm is None and not embedding.scale_grad_by_freq
                    and not embedding.sparse)
    hybrid.adapter = adapter
    hybrid.user_adapter = user_adapter  # only with data.user_token
    hybrid._armed = None
    return hybrid
