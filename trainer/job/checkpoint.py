"""Checkpoints that are complete or invisible.

    <output_dir>/checkpoints/step_000100/   DeepSpeed's sharded states (one file set per rank)
                                            trainable.safetensors     the same trained state, whole: for a resume
                                                                      on another number of workers (trainable_state.py)
                                            rng_rank{r}.safetensors   each rank's torch RNG states (CPU; GPU too on GPU)
                                            trainer_state.json        step, epoch, reader position, scheduler, ...
                                            COMPLETE                  written after every rank saved
    <output_dir>/checkpoints/latest         the newest complete tag, replaced atomically, written last

A checkpoint whose COMPLETE marker is missing (the run died while writing it) is never loaded; the
newest complete one is used instead, and the torn folder is written again from scratch when the run
gets there. After each save the newest train.keep_last complete checkpoints are kept (prune). A resume
on the world size that wrote a checkpoint loads DeepSpeed's files (bit-identical continuation); on another
one (a requeue onto fewer nodes, an elastic Ray cluster) it loads trainable.safetensors (load_resized). This
module alone decides which checkpoints exist: Ray Train is told of none (its run snapshot would
otherwise name folders deleted here or by a kill, and refuse the next run in the folder).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
import errno
import numpy as np

from configs.schema import accumulation_for
from trainer.job import trainable_state
from trainer.job.failures import Unrecoverable

log = logging.getLogger(__name__)
LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_states() -> dict:
    """The CPU generator's state and, on a GPU worker, the current GPU's (LoRA dropout draws from it)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # written for GPUs, run on CPU only
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(engine, root: str, step: int, state: dict, rank: int, keep_last: int) -> str:
    """Collective: every rank writes its partitions and RNG states; rank 0 then writes the trainer
    state, COMPLETE and `latest`, and only then deletes what is no longer needed (prune). This module
    is the one owner of the checkpoint folder: Ray Train is never told of checkpoints, so no run
    snapshot of Ray's can name a folder that is gone. A full disk raises NoSpaceForCheckpoint (the
    folder, what the checkpoint needs, what is free); the torn folder is never loaded (no COMPLETE)."""
    try:
        return _save(engine, root, step, state, rank, keep_last)
    except (OSError, RuntimeError) as e:
        needed, how = checkpoint_bytes(engine, root)
        if not _out_of_space(e, root, needed):
            raise
        raise NoSpaceForCheckpoint(no_space_message(root, tag_for(step), needed, how)) from e


class NoSpaceForCheckpoint(Unrecoverable, OSError):
    """The file system of the checkpoints is full: a restart would write the same bytes to it."""


def _out_of_space(e: BaseException, root: str, needed: int) -> bool:
    """ENOSPC / EDQUOT as an OSError, or any write error with less free space left under `root` than a
    checkpoint needs (torch.save then raises RuntimeErrors such as "basic_ios::clear: iostream error")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return os.path.isdir(root) and shutil.disk_usage(root).free < needed


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if os.path.isfile(os.path.join(d, f)))


def checkpoint_bytes(engine, root: str) -> tuple[int, str]:
    """(bytes, how known) a checkpoint takes: the newest complete one's size, else an estimate from the
    trained parameters (DeepSpeed's files: the module copy, the fp32 master and AdamW's two fp32 moments;
    trainable.safetensors: the master and the moments again)."""
    tag = find_latest(root)
    if tag:
        return _folder_bytes(os.path.join(root, tag)), f"the size of {tag}"
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    n = sum(getattr(p, "ds_numel", p.numel()) for p in trained)
    module_bytes = trained[0].element_size() if trained else 4
    return n * (module_bytes + 12 + 12), "estimated from the trained parameters"


def no_space_message(root: str, tag: str, needed: int, how: str) -> str:
    free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
    return (f"no space left on the device of {root} while writing checkpoint {tag}: a checkpoint needs about "
            f"{needed / 2**20:.1f} MB ({how}), {free / 2**20:.1f} MB are free there (the part written is left "
            f"without COMPLETE, never loaded). Free space or lower train.keep_last, then run the same command: "
            f"it resumes from {find_latest(root) or 'the start (no complete checkpoint yet)'}")


def _save(engine, root: str, step: int, state: dict, rank: int, keep_last: int) -> str:
    tag = tag_for(step)
    path = os.path.join(root, tag)
    started = time.perf_counter()
    if rank == 0 and os.path.exists(path):  # a torn one from before a fallback to an older checkpoint:
        shutil.rmtree(path)  # written again from scratch, no stale file of it left beside the new ones
    _barrier()
    rng = _rng_states()  # saving must not move the RNG streams: a run that saved here and one
    # only what training changes: the frozen base (13.5 GB for a 7B in bf16) is the model folder's, read again on resume
    engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=True)  # that did not must
    # draw the same numbers next
    _set_rng_states(rng)
    save_file(rng, os.path.join(path, f"rng_rank{rank}.safetensors"))
    deepspeed_s, started = time.perf_counter() - started, time.perf_counter()
    whole_bytes = trainable_state.save(engine, path, rank)  # the world-size-independent copy (collective)
    _barrier()
    if rank == 0:
        log.info("checkpoint %s: DeepSpeed's files %.2f s; the trained state whole (for a resume on any number "
                 "of workers) %.1f MB in %.2f s", tag, deepspeed_s, whole_bytes / 2**20, time.perf_counter() - started)
        with open(os.path.join(path, STATE), "w") as f:
            json.dump(state, f, indent=1)
        open(os.path.join(path, COMPLETE), "w").close()
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
        prune(root, keep_last)
    _barrier()
    return path


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest keep_last complete checkpoints (0: keep all), and every torn one
    older than the newest complete (a torn newer one is left: the run that tore it may be this one's
    future, about to write it again). Returns the tags deleted."""
    steps = sorted(t for t in os.listdir(root) if t.startswith("step_"))
    complete = _complete(root, steps)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [t for t in steps if t not in complete and complete and t < complete[-1]]
    for tag in doomed:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    if doomed:
        log.info("checkpoints deleted (train.keep_last=%d, or torn): %s", keep_last, ", ".join(sorted(doomed)))
    return sorted(doomed)


