"""Memory and speed switches (issue #23) on the ~0.56B Llama-2-shaped model of bench/bench_scale.py, on
this CPU. Not CI: ~15-25 minutes, several GiB.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_memory.py --out /tmp/bench_memory            # ~0.56B
    OMP_WAIT_POLICY=PASSIVE python bench/bench_memory.py --out /tmp/bench_memory_dbg --hidden 256 \
        --layers 2 --heads 4 --intermediate 688 --tokens 64                                 # to debug

Every row runs in a fresh process (or two, for ZeRO), so each peak is its own. The model is the
trainer's (trainer.model.build.build_llara_model: LoRA r=8 on the 7 projections + the adapter, the
base frozen, fp32, sdpa attention), the batch one sample of --tokens tokens with 10 behaviour slots
(the fused injection runs) and a --answer-token answer at its end, the step the trainer's
(forward, trainer.train_loop.answer_loss, backward, AdamW). Rows:

1. activation checkpointing off / on (train.activation_checkpointing);
2. answer-only logits on / off (the LM head at the answer positions only, as the trainer does, or at
   every position); then the LM head + loss alone at 32,000 (Llama-2) and 151,936 (Qwen2) rows;
3. ZeRO stage 2 / 3 (train.zero_stage) on 2 ranks (torch.distributed.run, gloo, the trainer's
   deepspeed_config), ZeRO-3 loading partition by partition as the trainer does, plus every
   collective's calls and bytes in the measured steps from DeepSpeed's comms logger (its message
   size: the tensor the rank puts in, e.g. its own partition for an all-gather);
4. data.length_grouping off / N = 8 on LastFM micro-batches (worker_padding): useful tokens/s.

Memory: each process runs one warm-up step (so the optimizer's state exists), then its VmHWM is reset
(/proc/self/clear_refs) and the "peak above rest" is VmHWM after the measured steps minus VmRSS before
them. The processes run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc hands freed tensors back at
once and RSS follows what is live (BENCHMARKS.md "Scale" shows ~1.3 GiB retained otherwise). Time: the
median of the measured steps' wall seconds. The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 2 ** 30


# ---- inside a measured process

def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss("VmRSS")


def sample(vocab: int, tokens: int, answer: int, seed: int):
    """One sample: random ids, 10 behaviour slots (rows of 5 item vectors), labels on the last `answer`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (1, tokens), generator=g)
    slot = torch.full((1, tokens), -1)
    slot[0, torch.randperm(tokens - answer - 1, generator=g)[:10]] = torch.randint(0, 5, (10,), generator=g)
    labels = torch.full((1, tokens), -100)
    labels[:, -answer:] = ids[:, -answer:]
    return ids, slot, labels, torch.randn(5, 64, generator=g)


def step(model, embed, batch, answer_only: bool, attention_mask=None):
    """The trainer's loss (step_loss without the data plumbing): the LM head at the answer positions
    only, or over every position. batch: (input ids, slot map, labels, behaviour rows)."""
    from trainer.train_loop import answer_loss, answer_positions

    ids, slot, labels, vectors = batch
    positions = answer_positions(labels) if answer_only else None
    with embed.inject(slot, vectors, None):
        out = model(input_ids=ids, attention_mask=attention_mask, use_cache=False,
                    **({"logits_to_keep": positions} if answer_only else {}))
    return answer_loss(out.logits, labels, positions)


def measured(run_one, steps: int) -> dict:
    run_one(0)  # warm-up: the optimizer's state, the op's first call
    rest = reset_peak()
    seconds = []
    for i in range(steps):
        t = time.perf_counter()
        run_one(i + 1)
        seconds.append(time.perf_counter() - t)
    peak = rss("VmHWM")
    return {"rest": rest, "peak": peak, "above_rest": peak - rest, "seconds": seconds,
            "median_s": statistics.median(seconds)}


