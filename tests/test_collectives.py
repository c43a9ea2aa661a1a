"""Collectives that hold on NCCL as on gloo, and the training precision (its GPU branches are
checked here as logic only: no GPU was available to this project)."""

import pytest
import torch
import torch.distributed as dist

from shards import collectives
from trainer.job.ds_config import deepspeed_config
from trainer.job.precision import resolve_precision


def test_one_process_needs_no_process_group():
    assert collectives.rank_world() == (0, 1)
    assert collectives.collective_device() == torch.device("cpu")
    assert collectives.all_reduce_scalar(2.5) == 2.5


def _any_rank_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 alone says yes to the first, rank 1 alone to the second, nobody to the third
    out[rank] = collectives.any_rank(rank == 0, rank == 1, False)
    # the step's loss, tokens and LM-head positions over both ranks (the logged throughput and MFU):
    # rank 0 had 2 micro-batches, 100 tokens, 10 head positions; rank 1 one, 101 tokens, 20 positions
    from trainer.train_loop import _step_sums

    out[f"sums{rank}"] = _step_sums([1.0, 3.0] if rank == 0 else [2.0], 100 + rank, 10 * (rank + 1), {})
    # S-DPO's logged sums: means per real sample over both ranks (rank 0: 3 samples, rank 1: 1)
    logged = {"reward_margin": 0.6 if rank == 0 else 1.0, "reward_accuracy": 2.0 - rank, "samples": 3.0 - 2 * rank}
    out[f"sdpo{rank}"] = _step_sums([1.0], 1, 1, logged)[3]
    collectives.exit_together()


@pytest.mark.slow  # two processes (torch.multiprocessing.spawn)
def test_any_rank_gives_every_rank_the_same_decisions():
    """The training loop's stop and Ray-report decisions: a flag raised by one rank reaches all (2 gloo ranks);
    the step's sums (loss, tokens, head positions) are every rank's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_any_rank_worker, args=(port, out), nprocs=2, join=True)
    assert out[0] == out[1] == (True, True, False)
    assert out["sums0"] == out["sums1"] == (2.0, 201, 30, {})  # every rank's tokens, not rank 0's times 2
    assert out["sdpo0"] == out["sdpo1"] and out["sdpo0"].keys() == {"reward_margin", "reward_accuracy"}
    assert abs(out["sdpo0"]["reward_margin"] - 0.4) < 1e-12 and out["sdpo0"]["reward_accuracy"] == 0.75
    assert collectives.any_rank(True, False) == (True, False)  # one process: the flags themselves


def test_nccl_collectives_use_the_current_gpu(monkeypatch):
    """Ray Train's NCCL group reduces CUDA tensors only: the device must be the worker's GPU."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_resolve_precision():
    assert resolve_precision("auto", use_gpu=False, bf16_supported=True) == "fp32"
    assert resolve_precision("fp32", use_gpu=False, bf16_supported=True) == "fp32"
    # DeepSpeed's CPU accelerator runs both half precisions: the GPU's precision path is tested on CPU
    assert resolve_precision("bf16", use_gpu=False, bf16_supported=False) == "bf16"
    assert resolve_precision("fp16", use_gpu=False, bf16_supported=False) == "fp16"
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp16, fp32"):
        resolve_precision("half", use_gpu=False, bf16_supported=True)
    assert resolve_precision("auto", use_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", use_gpu=True, bf16_supported=False) == "fp16"  # V100, T4
    assert resolve_precision("fp32", use_gpu=True, bf16_supported=True) == "fp32"
    with pytest.raises(ValueError, match="train.precision=bf16: this GPU has no bfloat16"):
        resolve_precision("bf16", use_gpu=True, bf16_supported=False)
    # launch/eval.py names its own option
    with pytest.raises(ValueError, match="--precision='half'"):
        resolve_precision("half", use_gpu=False, bf16_supported=True, option="--precision")


def test_deepspeed_config_follows_the_precision():
    from configs.schema import load_config

    cfg = load_config(None, [])
    for precision in ("bf16", "fp16", "fp32"):
        ds = deepspeed_config(cfg, precision)
        assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")


def test_all_reduce_sums_in_one_process():
    assert collectives.all_reduce_sums(2.5, 3) == (2.5, 3.0)
