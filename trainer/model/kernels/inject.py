"""The fused adapter-injection op: the embedding lookup with the behaviour rows written at the slots,
and its backward, as two dispatcher ops defined in C++ (trainer/model/kernels/cpu.py):

    llmrec::inject(token_ids [B,T] int64, weight [V,H], slot_map [B,T] int64 (-1 or a row of behaviour),
                   behaviour [S,H], padding_idx int (-1 = none)) -> [B,T,H]
    llmrec::inject_backward(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad)
                   -> (grad_weight [V,H] or [0,H] when not needed, grad_behaviour [S,H])

Each output row is written once, from the weight or from the behaviour rows. Autograd is a C++
torch::autograd::Function (Autograd key, every device), so a forward + backward has no Python in
it; when nothing requires grad no autograd node is made. The behaviour rows get the sum of the
gradients of their slots; the weight (only when it requires grad) gets what nn.Embedding would give
it at the non-slot positions, nothing at padding_idx. Kernels:
- CPU: C++ (at::parallel_for), in the same library;
- CUDA: Triton (trainer/model/kernels/triton_kernels.py), registered here - verified only under
  TRITON_INTERPRET=1 on CPU;
- fake (meta), for torch.compile: registered here;
- any other device: the reference forward and a branch-free index_add backward, registered here.
The library is built (g++, ~40 s, once per source and torch; ahead of time with
`python launch/build_kernels.py`, see trainer/model/kernels/build.py) and the ops registered by `load()`,
which the first eager `inject_fused` call makes; call it yourself before torch.compile-ing a model
that uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.model.kernels.cpu import load_library
from trainer.model.kernels.reference import inject_reference
from trainer.model.kernels.triton_kernels import inject_backward_triton, inject_forward_triton

_loaded = False
_LIB = None  # the Python-side registrations (kept alive for the process)


def inject_backward_reference(grad: Tensor, token_ids: Tensor, slot_map: Tensor, num_rows: int, vocab: int,
                              padding_idx: int, weight_grad: bool) -> tuple[Tensor, Tensor]:
    """llmrec::inject_backward in plain torch: two branch-free index_add passes."""
    H = grad.shape[-1]
    g = grad.reshape(-1, H)
    ids, slot = token_ids.reshape(-1), slot_map.reshape(-1)
    to_b = torch.where(slot >= 0, slot, num_rows)  # row num_rows collects the non-slot positions, then is cut off
    gb = g.new_zeros((num_rows + 1, H)).index_add_(0, to_b, g)[:num_rows]
    if not weight_grad:
        return g.new_zeros((0, H)), gb
    keep = slot < 0
    if padding_idx >= 0:
        keep = keep & (ids != padding_idx)
    to_w = torch.where(keep, ids, vocab)
    gw = g.new_zeros((vocab + 1, H)).index_add_(0, to_w, g)[:vocab]
    return gw, gb


def _same_device(op: str, **tensors: Tensor) -> None:
    """A Triton kernel handed a tensor from another device reads a wrong address: say which one instead."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"llmrec::{op}: every tensor must be on one device, got "
                         + ", ".join(f"{name} on {d}" for name, d in devices.items()))


def _inject_cuda(token_ids, weight, slot_map, behaviour, padding_idx):

    _same_device("inject", token_ids=token_ids, weight=weight, slot_map=slot_map, behaviour=behaviour)
    return inject_forward_triton(token_ids.contiguous(), weight.contiguous(), slot_map.contiguous(), behaviour.contiguous())


def _inject_backward_cuda(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad):

    _same_device("inject_backward", grad=grad, token_ids=token_ids, slot_map=slot_map)
    return inject_backward_triton(grad.contiguous(), token_ids.contiguous(), slot_map.contiguous(), num_rows, vocab,
                                  padding_idx, weight_grad)


def _inject_fake(token_ids, weight, slot_map, behaviour, padding_idx):
    return weight.new_empty((*token_ids.shape, weight.shape[1]))


def _inject_backward_fake(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad):
    H = grad.shape[-1]
    return grad.new_empty((vocab if weight_grad else 0, H)), grad.new_empty((num_rows, H))


def _inject_default(token_ids, weight, slot_map, behaviour, padding_idx):
    return inject_reference(token_ids, weight, slot_map, behaviour)


def load() -> None:
    """Build/load the C++ library (defines the ops, CPU kernels, autograd) and register the rest."""
    global _loaded, _LIB
    if _loaded:
        return

    load_library()
    _LIB = torch.library.Library("llmrec", "IMPL")
    for name, cuda, fake, default in (("inject", _inject_cuda, _inject_fake, _inject_default),
                                      ("inject_backward", _inject_backward_cuda, _inject_backward_fake,
                                       inject_backward_reference)):
        _LIB.impl(name, cuda, "CUDA")
        _LIB.impl(name, default, "CompositeExplicitAutograd")  # devices with no kernel of their own
        torch.library.register_fake(f"llmrec::{name}", fake, lib=_LIB)
    _loaded = True


def inject_fused(token_ids: Tensor, weight: Tensor, slot_map: Tensor, behaviour: Tensor,
                 padding_idx: int | None = None) -> Tensor:
    """The fused op with the reference's signature; behaviour is cast to the weight's dtype."""
    if not _loaded:
        if torch.compiler.is_compiling():  # building a C++ library cannot be traced
            raise RuntimeError("call trainer.model.kernels.inject.load() before compiling a model that uses inject_fused")
        load()
    if slot_map.shape != token_ids.shape:
        raise ValueError(f"slot_map {tuple(slot_map.shape)} must have the shape of token_ids {tuple(token_ids.shape)}")
    return torch.ops.llmrec.inject(token_ids, weight, slot_map, behaviour.to(weight.dtype),
                                   -1 if padding_idx is None else padding_idx)
