"""The model a second stage starts from (model.init_from: a finished run) and the reference S-DPO
it is compared with, without a second copy of the base.

    check_init_from(run_dir)          driver, before anything is built: a finished run, its SRec unchanged
    start = starting_weights(run_dir)  the finished run's trained parameters (LoRA, adapter, model.unfreeze)
    start_from(engine, start)          a fresh stage: the engine's module and fp32 master copy set to them
    with reference(engine, start):     the module holds the starting weights (pi_ref) until the block ends

The reference is the same base with the starting trained parameters: only those are swapped (the
module's copy; the optimizer's fp32 master copy is not touched), set back bit for bit after the pass.
Memory: one whole copy of the trained parameters per worker in fp32 (LoRA r=8 + adapter at 7B: 37M
values, 150 MB), and while swapped a second one in the module's dtype; no second base. Time: a no-grad
forward of the step's sequences, and under ZeRO-3 two gathers of the trained parameters (not of the base).
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors import safe_open

from trainer.data.prepare import prepared_paths
from trainer.job import checkpoint as ckpt
from trainer.job import trainable_state
from trainer.model.srec import srec_hash


def finished_checkpoint(run_dir: str) -> tuple[str, dict]:
    """(checkpoint folder, trainer state) of a finished run's last step, or a ValueError saying what it is."""
    root = os.path.join(os.path.abspath(run_dir), "checkpoints")
    tag = ckpt.find_latest(root) if os.path.isdir(root) else None
    where = f"model.init_from={run_dir}"
    if tag is None:
        raise ValueError(f"{where} is not a finished run: it has no complete checkpoint in {root}")
    folder = os.path.join(root, tag)
    state = ckpt.read_trainer_state(folder)
    if state["global_step"] < state["total_steps"]:
        raise ValueError(f"{where} is not a finished run: its newest checkpoint is step {state['global_step']} of "
                         f"{state['total_steps']}; finish it first (run its command again)")
    if not os.path.exists(os.path.join(folder, trainable_state.FILE)):
        raise ValueError(f"{where}: {folder} has no {trainable_state.FILE} (written by this trainer since "
                         "resizable checkpoints); run it again with this version")
    return folder, state


def check_init_from(run_dir: str) -> None:
    """A stage's start, checked on the driver before anything is built: model.init_from a finished run whose
    SRec (which the stage reads) is still the one it trained with."""
    _, state = finished_checkpoint(run_dir)
    srec_dir = prepared_paths(run_dir).srec
    if state.get("srec_sha256") != srec_hash(srec_dir):
        raise ValueError(f"model.init_from={run_dir} trained with another SRec than {srec_dir} holds "
                         "now: the behaviour tokens would not be the ones its adapter learned")


def starting_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """The finished run's trained parameters, whole, fp32, by parameter name."""
    folder, _ = finished_checkpoint(run_dir)
    with safe_open(os.path.join(folder, trainable_state.FILE), "pt") as f:
        return {k[len("param."):]: f.get_tensor(k) for k in f.keys() if k.startswith("param.")}


def check_names(engine, start: dict[str, torch.Tensor], run_dir: str) -> None:
    names = {n for n, _ in trainable_state.trained_parameters(engine)}
    if names != set(start):
        raise ValueError(f"model.init_from={run_dir} trained other parameters than this stage trains: missing "
                         f"{sorted(names - set(start))[:3]}, unknown {sorted(set(start) - names)[:3]}")


def start_from(engine, start: dict[str, torch.Tensor]) -> None:
    """Collective: a fresh stage's trained parameters set to the starting ones (module and fp32 master)."""
    trainable_state.write_module(engine, start)
    trainable_state.write_master(engine, start)


@contextlib.contextmanager
def reference(engine, start: dict[str, torch.Tensor]):
    """Collective: inside the block the module computes pi_ref (the starting weights, eval mode: no dropout);
    on leaving, the trained values and the training mode are back, bit for bit."""
    training = engine.module.training
    current = trainable_state.write_module(engine, start)
    engine.module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        trainable_state.write_module(engine, current)
        engine.module.train(training)
