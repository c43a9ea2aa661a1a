"""Raw interactions -> LLaRA samples -> tokenized webdataset tar shards + manifest.json.

    python -m shards.build --synthetic --tokenizer runs/default/assets/tokenizer --out runs/default/data

Each split is written as `{split}-{index:05d}.tar`. A record holds
    input_ids.npy   int32  [T]   bos + prompt + answer + eos, tokenized once here
    label_mask.npy  uint8  [T]   1 on the answer tokens (loss is computed on these only)
    slot_pos.npy    int32  [S]   position of every placeholder token, history first then candidates
    slot_item.npy   int32  [S]   the dense item id each placeholder stands for
    meta.json              user, history, candidates, target, prompt_len, template
The build is deterministic: tar headers carry mtime 0 and fixed owners, so the same inputs give
byte-identical shards. The manifest lists every shard with its sample count and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np
import webdataset as wds

from shards.prompts import LLARA_TEMPLATES, tokenize_llara
from shards.samples import SPLITS, _SPLIT_CODE, build_vocab, leave_one_out, sample_candidates, user_sequences

MANIFEST = "manifest.json"
ITEMS = "items.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer_dir: str) -> str:
    return sha256_file(os.path.join(tokenizer_dir, "tokenizer.json"))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_shard(path: str, records: list[dict]) -> None:
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, user="llmrec", group="llmrec", mode=0o444, mtime=0, encoder=False)
        for rec in records:
            writer.write(rec)
        writer.close()


def build_shards(interactions, items, tokenizer, tokenizer_dir: str, out_dir: str, *, history_len: int,
                 num_candidates: int, max_len: int, samples_per_shard: int, seed: int) -> dict:
    """Build all splits; return the manifest (also written to out_dir/manifest.json)."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = build_vocab(interactions, items)
    num_items = len(vocab["raw_item_ids"])
    sequences = user_sequences(interactions, vocab["dense"])
    splits = leave_one_out(sequences, history_len)

    params = {"history_len": history_len, "num_candidates": num_candidates, "max_len": max_len,
              "samples_per_shard": samples_per_shard, "seed": seed, "templates": list(LLARA_TEMPLATES)}
    data_digest = hashlib.sha256(json.dumps([list(map(int, r[:4])) for r in interactions]).encode()).hexdigest()
    manifest = {
        "format": 1,
        "num_items": num_items,
        "pad_item_id": num_items,
        "tokenizer": {"name": os.path.basename(os.path.normpath(tokenizer_dir)), "sha256": tokenizer_hash(tokenizer_dir)},
        "config_hash": hashlib.sha256(json.dumps({**params, "data": data_digest}, sort_keys=True).encode()).hexdigest(),
        "params": params,
        "stats": {"users": len(sequences), "items": num_items, "interactions": len(interactions)},
        "shards": [],
    }
    for split in SPLITS:
        records = []
        for n, sample in enumerate(splits[split]):
            sample["candidates"] = sample_candidates(sample, num_items, num_candidates, seed, split)
            t = int(np.random.default_rng([seed, 7, _SPLIT_CODE[split], sample["user"], sample["position"]])
                    .integers(len(LLARA_TEMPLATES)))
            tok = tokenize_llara(sample, vocab["titles"], LLARA_TEMPLATES[t], tokenizer, max_len)
            meta = {"user": sample["user"], "history": sample["history"], "candidates": sample["candidates"],
                    "target": sample["target"], "prompt_len": tok["prompt_len"], "template": t}
            records.append({
                "__key__": f"{split}-{n:08d}",
                "input_ids.npy": _npy(tok["input_ids"]),
                "label_mask.npy": _npy(tok["label_mask"]),
                "slot_pos.npy": _npy(tok["slot_pos"]),
                "slot_item.npy": _npy(tok["slot_item"]),
                "meta.json": json.dumps(meta, sort_keys=True).encode(),
            })
        manifest["stats"][f"{split}_samples"] = len(records)
        for s, start in enumerate(range(0, len(records), samples_per_shard)):
            name = f"{split}-{s:05d}.tar"
            chunk = records[start:start + samples_per_shard]
            _write_shard(os.path.join(out_dir, name), chunk)
            manifest["shards"].append({"name": name, "split": split, "count": len(chunk),
                                       "sha256": sha256_file(os.path.join(out_dir, name))})
    with open(os.path.join(out_dir, ITEMS), "w") as f:
        json.dump({"raw_item_ids": vocab["raw_item_ids"], "titles": vocab["titles"], "genres": vocab["genres"]}, f)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}: build the shards first (python -m shards.build)")
    with open(path) as f:
        return json.load(f)


def load_items(data_dir: str) -> dict:
    with open(os.path.join(data_dir, ITEMS)) as f:
        return json.load(f)


def check_manifest(data_dir: str, manifest: dict, tokenizer_dir: str, verify_sha: bool = True) -> None:
    """Refuse shards that do not match their manifest, or a tokenizer other than the one they were built for."""
    want, got = manifest["tokenizer"]["sha256"], tokenizer_hash(tokenizer_dir)
    if want != got:
        raise ValueError(f"shards in {data_dir} were tokenized with tokenizer sha256 {want[:12]}…, "
                         f"but the model's tokenizer ({tokenizer_dir}) has {got[:12]}…; rebuild the shards")
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["name"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {path} is listed in the manifest but missing")
        if verify_sha and sha256_file(path) != shard["sha256"]:
            raise ValueError(f"shard {path} does not match its sha256 in the manifest (corrupt or truncated)")


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from shards.synthetic import SyntheticConfig, generate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="build the embedded synthetic data set")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--history-len", type=int, default=10)
    p.add_argument("--num-candidates", type=int, default=20)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.synthetic:
        p.error("only --synthetic is available in this version (real readers: see issue 3)")
    interactions, items = generate(SyntheticConfig(seed=a.seed))
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    m = build_shards(interactions, items, tok, a.tokenizer, a.out, history_len=a.history_len,
                     num_candidates=a.num_candidates, max_len=a.max_len,
                     samples_per_shard=a.samples_per_shard, seed=a.seed)
    print(json.dumps(m["stats"], indent=1))


if __name__ == "__main__":
    main()