def find_latest(root: str) -> str | None:
    """The newest complete checkpoint tag under root, or None: what a run resumes from (a restart by
    Ray's FailureConfig and a new run of the same command alike; Ray is never told of checkpoints)."""
    if not os.path.isdir(root):
        return None
    marker = os.path.join(root, LATEST)
    if os.path.exists(marker):
        with open(marker) as f:
            tag = f.read().strip()
        if os.path.exists(os.path.join(root, tag, COMPLETE)):
            return tag
    complete = _complete(root, sorted(t for t in os.listdir(root) if t.startswith("step_")))
    return complete[-1] if complete else None


def _complete(root: str, tags: list[str]) -> list[str]:
    """The tags (in their order) whose folder has COMPLETE: written by every rank."""
    return [t for t in tags if os.path.exists(os.path.join(root, t, COMPLETE))]


def _load_trained(src: dict, dst) -> None:
    """DeepSpeed's module load for a checkpoint that holds only the trained parameters (older ones hold
    the frozen base too): every trainable parameter must be there; the frozen ones are the base's."""
    result = dst.load_state_dict(src, strict=False)
    lost = sorted(set(result.missing_keys) & {n for n, p in dst.named_parameters() if p.requires_grad})
    if lost or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not match the model: trained parameters missing {lost[:3]}, "
                           f"unknown {result.unexpected_keys[:3]}")


def read_trainer_state(checkpoint_dir: str) -> dict:
    """A checkpoint's trainer_state.json: step, epoch, reader position, world size, the run's config."""
    with open(os.path.join(checkpoint_dir, STATE)) as f:
        return json.load(f)


def global_batch_of(state: dict) -> int:
    """Samples per optimizer step of the run that wrote a checkpoint's trainer state."""
    if "global_batch" in state:
        return state["global_batch"]
    train = state["config"]["train"]  # written before global_batch was recorded
    return state["world_size"] * train["micro_batch"] * train["grad_accum"]


def accumulation_at(train, world: int, state: dict | None = None, tag: str = "") -> int:
    """train.grad_accum for `world` workers. The global batch is the configuration's (micro_batch x
    grad_accum x num_workers) when it runs on the number of workers that wrote `state` (a checkpoint's trainer
    state; a change at an epoch boundary is the user's to make) and that number is the configured one; else
    (a resize, an elastic restart) the checkpoint's: the schedule is kept, the accumulation re-derived.
    A ValueError when that cannot be split, naming the worker counts that can."""
    target = train.micro_batch * train.grad_accum * train.num_workers
    if state is not None and not world == state["world_size"] == train.num_workers:
        target = global_batch_of(state)
        if train.global_batch > 0 and train.global_batch != target:
            raise ValueError(f"checkpoint {tag} was written with global batch {target}; a resume on another number "
                             f"of workers keeps it (train.global_batch={train.global_batch} was given)")
    try:
        return accumulation_for(target, train.micro_batch, world)
    except ValueError as e:
        where = f"checkpoint {tag} (written by {state['world_size']} workers) cannot resume on" if state else "cannot run on"
        raise ValueError(f"{where} {world} workers: {e}") from None


def load_checkpoint(engine, root: str, tag: str, rank: int) -> dict:
    path = os.path.join(root, tag)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                          custom_load_fn=_load_trained)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {path}")
    rng = os.path.join(path, f"rng_rank{rank}.safetensors")
    if os.path.exists(rng):
        _set_rng_states(load_file(rng))
    return read_trainer_state(path)



def load_resized(engine, root: str, tag: str, state: dict, rank: int, seed: int) -> None:
    """Resume a checkpoint written by another number of workers (`state`: its trainer state, read by the
    caller): the trained state from trainable.safetensors (verified against the file bit for bit), the
    scheduler, DeepSpeed's step counters; each rank's RNG from the rank of that number in the checkpoint,
    and for a rank that did not exist there, seeded from (seed, step, rank)."""
    path = os.path.join(root, tag)
    trainable_state.restore(engine, path)
    trainable_state.verify(engine, path)  # raises unless every trained tensor equals the file's, bit for bit
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    for name, value in state["engine_steps"].items():  # global_steps, global_samples, skipped_steps
        setattr(engine, name, value)
    rng = os.path.join(path, f"rng_rank{rank}.safetensors")
    if os.path.exists(rng):
        _set_rng_states(load_file(rng))
    else:
        torch.manual_seed(int(np.random.SeedSequence([seed, state["global_step"], rank]).generate_state(1)[0]))
