"""S-DPO against more SFT for the same samples: one LLaRA run (SFT), then two second stages started from
it (model.init_from) with the same number of steps, samples, learning rate and hybrid prompts:
train.objective=sdpo and train.objective=sft. Each is evaluated at its end on the whole test split
(candidate HR@1/HR@5/NDCG@5 with standard errors, LLaRA's generation HitRatio@1 and ValidRatio), and
the stages' step time, samples/s and peak memory are compared (same machine, same run of this script).

    # the embedded default (tiny Llama, synthetic data): ~20 min on a 2-core CPU
    OMP_WAIT_POLICY=PASSIVE python bench/sdpo.py --out /tmp/sdpo-default --sft-steps 1000 --stage-steps 100 --stage-lr 0.0003
    # SmolLM2 on LLaRA's LastFM (launch/real_model.py): ~2.5 hours on a 2-core CPU (the SFT run ~45 min)
    OMP_WAIT_POLICY=PASSIVE python bench/sdpo.py --out /tmp/sdpo-lastfm --data lastfm --model smollm2 \
        --sft-steps 256 --stage-steps 32 --whole-rows train.micro_batch=1 train.global_batch=8 train.lr=0.0005

Every run is `launch/train.py` (2 Ray workers, ZeRO-3, fp32 on CPU); extra `key=value` arguments go to all
the runs. --whole-rows adds a third stage, S-DPO over 1 + k whole rows per prompt
(train.sdpo.shared_prompt=false), to compare its cost with the default's. Written: <out>/sdpo.md (the
tables, also printed) and sdpo.json.
"""

import argparse
import json
import os
import statistics
import sys

from fidelity import DATA, REPO, evaluate, model_args, per_row, run

sys.path.insert(0, REPO)


def cost(out: str) -> dict:
    """Median ms per optimizer step (every phase), samples/s and the largest peak memory over the run's
    logged windows, the first left out (start-up)."""
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        windows = [r for r in map(json.loads, f) if "samples_per_s" in r][1:]
    ms = [sum(r[k] for k in ("data_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms")) for r in windows]
    return {"ms_per_step": statistics.median(ms), "samples_per_s": statistics.median(r["samples_per_s"] for r in windows),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in windows), "memory": windows[-1]["memory"]}


def train(out: str, args: list[str], log: str) -> None:
    """launch/train.py into `out`, unless a run there has already finished and evaluated."""
    if not os.path.exists(os.path.join(out, "eval", "final_test", "metrics.json")):
        run([sys.executable, "launch/train.py", *args, f"output_dir={out}"], log)


def cell(v: dict | None) -> str:
    return "-" if v is None else f"{v['mean']:.4f} ± {v['se']:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=sorted(DATA), default="default")
    p.add_argument("--model", default="tiny", help="tiny (built from the config) | smollm2 | a model folder")
    p.add_argument("--sft-steps", type=int, default=-1, help="the first run's steps (-1: the config's epochs)")
    p.add_argument("--stage-steps", type=int, default=100, help="steps of each second stage")
    p.add_argument("--negatives", type=int, default=3)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--stage-lr", type=float, default=0, help="the second stages' train.lr (0: the first run's)")
    p.add_argument("--whole-rows", action="store_true",
                   help="also S-DPO with train.sdpo.shared_prompt=false (1 + k whole rows per prompt): its cost")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = model_args(a.model)
    common = [*DATA[a.data], *model, *a.overrides, "eval.max_samples=-1", "eval.compare=false", "train.log_every=5"]
    sft = os.path.join(a.out, "sft")
    train(sft, [*common, f"train.max_steps={a.sft_steps}"], os.path.join(a.out, "sft.train.log"))
    sdpo = ["train.objective=sdpo", f"train.sdpo.negatives={a.negatives}", f"train.sdpo.beta={a.beta}"]
    stages = {"then_sdpo": sdpo, "then_sft": ["train.objective=sft"]}
    if a.whole_rows:
        stages["then_sdpo_whole"] = [*sdpo, "train.sdpo.shared_prompt=false"]
    for run_dir, extra in stages.items():
        train(os.path.join(a.out, run_dir), [*common, f"model.init_from={sft}", "train.mode=hybrid",
              f"train.max_steps={a.stage_steps}", *extra, *([f"train.lr={a.stage_lr}"] if a.stage_lr else [])],
              os.path.join(a.out, f"{run_dir}.train.log"))
    lr = f", lr {a.stage_lr}" if a.stage_lr else ""
    names = {"sft": f"SFT, {a.sft_steps} steps", "then_sft": f"SFT, then {a.stage_steps} steps more SFT (hybrid{lr})",
             "then_sdpo": f"SFT, then {a.stage_steps} steps S-DPO (k={a.negatives}, beta={a.beta}{lr})"}
    if a.whole_rows:
        names["then_sdpo_whole"] = names["then_sdpo"] + ", whole rows"
    rows = {}
    for run_dir, name in names.items():  # generation from the end of training, candidate scoring by launch/eval.py
        scored, _ = evaluate(os.path.join(a.out, run_dir), run_dir, "test", "score", [], a.out)
        rows[name] = {**per_row(os.path.join(a.out, run_dir, "eval", "final_test", "predictions.csv")), **scored}
    costs = {name: cost(os.path.join(a.out, run_dir)) for run_dir, name in names.items() if run_dir != "sft"}
    n = next(iter(rows.values()))["hr@1"]["n"]
    lines = [f"{a.data}, model {a.model}, test split ({n} rows), extra: {' '.join(a.overrides) or 'none'}", "",
             "| model | ValidRatio | HitRatio@1 (generation, of all) | HR@1 | HR@5 | NDCG@5 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {cell(r.get('valid_ratio'))} | {cell(r.get('gen_hr@1'))} | {cell(r.get('hr@1'))} | "
              f"{cell(r.get('hr@5'))} | {cell(r.get('ndcg@5'))} |" for name, r in rows.items()]
    sft_cost = costs[names["then_sft"]]
    lines += ["", "| stage | ms per step | samples/s | peak memory (GiB) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {c['ms_per_step']:.0f} | {c['samples_per_s']:.2f} | {c['peak_memory_gib']:.2f} ({c['memory']}) |"
              for name, c in costs.items()]
    lines.append("")
    for run_dir, label in (("then_sdpo", "S-DPO"), ("then_sdpo_whole", "S-DPO, whole rows")):
        if run_dir in names:
            c = costs[names[run_dir]]
            lines.append(f"{label} / SFT: step time x{c['ms_per_step'] / sft_cost['ms_per_step']:.2f}, "
                         f"peak memory x{c['peak_memory_gib'] / sft_cost['peak_memory_gib']:.2f}")
    text = "\n".join(lines)
    with open(os.path.join(a.out, "sdpo.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "sdpo.json"), "w") as f:
        json.dump({"rows": rows, "costs": costs}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
