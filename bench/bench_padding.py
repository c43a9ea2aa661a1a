"""Padding per micro-batch with data.length_grouping off vs on, on LLaRA's released data sets.

collate pads every micro-batch to its longest sample; the padded share is padded positions / all
positions of a micro-batch (B x longest), averaged over the epoch's micro-batches of every rank.
Also: the padded share of all positions (token-weighted), useful (non-padding, non-filler) tokens and
computed positions (B x longest, all ranks) per optimizer step, and the seconds one rank takes to read
and decode its epoch (the grouping's cost). Every run checks that the ranks read each sample once.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_padding.py [--out /tmp/bench_padding] \
        [--sets lastfm movielens steam] [--micro 4 8] [--grouping 8 32] [--workers 2]

Each set is read as its preset (configs/llara_<set>.yaml: data.source=llara, ../shared/data/llara-data/
<set>) with model.base null: the tiny default tokenizer trained on the set's titles, shards built once
into --out/<set> (reused on a rerun). data.max_len is raised to 4096: it is only a limit (a longer
prompt is an error, never cut), and the tiny tokenizer makes some MovieLens prompts longer than the
preset's 512. LLaRA released MovieLens and Steam without their training split:
for those the val+test prompts (the same template and length distribution) stand in, and the table says
so. A set whose folder is absent is skipped with a message. The global batch is the presets' 128
(grad_accum = 128 / (micro x workers)). The last line prints the ratios on LastFM.
"""

import argparse
import os
import time

import numpy as np

from shards.build import MANIFEST, load_manifest
from trainer.data.loader import SplitReader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(name: str, out: str, build_workers: int) -> str | None:
    """The set's shard folder (built on first use), or None when its data folder is absent."""
    from configs.schema import load_config
    from trainer.data.prepare import build_llm, prepare_shards, source_paths
    from shards.build import load_source

    cfg = load_config(os.path.join(REPO, "configs", f"llara_{name}.yaml"),
                      [f"output_dir={os.path.join(out, name)}", "model.base=null", "srec.path=null",
                       f"data.build_workers={build_workers}", "data.max_len=4096"])
    path = os.path.normpath(os.path.join(REPO, cfg.data.path))
    if not os.path.isdir(path):
        print(f"skipping {name}: {path} is absent (see ../shared/data/INDEX.md)")
        return None
    cfg.data.path = path
    paths = source_paths(cfg.output_dir, None, None)
    if not os.path.exists(os.path.join(paths.data, MANIFEST)):
        t0 = time.perf_counter()
        items, splits, stats = load_source(cfg.data, cfg.seed)
        build_llm(cfg, items, paths)
        prepare_shards(cfg, items, splits, stats, paths, None)
        print(f"{name}: built shards in {paths.data} ({time.perf_counter() - t0:.0f} s)")
    return paths.data


def measure(data_dir: str, shards: list, micro: int, workers: int, accum: int, grouping: int) -> dict:
    shares, positions, tokens, useful, seconds, keys = [], 0, 0, 0, 0.0, []
    for rank in range(workers):
        reader = SplitReader(data_dir, shards, rank, workers, micro, seed=0, shuffle=True, grad_accum=accum,
                             length_grouping=grouping)
        t0 = time.perf_counter()
        for batch in reader.rank_batches(epoch=0):
            lengths = [len(s["input_ids"]) for s in batch]
            shares.append(1 - sum(lengths) / (len(batch) * max(lengths)))
            positions += len(batch) * max(lengths)
            tokens += sum(lengths)
            useful += sum(n for n, s in zip(lengths, batch) if not s["filler"])
            keys += [s["key"] for s in batch if not s["filler"]]
        seconds += time.perf_counter() - t0
    if not len(keys) == len(set(keys)) == reader.num_samples:  # the guarantee, checked on the real data too
        raise AssertionError(f"grouping {grouping}: {len(keys)} samples read, {len(set(keys))} distinct, "
                             f"{reader.num_samples} in the split")
    steps = reader.batches_per_epoch() // accum
    return {"share": float(np.mean(shares)), "share_all": 1 - tokens / positions, "steps": steps,
            "useful_per_step": useful / steps, "positions_per_step": positions / steps, "read_s": seconds / workers,
            "micro_batches": len(shares) // workers}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_padding")
    sets = ["lastfm", "movielens", "steam"]
    p.add_argument("--sets", nargs="+", default=sets, choices=sets)
    p.add_argument("--micro", type=int, nargs="+", default=[4, 8])
    p.add_argument("--grouping", type=int, nargs="+", default=[8, 32])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--build-workers", type=int, default=1)
    a = p.parse_args()
    rows = []
    for name in a.sets:
        data_dir = build(name, a.out, a.build_workers)
        if data_dir is None:
            continue
        manifest = load_manifest(data_dir)
        split = "train" if any(s["split"] == "train" for s in manifest["shards"]) else "val+test"
        shards = [s for s in manifest["shards"] if (s["split"] == "train") == (split == "train")]
        for micro in a.micro:
            accum = max(1, a.global_batch // (micro * a.workers))
            for grouping in [0, *a.grouping]:
                r = measure(data_dir, shards, micro, a.workers, accum, grouping)
                rows.append({"set": name, "split": split, "n": sum(s["count"] for s in shards), "micro": micro,
                             "accum": accum, "grouping": grouping, **r})
                print(f"  {name} micro {micro} grouping {grouping}: padded {100 * r['share']:.1f}% "
                      f"({r['read_s']:.1f} s per rank)", flush=True)
    if not rows:
        print("no data set found: nothing measured")
        return
    print(f"\n{a.workers} workers, global batch {a.global_batch}, seed 0, epoch 0; padded = mean over micro-batches "
          "of padded / (B x longest); of tokens = all padded / all positions; vs off = positions/step on / off")
    head = (f"{'set':<10}{'split':<10}{'samples':>8}{'micro':>6}{'accum':>6}{'grouping':>9}{'padded':>8}"
            f"{'of tokens':>10}{'useful/step':>12}{'positions/step':>15}{'vs off':>7}{'read s':>7}")
    print(head)
    print("-" * len(head))
    off = {}
    for r in rows:
        key = (r["set"], r["micro"])
        if r["grouping"] == 0:
            off[key] = r
        base = off[key]["positions_per_step"]
        print(f"{r['set']:<10}{r['split']:<10}{r['n']:>8}{r['micro']:>6}{r['accum']:>6}{r['grouping'] or 'off':>9}"
              f"{100 * r['share']:>7.1f}%{100 * r['share_all']:>9.1f}%{r['useful_per_step']:>12.0f}"
              f"{r['positions_per_step']:>15.0f}{r['positions_per_step'] / base:>7.2f}{r['read_s']:>7.1f}")
    ref = [r for r in rows if r["set"] == "lastfm"] or rows
    name = ref[0]["set"]
    parts = []
    for micro in a.micro:
        o = next(r for r in ref if r["micro"] == micro and r["grouping"] == 0)
        for r in (r for r in ref if r["micro"] == micro and r["grouping"]):
            fewer = r["positions_per_step"] / o["positions_per_step"]
            parts.append(f"micro {micro} N={r['grouping']}: padded {100 * o['share']:.1f}% -> {100 * r['share']:.1f}% "
                         f"(x{r['share'] / o['share']:.2f}), positions/step x{fewer:.2f}")
    print(f"ratios on {name}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
