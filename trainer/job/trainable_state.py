"""The trained state in a form that does not depend on the number of workers, for a resume on another one.

DeepSpeed's checkpoint files hold each rank's slice of ZeRO's flat buffers: they load back only on the
world size that wrote them. Beside them every checkpoint holds `trainable.safetensors`, written by rank 0:

    param.<name>        each trained parameter, whole, in fp32 (ZeRO's fp32 master copy)
    <state>.<name>      each of the optimizer's per-parameter states, whole (AdamW: exp_avg, exp_avg_sq)
    metadata            optimizer_step (AdamW's step count)

With LoRA that is the LoRA matrices and the adapter(s): 37M parameters, 0.44 GB at 7B (fp32 weight and
two moments each). The scheduler's state and DeepSpeed's step counters go in trainer_state.json.

restore() writes such a file into an engine of any world size and ZeRO stage 1-3: every rank takes its
own partition of each tensor (ZeRO-3: padded to world x partition, as ZeRO pads), the module's parameters
(ZeRO-3: re-partitioned from rank 0's full copy; stage 1/2: the full copy each rank holds) and the fp32
master copy; then verify() gathers all three back and compares them with the file, bit for bit.
Verified on CPU (fp32) with ZeRO-2 and ZeRO-3; on a GPU the module copy is bf16/fp16 and compared as such.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
import torch.distributed as dist

from trainer.job.failures import Unrecoverable

FILE = "trainable.safetensors"


class ResizeMismatch(Unrecoverable, RuntimeError):
    """The engine does not hold what the checkpoint's file says after a restore: restarting restores the same."""


def trained_parameters(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trained parameter, in the module's order (the same on every rank)."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _inner_optimizer(engine):
    """The torch optimizer under ZeRO's wrapper (AdamW here)."""
    return engine.optimizer.optimizer


def optimizer_state_keys(engine) -> list[str]:
    """The optimizer's per-element states (AdamW: exp_avg, exp_avg_sq); scalars such as step are not."""
    states = list(_inner_optimizer(engine).state.values())
    if not states:
        return []
    return sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0)


def optimizer_step(engine) -> float:
    """AdamW's step count (the same for every parameter group: each takes part in every step)."""
    steps = [float(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s]
    return max(steps) if steps else 0.0


def gather(engine) -> dict[str, torch.Tensor]:
    """Collective (every rank, same order): the whole fp32 master copy and optimizer states of every
    trained parameter, as the tensors of FILE (on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # lazy: reads DS_ACCELERATOR on import

    keys, out = optimizer_state_keys(engine), {}
    for name, p in trained_parameters(engine):
        out[f"param.{name}"] = safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
        for key in keys:
            out[f"{key}.{name}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().contiguous()
    return out


def save(engine, checkpoint_dir: str, rank: int) -> int:
    """Collective: gather, and rank 0 writes FILE. Returns the bytes written (rank 0) or 0."""
    tensors = gather(engine)
    if rank != 0:
        return 0
    path = os.path.join(checkpoint_dir, FILE)
    save_file(tensors, path, metadata={"optimizer_step": repr(optimizer_step(engine))})
    return os.path.getsize(path)


def _my_partition(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole tensor: flattened, zero-padded to world x partition size."""
    size = p.ds_tensor.numel()
    flat = full.flatten()
    padded = torch.zeros(size * dist.get_world_size(), dtype=flat.dtype)
    padded[:flat.numel()] = flat
    return padded[dist.get_rank() * size:(dist.get_rank() + 1) * size]


def _create_states(engine, keys: list[str]) -> None:
    """AdamW makes its states at its first step: a fresh engine has none yet. Made here, zero, for each of
    ZeRO's flat fp32 partitions (what the torch optimizer steps), to be overwritten by restore."""
    inner = _inner_optimizer(engine)
    # ZeRO-3 hands its flat partitions to the torch optimizer only inside step(); ZeRO-1/2 at construction
    flats = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or
                 [p for group in inner.param_groups for p in group["params"]])
    for flat in flats:
        state = inner.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state.setdefault("step", torch.tensor(0.0))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 map each parameter's fragment of the states at the first step: now, to set them
        link()


