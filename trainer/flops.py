"""Model FLOP utilisation (MFU) and peak memory, for the training log.

FLOPs per trained token of a decoder LLM with N parameters of which N_t are trained (LoRA, adapter,
model.unfreeze), L layers of width d, at sequence length T (a multiply-add is 2 FLOPs):

    forward    2 N                 every weight once
               + 2 L T d           causal attention: Q K^T and A V over T/2 keys on average
    backward   2 N                 gradients of the activations through every (also frozen) weight
               + 2 N_t             gradients of the trained weights only
               + 4 L T d           attention, twice its forward
    total      4 N + 2 N_t + 6 L T d

(a fully trained model gives the familiar 6 N + 6 L T d). Recomputation under activation
checkpointing is not counted: MFU counts the model's FLOPs, not the hardware's. The peak is
train.peak_tflops when given, else a data-sheet value for a known GPU (dense bf16/fp16 tensor
cores), else unknown (CPU): MFU is then not reported.
"""

from __future__ import annotations

# dense bf16 / fp16 tensor-core peaks per GPU, TFLOP/s, from the vendors' data sheets; matched as
# substrings of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100")
KNOWN_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                     ("A10G", 125.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0))


def training_flops_per_token(params: int, trained: int, layers: int, hidden: int, seq_len: float) -> float:
    """FLOPs to train on one token (module docstring)."""
    return 4 * params + 2 * trained + 6 * layers * seq_len * hidden


def peak_flops(device_name: str | None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override, a known GPU's, or None (CPU, unknown GPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, tflops in KNOWN_PEAK_TFLOPS:
        if device_name and name in device_name:
            return tflops * 1e12
    return None


def peak_memory_gib(device) -> tuple[float, str]:
    """(GiB, what): on CUDA the allocator's peak since the last call (then reset), else this process's
    peak resident set size (the kernel's high-water mark: it never goes down)."""
    import torch

    if device.type == "cuda":  # written for GPUs, run on CPU only here
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30, "gpu_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_rss"  # Linux: KiB
