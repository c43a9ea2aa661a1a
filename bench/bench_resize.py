"""A resize at scale (issue 24): the ~0.56B Llama-2-shaped model of bench/bench_scale.py trained by
launch/train.py on 2 Ray workers (ZeRO-3, LoRA + adapter), stopped by a STOP file after a checkpoint, and
resumed by the same command on 1 worker. Not CI: minutes, gigabytes.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_resize.py --base /tmp/bench_scale/base --out /tmp/bench_resize \
        --prepared /tmp/bench_scale/run

--base: a model folder (bench/bench_scale.py --out X writes X/base); --prepared: a run folder of the same
data and model whose data/ and assets/ are copied (else the first run builds them). Prints, from the
runs' own log lines: per checkpoint the seconds of DeepSpeed's per-rank files and of the world-size-
independent trained state (trainable.safetensors) and its bytes, the ratio of the two times, and the
resize line of the resumed run; writes them to <out>/bench_resize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = re.compile(r"checkpoint (step_\d+): DeepSpeed's files ([\d.]+) s; the trained state whole "
                        r"\(for a resume on any number of workers\) ([\d.]+) MB in ([\d.]+) s")


def args_for(a, run: str, workers: int) -> list[str]:
    return [f"output_dir={run}", f"model.base={a.base}", "model.unfreeze=[]", "data.max_len=512",
            f"data.synthetic.num_users={a.users}", "srec.epochs=2", f"train.num_workers={workers}", "train.zero_stage=3",
            "train.micro_batch=1", "train.global_batch=2", f"train.max_steps={a.steps}", "train.checkpoint_every=2",
            "train.log_every=1", "eval.max_samples=2", "eval.batch_size=2", "eval.compare=false", "eval.max_new_tokens=2"]


def run(cmd: list[str], log_path: str, stop_after: str | None = None) -> tuple[int, float, str]:
    """Run cmd; with stop_after, write <run>/STOP once that checkpoint is complete."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if stop_after and os.path.exists(os.path.join(stop_after, "COMPLETE")):
                open(os.path.join(os.path.dirname(os.path.dirname(stop_after)), "STOP"), "w").close()
                stop_after = None
            time.sleep(0.5)
    return proc.returncode, time.time() - t, open(log_path).read()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prepared", default=None)
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    run_dir = os.path.join(a.out, "run")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(run_dir)
    if a.prepared:
        for name in ("data", "assets"):
            shutil.copytree(os.path.join(a.prepared, name), os.path.join(run_dir, name))
    train = [sys.executable, "launch/train.py"]
    rc1, s1, log1 = run([*train, *args_for(a, run_dir, 2)], os.path.join(a.out, "train_2workers.log"),
                        stop_after=os.path.join(run_dir, "checkpoints", "step_000002"))
    rc2, s2, log2 = run([*train, *args_for(a, run_dir, 1)], os.path.join(a.out, "train_1worker.log"))
    checkpoints = [{"run": name, "tag": m[0], "deepspeed_s": float(m[1]), "whole_mb": float(m[2]), "whole_s": float(m[3])}
                   for name, log in (("2 workers", log1), ("1 worker", log2)) for m in CHECKPOINT.findall(log)]
    resize = re.search(r"resize at step .*?workers \(was accumulation \d+\)", log2)
    result = {"exit_codes": [rc1, rc2], "seconds": [round(s1), round(s2)], "checkpoints": checkpoints,
              "resize": resize.group(0) if resize else None, "verified": "verified bit for bit" in log2}
    with open(os.path.join(a.out, "bench_resize.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"runs: exit {rc1} (stopped, 2 workers) in {s1:.0f} s, exit {rc2} (resumed, 1 worker) in {s2:.0f} s")
    print(f"{'run':10s} {'checkpoint':12s} {'DeepSpeed files s':>18s} {'whole state MB':>15s} {'whole state s':>14s} {'ratio':>6s}")
    for c in checkpoints:
        print(f"{c['run']:10s} {c['tag']:12s} {c['deepspeed_s']:18.2f} {c['whole_mb']:15.1f} {c['whole_s']:14.2f} "
              f"{c['whole_s'] / max(c['deepspeed_s'], 1e-9):6.2f}")
    print(result["resize"], "| state verified bit for bit:", result["verified"])


if __name__ == "__main__":
    main()
