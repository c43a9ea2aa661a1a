"""Shard reading + collation vs a LLaRA-style loader, samples per second on one core, same data, same run.

  ours      SplitReader over the webdataset shards (already tokenized) + collate: padded tensors,
            slot map, unique items
  baseline  LLaRA's way: a pandas DataFrame of (seq, len_seq, next) rows; the collate function draws
            the 19 negatives, writes the prompt text and tokenizes it (the HF fast tokenizer, batched)

    OMP_WAIT_POLICY=PASSIVE python bench/bench_data.py [--run runs/default] [--samples 4000]

--run reuses a prepared run folder (tokenizer in assets/llm, shards in data/); without it the
embedded default's data is built in a temporary folder first. The last line prints the ratio.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from shards.build import load_items, load_manifest
from shards.prompts import CANS_EMB, HISTORY_EMB, LLARA_TEMPLATES
from trainer.data.loader import SplitReader, collate, meta, read_shard


def ours(data_dir, manifest, pad_id, n, micro):
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    reader = SplitReader(data_dir, shards, 0, 1, micro, seed=0, shuffle=True)
    t0, seen = time.perf_counter(), 0
    for samples in reader.rank_batches(0):
        collate(samples, pad_id)
        seen += len(samples)
        if seen >= n:
            break
    return seen / (time.perf_counter() - t0)


def baseline(df, titles, tokenizer, n, micro, num_items):
    """LLaRA-style: rows from a DataFrame, candidates and prompts made and tokenized in collate."""
    rng = np.random.default_rng(0)

    def collate_fn(rows):
        texts = []
        for seq, length, nxt in rows:
            history = list(seq[:length])
            negatives = []
            while len(negatives) < 19:
                c = int(rng.integers(num_items))
                if c not in history and c != nxt and c not in negatives:
                    negatives.append(c)
            cans = negatives + [nxt]
            rng.shuffle(cans)
            prompt = LLARA_TEMPLATES[int(rng.integers(3))]
            prompt = prompt.replace("[HistoryHere]", ", ".join(f"{titles[i]} {HISTORY_EMB}" for i in history))
            prompt = prompt.replace("[CansHere]", ", ".join(f"{titles[i]} {CANS_EMB}" for i in cans))
            texts.append(prompt + " " + titles[nxt] + "\n")
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        # LLaRA then finds the placeholder positions with nonzero on the ids
        torch.nonzero(ids == tokenizer.convert_tokens_to_ids(HISTORY_EMB))
        torch.nonzero(ids == tokenizer.convert_tokens_to_ids(CANS_EMB))
        return enc

    t0, seen = time.perf_counter(), 0
    for start in range(0, len(df), micro):
        rows = list(df.iloc[start:start + micro][["seq", "len_seq", "next"]].itertuples(index=False, name=None))
        collate_fn(rows)
        seen += len(rows)
        if seen >= n:
            break
    return seen / (time.perf_counter() - t0)


def main():
    import pandas as pd
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--run", default=None)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--micro", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.run is None:
        from configs.schema import load_config
        from trainer.data.prepare import prepare

        a.run = tempfile.mkdtemp()
        prepare(load_config(None, [f"output_dir={a.run}", "srec.epochs=1", "data.build_workers=1"]))
    data_dir, llm = os.path.join(a.run, "data"), os.path.join(a.run, "assets", "llm")
    manifest = load_manifest(data_dir)
    tok = AutoTokenizer.from_pretrained(llm)
    titles = load_items(data_dir)["titles"]
    pad = manifest["pad_item_id"]
    rows = []
    for s in manifest["shards"]:
        if s["split"] == "train":
            for x in read_shard(os.path.join(data_dir, s["name"])):
                h = meta(x)["history"]
                rows.append({"seq": h + [pad] * (10 - len(h)), "len_seq": len(h), "next": meta(x)["target"]})
    df = pd.DataFrame(rows)
    n = min(a.samples, len(df))
    ours_rate = ours(data_dir, manifest, tok.pad_token_id, n, a.micro)
    base_rate = baseline(df, titles, tok, n, a.micro, manifest["num_items"])
    print(f"{n} samples, micro-batch {a.micro}, 1 thread, 1 process")
    print(f"ours (shards + collate):         {ours_rate:9.0f} samples/s")
    print(f"LLaRA-style (pandas + tokenize): {base_rate:9.0f} samples/s")
    print(f"ratio: ours is {ours_rate / base_rate:.1f}x the LLaRA-style loader")


if __name__ == "__main__":
    main()
