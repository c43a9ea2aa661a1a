"""End to end: launch/train.py with 2 Ray workers and DeepSpeed ZeRO-3 on the small synthetic set, from an
empty output folder (conftest's trained_run: data build, SRec, training, checkpoints, evaluation), and the
finished run extended by more steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TRAINED_ARGS, TRAINED_STEPS
from trainer.job.checkpoint import find_latest

pytestmark = pytest.mark.slow  # launch/train.py in a subprocess: 2 Ray workers, ZeRO-3 training


def _records(out):
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_checkpoint_evaluate(trained_run):
    out = trained_run
    stdout, stderr = (out.parent / "train.stdout").read_text(), (out.parent / "train.stderr").read_text()
    ds = json.loads((out / "logs" / "deepspeed_config.json").read_text())  # what the engine was given
    assert ds["zero_optimization"] == {"stage": 3} and ds["train_micro_batch_size_per_gpu"] == 8
    assert "Reporting training result" not in stdout + stderr  # Ray's info line on every report, filtered
    recs = _records(out)
    assert [x["step"] for x in recs] == list(range(1, TRAINED_STEPS + 1))
    losses = [x["loss"] for x in recs]
    timed = [x for x in recs if "samples_per_s" in x]  # throughput on every log_every-th step
    assert [x["step"] for x in timed] == list(range(3, TRAINED_STEPS + 1, 3))
    assert all(x["samples_per_s"] > 0 and x["tokens_per_s"] > x["samples_per_s"] for x in timed)
    for x in timed:  # where the time went, ms per optimizer step: the phases add up to the step time
        phases = [x[f"{k}_ms"] for k in ("data", "forward", "backward", "optimizer", "other")]
        assert x["forward_ms"] > 0 and x["backward_ms"] > 0 and min(phases) > -0.01, x
        step_ms = 1e3 * 16 / x["samples_per_s"]  # 2 workers x micro-batch 8 per step
        assert abs(sum(phases) - step_ms) < 0.01 * step_ms + 1, x
        # on CPU no peak to compare with: the achieved TFLOP/s instead of MFU, and the host's peak RSS
        assert x["mfu"] is None and x["tflops_per_s"] > 0 and x["memory"] == "host_rss" and x["peak_memory_gib"] > 0.1, x
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses  # the loss falls
    tag = f"step_{TRAINED_STEPS:06d}"
    assert find_latest(str(out / "checkpoints")) == tag
    ckpt = out / "checkpoints" / tag
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "test_metrics.json").exists()
    assert len([f for f in os.listdir(ckpt) if "optim_states" in f]) == 2  # ZeRO-3: one shard per rank
    m = json.loads((out / "eval" / "final_test" / "metrics.json").read_text())
    for k in ("hr@1_of_valid", "hr@1_of_all", "valid_ratio"):
        assert 0.0 <= m["generate"][k] <= 1.0
    assert m["samples"] == 16
    assert "HitRatio@1" in stdout and "ValidRatio" in stdout
    # the side-by-side table: the LLM with hybrid and text-only prompts, the SRec alone, the baselines
    c = {"llm_hybrid": m["score_hybrid"], "llm_text": m["score_text"], **m["baselines"]}
    assert set(c) == {"llm_hybrid", "llm_text", "srec", "popularity", "random"}
    assert all(c[k]["samples"] == 16 and 0 <= c[k]["hr@1"] <= c[k]["hr@5"] <= 1 for k in c)
    assert "frozen SRec alone" in stdout and "text-only prompts" in stdout


def test_a_finished_run_goes_on_for_more_steps_with_a_deepspeed_knob(trained_run, tmp_path):
    """The same output folder with a larger train.max_steps resumes from its newest checkpoint; a ZeRO-3 knob
    passed through to DeepSpeed (train.deepspeed) reaches the engine."""
    out = tmp_path / "run"
    # not eval/: test_eval may be writing there at the same time (pytest -n 2); the run does not read it
    shutil.copytree(trained_run, out, ignore=shutil.ignore_patterns("ray", ".lock", "eval"))
    more = TRAINED_STEPS + 6
    args = [a for a in TRAINED_ARGS if not a.startswith("train.max_steps")]
    r = subprocess.run([sys.executable, "launch/train.py", f"output_dir={out}", *args, f"train.max_steps={more}",
                        "train.deepspeed.zero_optimization.stage3_prefetch_bucket_size=1e6", "eval.compare=false"],
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert f"resumed from step_{TRAINED_STEPS:06d}" in r.stdout + r.stderr
    ds = json.loads((out / "logs" / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1e6}
    assert [x["step"] for x in _records(out)] == list(range(1, more + 1))
    assert find_latest(str(out / "checkpoints")) == f"step_{more:06d}"
