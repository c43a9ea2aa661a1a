"""Checkpoints that are complete or invisible.

    <output_dir>/checkpoints/step_000100/   DeepSpeed's sharded states (one file set per rank)
                                            rng_rank{r}.safetensors   each rank's torch RNG states (CPU; GPU too on GPU)
                                            trainer_state.json        step, epoch, reader position, ...
                                            COMPLETE                  written after every rank saved
    <output_dir>/checkpoints/latest         the newest complete tag, replaced atomically, written last

A checkpoint whose COMPLETE marker is missing (the run died while writing it) is never loaded; the
newest complete one is used instead.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

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


def save_checkpoint(engine, root: str, step: int, state: dict, rank: int) -> str:
    """Collective: every rank writes its partitions and RNG states; rank 0 then writes the trainer
    state, COMPLETE and `latest`. Old checkpoints are deleted by Ray Train (train.keep_last), which
    must know of every folder it deletes (trainer/train_loop.py reports each checkpoint to it)."""
    tag = tag_for(step)
    path = os.path.join(root, tag)
    rng = _rng_states()  # saving must not move the RNG streams: a run that saved here and one
    engine.save_checkpoint(root, tag=tag, save_latest=False)  # that did not must draw the same numbers next
    _set_rng_states(rng)
    save_file(rng, os.path.join(path, f"rng_rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        with open(os.path.join(path, STATE), "w") as f:
            json.dump(state, f, indent=1)
        open(os.path.join(path, COMPLETE), "w").close()
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
    _barrier()
    return path


def find_latest(root: str) -> str | None:
    """The newest complete checkpoint tag under root, or None."""
    if not os.path.isdir(root):
        return None
    marker = os.path.join(root, LATEST)
    if os.path.exists(marker):
        with open(marker) as f:
            tag = f.read().strip()
        if os.path.exists(os.path.join(root, tag, COMPLETE)):
            return tag
    complete = sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.exists(os.path.join(root, t, COMPLETE)))
    return complete[-1] if complete else None


def read_trainer_state(checkpoint_dir: str) -> dict:
    """A checkpoint's trainer_state.json: step, epoch, reader position, world size, the run's config."""
    with open(os.path.join(checkpoint_dir, STATE)) as f:
        return json.load(f)


def load_checkpoint(engine, root: str, tag: str, rank: int) -> dict:
    path = os.path.join(root, tag)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rng = os.path.join(path, f"rng_rank{rank}.safetensors")
    if os.path.exists(rng):
        _set_rng_states(load_file(rng))
    return read_trainer_state(path)


def resume_tag(reported, root: str) -> tuple[str | None, str]:
    """The checkpoint to resume from: the one last reported to Ray (what a FailureConfig restart is
    handed), if it is complete; else the newest complete one in the output folder (a new run of the
    same command, or a report that never reached Ray). Returns (tag or None, where it came from)."""
    if reported is not None:
        path = os.path.realpath(reported.path)
        if os.path.dirname(path) == os.path.realpath(root) and os.path.exists(os.path.join(path, COMPLETE)):
            return os.path.basename(path), "the checkpoint reported to Ray"
        log.warning("the checkpoint Ray handed over (%s) is not a complete checkpoint of %s: ignoring it", reported.path, root)
    return find_latest(root), "the newest complete checkpoint in the output folder"


def report_checkpoint(metrics: dict, root: str, step: int, is_main: bool) -> None:
    """Register a saved checkpoint with Ray Train (every rank calls this; rank 0 passes the folder).
    It already lies in the run's storage (RunConfig storage_path=output_dir, name="checkpoints"), so
    nothing is copied. Ray keeps the newest train.keep_last (CheckpointConfig) and deletes older ones:
    Ray's run snapshot must never name a folder that is gone, or the next run in this output folder
    (a resume) would be refused by Ray."""
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(os.path.join(root, tag_for(step))) if is_main else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=tag_for(step),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
