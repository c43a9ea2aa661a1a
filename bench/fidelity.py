"""Fidelity: does the LLM use the behaviour tokens? The same model, data, seed and budget trained
three ways (text-only, LLaRA's curriculum, hybrid), each evaluated by candidate scoring on the same
test rows, next to the frozen SRec alone, popularity and random (launch/eval.py's baselines).

    # LLaRA's released LastFM data with LLaRA's released SASRec (hours on a 2-core CPU at full size)
    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py --out /tmp/fid-lastfm --data lastfm --steps 300
    # the embedded synthetic default
    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py --out /tmp/fid-default --steps 300

Each mode is one `launch/train.py` run (2 Ray workers, ZeRO-3) and one `launch/eval.py --modes score`
run; extra `key=value` arguments go to every training run. The table is printed last and written to
<out>/fidelity.md.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
DATA = {
    "default": [],
    "lastfm": ["data.source=llara", f"data.path={SHARED}/llara-data/lastfm", f"srec.path={SHARED}/llara-srec/lastfm.pt",
               "data.domain=artist", "data.max_len=1024", "model.tiny.max_position_embeddings=1024", "model.tiny.vocab_size=4000"],
}


def run(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=sorted(DATA), default="default")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per mode (the same budget for each)")
    p.add_argument("--eval-samples", type=int, default=-1)
    p.add_argument("--modes", default="text,curriculum,hybrid")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = {}
    for mode in a.modes.split(","):
        out = os.path.join(a.out, mode)
        run([sys.executable, "launch/train.py", f"output_dir={out}", f"train.mode={mode}", f"train.max_steps={a.steps}",
             "eval.max_samples=32", *DATA[a.data], *a.overrides], os.path.join(a.out, f"{mode}.train.log"))
        run([sys.executable, "launch/eval.py", "--run", out, "--modes", "score", "--max-samples", str(a.eval_samples),
             "--out", os.path.join(out, "eval", "fidelity")], os.path.join(a.out, f"{mode}.eval.log"))
        with open(os.path.join(out, "eval", "fidelity", "metrics.json")) as f:
            m = json.load(f)
        rows[f"LLM trained {mode}"] = m["score"]
        rows.update({f"baseline: {k}": v for k, v in m["baselines"].items()})  # the same in every run
    lines = [f"{a.data}, {a.steps} optimizer steps per mode, {m['samples']} test rows, candidate scoring",
             "", "| model | HR@1 | HR@5 | NDCG@5 |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['hr@1']:.4f} | {v['hr@5']:.4f} | {v['ndcg@5']:.4f} |" for k, v in rows.items()]
    text = "\n".join(lines)
    with open(os.path.join(a.out, "fidelity.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
