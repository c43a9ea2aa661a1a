"""Fidelity at CI scale, in one process: the loop of tests/test_fidelity.py (the trainer's step_loss
on the trainer's model and shards, no Ray/DeepSpeed) for any config, modes and budget.

    OMP_WAIT_POLICY=PASSIVE python bench/fidelity_inprocess.py --out /tmp/fidq --steps 600 \\
        --modes hybrid,text,curriculum [key=value ...]      # e.g. data.synthetic.titles=pairs

Prints HR@1 of the frozen SRec alone, popularity and random on the first --eval-samples test rows,
then per training mode the trained model's HR@1 read with hybrid and with text-only prompts.
Bench/fidelity.py does the same through launch/train.py (Ray, ZeRO-3), at far higher cost.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--modes", default="hybrid,text")
    p.add_argument("--eval-samples", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--broken", choices=["injection", "adapter_grad"], default=None,
                   help="train with a fault on purpose: placeholders get other items' rows, or the adapter no gradient")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from shards.build import load_manifest
    from test_fidelity import train_and_rank
    from configs.schema import load_config
    from trainer.data.loader import meta
    from trainer.evaluation.evaluate import baseline_ranks, split_samples
    from trainer.data.prepare import prepare
    from trainer.evaluation.ranking import ranking_metrics
    from trainer.model.srec import load_srec

    cfg = load_config(None, [f"output_dir={a.out}", *a.overrides])
    paths = prepare(cfg)
    manifest = load_manifest(paths.data)
    test = split_samples(paths, manifest, "test", a.eval_samples)
    train_targets = [meta(s)["target"] for s in split_samples(paths, manifest, "train", -1)]
    for name, ranks in baseline_ranks(load_srec(paths.srec), test, train_targets, manifest["num_items"], cfg.seed).items():
        print(f"baseline {name}: HR@1 {ranking_metrics(ranks)['hr@1']:.3f}", flush=True)
    trained = {mode: train_and_rank(cfg, paths, mode, a.steps, broken=a.broken, eval_samples=a.eval_samples)
               for mode in a.modes.split(",")}
    if {"curriculum", "text"} <= set(trained):  # the check tests/test_fidelity.py made before 2026-12-01
        c, t, n = trained["curriculum"]["hybrid"], trained["text"]["text"], trained["curriculum"]["samples"]
        two_se = 2 * ((c * (1 - c) + t * (1 - t)) / n) ** 0.5
        shown = c - t > two_se and trained["curriculum"]["hybrid"] > trained["curriculum"]["text"]
        print(f"curriculum - text-only: {c - t:+.3f} HR@1, two standard errors {two_se:.3f}, curriculum read without "
              f"its tokens {trained['curriculum']['text']:.3f}: margin {'shown' if shown else 'NOT shown'}")


if __name__ == "__main__":
    main()
