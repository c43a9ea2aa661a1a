"""Model FLOP utilisation (MFU) and peak memory, for the training log.

The model's FLOPs of one optimizer step (a multiply-add is 2 FLOPs), over every rank's tokens:

    per token, every position of every sample (N_b: the decoder's parameters, without the input
    embedding, a lookup, and the LM head; N_bt: those of them trained; L layers of width d; T the
    samples' mean length):
        forward    2 N_b + 2 L T d          every weight once; causal attention, Q K^T and A V over T/2 keys
        backward   2 N_b + 2 N_bt + 4 L T d  the activations' gradients through every (also frozen) weight,
                                            the trained weights' gradients, attention twice its forward
    per LM-head position (V x d; it runs at the positions that predict an answer token only,
    trainer/train_loop.py answer_positions, K of a sample's T):
        forward 2 V d, backward 2 V d, and 2 V d more when the head is trained

    step FLOPs = tokens x (4 N_b + 2 N_bt + 6 L T d) + head positions x (4 + 2 [head trained]) V d

(a fully trained model with the head at every position gives the familiar 6 N + 6 L T d per token).
The adapter runs once per unique item of a batch, a few dozen rows against thousands of tokens, and is
left out. Recomputation under activation checkpointing is not counted: MFU counts the model's FLOPs, not
the hardware's. The peak is one device's, of the dtype the run computes in: train.peak_tflops when given,
else a data-sheet value for a known GPU (dense tensor cores for bf16/fp16; the FP32 units for fp32, as
torch leaves TF32 off for matmuls), else unknown (CPU): MFU is then not reported.
"""

from __future__ import annotations

import resource
import torch

# per GPU, TFLOP/s from the vendors' data sheets, dense: (bf16, fp16, fp32); None where the GPU has none.
# Matched as substrings of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100")
KNOWN_PEAK_TFLOPS = (("H200", (989.0, 989.0, 67.0)), ("H100 PCIe", (756.0, 756.0, 51.0)),
                     ("H100", (989.0, 989.0, 67.0)), ("A100", (312.0, 312.0, 19.5)),
                     ("L40S", (362.0, 362.0, 91.6)), ("A10G", (125.0, 125.0, 31.2)), ("A10", (125.0, 125.0, 31.2)),
                     ("L4", (121.0, 121.0, 30.3)), ("V100", (None, 125.0, 15.7)))
PRECISION_COLUMN = {"bf16": 0, "fp16": 1, "fp32": 2}


def model_shape(model, hybrid_embedding) -> dict:
    """What the FLOP count needs of a (peft) LLM: {body, body_trained, head, head_trained, layers, hidden}.
    Under ZeRO-3 a parameter's size is its ds_numel (its local shape is (0,))."""
    def size(p):
        return getattr(p, "ds_numel", p.numel())

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight
    outside = {id(hybrid_embedding.weight), id(head)}  # the lookup and the head (once if tied)
    outside |= {id(p) for p in hybrid_embedding.parameters()}  # the adapter(s): per unique item, not per token
    body = [p for p in model.parameters() if id(p) not in outside]
    config = base.config
    return {"body": sum(size(p) for p in body), "body_trained": sum(size(p) for p in body if p.requires_grad),
            "head": size(head), "head_trained": bool(head.requires_grad),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def step_flops(shape: dict, tokens: float, head_positions: float, seq_len: float) -> float:
    """The model FLOPs of `tokens` trained tokens of mean sequence length seq_len with the LM head at
    `head_positions` positions (module docstring)."""
    per_token = 4 * shape["body"] + 2 * shape["body_trained"] + 6 * shape["layers"] * seq_len * shape["hidden"]
    per_head = (4 + 2 * shape["head_trained"]) * shape["head"]
    return tokens * per_token + head_positions * per_head


def throughput_flops(shape: dict, samples_per_s: float, tokens_per_s: float, head_positions_per_s: float,
                     peak: float | None, world: int) -> tuple[float, float | None]:
    """(model FLOP/s of the whole job, MFU against `world` devices of `peak` FLOP/s each, or None without a
    peak) from rates counted over every rank; the mean sequence length is tokens / samples."""
    flops = step_flops(shape, tokens_per_s, head_positions_per_s, tokens_per_s / max(samples_per_s, 1e-9))
    return flops, (flops / (peak * world) if peak else None)


def peak_flops(device_name: str | None, precision: str = "bf16", override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device in `precision`: the override, a known GPU's, or None (CPU, unknown GPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, peaks in KNOWN_PEAK_TFLOPS:
        if device_name and name in device_name:
            tflops = peaks[PRECISION_COLUMN[precision]]
            return tflops * 1e12 if tflops else None
    return None


def peak_memory_gib(device) -> tuple[float, str]:
    """(GiB, what): on CUDA the allocator's peak since the last call (then reset), else this process's
    peak resident set size (the kernel's high-water mark: it never goes down)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30, "gpu_allocated"

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_rss"  # Linux: KiB
