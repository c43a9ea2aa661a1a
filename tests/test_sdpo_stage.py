"""The S-DPO stage on the real stack: launch/train.py with train.objective=sdpo from a finished LLaRA run
(conftest's trained_run), 2 Ray Train workers, DeepSpeed ZeRO-3 in bf16 (the GPU's precision on DeepSpeed's
CPU accelerator) and ZeRO-2 in fp32; stopped by SIGTERM and resumed bit for bit; the starts it refuses."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TRAINED_ARGS, sigterm_at_step
from trainer.job.checkpoint import find_latest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sdpo")]

K = 3


def _cmd(start, out, *extra):
    return [sys.executable, "launch/train.py", f"output_dir={out}", *TRAINED_ARGS, "train.objective=sdpo",
            "train.mode=hybrid", f"model.init_from={start}", f"train.sdpo.negatives={K}", "train.max_steps=8",
            "train.checkpoint_every=4", "train.log_every=1", "eval.max_samples=8", "train.lr=0.001", *extra]


def _records(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _logged(out):
    keys = ("step", "loss", "reward_margin", "reward_accuracy", "chosen_logp")
    return [tuple(r[k] for k in keys) for r in _records(out)]


def _export(out):
    ex = os.path.join(out, "export")
    return {n: open(os.path.join(ex, n), "rb").read()
            for n in ("projector.safetensors", "trained_base.safetensors", os.path.join("lora", "adapter_model.safetensors"))}


def test_bf16_zero3_stage_starts_from_the_run_and_resumes_after_sigterm_bit_for_bit(trained_run, tmp_path):
    """The stage reads its starting run's data, tokenizer and SRec and starts from its weights: at step 1
    the policy is the reference, so the loss is log(1 + k) up to LoRA's dropout (the reference pass runs
    without it). Stopped by SIGTERM at step 3 and run again, it ends with the uninterrupted stage's per-step
    loss, reward margin, accuracy and true-item log-likelihood, export and evaluation, bit for bit."""
    whole = tmp_path / "whole"
    r = subprocess.run(_cmd(trained_run, whole, "train.precision=bf16"), cwd=REPO, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "starting from" in r.stderr and "S-DPO | reward margin" in r.stderr
    assert not (whole / "data").exists() and not (whole / "assets" / "srec").exists()  # the starting run's, read
    recs = _records(whole)
    assert [x["step"] for x in recs] == list(range(1, 9))
    assert abs(recs[0]["loss"] - math.log(1 + K)) < 0.2 and abs(recs[0]["reward_margin"]) < 0.3, recs[0]
    assert all(0 <= x["reward_accuracy"] <= 1 and x["chosen_logp"] < 0 for x in recs)
    metrics = json.loads((whole / "eval" / "final_test" / "metrics.json").read_text())
    assert metrics["samples"] == 8 and metrics["mode"] == "hybrid" and metrics["precision"] == "bf16"

    stopped = tmp_path / "stopped"
    sigterm_at_step(_cmd(trained_run, stopped, "train.precision=bf16"), stopped, 3)
    assert 3 <= int(find_latest(str(stopped / "checkpoints"))[len("step_"):]) < 8
    r = subprocess.run(_cmd(trained_run, stopped, "train.precision=bf16"), cwd=REPO, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0 and "resumed from step_00000" in r.stderr, r.stderr[-4000:]
    assert _logged(stopped) == _logged(whole)
    assert _export(stopped) == _export(whole)
    assert json.loads((stopped / "eval" / "final_test" / "metrics.json").read_text()) == metrics
    # launch/eval.py finds the stage's sources through its starting run
    r = subprocess.run([sys.executable, "launch/eval.py", "--run", str(whole), "--modes", "score", "--max-samples", "8",
                        "--batch-size", "4"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((whole / "eval" / "export_test" / "metrics.json").read_text())["samples"] == 8


def test_fp32_zero2_stage_over_whole_rows_trains_and_evaluates(trained_run, tmp_path):
    """ZeRO-2, fp32, and the 1 + k whole rows per prompt (train.sdpo.shared_prompt=false; the bf16 ZeRO-3
    test above runs each prompt once)."""
    out = tmp_path / "zero2"
    r = subprocess.run(_cmd(trained_run, out, "train.zero_stage=2", "train.max_steps=4", "train.sdpo.shared_prompt=false"),
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    recs = _records(out)
    assert len(recs) == 4 and abs(recs[0]["loss"] - math.log(1 + K)) < 0.2, recs[0]
    assert json.loads((out / "logs" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert json.loads((out / "eval" / "final_test" / "metrics.json").read_text())["samples"] == 8


def _not_finished(trained_run, tmp_path):
    """A copy of the run whose newest checkpoint is not its last step."""
    run = tmp_path / "unfinished"
    for name in ("assets", "data"):
        shutil.copytree(trained_run / name, run / name)
    first = sorted(os.listdir(trained_run / "checkpoints"))
    first = [t for t in first if t.startswith("step_")][0]  # keep_last=2: step 18 (and 24)
    shutil.copytree(trained_run / "checkpoints" / first, run / "checkpoints" / first)
    (run / "checkpoints" / "latest").write_text(first)
    return run


def _other_srec(trained_run, tmp_path):
    """A copy of the finished run whose SRec file was replaced after it trained."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "other_srec"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "export", "logs", "*.lock", ".lock"))
    weights = load_file(str(run / "assets" / "srec" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, str(run / "assets" / "srec" / "model.safetensors"))
    return run


@pytest.mark.parametrize("make, extra, message", [
    (None, ["model.init_from=/nonexistent/run"], "model.init_from=/nonexistent/run is not a finished run: it has no "
                                                 "complete checkpoint"),
    (_not_finished, [], "is not a finished run: its newest checkpoint is step 18 of 24"),
    (_other_srec, [], "trained with another SRec than"),
    ("same", ["srec.epochs=4"], "was prepared with another srec config than this stage's"),
    ("same", [f"train.sdpo.negatives=20"], "train.sdpo.negatives=20 but a sample has 19 candidates"),
])
def test_a_stage_that_cannot_start_is_refused_before_ray_in_one_line(trained_run, tmp_path, make, extra, message):
    start = trained_run if make == "same" else make(trained_run, tmp_path) if make else "/nonexistent/run"
    out = tmp_path / "stage"
    r = subprocess.run(_cmd(start, out, *extra), cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), r.stderr
    assert "Ray" not in r.stderr + r.stdout and not (out / "checkpoints").exists()


def test_a_stopped_stage_resumes_on_one_worker_keeping_its_global_batch(trained_run, tmp_path):
    """The stage's trained state goes through the first stage's resize path: stopped by SIGTERM on 2
    workers, run again on 1 with the global batch kept (accumulation 1 -> 2); every step is logged once,
    the first after the resize says so, and the stage evaluates at its end."""
    out = tmp_path / "resized"
    batch = ["train.global_batch=16", "train.sample_log=true"]
    log = sigterm_at_step(_cmd(trained_run, out, *batch), out, 3)
    stop = int(find_latest(str(out / "checkpoints"))[len("step_"):])
    assert 3 <= stop < 8, log[-2000:]
    r = subprocess.run(_cmd(trained_run, out, *batch, "train.num_workers=1"), cwd=REPO, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resize at step {stop}: 2 -> 1 workers; global batch 16 = micro 8 x accumulation 2 x 1 workers" in r.stderr
    recs = _records(out)
    assert [x["step"] for x in recs] == list(range(1, 9))
    assert [(x["step"], x["resized_from"]) for x in recs if "resized_from" in x] == [(stop + 1, 2)]
    assert all(math.isfinite(x["loss"]) and "reward_margin" in x for x in recs)
    keys = []
    for name in os.listdir(out / "logs" / "samples"):
        keys += [k for line in open(out / "logs" / "samples" / name) for k in json.loads(line)["keys"]]
    assert len(keys) == len(set(keys)) == 8 * 16  # each sample once across the stop and the resize
    assert json.loads((out / "eval" / "final_test" / "metrics.json").read_text())["samples"] == 8
