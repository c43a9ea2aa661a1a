"""Fidelity: does the LLM use the behaviour tokens? The same model, data, seed and budget trained
text-only and with LLaRA's curriculum (and optionally hybrid from the start), each evaluated on the
same rows by LLaRA's generation protocol (HitRatio@1, ValidRatio) and by candidate scoring (HR@1,
HR@5, NDCG@5), next to the untrained model (zero-shot, text prompts), the frozen SRec alone,
popularity and random (launch/eval.py's baselines), with standard errors.

    # a real pretrained LLM (SmolLM2-135M-Instruct, launch/real_model.py) on LLaRA's LastFM split with
    # LLaRA's released SASRec: about 2.5 hours on a 2-core CPU (BENCHMARKS.md "Fidelity: a real LLM")
    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py --out /tmp/fid-real --data lastfm --model smollm2 \
        --samples 2048 --modes zero-shot,text,curriculum --splits val,test \
        train.micro_batch=1 train.global_batch=8 train.lr=0.0005
    # the tiny Llama from scratch (what the embedded default can show)
    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py --out /tmp/fid-default --steps 300 --eval-modes score

Each trained mode is one `launch/train.py` run (2 Ray workers, ZeRO-3, fp32 on CPU) and one `launch/eval.py`
run per split; zero-shot is `launch/eval.py --zero-shot --prompts text` on the text run's folder. Extra
`key=value` arguments go to every training run. The table (value ± standard error: sqrt(p(1-p)/n) for a
rate, the per-row standard deviation / sqrt(n) for NDCG) is printed last and written to <out>/fidelity.md,
the numbers to fidelity.json, candidate HR@1 with two standard errors to fidelity.png.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
sys.path.insert(0, REPO)
DATA = {
    "default": [],
    "lastfm": ["data.source=llara", f"data.path={SHARED}/llara-data/lastfm", f"srec.path={SHARED}/llara-srec/lastfm.pt",
               "data.domain=artist", "data.max_len=1024", "model.tiny.max_position_embeddings=1024", "model.tiny.vocab_size=4000"],
}


def model_args(model: str) -> list[str]:
    """The overrides for --model: tiny (the config's tiny Llama), smollm2 (launch/real_model.py's folder) or a
    folder; a pretrained base trains LoRA + adapter only, as LLaRA."""
    if model == "tiny":
        return []
    if model == "smollm2":
        from trainer.model.smollm2 import smollm2_folder

        model = smollm2_folder()
    return [f"model.base={os.path.abspath(model)}", "model.unfreeze=[]"]


def run(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def rate(values: list[float]) -> dict:
    """Mean and standard error of per-row values (0/1 rates: the binomial standard error)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return {"mean": mean, "se": math.sqrt(var / n), "n": n}


def per_row(predictions: str) -> dict:
    """The LLM's per-row results from launch/eval.py's predictions.csv."""
    rows = list(csv.DictReader(open(predictions)))
    out = {}
    if rows and rows[0]["valid"] != "":
        out["valid_ratio"] = rate([float(r["valid"] == "True") for r in rows])
        out["gen_hr@1"] = rate([float(r["correct"] == "True") for r in rows])  # correct / all
    if rows and rows[0]["score_rank"] != "":
        ranks = [int(r["score_rank"]) for r in rows]  # 0-based: 0 = the target first
        out["hr@1"] = rate([float(k < 1) for k in ranks])
        out["hr@5"] = rate([float(k < 5) for k in ranks])
        out["ndcg@5"] = rate([1 / math.log2(k + 2) if k < 5 else 0.0 for k in ranks])
    return out


def baseline_rows(metrics: dict) -> dict:
    """The baselines' means (launch/eval.py reports no per-row values for them): binomial errors for HR."""
    n, out = metrics["samples"], {}
    for name, m in metrics["baselines"].items():
        out[name] = {k: {"mean": m[k], "se": math.sqrt(m[k] * (1 - m[k]) / n) if k != "ndcg@5" else None, "n": n}
                     for k in ("hr@1", "hr@5", "ndcg@5")}
    return out


def evaluate(run_dir: str, name: str, split: str, modes: str, extra: list, log_dir: str,
             max_samples: int = -1) -> tuple[dict, dict]:
    out = os.path.join(run_dir, "eval", f"fidelity_{name}_{split}")
    run([sys.executable, "launch/eval.py", "--run", run_dir, "--split", split, "--modes", modes,
         "--max-samples", str(max_samples),
         "--batch-size", "8", "--max-new-tokens", "32", "--out", out, *extra], os.path.join(log_dir, f"{name}.{split}.eval.log"))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return per_row(os.path.join(out, "predictions.csv")), metrics


