"""Trainer overhead: milliseconds per optimizer step of launch/train.py (Ray Train, 1 worker, DeepSpeed
ZeRO-3, streaming reader, curriculum, logging) against a bare loop of the same model's forward,
backward and AdamW step in one process on the same batches, same run. 1 thread each, hybrid steps.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_trainer_overhead.py [--out /tmp/bench_overhead] [--steps 60] \\
        [--zero-stage 3] [--breakdown] [key=value ...]

A bigger model than the default's 2 x 128 tiny Llama shows how the trainer's fixed per-step costs
(DeepSpeed's hooks, logging, the reader) weigh at other sizes:

    ... bench_trainer_overhead.py --out /tmp/bench_overhead_h512 model.tiny.hidden_size=512 \\
        model.tiny.num_layers=4 model.tiny.intermediate_size=1376

The trainer's time per step and its split (data, forward, backward, optimizer, other) come from its
metrics.jsonl (the logged intervals after the first, which holds the start-up); the bare loop skips
its first 10 steps. The last line prints the ratio.

Where the overhead goes (--breakdown): the same batches also go through DeepSpeed engines built in this
process (world size 1, gloo; no Ray, no reader, no logging), stage 0 and stage 3, timed by the same
phases, so the gap splits into DeepSpeed's engine (engine - bare) and the trainer around it (trainer -
engine of its stage); then a cProfile of the stage-3 engine's steps lists the functions that take the
time (top 25 by own time; cProfile slows Python-heavy code, so read it for where, not how much).
"""

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("data", "forward", "backward", "optimizer", "other")


def trainer_phases(out: str, args: list[str]) -> dict:
    """Run launch/train.py (fresh checkpoints and logs; data and assets reused) and return its mean ms
    per step by phase, over the logged intervals after the first."""
    for sub in ("checkpoints", "logs"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    r = subprocess.run([sys.executable, "launch/train.py", f"output_dir={out}", *args], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        logged = [rec for rec in map(json.loads, f) if "samples_per_s" in rec][1:]
    return {k: sum(rec[f"{k}_ms"] for rec in logged) / len(logged) for k in PHASES}


def timed_phases(steps, batches, skip: int = 10) -> dict:
    """Mean ms per step by phase of `steps(batch)`, a generator yielding after each phase's name."""
    sums, n = dict.fromkeys(PHASES, 0.0), 0
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        for phase in steps(batch):
            now = time.perf_counter()
            if i >= skip:
                sums[phase] += 1e3 * (now - t)
            t = now
        n += i >= skip
    return {k: v / n for k, v in sums.items()}


def bare_steps(model, embed, srec, ph, cfg):
    from trainer.train_loop import step_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)  # as the trainer

    def steps(batch):
        loss = step_loss(model, embed, srec, batch, True, ph, "cpu")
        yield "forward"
        opt.zero_grad()
        loss.backward()
        yield "backward"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()
        yield "optimizer"
    return steps


def engine_phases(cfg, llm, srec, batches, ph, stage: int, profile: bool = False) -> dict:
    """ms per step by phase of a DeepSpeed engine (the trainer's deepspeed_config at `stage`) built in
    this process on a fresh copy of the model, over the same batches; with profile, the timed steps run
    again under cProfile and its top 25 functions by own time are printed."""
    import cProfile
    import pstats

    import deepspeed
    from omegaconf import OmegaConf

    from trainer.model.build import build_llara_model
    from trainer.job.ds_config import deepspeed_config
    from trainer.train_loop import step_loss

    if not torch.distributed.is_initialized():
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29531"}.items():
            os.environ.setdefault(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
    model, embed = build_llara_model(llm, srec.hidden, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(OmegaConf.merge(cfg, {"train": {"zero_stage": stage}})))
    engine.train()

    def steps(batch):
        loss = step_loss(engine, embed, srec, batch, True, ph, "cpu")
        yield "forward"
        engine.backward(loss)
        yield "backward"
        engine.step()
        loss.item()
        yield "optimizer"

    phases = timed_phases(steps, batches)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        timed_phases(steps, batches[10:], skip=0)
        prof.disable()
        print(f"cProfile of {len(batches) - 10} steps of the ZeRO stage {stage} engine (own time, top 25):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    engine.destroy()
    return phases


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_overhead")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--breakdown", action="store_true", help="also time DeepSpeed engines in-process and profile ZeRO-3")
    p.add_argument("overrides", nargs="*", help="config overrides for both, e.g. model.tiny.hidden_size=512")
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    common = ["train.mode=hybrid", "train.micro_batch=8", "train.grad_accum=1", "train.cpus_per_worker=1", *a.overrides]
    columns = {f"trainer (Ray, ZeRO {a.zero_stage})": trainer_phases(a.out, [
        "train.num_workers=1", f"train.max_steps={a.steps}", "train.log_every=10", f"train.checkpoint_every={10 * a.steps}",
        "eval.max_samples=8", f"train.zero_stage={a.zero_stage}", *common])}

    from shards.build import load_manifest
    from configs.schema import load_config
    from trainer.data.loader import SplitReader, collate
    from trainer.model.build import build_llara_model, load_tokenizer
    from trainer.model.srec import load_srec

    torch.set_num_threads(1)
    cfg = load_config(None, [f"output_dir={a.out}", *common])
    data, llm, srec_dir = (os.path.join(a.out, x) for x in ("data", "assets/llm", "assets/srec"))
    tok = load_tokenizer(llm)
    srec = load_srec(srec_dir).requires_grad_(False)
    shards = [s for s in load_manifest(data)["shards"] if s["split"] == "train"]
    batches = [collate(b, tok.pad_token_id) for b in
               itertools.islice(SplitReader(data, shards, 0, 1, 8, 0, True).rank_batches(0), a.steps)]
    ph = tok.convert_tokens_to_ids("[PH]")
    model, embed = build_llara_model(llm, srec.hidden, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze))
    model.train()
    columns["bare loop"] = timed_phases(bare_steps(model, embed, srec, ph, cfg), batches)
    if a.breakdown:
        for stage in (0, 3):
            columns[f"engine in-process, ZeRO {stage}"] = engine_phases(cfg, llm, srec, batches, ph, stage,
                                                                       profile=stage == 3)
    names = list(columns)
    print("\nms per optimizer step, by phase (1 thread, micro-batch 8, hybrid steps)\n")
    print("| phase | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for k in (*PHASES, "total"):
        print(f"| {k} | " + " | ".join(f"{(sum(c.values()) if k == 'total' else c[k]):.1f}" for c in columns.values()) + " |")
    total = {n: sum(c.values()) for n, c in columns.items()}
    trainer, bare = total[names[0]], total["bare loop"]
    engine = total.get(f"engine in-process, ZeRO {a.zero_stage}")
    if engine is not None:
        print(f"\nsplit of the trainer's {trainer - bare:+.1f} ms/step over the bare loop: DeepSpeed's engine "
              f"{engine - bare:+.1f} ms, the trainer around it (Ray, reader, logging, signals) {trainer - engine:+.1f} ms")
    print(f"ratio: the trainer takes {trainer / bare:.2f}x the bare loop per step ({100 * (trainer / bare - 1):+.0f}% overhead)")


if __name__ == "__main__":
    main()
