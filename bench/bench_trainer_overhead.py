"""Trainer overhead: seconds per optimizer step of launch/train.py (Ray Train, 1 worker, DeepSpeed
ZeRO-3, streaming reader, curriculum, logging) against a bare loop of the same model's forward,
backward and AdamW step in one process on the same batches, same run. 1 thread each, hybrid steps.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_trainer_overhead.py [--out /tmp/bench_overhead] [--steps 60] [--zero-stage 3] [key=value ...]

A bigger model than the default's 2 x 128 tiny Llama shows how the trainer's fixed per-step costs
(DeepSpeed's hooks, logging, the reader) weigh at other sizes:

    ... bench_trainer_overhead.py --out /tmp/bench_overhead_h512 model.tiny.hidden_size=512 \
        model.tiny.num_layers=4 model.tiny.intermediate_size=1376

The trainer's time per step comes from its metrics.jsonl (samples/s over the logged intervals after the
first, which holds the start-up); the bare loop skips its first 10 steps. The last line prints the ratio.
"""

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_overhead")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides for both, e.g. model.tiny.hidden_size=512")
    a = p.parse_args()
    common = ["train.mode=hybrid", "train.micro_batch=8", "train.grad_accum=1", "train.cpus_per_worker=1", *a.overrides]
    cmd = [sys.executable, "launch/train.py", f"output_dir={a.out}", "train.num_workers=1", f"train.max_steps={a.steps}",
           "train.log_every=10", f"train.checkpoint_every={10 * a.steps}", "eval.max_samples=8", f"train.zero_stage={a.zero_stage}", *common]
    for sub in ("checkpoints", "logs"):  # a fresh run each time (the data and assets are reused)
        shutil.rmtree(os.path.join(a.out, sub), ignore_errors=True)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    with open(os.path.join(a.out, "logs", "metrics.jsonl")) as f:
        rates = [rec["samples_per_s"] for rec in map(json.loads, f) if "samples_per_s" in rec]
    trainer_s_per_step = 8 / (sum(rates[1:]) / len(rates[1:]))

    from shards.build import load_manifest
    from trainer.config import load_config
    from trainer.data import SplitReader, collate
    from trainer.model.build import build_llara_model, load_tokenizer
    from trainer.srec import load_srec
    from trainer.train_loop import step_loss

    torch.set_num_threads(1)
    cfg = load_config(None, [f"output_dir={a.out}", *common])
    data, llm, srec_dir = (os.path.join(a.out, x) for x in ("data", "assets/llm", "assets/srec"))
    tok = load_tokenizer(llm)
    srec = load_srec(srec_dir).requires_grad_(False)
    model, embed = build_llara_model(llm, srec.hidden, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)  # as the trainer
    shards = [s for s in load_manifest(data)["shards"] if s["split"] == "train"]
    batches = [collate(b, tok.pad_token_id) for b in
               itertools.islice(SplitReader(data, shards, 0, 1, 8, 0, True).rank_batches(0), a.steps)]
    ph = tok.convert_tokens_to_ids("[PH]")
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = step_loss(model, embed, srec, batch, True, ph, "cpu")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    bare = sum(times[10:]) / len(times[10:])
    print(f"trainer (Ray Train, 1 worker, ZeRO stage {a.zero_stage}): {trainer_s_per_step * 1e3:.1f} ms/step")
    print(f"bare loop, same model and batches:     {bare * 1e3:.1f} ms/step")
    print(f"ratio: the trainer takes {trainer_s_per_step / bare:.2f}x the bare loop per step "
          f"({100 * (trainer_s_per_step / bare - 1):+.0f}% overhead)")


if __name__ == "__main__":
    main()