def table(results: dict, title: str) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v['mean']:.4f} ± {v['se']:.4f}" if v.get("se") is not None else f"{v['mean']:.4f}"

    lines = [title, ""]
    for split, rows in results.items():
        lines += [f"**{split}** ({next(iter(rows.values()))['hr@1']['n']} rows)", "",
                  "| model | ValidRatio | HitRatio@1 (generation, of all) | HR@1 | HR@5 | NDCG@5 |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {cell(r.get('valid_ratio'))} | {cell(r.get('gen_hr@1'))} | {cell(r.get('hr@1'))} | "
                  f"{cell(r.get('hr@5'))} | {cell(r.get('ndcg@5'))} |" for name, r in rows.items()]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (split, rows) in zip(axes[0], results.items()):
        names = list(rows)
        means = [rows[n]["hr@1"]["mean"] for n in names]
        errors = [2 * (rows[n]["hr@1"]["se"] or 0) for n in names]
        ax.bar(range(len(names)), means, yerr=errors, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("candidate HR@1 (± 2 SE)")
        ax.set_title(split)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=sorted(DATA), default="default")
    p.add_argument("--model", default="tiny", help="tiny (built from the config) | smollm2 | a model folder")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per mode (the same budget for each)")
    p.add_argument("--samples", type=int, default=0, help="training samples per mode instead of --steps (/ global batch)")
    p.add_argument("--epochs", type=int, default=0, help="whole epochs of the training split per mode instead of --steps")
    p.add_argument("--modes", default="text,curriculum,hybrid", help="zero-shot, text, curriculum, hybrid")
    p.add_argument("--splits", default="test")
    p.add_argument("--eval-modes", default="generate,score")
    p.add_argument("--eval-samples", type=int, default=-1, help="the first N rows of each split (-1: all)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = model_args(a.model)
    train_args = [*DATA[a.data], *model, *a.overrides]
    budget = [f"train.max_steps={a.steps}"]
    if a.epochs:
        budget = ["train.max_steps=-1", f"train.epochs={a.epochs}"]
    elif a.samples:
        from configs.schema import load_config

        cfg = load_config(None, train_args)
        global_batch = cfg.train.micro_batch * cfg.train.grad_accum * cfg.train.num_workers
        budget = [f"train.max_steps={max(1, a.samples // global_batch)}"]
    modes = a.modes.split(",")
    results = {split: {} for split in a.splits.split(",")}
    on_gpu = "train.use_gpu=true" in a.overrides  # the evaluations then run on the GPUs too, one per worker
    eval_args = ["--gpu", "--workers", next((o.split("=")[1] for o in a.overrides if o.startswith("train.num_workers=")), "1")] \
        if on_gpu else []
    trained = [m for m in modes if m != "zero-shot"]
    for mode in trained:
        out = os.path.join(a.out, mode)
        run([sys.executable, "launch/train.py", *train_args, f"output_dir={out}", f"train.mode={mode}", *budget,
             "eval.max_samples=8", "eval.compare=false"], os.path.join(a.out, f"{mode}.train.log"))
    for split in results:
        if "zero-shot" in modes:  # the untrained model, on text prompts (its adapter is random)
            rows, metrics = evaluate(os.path.join(a.out, trained[0]), "zero_shot", split, a.eval_modes,
                                     ["--zero-shot", "--prompts", "text", *eval_args], a.out, a.eval_samples)
            results[split]["LLM zero-shot (text prompts)"] = rows
        for mode in trained:
            rows, metrics = evaluate(os.path.join(a.out, mode), mode, split, a.eval_modes, eval_args, a.out, a.eval_samples)
            results[split][f"LLM trained {mode} ({'text' if mode == 'text' else 'hybrid'} prompts)"] = rows
        for name, r in baseline_rows(metrics).items():
            results[split][f"baseline: {name}"] = r
    title = (f"{a.data}, model {a.model}, {' '.join(budget)} per trained mode ({a.samples or 'steps'} samples), "
             f"extra: {' '.join(a.overrides) or 'none'}")
    text = table(results, title)
    with open(os.path.join(a.out, "fidelity.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "fidelity.json"), "w") as f:
        json.dump({"title": title, "results": results}, f, indent=1)
    plot(results, os.path.join(a.out, "fidelity.png"))
    print(text)


if __name__ == "__main__":
    main()
