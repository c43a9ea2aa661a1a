"""The precision a job runs in (train.precision, launch/eval.py --precision) and the dtype policy.

    auto   bf16 on a GPU that has it, fp16 on one that has not (V100, T4: DeepSpeed refuses bf16
           there), fp32 on CPU
    bf16   the LLM, its LoRA weights and the adapter(s) in bfloat16; DeepSpeed keeps an fp32 master
           copy of every trained parameter in its optimizer and steps that (GPU and CPU alike: DeepSpeed's
           CPU accelerator runs bf16, which is how the GPU's precision path is tested here)
    fp16   the same in float16, with DeepSpeed's dynamic loss scaling (runs on DeepSpeed's CPU accelerator too)
    fp32   everything in float32

Dtype policy: every parameter of the model DeepSpeed wraps, trained or frozen, is in the run's dtype
(trainer/model/build.py; peft's default would upcast LoRA to fp32, and ZeRO-3 refuses a group that mixes
dtypes with a bare AssertionError). The frozen SRec runs in fp32 outside the engine; its vectors are cast
to the adapter's dtype. Losses are computed in fp32 from the logits (trainer/train_loop.py answer_loss).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, use_gpu: bool, bf16_supported: bool, option: str = "train.precision") -> str:
    """bf16 | fp16 | fp32; a ValueError naming `option` for an unknown value. `auto` is fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"{option}={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and use_gpu and not bf16_supported:
        raise ValueError(f"{option}=bf16: this GPU has no bfloat16 (DeepSpeed refuses it there); use fp16 or auto")
    if precision != "auto":
        return precision
    if not use_gpu:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"
