"""Triton kernels of the fused injection (CUDA). Verified here only under Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors, against the reference; no GPU was available to this project.

The backward sums with float32 atomics: where several positions feed one row (an item repeated in
a batch; a token's weight gradient) the order of the additions varies, so on CUDA the gradients
may differ between runs in the last bits (the CPU kernel sums in a fixed order).

Ids and slots are checked as the CPU kernel checks them, with its messages ("inject: token id 12 out
of range [0, 10)", "inject: slot_map names behaviour row 5, only 2 rows given"; RuntimeError):
- the kernels never read or write outside the weight, behaviour or gradient rows: an id outside
  [0, V) at a position that takes the weight, or a slot >= S, is masked (its output row is zeros,
  its gradient is dropped);
- the forward kernel also sets a one-int device flag at such a row, and `inject_forward_triton`
  reads that flag once after the launch and raises. Why a flag set by the kernel and not a check in
  Python before the launch: the kernel reads ids and slots anyway, so the check costs no extra pass
  over them (a wrapper check would be ~6 elementwise kernels and a reduction); both ways cost one
  device-to-host sync per forward (the host waits for the GPU to reach this kernel, once per step at
  the embedding), which is what a clear, synchronous error needs. The sync is skipped while a CUDA
  graph is being captured (a sync is illegal there; the masking still holds) and can be turned off
  with LLMREC_INJECT_CHECK_IDS=0 (then bad rows are silently zeros, as in the masking above).
  The backward is not checked (its ids were checked by the forward, as on CPU), only masked.
Verified only under TRITON_INTERPRET=1 on CPU tensors (tests/test_kernels.py); the cost of the sync on
a GPU was not measured."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _inject_fwd(ids_ptr, slot_ptr, w_ptr, b_ptr, out_ptr, bad_ptr, H, V, S, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * H passes 2^31 at B*T*H >= 2^31 (e.g. 16 x 32k x 4096)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        s = tl.load(slot_ptr + row)
        tok = tl.load(ids_ptr + row)
        use_b = (s >= 0) & (s < S)
        use_w = (s < 0) & (tok >= 0) & (tok < V)
        from_b = tl.where(use_b, m, False)
        from_w = tl.where(use_w, m, False)
        vb = tl.load(b_ptr + tl.where(use_b, s, 0) * H + offs, mask=from_b, other=0.0)
        vw = tl.load(w_ptr + tl.where(use_w, tok, 0) * H + offs, mask=from_w, other=0.0)
        tl.store(out_ptr + row * H + offs, tl.where(s >= 0, vb, vw), mask=m)
        bad = (s >= S) | ((s < 0) & ((tok < 0) | (tok >= V)))  # the CPU kernel's TORCH_CHECKs
        tl.store(bad_ptr + offs * 0, tl.full((BLOCK,), 1, tl.int32), mask=tl.where(bad, offs == 0, False))

    @triton.jit
    def _inject_bwd(grad_ptr, ids_ptr, slot_ptr, gw_ptr, gb_ptr, H, V, S, padding_idx, WEIGHT_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        s = tl.load(slot_ptr + row)
        tok = tl.load(ids_ptr + row)
        use_b = (s >= 0) & (s < S)  # out-of-range ids/slots are masked: no write outside gw/gb
        to_b = tl.where(use_b, m, False)
        if WEIGHT_GRAD:
            use_w = (s < 0) & (tok >= 0) & (tok < V) & (tok != padding_idx)
            to_w = tl.where(use_w, m, False)
            g = tl.load(grad_ptr + row * H + offs, mask=to_b | to_w, other=0.0)
            tl.atomic_add(gw_ptr + tl.where(use_w, tok, 0) * H + offs, g, mask=to_w)
        else:  # frozen weight: only the slot rows of the gradient are read (31 of 512 per sample in LLaRA)
            g = tl.load(grad_ptr + row * H + offs, mask=to_b, other=0.0)
        tl.atomic_add(gb_ptr + tl.where(use_b, s, 0) * H + offs, g, mask=to_b)


def _block(H: int) -> int:
    return min(1024, triton.next_power_of_2(H))


def _check_ids() -> bool:
    return os.environ.get("LLMREC_INJECT_CHECK_IDS", "1") != "0"


def _raise_bad_row(ids, slot, V: int, S: int):
    """The CPU kernel's error for the first bad row (its checks run row by row, the slot first)."""
    ids, slot = ids.reshape(-1).cpu(), slot.reshape(-1).cpu()
    bad = (slot >= S) | ((slot < 0) & ((ids < 0) | (ids >= V)))
    r = int(bad.nonzero()[0, 0])
    if slot[r] >= S:
        raise RuntimeError(f"inject: slot_map names behaviour row {int(slot[r])}, only {S} rows given")
    raise RuntimeError(f"inject: token id {int(ids[r])} out of range [0, {V})")


def inject_forward_triton(ids, weight, slot, behaviour):
    B_T = ids.numel()
    V, H = weight.shape
    S = behaviour.shape[0]
    out = torch.empty((*ids.shape, H), dtype=weight.dtype, device=weight.device)
    bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
    BLOCK = _block(H)
    _inject_fwd[(B_T, triton.cdiv(H, BLOCK))](ids.reshape(-1), slot.reshape(-1), weight, behaviour, out, bad, H, V, S,
                                             BLOCK=BLOCK)
    capturing = weight.is_cuda and torch.cuda.is_current_stream_capturing()
    if _check_ids() and not capturing and bad.item():  # one device-to-host sync (module docstring)
        _raise_bad_row(ids, slot, V, S)
    return out


def inject_backward_triton(grad, ids, slot, num_rows: int, vocab: int, padding_idx: int, weight_grad: bool):
    """Returns (grad_weight or an empty tensor, grad_behaviour), accumulated in float32."""
    H = grad.shape[-1]
    g = grad.reshape(-1, H).contiguous()
    gb = torch.zeros((num_rows, H), dtype=torch.float32, device=grad.device)
    gw = torch.zeros((vocab, H) if weight_grad else (0, H), dtype=torch.float32, device=grad.device)
    BLOCK = _block(H)
    _inject_bwd[(g.shape[0], triton.cdiv(H, BLOCK))](g, ids.reshape(-1), slot.reshape(-1), gw, gb, H, vocab, num_rows,
                                                    -1 if padding_idx is None else padding_idx,
                                                    WEIGHT_GRAD=weight_grad, BLOCK=BLOCK)
    return gw.to(grad.dtype), gb.to(grad.dtype)