def worker_single(a) -> dict:
    """Rows 1 and 2: one process, torch.optim.AdamW on the trainable parameters."""
    import torch

    from trainer.model.build import build_llara_model
    from bench.bench_scale import LORA

    torch.set_num_threads(a.threads)
    model, embed = build_llara_model(a.base, 64, LORA, unfreeze=[], activation_checkpointing=a.checkpointing)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = a.id_vocab

    def run_one(i):
        loss = step(model, embed, sample(vocab, a.tokens, a.answer_tokens, i), a.answer_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measured(run_one, a.steps)


def worker_head(a) -> dict:
    """Row 2b: the LM head (frozen, as in LoRA training) + the loss alone on hidden states that need a
    gradient, the [1, T, V] logits or the answer positions' [1, K, V] only."""
    import torch

    from trainer.train_loop import answer_loss, answer_positions

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False).requires_grad_(False)
    labels = torch.full((1, a.tokens), -100)
    labels[:, -a.answer_tokens:] = torch.randint(0, a.vocab, (a.answer_tokens,))

    def run_one(i):
        hidden = torch.randn(1, a.tokens, a.hidden, requires_grad=True)
        positions = answer_positions(labels) if a.answer_only else None
        logits = head(hidden if positions is None else hidden[:, positions])
        answer_loss(logits, labels, positions).backward()

    return measured(run_one, a.steps)


