"""The precision a job runs in (train.precision, launch/eval.py --precision): auto is bf16 on a GPU
that has it, fp16 on one that has not (V100, T4: DeepSpeed refuses bf16 there), fp32 on CPU. Only
fp32 on CPU was run here (no GPU was lent to this project); the GPU branches are tested as logic."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, use_gpu: bool, bf16_supported: bool, option: str = "train.precision",
                      gpu_option: str = "train.use_gpu=true") -> str:
    """bf16 | fp16 | fp32; a ValueError naming `option` for an unknown value or bf16/fp16 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"{option}={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not use_gpu:
        if precision not in ("auto", "fp32"):
            raise ValueError(f"{option}={precision} needs {gpu_option}: on CPU the trainer runs in fp32")
        return "fp32"
    if precision == "auto":
        return "bf16" if bf16_supported else "fp16"
    return precision
