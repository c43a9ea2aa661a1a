"""trainer/flops.py: the FLOP count behind the logged MFU, the peak look-up, peak memory."""

import pytest
import torch

from trainer.flops import peak_flops, peak_memory_gib, training_flops_per_token


def test_flops_per_token_of_a_frozen_7b_with_lora():
    """Llama-2-7B (6.74e9 parameters, 32 layers of 4096) with LLaRA's 37,036,032 trained parameters at
    512 tokens: 4 N + 2 N_t + 6 L T d; a fully trained model would be the usual 6 N + 6 L T d."""
    n, trained, layers, hidden, seq = 6_738_415_616, 37_036_032, 32, 4096, 512
    got = training_flops_per_token(n, trained, layers, hidden, seq)
    assert got == 4 * n + 2 * trained + 6 * layers * seq * hidden
    assert got == pytest.approx(2.744e10, rel=1e-3)  # about 2/3 of full training's 6 N + 6 L T d
    assert training_flops_per_token(n, n, layers, hidden, seq) == 6 * n + 6 * layers * seq * hidden


def test_peak_is_the_override_a_known_gpu_or_none():
    assert peak_flops(None) is None and peak_flops("cpu") is None
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", override_tflops=165.2) == pytest.approx(165.2e12)


def test_peak_memory_on_cpu_is_the_process_high_water_mark():
    before, kind = peak_memory_gib(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after, _ = peak_memory_gib(torch.device("cpu"))
    assert kind == "host_rss" and after >= before > 0 and block.sum() > 0