def worker_zero(a) -> dict:
    """Row 3: one rank of 2 under torch.distributed.run, the trainer's DeepSpeed config at stage a.stage."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from configs.schema import load_config
    from trainer.job.ds_config import deepspeed_config
    from trainer.model.build import build_llara_model, partitioned_loading
    from bench.bench_scale import LORA

    torch.set_num_threads(a.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = load_config(None, ["train.micro_batch=1", "train.grad_accum=1", f"train.zero_stage={a.stage}",
                             "train.grad_clip=1.0"])
    ds_config = deepspeed_config(cfg)
    ds_config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    loading = partitioned_loading(ds_config)  # ZeRO-3: zero.Init, as the trainer loads; None otherwise
    model, embed = build_llara_model(a.base, 64, LORA, unfreeze=[])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    del loading

    from deepspeed.comm import comm as ds_comm

    def run_one(i):
        loss = step(engine, embed, sample(a.id_vocab, a.tokens, a.answer_tokens, 100 * i + rank), True)
        engine.backward(loss)
        engine.step()
        if i == 0:  # the warm-up step's collectives (and the engine's setup) are not counted
            ds_comm.comms_logger.comms_dict.clear()

    out = measured(run_one, a.steps)
    comms = {}
    for op, sizes in ds_comm.comms_logger.comms_dict.items():  # DeepSpeed's message size: the rank's input tensor
        comms[op] = {"calls": sum(v[0] for v in sizes.values()),
                     "bytes": sum(size * v[0] for size, v in sizes.items())}
    out.update(rank=rank, comms=comms,
               sharded_params=sum(int(hasattr(p, "ds_tensor")) for p in engine.module.parameters()))
    dist.barrier()
    dist.destroy_process_group()
    return out


def worker_padding(a) -> dict:
    """Row 4: the same step on LastFM micro-batches as rank 0 of 2 reads them for training (micro-batch 4,
    global batch 128: grad_accum 16), with data.length_grouping off and N = 8. The first window of 8
    global batches holds the same samples either way (grouping only reorders it): a.padding_batches
    micro-batches spread evenly over that window are taken from each order and timed alternately."""
    import torch

    from shards.build import load_manifest
    from trainer.data.loader import SplitReader, collate
    from trainer.model.build import build_llara_model, load_tokenizer
    from bench.bench_scale import LORA

    torch.set_num_threads(a.threads)
    pad = load_tokenizer(a.lastfm_tokenizer).pad_token_id
    shards = [s for s in load_manifest(a.lastfm)["shards"] if s["split"] == "train"]
    window = 8 * 16  # micro-batches of rank 0 in 8 global batches
    picks = [window * (2 * i + 1) // (2 * a.padding_batches) for i in range(a.padding_batches)]
    batches = {}
    for grouping in (0, 8):
        reader = SplitReader(a.lastfm, shards, 0, 2, 4, seed=0, shuffle=True, grad_accum=16, length_grouping=grouping)
        first = [b for _, b in zip(range(window), reader.rank_batches(epoch=0))]
        batches[grouping] = [collate(first[i], pad) for i in picks]
    model, embed = build_llara_model(a.base, 64, LORA, unfreeze=[])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run(batch):
        vectors = torch.randn(len(batch["unique_items"]), 64)
        t = time.perf_counter()
        step(model, embed, (batch["input_ids"], batch["slot_map"], batch["labels"], vectors), True,
             batch["attention_mask"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    run(batches[0][0])  # warm-up
    out = {}
    for grouping in (0, 8):
        out[grouping] = {"seconds": [], "useful": 0, "positions": 0}
    for i in range(a.padding_batches):  # alternately, so that the machine's load falls on both alike
        for grouping in (0, 8):
            batch = batches[grouping][i]
            real = (batch["labels"] != -100).any(1)  # fillers (exactly-once padding of the epoch) are not useful
            out[grouping]["seconds"].append(run(batch))
            out[grouping]["useful"] += int(batch["attention_mask"][real].sum())
            out[grouping]["positions"] += batch["input_ids"].numel()
    for r in out.values():
        r["useful_per_s"] = r["useful"] / sum(r["seconds"])
        r["padded_share"] = 1 - r["useful"] / r["positions"]
    return {"off": out[0], "grouped": out[8]}


# ---- the driver

def child_env(a) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(a.threads), PYTHONPATH=REPO,
                MALLOC_MMAP_THRESHOLD_="65536", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


def run_row(a, name: str, kind: str, extra: list[str], ranks: int = 1, report: bool = True) -> list[dict]:
    out = os.path.join(a.out, name)
    os.makedirs(out, exist_ok=True)
    args = [__file__, "--worker", kind, "--result", out, "--base", a.base, "--tokens", str(a.tokens),
            "--answer-tokens", str(a.answer_tokens), "--steps", str(a.steps), "--threads", str(a.threads),
            "--id-vocab", str(a.id_vocab), *extra]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(ranks), "--master_port", "29671"]
    t = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        r = subprocess.run([*launcher, *args], cwd=REPO, env=child_env(a), stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}; see {out}/log.txt")
    rows = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith("result")]
    if not report:
        return rows
    print(f"{name}: {time.time() - t:.0f} s; " + "; ".join(
        f"peak above rest {r['above_rest'] / GiB:.2f} GiB, rest {r['rest'] / GiB:.2f} GiB, "
        f"{r['median_s']:.1f} s/step" for r in rows), flush=True)
    return rows


def rows_checkpointing_and_logits(a, config, rows: set, results: dict, ratios: list) -> None:
    """Activation checkpointing off and on; the whole step's and the LM head's peak with full and answer-only logits."""
    if "checkpointing" in rows:
        off = run_row(a, "checkpointing_off", "single", ["--answer-only"])[0]
        on = run_row(a, "checkpointing_on", "single", ["--answer-only", "--checkpointing"])[0]
        results["checkpointing"] = {"off": off, "on": on}
        ratios.append(f"activation checkpointing: peak above rest {off['above_rest'] / on['above_rest']:.2f}x lower, "
                      f"step time {on['median_s'] / off['median_s']:.2f}x")
    if "logits" in rows:
        full = run_row(a, "logits_full", "single", [])[0]
        only = results.get("checkpointing", {}).get("off") or run_row(a, "logits_answer_only", "single",
                                                                       ["--answer-only"])[0]
        results["logits_model"] = {"full": full, "answer_only": only}
        ratios.append(f"answer-only logits, whole step: peak above rest {full['above_rest'] / only['above_rest']:.2f}x "
                      f"lower, step time {only['median_s'] / full['median_s']:.2f}x")
        for vocab in (config.vocab_size, 151936):
            head = [run_row(a, f"head_{vocab}_{kind}", "head", ["--hidden", str(config.hidden_size), "--vocab",
                                                                str(vocab), *flag])[0]
                    for kind, flag in (("full", []), ("answer_only", ["--answer-only"]))]
            results[f"logits_head_{vocab}"] = {"full": head[0], "answer_only": head[1]}
            ratios.append(f"answer-only logits, LM head + loss at V={vocab:,}: "
                          f"{head[0]['above_rest'] / max(head[1]['above_rest'], 1):.0f}x lower peak")


def rows_zero_and_padding(a, config, rows: set, results: dict, ratios: list) -> None:
    """ZeRO-2 against ZeRO-3 on 2 ranks (memory, time, collective bytes); length grouping on LastFM's shards."""
    if "zero" in rows:
        for stage in (2, 3):
            results[f"zero{stage}"] = run_row(a, f"zero{stage}", "zero", ["--stage", str(stage)], ranks=2)
        z2, z3 = results["zero2"], results["zero3"]
        sent = {s: max(sum(c["bytes"] for c in r["comms"].values()) for r in results[f"zero{s}"]) / a.steps
                for s in (2, 3)}
        ratios.append(f"ZeRO-3 vs 2: per-rank rest {max(r['rest'] for r in z3) / max(r['rest'] for r in z2):.2f}x, "
                      f"peak {max(r['peak'] for r in z3) / max(r['peak'] for r in z2):.2f}x, "
                      f"step time {max(r['median_s'] for r in z3) / max(r['median_s'] for r in z2):.2f}x, "
                      f"collective bytes per step {sent[3] / max(sent[2], 1):.0f}x "
                      f"({sent[2] / 2**20:.1f} MiB vs {sent[3] / 2**20:.1f} MiB)")
    if "padding" in rows:
        if not os.path.exists(os.path.join(a.lastfm, "manifest.json")):
            print(f"padding: skipped, no LastFM shards in {a.lastfm} (run bench/bench_padding.py --sets lastfm first)")
        else:
            r = run_row(a, "padding", "padding", ["--lastfm", a.lastfm, "--lastfm-tokenizer", a.lastfm_tokenizer,
                                                  "--padding-batches", str(a.padding_batches)], report=False)[0]
            results["padding"] = r
            for name, x in r.items():
                print(f"padding {name}: padded {100 * x['padded_share']:.1f}%, {x['useful_per_s']:.1f} useful tokens/s, "
                      f"s per micro-batch {[round(t, 1) for t in x['seconds']]}")
            ratios.append(f"length grouping (N=8) on LastFM: padded {100 * r['off']['padded_share']:.1f}% -> "
                          f"{100 * r['grouped']['padded_share']:.1f}%, useful tokens/s "
                          f"{r['grouped']['useful_per_s'] / r['off']['useful_per_s']:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/bench_memory")
    p.add_argument("--base", help="a model folder; default: <out>/base, built as bench_scale.py builds it")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512, help="tokens per sample (micro-batch 1)")
    p.add_argument("--answer-tokens", type=int, default=10, help="answer tokens at each sample's end")
    p.add_argument("--steps", type=int, default=2, help="measured steps per row, after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the trainer's workers: 1)")
    p.add_argument("--rows", default="checkpointing,logits,zero,padding", help="which rows, comma-separated")
    # inside a measured process
    p.add_argument("--worker", choices=("single", "head", "zero", "padding"))
    p.add_argument("--result")
    p.add_argument("--id-vocab", type=int, default=1000, help="ids drawn below this (the tokenizer's length)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--answer-only", action="store_true")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--lastfm", default="/tmp/bench_padding/lastfm/data",
                   help="LastFM shards as bench/bench_padding.py builds them (row 'padding'; skipped when absent)")
    p.add_argument("--lastfm-tokenizer", default="/tmp/bench_padding/lastfm/assets/llm")
    p.add_argument("--padding-batches", type=int, default=4, help="micro-batches timed per order (row 'padding')")
    a = p.parse_args()

    if a.worker:
        result = {"single": worker_single, "head": worker_head, "zero": worker_zero,
                  "padding": worker_padding}[a.worker](a)
        rank = os.environ.get("RANK", "0")
        json.dump(result, open(os.path.join(a.result, f"result_{rank}.json"), "w"))
        return

    os.makedirs(a.out, exist_ok=True)
    if not a.base:
        from bench.bench_scale import build_folder

        a.base = os.path.join(a.out, "base")
        build_folder(a.base, argparse.Namespace(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=None,
                                                intermediate=a.intermediate, tok_vocab=4000, pad_vocab=32000,
                                                users=60))
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(a.base)
    a.id_vocab = len(AutoTokenizer.from_pretrained(a.base))
    rows = set(a.rows.split(","))
    results = {"args": {k: v for k, v in vars(a).items()}, "model": {"hidden": config.hidden_size,
               "layers": config.num_hidden_layers, "vocab": config.vocab_size}}
    ratios = []
    rows_checkpointing_and_logits(a, config, rows, results, ratios)
    rows_zero_and_padding(a, config, rows, results, ratios)
    json.dump(results, open(os.path.join(a.out, "bench_memory.json"), "w"), indent=1)
    print("ratios: " + " | ".join(ratios))


if __name__ == "__main__":
    main()
