"""The fused adapter-injection op: one `torch.library` custom op for the embedding lookup with the
behaviour rows written at the slots, and one for its backward.

    llmrec::inject(token_ids [B,T] int64, weight [V,H], slot_map [B,T] int64 (-1 or a row of behaviour),
                   behaviour [S,H], padding_idx int (-1 = none)) -> [B,T,H]

Each output row is written once, from the weight or from the behaviour rows. Kernels:
- CPU: C++ with at::parallel_for (trainer/kernels/cpu.py), built on first use;
- CUDA: Triton (trainer/kernels/triton_kernels.py) - verified only under TRITON_INTERPRET=1 on CPU;
- any other device: the reference implementation.
A fake (meta) implementation lets torch.compile trace it; autograd is registered: the behaviour rows
get the sum of the gradients of their slots, and the weight (only when it requires grad) gets what
nn.Embedding would give it at the non-slot positions, nothing at padding_idx. Nothing is built per
slot: the backward is one C++ pass over the rows, accumulating in float32 with each thread owning a
range of columns (CPU), or one atomic-add kernel (CUDA); the default implementation (other
devices) is two branch-free index_add passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.kernels.reference import inject_reference


@torch.library.custom_op("llmrec::inject", mutates_args=())
def inject(token_ids: Tensor, weight: Tensor, slot_map: Tensor, behaviour: Tensor, padding_idx: int) -> Tensor:
    return inject_reference(token_ids, weight, slot_map, behaviour)


@inject.register_kernel("cpu")
def _inject_cpu(token_ids, weight, slot_map, behaviour, padding_idx):
    from trainer.kernels.cpu import extension

    return extension().inject_forward(token_ids.contiguous(), weight.contiguous(), slot_map.contiguous(),
                                      behaviour.contiguous())


@inject.register_kernel("cuda")
def _inject_cuda(token_ids, weight, slot_map, behaviour, padding_idx):
    from trainer.kernels.triton_kernels import inject_forward_triton

    return inject_forward_triton(token_ids.contiguous(), weight.contiguous(), slot_map.contiguous(), behaviour.contiguous())


@inject.register_fake
def _inject_fake(token_ids, weight, slot_map, behaviour, padding_idx):
    return weight.new_empty((*token_ids.shape, weight.shape[1]))


@torch.library.custom_op("llmrec::inject_backward", mutates_args=())
def inject_backward(grad: Tensor, token_ids: Tensor, slot_map: Tensor, num_rows: int, vocab: int, padding_idx: int,
                    weight_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_weight [V,H] or [0,H] when not needed, grad_behaviour [S,H]), branch-free index_add passes."""
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


@inject_backward.register_kernel("cpu")
def _inject_backward_cpu(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad):
    from trainer.kernels.cpu import extension

    gw, gb = extension().inject_backward(grad, token_ids.contiguous(), slot_map.contiguous(), num_rows, vocab,
                                         padding_idx, weight_grad)
    return gw, gb


@inject_backward.register_kernel("cuda")
def _inject_backward_cuda(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad):
    from trainer.kernels.triton_kernels import inject_backward_triton

    return inject_backward_triton(grad, token_ids.contiguous(), slot_map.contiguous(), num_rows, vocab,
                                  padding_idx, weight_grad)


@inject_backward.register_fake
def _inject_backward_fake(grad, token_ids, slot_map, num_rows, vocab, padding_idx, weight_grad):
    H = grad.shape[-1]
    return grad.new_empty((vocab if weight_grad else 0, H)), grad.new_empty((num_rows, H))


def _setup_context(ctx, inputs, output):
    token_ids, weight, slot_map, behaviour, padding_idx = inputs
    ctx.save_for_backward(token_ids, slot_map)
    ctx.num_rows, ctx.vocab, ctx.padding_idx = behaviour.shape[0], weight.shape[0], padding_idx


def _backward(ctx, grad):
    token_ids, slot_map = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    gw, gb = inject_backward(grad.contiguous(), token_ids, slot_map, ctx.num_rows, ctx.vocab, ctx.padding_idx, weight_grad)
    return None, gw if weight_grad else None, None, gb if ctx.needs_input_grad[3] else None, None


inject.register_autograd(_backward, setup_context=_setup_context)


def inject_fused(token_ids: Tensor, weight: Tensor, slot_map: Tensor, behaviour: Tensor,
                 padding_idx: int | None = None) -> Tensor:
    """The fused op with the reference's signature; behaviour is cast to the weight's dtype."""
    if slot_map.shape != token_ids.shape:
        raise ValueError(f"slot_map {tuple(slot_map.shape)} must have the shape of token_ids {tuple(token_ids.shape)}")
    return inject(token_ids, weight, slot_map, behaviour.to(weight.dtype), -1 if padding_idx is None else padding_idx)
