"""trainer/job/flops.py: the FLOP count behind the logged MFU (numbers worked out by hand), the peak of
the dtype in use, peak memory."""

import pytest
import torch

from trainer.job.flops import model_shape, peak_flops, peak_memory_gib, step_flops, throughput_flops

# a shape whose count is easy by hand: 1,000 decoder parameters of which 10 trained, a 100 x 8 head,
# 2 layers of width 8
SHAPE = {"body": 1000, "body_trained": 10, "head": 800, "head_trained": False, "layers": 2, "hidden": 8}


def test_step_flops_by_hand():
    """4 samples of 16 tokens (64 tokens), the head at 3 positions of each (12):
    per token 4*1000 + 2*10 + 6*2*16*8 = 4000 + 20 + 1536 = 5556, x 64 = 355,584;
    head 12 positions x 4 x 800 = 38,400 (frozen head: forward + the activations' gradient); 393,984.
    With the head trained, 2 x 800 more per position: + 19,200 = 413,184."""
    assert step_flops(SHAPE, tokens=64, head_positions=12, seq_len=16) == 393_984
    assert step_flops({**SHAPE, "head_trained": True}, tokens=64, head_positions=12, seq_len=16) == 413_184
    # the head at every position (a plain LM loss) would have cost 64 x 4 x 800 = 204,800 for the head alone
    assert step_flops(SHAPE, 64, 64, 16) - step_flops(SHAPE, 64, 0, 16) == 204_800


def test_mfu_counts_every_rank_against_every_device():
    """Rates over every rank of a 2-worker job in 1 s: 4 samples, 64 tokens, 12 head positions -> 393,984
    FLOP/s; against 2 devices of 1e6 FLOP/s, MFU 0.196992. No peak (CPU): no MFU."""
    flops, mfu = throughput_flops(SHAPE, samples_per_s=4, tokens_per_s=64, head_positions_per_s=12, peak=1e6, world=2)
    assert flops == 393_984 and mfu == pytest.approx(0.196992)
    assert throughput_flops(SHAPE, 4, 64, 12, peak=None, world=2) == (393_984, None)


def test_model_shape_of_a_lora_llama_by_hand():
    """LlamaConfig(vocab 100, hidden 8, intermediate 16, 2 layers): a layer is q, k, v, o (4 x 64 = 256),
    the MLP (3 x 8 x 16 = 384) and 2 norms (16): 656; 2 layers and the final norm: 1,320. LoRA r=2 on q and
    v: (2 x 8 + 8 x 2) x 2 modules x 2 layers = 128 trained. The head 100 x 8 = 800, frozen; untied or tied
    alike (the lookup is no matmul). The adapter (per unique item) is not counted."""
    from transformers import LlamaConfig

    from trainer.model.build import build_llara_model

    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    for tied in (False, True):
        config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
        model, embed = build_llara_model(config, 4, lora)
        assert model_shape(model, embed) == {"body": 1320 + 128, "body_trained": 128, "head": 800,
                                             "head_trained": False, "layers": 2, "hidden": 8}
        model, embed = build_llara_model(config, 4, lora, unfreeze=["lm_head"] if not tied else ["embed_tokens"])
        assert model_shape(model, embed)["head_trained"] is True


def test_peak_is_the_override_or_a_known_gpus_of_the_dtype_in_use():
    assert peak_flops(None) is None and peak_flops("cpu", "fp32") is None
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 67e12  # fp32 runs on the FP32 units, not the tensor cores
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12 and peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 there
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16", override_tflops=165.2) == pytest.approx(165.2e12)


def test_peak_memory_on_cpu_is_the_process_high_water_mark():
    before, kind = peak_memory_gib(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after, _ = peak_memory_gib(torch.device("cpu"))
    assert kind == "host_rss" and after >= before > 0 and block.sum() > 0
