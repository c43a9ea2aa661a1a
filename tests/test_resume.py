"""Preemption and exact resume, on the real stack (Ray Train, 2 workers, DeepSpeed ZeRO-3, fp32 on CPU).

One uninterrupted reference run (conftest's trained_run); then the same run at ZeRO stage 2 with a
worker killed by SIGKILL at a random step (Ray restarts the workers, they resume from the newest
checkpoint): the reference's losses and weights to float tolerance. Refusals of a resume that cannot work, the export, the logs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TRAINED_ARGS, TRAINED_STEPS, copy_prepared, start_logged, wait_for_step
from trainer.job.checkpoint import find_latest

pytestmark = pytest.mark.slow  # launch/train.py trainings in subprocesses (Ray, ZeRO-3), killed and resumed

STEPS, ARGS = TRAINED_STEPS, TRAINED_ARGS


def _cmd(out, *extra):
    return [sys.executable, "launch/train.py", f"output_dir={out}", *ARGS, *extra]


def _losses(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in recs]


def _export_bytes(out):
    ex = os.path.join(out, "export")
    return {name: open(os.path.join(ex, name), "rb").read()
            for name in ("projector.safetensors", "trained_base.safetensors", os.path.join("lora", "adapter_model.safetensors"))}


@pytest.fixture(scope="module")
def reference(trained_run):
    """The uninterrupted run (conftest's trained_run, shared with test_eval)."""
    return trained_run


def test_sigkill_of_a_worker_resume_at_zero_stage_2(reference, tmp_path):
    """The run at ZeRO stage 2 (README's choice for LoRA when the base fits on every GPU), a worker SIGKILLed at
    a random step after a checkpoint: Ray's FailureConfig restarts the workers, which resume from the newest
    complete checkpoint, and the run ends with exit 0. Its checkpoints, resume and export go through the same
    code as ZeRO-3's, and it ends with the ZeRO-3 reference's losses and weights to float tolerance (the two
    stages reduce in another order; measured here: losses 1e-7 relative or less at every step, weights 5e-5 of
    each tensor's largest entry; a resume that lost the optimizer state is off by more than 1e-4). A worker's
    SIGTERM (a preempted node's processes get one: the step in flight finished everywhere, a checkpoint,
    exit 75): tests/test_resize.py; bit-identical resumes at ZeRO-3 after SIGKILL and SIGTERM:
    tests/test_kills.py and tests/test_slurm.py."""
    out = copy_prepared(reference, tmp_path / "run")
    stage2 = "train.zero_stage=2"
    kill_at = random.Random(os.getpid()).randint(7, 20)  # after the first checkpoint (step 6), between or on one
    proc, log_path = start_logged(_cmd(out, stage2), out)
    try:
        wait_for_step(out, kill_at, proc)
        t0 = time.time()
        while find_latest(str(out / "checkpoints")) is None:  # a restart resumes from the newest complete one
            assert time.time() - t0 < 300 and proc.poll() is None, "no checkpoint was completed"
            time.sleep(0.2)
        os.kill(int((out / "logs" / "worker_1.pid").read_text()), signal.SIGKILL)
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert log.count("resumed from step_") == 1, f"killed at step {kill_at}: {log[-3000:]}"  # Ray's restart
    assert json.load(open(out / "logs" / "deepspeed_config.json"))["zero_optimization"]["stage"] == 2
    steps, losses = zip(*_losses(out))
    ref_steps, ref_losses = zip(*_losses(reference))
    assert steps == ref_steps and losses == pytest.approx(ref_losses, rel=1e-6)  # lost optimizer state: >1e-4
    from safetensors.torch import load

    reference_export = _export_bytes(reference)
    for name, data in _export_bytes(out).items():
        mine, ref = load(data), load(reference_export[name])
        assert mine.keys() == ref.keys()
        for key in ref:  # measured: at most 5e-5 of the tensor's largest entry (Adam magnifies tiny gradients' rounding)
            assert (mine[key] - ref[key]).abs().max() <= 1e-4 * ref[key].abs().max(), f"{name}: {key}"


def test_a_resize_that_cannot_keep_the_global_batch_is_refused_before_ray(reference, tmp_path):
    """The reference's checkpoints have global batch 16 = micro 8 x 1 x 2 workers: 3 workers cannot keep it
    (refused naming the counts that can); a checkpoint from before resizable checkpoints (no
    trainable.safetensors) resumes only on the count that wrote it. Both said before Ray starts."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("ray", ".lock"))
    r = subprocess.run(_cmd(out, "train.num_workers=3", f"train.max_steps={STEPS + 6}"), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("checkpoint step_000024 (written by 2 workers) cannot resume on 3 workers: global batch 16 cannot be split "
            "into micro_batch 8 x whole accumulation steps x 3 workers; worker counts that work with micro_batch 8: 1, 2"
            ) in r.stderr
    assert "starting a local Ray cluster" not in r.stderr + r.stdout
    os.remove(out / "checkpoints" / "step_000024" / "trainable.safetensors")
    r = subprocess.run(_cmd(out, "train.num_workers=1", f"train.max_steps={STEPS + 6}"), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("checkpoint step_000024 was written by 2 workers before resizable checkpoints (it has no "
            "trainable.safetensors); resume with train.num_workers=2") in r.stderr


def test_export_loads_without_deepspeed_and_gives_the_same_outputs(reference):
    script = os.path.join(REPO, "tests", "scripts", "eval_export.py")
    r = subprocess.run([sys.executable, script, str(reference)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["deepspeed_imported"] is False
    assert res["compared"] == 16 and res["same"] == 16, res


def test_logs_tensorboard_and_loss_png(reference):
    logs = reference / "logs"
    assert (logs / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(logs / "tensorboard"))


def test_bf16_run_stopped_by_sigterm_and_resumed_ends_where_the_uninterrupted_one_ends(reference, tmp_path):
    """The GPU's precision on DeepSpeed's CPU accelerator (train.precision=bf16, ZeRO-3, 2 workers): a run
    stopped by SIGTERM to a worker (the step in flight finished, a checkpoint, exit 75) and run again ends
    with the uninterrupted bf16 run's per-step losses and export, bit for bit, and the same evaluation.
    The export holds the bf16 module copy (what the end-of-run evaluation ran); launch/eval.py reads it
    in bf16."""
    from safetensors.torch import load

    from conftest import sigterm_at_step

    bf16 = ["train.precision=bf16", "train.max_steps=12", "train.checkpoint_every=4", "eval.max_samples=8"]
    whole = copy_prepared(reference, tmp_path / "whole")
    r = subprocess.run(_cmd(whole, *bf16), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.load(open(whole / "logs" / "deepspeed_config.json"))["bf16"]["enabled"] is True
    stopped = copy_prepared(reference, tmp_path / "stopped")
    sigterm_at_step(_cmd(stopped, *bf16), stopped, 5)
    assert 5 <= int(find_latest(str(stopped / "checkpoints"))[len("step_"):]) < 12  # stopped before the end
    r = subprocess.run(_cmd(stopped, *bf16), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and "resumed from step_00000" in r.stderr, r.stderr[-4000:]
    assert _losses(stopped) == _losses(whole) and len(_losses(whole)) == 12
    exported = _export_bytes(whole)
    assert _export_bytes(stopped) == exported
    assert {t.dtype for t in load(exported["projector.safetensors"]).values()} == {torch.bfloat16}
    metrics = [json.loads((run / "eval" / "final_test" / "metrics.json").read_text()) for run in (whole, stopped)]
    assert metrics[0]["samples"] == 8 and metrics[0] == metrics[1]
    # launch/eval.py reads the export in bf16 on the CPU too
    r = subprocess.run([sys.executable, "launch/eval.py", "--run", str(stopped), "--precision", "bf16", "--modes", "score",
                        "--max-samples", "8", "--batch-size", "4"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((stopped / "eval" / "export_test" / "metrics.json").read_text())
    assert m["precision"] == "bf16" and m["samples"] == 8 and 0 <= m["score"]["hr@1"] <= 1
