"""bench/gpu_check.py without a GPU (--dry-run): it checks what a CPU can and says what it could not."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # torch.distributed.run subprocesses (2 CPU ranks), Triton's interpreter


def test_dry_run_checks_what_a_cpu_can_and_names_the_rest(tmp_path):
    """Triton compiles the kernels for sm_80 and sm_90; the kernels under the interpreter agree with the C++
    op; the training (ZeRO-3, bf16, the trainer's step) checkpoints at half its steps and a resume in new
    processes gives the first run's losses (bit for bit on CPU); the S-DPO step runs both ways against it;
    exit 0, and the GPU-only parts named."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["gpus"] == []
    assert report["compile"]["sm_80"]["ok"] and report["compile"]["sm_90"]["ok"]
    assert report["kernels"]["ok"] and report["kernels"]["cases"] == 24 and report["kernels"]["bad_rows"] == 6
    train = report["train"]
    assert train["ok"] and train["world"] == 2 and train["resumed_from_step"] == 3
    assert train["resume_max_rel_diff"] == 0.0 and len(train["losses"]) == 6
    assert all(train["resumed_losses"][k] == train["losses"][k] for k in ("4", "5", "6"))
    sdpo = report["sdpo"]  # the S-DPO step, shared prompt and whole rows, against the SFT step of the same run
    assert sdpo["ok"] and sdpo["sft_step_s"] == train["step_s"]
    for name in ("shared", "whole"):
        assert len(sdpo[f"{name}_losses"]) == 6 and sdpo[f"{name}_step_vs_sft"] == sdpo[f"{name}_step_s"] / train["step_s"]
    # the same starting weights, batches and negatives: the first step's loss is log(1 + k) either way
    assert sdpo["shared_losses"]["1"] == pytest.approx(sdpo["whole_losses"]["1"], rel=1e-2)
    assert sdpo["shared_losses"]["1"] == pytest.approx(math.log(4), rel=1e-2)
    assert "S-DPO step (k=3), shared prompt:" in r.stdout and "whole rows:" in r.stdout
    assert "all checks passed" in r.stdout and "not checked here: NCCL (run here: gloo)" in r.stdout