def write_module(engine, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective under ZeRO-3: set the module's copy of every trained parameter to tensors[name] (whole,
    any dtype; every rank passes the same), the optimizer's fp32 master copy left as it is. Returns the
    values they had (whole, in the module's dtype), to be written back the same way."""
    import deepspeed  # lazy: reads DS_ACCELERATOR on import

    params = trained_parameters(engine)
    # under ZeRO-3 gathered, set on rank 0 and partitioned again on leaving the context
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
        with torch.no_grad():
            before = {name: p.data.clone() for name, p in params}
            for name, p in params:
                p.data.copy_(tensors[name].view(p.shape).to(p.dtype))
    return before


def write_master(engine, tensors: dict[str, torch.Tensor]) -> None:
    """Set the fp32 master copy of every trained parameter to tensors[name] (whole; each rank takes its part:
    ZeRO-3 its partition, ZeRO-1/2 its fragment by DeepSpeed's own mapping of the whole tensor)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param  # lazy: reads DS_ACCELERATOR on import

    device = next(iter(engine.module.parameters())).device
    for name, p in trained_parameters(engine):
        if hasattr(p, "ds_id"):  # ZeRO-3
            safe_set_local_fp32_param(p, _my_partition(tensors[name].float(), p).to(device))
        else:
            safe_set_full_fp32_param(p, tensors[name].float().to(device))


def restore(engine, checkpoint_dir: str) -> dict:
    """Write FILE into the engine (every rank, collective under ZeRO-3): module parameters, fp32 master
    copy, optimizer states and step. Returns {"tensors", "values", "bytes"} of what was restored."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state  # lazy: reads DS_ACCELERATOR on import

    path = os.path.join(checkpoint_dir, FILE)
    if not os.path.exists(path):
        raise ValueError(f"{checkpoint_dir} has no {FILE} (written from this version on): it can be resumed only by "
                         "the number of workers that wrote it")
    params = trained_parameters(engine)
    with safe_open(path, "pt") as f:
        stored, step = set(f.keys()), float(f.metadata()["optimizer_step"])
        keys = sorted({k.split(".", 1)[0] for k in stored} - {"param"})
        wanted = {f"param.{n}" for n, _ in params} | {f"{k}.{n}" for n, _ in params for k in keys}
        if stored != wanted:
            raise ValueError(f"{path} does not match the model: missing {sorted(wanted - stored)[:3]}, "
                             f"unknown {sorted(stored - wanted)[:3]}")
        full = {k: f.get_tensor(k) for k in sorted(stored)}
    values = sum(full[f"param.{n}"].numel() for n, _ in params)
    _create_states(engine, keys)
    device = next(iter(engine.module.parameters())).device
    weights = {n: full[f"param.{n}"] for n, _ in params}
    write_module(engine, weights)
    write_master(engine, weights)
    for name, p in params:  # the optimizer states: each rank its own part
        for key in keys:
            if hasattr(p, "ds_id"):  # ZeRO-3
                safe_set_local_optimizer_state(p, _my_partition(full[f"{key}.{name}"], p).to(device), key)
            else:  # ZeRO-1/2: each rank's fragment is found by DeepSpeed's own mapping of the whole tensor
                safe_set_full_optimizer_state(p, full[f"{key}.{name}"].to(device), key)
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    return {"tensors": len(full), "values": values, "bytes": os.path.getsize(path)}


def verify(engine, checkpoint_dir: str) -> None:
    """Collective: the module's parameters, the fp32 master copy and the optimizer states gathered from
    the engine equal FILE bit for bit (the module's copy in its own dtype), or a RuntimeError naming the first
    tensor that does not."""
    import deepspeed  # lazy: reads DS_ACCELERATOR on import

    gathered = gather(engine)
    params = trained_parameters(engine)
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        module = {name: p.detach().cpu().clone() for name, p in params}
    with safe_open(os.path.join(checkpoint_dir, FILE), "pt") as f:
        for key in f.keys():
            saved = f.get_tensor(key)
            if not torch.equal(gathered[key], saved):
                raise ResizeMismatch(f"resize: {key} in the engine differs from {FILE} of {checkpoint_dir}")
            if key.startswith("param."):
                name = key[len("param."):]
                if not torch.equal(module[name], saved.view(module[name].shape).to(module[name].dtype)):
                    raise ResizeMismatch(f"resize: the module's {name} differs from {FILE} of {checkpoint_dir}")
