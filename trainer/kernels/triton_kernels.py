"""Triton kernels of the fused injection (CUDA). Verified here only under Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors, against the reference; no GPU was available to this project.

The backward sums with float32 atomics: where several positions feed one row (an item repeated in
a batch; a token's weight gradient) the order of the additions varies, so on CUDA the gradients
may differ between runs in the last bits (the CPU kernel sums in a fixed order)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _inject_fwd(ids_ptr, slot_ptr, w_ptr, b_ptr, out_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * H passes 2^31 at B*T*H >= 2^31 (e.g. 16 x 32k x 4096)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        s = tl.load(slot_ptr + row)
        tok = tl.load(ids_ptr + row)
        from_b = tl.where(s >= 0, m, False)
        from_w = tl.where(s >= 0, False, m)
        vb = tl.load(b_ptr + tl.maximum(s, 0) * H + offs, mask=from_b, other=0.0)
        vw = tl.load(w_ptr + tok * H + offs, mask=from_w, other=0.0)
        tl.store(out_ptr + row * H + offs, tl.where(s >= 0, vb, vw), mask=m)

    @triton.jit
    def _inject_bwd(grad_ptr, ids_ptr, slot_ptr, gw_ptr, gb_ptr, H, padding_idx, WEIGHT_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        s = tl.load(slot_ptr + row)
        tok = tl.load(ids_ptr + row)
        to_b = tl.where(s >= 0, m, False)
        if WEIGHT_GRAD:
            to_w = tl.where(s >= 0, False, tl.where(tok == padding_idx, False, m))
            g = tl.load(grad_ptr + row * H + offs, mask=to_b | to_w, other=0.0)
            tl.atomic_add(gw_ptr + tok * H + offs, g, mask=to_w)
        else:  # frozen weight: only the slot rows of the gradient are read (31 of 512 per sample in LLaRA)
            g = tl.load(grad_ptr + row * H + offs, mask=to_b, other=0.0)
        tl.atomic_add(gb_ptr + tl.maximum(s, 0) * H + offs, g, mask=to_b)


def _block(H: int) -> int:
    return min(1024, triton.next_power_of_2(H))


def inject_forward_triton(ids, weight, slot, behaviour):
    B_T = ids.numel()
    H = weight.shape[1]
    out = torch.empty((*ids.shape, H), dtype=weight.dtype, device=weight.device)
    BLOCK = _block(H)
    _inject_fwd[(B_T, triton.cdiv(H, BLOCK))](ids.reshape(-1), slot.reshape(-1), weight, behaviour, out, H, BLOCK=BLOCK)
    return out


def inject_backward_triton(grad, ids, slot, num_rows: int, vocab: int, padding_idx: int, weight_grad: bool):
    """Returns (grad_weight or an empty tensor, grad_behaviour), accumulated in float32."""
    H = grad.shape[-1]
    g = grad.reshape(-1, H).contiguous()
    gb = torch.zeros((num_rows, H), dtype=torch.float32, device=grad.device)
    gw = torch.zeros((vocab, H) if weight_grad else (0, H), dtype=torch.float32, device=grad.device)
    BLOCK = _block(H)
    _inject_bwd[(g.shape[0], triton.cdiv(H, BLOCK))](g, ids.reshape(-1), slot.reshape(-1), gw, gb, H,
                                                    -1 if padding_idx is None else padding_idx,
                                                    WEIGHT_GRAD=weight_grad, BLOCK=BLOCK)
    return gw.to(grad.dtype), gb.to(grad.dtype)
