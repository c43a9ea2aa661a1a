"""Raw interactions -> LLaRA samples -> tokenized webdataset tar shards + manifest.json.

    python -m shards.build --tokenizer runs/default/assets/llm --out /data/ml100k-shards \
        data.source=ml-100k data.path=../shared/data/ml-100k data.split=loo

Sources (data.source): synthetic, ml-100k, ml-1m, lastfm, sequences (SASRec/ICLRec files), llara
(LLaRA's released *.df, read with a restricted unpickler), generic (CSV/Parquet, data.items_path).
Splits (data.split): loo (leave-one-out), sliding (LLaRA: users 8:1:1, every window of a training
user), time (ReLLa: all interactions cut 8:1:1 by time).

Each split is written as `{split}-{index:05d}.tar`. A record holds two members:
    <key>.llara.bin   little-endian int32: T, S, prompt_len, then
                        input_ids[T]   bos + prompt + answer + eos, tokenized once here
                        label_mask[T]  1 on the answer tokens (loss is computed on these only)
                        slot_pos[S]    position of every placeholder token, history first then candidates
                        slot_item[S]   the dense item id each placeholder stands for
                        user_pos, H    only with data.user_token: the [UserEmb] position and the
                                       history length (the history is slot_item[:H]); absent when
                                       off, so default records are byte-identical to LLaRA-only ones
    <key>.meta.json   user, history, candidates, target, prompt_len, template
One binary member per sample keeps reading cheap (bench/bench_data.py).
The build is deterministic: tar headers carry mtime 0 and fixed owners, so the same inputs give
byte-identical shards. The manifest lists every shard with its sample count and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
import webdataset as wds

from shards.prompts import (CTR_TEMPLATES, check_domain, check_placeholder_tokens, templates, tokenize_ctr,
                            tokenize_llara)
from shards.samples import SPLITS, _SPLIT_CODE, build_vocab, sample_candidates

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


def pack_sample(tok: dict) -> bytes:
    """One little-endian int32 array: T, S, prompt_len, input_ids[T], label_mask[T], slot_pos[S], slot_item[S]
    [, user_pos, history_len] (the trailer only for a sample tokenized with the user token)."""
    T, S = len(tok["input_ids"]), len(tok["slot_pos"])
    parts = [np.asarray([T, S, tok["prompt_len"]]), tok["input_ids"], tok["label_mask"], tok["slot_pos"], tok["slot_item"]]
    if "user_pos" in tok:
        parts.append(np.asarray([tok["user_pos"], tok["history_len"]]))
    return np.concatenate([np.asarray(p, dtype="<i4") for p in parts]).tobytes()


def _write_shard(path: str, records: list[dict]) -> None:
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, user="llmrec", group="llmrec", mode=0o444, mtime=0, encoder=False)
        for rec in records:
            writer.write(rec)
        writer.close()


def load_source(data_cfg, seed: int) -> tuple[list, dict, dict]:
    """Read the configured raw data and split it. Returns (items, splits, stats)."""
    from shards import readers
    from shards.samples import SPLIT_SCHEMES, global_time_split, kcore_filter, leave_one_out, user_split, user_sequences

    src, path = data_cfg["source"], data_cfg["path"]
    if src == "llara":
        items, splits = readers.read_llara_processed(path)
        return items, splits, {"source": src}
    if src == "synthetic":
        from shards.synthetic import SyntheticConfig, generate

        interactions, items = generate(SyntheticConfig(seed=seed, **data_cfg["synthetic"]))
    else:
        if not path:
            raise ValueError(f"data.source={src!r} needs data.path")
        read = {"ml-100k": readers.read_movielens_100k, "ml-1m": readers.read_movielens_1m,
                "lastfm": readers.read_lastfm, "sequences": readers.read_sequences}
        if src == "generic":
            raw = readers.read_generic(path, data_cfg["items_path"])
        elif src in read:
            raw = read[src](path)
        else:
            raise ValueError(f"data.source={src!r}: expected one of {', '.join(readers.SOURCES)}")
        interactions, items = raw.interactions, raw.items
    n_raw = len(interactions)
    interactions = kcore_filter(interactions, data_cfg["kcore"])
    vocab = build_vocab(interactions, items)
    from shards.ctr import pool_len

    h = pool_len(data_cfg)  # history_len, or longer when SUBR picks the prompt's history from a pool
    split = data_cfg["split"]
    if split == "time":
        splits = global_time_split(interactions, vocab["dense"], h)
    else:
        seqs = user_sequences(interactions, vocab["dense"])
        splits = leave_one_out(seqs, h) if split == "loo" else user_split(seqs, h, seed) if split == "sliding" else None
        if splits is None:
            raise ValueError(f"data.split={split!r}: expected one of {', '.join(SPLIT_SCHEMES)}")
    items = [(d, vocab["titles"][d], vocab["genres"][d]) for d in range(len(vocab["raw_item_ids"]))]
    stats = {"source": src, "interactions": len(interactions), "interactions_before_kcore": n_raw,
             "users": len({r[0] for r in interactions}), "raw_item_ids": vocab["raw_item_ids"]}
    return items, splits, stats


_TOKENIZER = None


def _init_worker(tokenizer_dir):
    global _TOKENIZER
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_chunk(args):
    """Tokenize a chunk of (index, split, sample) in a worker; returns the tar records in order."""
    chunk, titles, num_items, num_candidates, max_len, seed, user_token, task, profiles, domain = args
    llara_templates = templates(user_token, domain)
    out = []
    for n, split, sample in chunk:
        for key in ("history", "candidates"):
            bad = [i for i in sample.get(key, []) if not 0 <= i < num_items]
            if bad:
                raise ValueError(f"{split} sample {n} (user {sample['user']}): item id {bad[0]} is outside the "
                                 f"vocabulary 0..{num_items - 1}")
        if not 0 <= sample["target"] < num_items:
            raise ValueError(f"{split} sample {n} (user {sample['user']}): target {sample['target']} is outside "
                             f"the vocabulary 0..{num_items - 1}")
        if task == "ctr":
            tok = tokenize_ctr(sample, titles, _TOKENIZER, max_len, profiles.get(sample["user"]))
            meta = {"user": sample["user"], "history": sample["history"], "history_ratings": sample["history_ratings"],
                    "candidates": [], "target": sample["target"], "label": int(sample["label"]),
                    "retrieved": bool(sample["retrieved"]), "prompt_len": tok["prompt_len"], "template": 0, "task": "ctr"}
            out.append({"__key__": f"{split}-{n:08d}", "llara.bin": pack_sample(tok),
                        "meta.json": json.dumps(meta, sort_keys=True).encode()})
            continue
        sample = dict(sample, candidates=sample_candidates(sample, num_items, num_candidates, seed, split))
        t = int(np.random.default_rng([seed, 7, _SPLIT_CODE[split], sample["user"], sample["position"]])
                .integers(len(llara_templates)))
        tok = tokenize_llara(sample, titles, llara_templates[t], _TOKENIZER, max_len, user_token)
        meta = {"user": sample["user"], "history": sample["history"], "candidates": sample["candidates"],
                "target": sample["target"], "prompt_len": tok["prompt_len"], "template": t}
        out.append({"__key__": f"{split}-{n:08d}", "llara.bin": pack_sample(tok),
                    "meta.json": json.dumps(meta, sort_keys=True).encode()})
    return out


def write_shards(items, splits, tokenizer_dir: str, out_dir: str, *, num_candidates: int, max_len: int,
                 samples_per_shard: int, seed: int, workers: int = 0, stats: dict | None = None,
                 progress: bool = False, user_token: bool = False, task: str = "llara",
                 profiles: dict | None = None, extra_params: dict | None = None, domain: str = "movie") -> dict:
    """Tokenize every sample (in `workers` processes; 0 = every core) and write shards + manifest.
    With user_token the prompts name the user's state ([UserEmb], see shards/prompts.py).
    task="ctr": the samples are shards/ctr.py's labelled ones, written as ReLLa prompts (with the
    user's profile from `profiles` where there is one); the manifest then records task and template.
    extra_params (e.g. retrieval settings) go into the manifest's params and config hash.
    domain (data.domain: movie, game, artist) picks the LLaRA template set, recorded as the manifest's
    templates (the CTR template does not change with it)."""
    check_domain(domain)
    if task not in ("llara", "ctr"):
        raise ValueError(f"data.task={task!r}: expected llara or ctr")
    if task == "ctr" and user_token:
        raise ValueError("data.user_token=true is not supported with data.task=ctr")
    os.makedirs(out_dir, exist_ok=True)
    titles = [t for _, t, _ in items]
    num_items = len(items)
    stats = dict(stats or {})
    raw_ids = stats.pop("raw_item_ids", list(range(num_items)))
    params = {"num_candidates": num_candidates, "max_len": max_len, "samples_per_shard": samples_per_shard,
              "seed": seed, "templates": list(templates(user_token, domain))}
    if user_token:  # only when on: the default manifest (and its config_hash) stays as it was
        params["user_token"] = True
    if task == "ctr":  # likewise: only CTR manifests name a task
        params["task"], params["templates"] = "ctr", list(CTR_TEMPLATES)
    params.update(extra_params or {})
    profiles = profiles or {}
    digest = hashlib.sha256(json.dumps([titles, {k: v for k, v in splits.items()}], sort_keys=True).encode()).hexdigest()
    manifest = {
        "format": 1, "num_items": num_items, "pad_item_id": num_items,
        "tokenizer": {"name": os.path.basename(os.path.normpath(tokenizer_dir)), "sha256": tokenizer_hash(tokenizer_dir)},
        "config_hash": hashlib.sha256(json.dumps({**params, "data": digest}, sort_keys=True).encode()).hexdigest(),
        "params": params, "stats": {**stats, "items": num_items}, "shards": [],
    }
    from transformers import AutoTokenizer

    check_placeholder_tokens(AutoTokenizer.from_pretrained(tokenizer_dir), user_token, tokenizer_dir)
    workers = workers or os.cpu_count() or 1
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,))
    else:
        _init_worker(tokenizer_dir)
    try:
        for split in SPLITS:
            rows = splits.get(split, [])
            kept = [(n, split, s) for n, s in enumerate(rows) if s["history"]]
            manifest["stats"][f"{split}_dropped_empty_history"] = len(rows) - len(kept)
            chunks = [(kept[i:i + 256], titles, num_items, num_candidates, max_len, seed, user_token, task,
                       {s["user"]: profiles[s["user"]] for _, _, s in kept[i:i + 256] if s["user"] in profiles},
                       domain)
                      for i in range(0, len(kept), 256)]
            results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(chunks), desc=f"tokenizing {split}", unit="chunk")
            records = [r for chunk in results for r in chunk]
            manifest["stats"][f"{split}_samples"] = len(records)
            for s, start in enumerate(range(0, len(records), samples_per_shard)):
                name = f"{split}-{s:05d}.tar"
                chunk = records[start:start + samples_per_shard]
                _write_shard(os.path.join(out_dir, name), chunk)
                manifest["shards"].append({"name": name, "split": split, "count": len(chunk),
                                           "sha256": sha256_file(os.path.join(out_dir, name))})
    finally:
        if pool:
            pool.close()
            pool.join()
    with open(os.path.join(out_dir, ITEMS), "w") as f:
        json.dump({"raw_item_ids": raw_ids, "titles": titles, "genres": [g for _, _, g in items]}, f)
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
    from trainer.config import ConfigError, load_config, to_dict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML merged over configs/llara_default.yaml (its data: section is used)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer (or model) folder")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (0 = every core)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.source=ml-100k data.path=../shared/data/ml-100k")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.exit(2, f"error: {e}\n")
    data_cfg = to_dict(cfg.data)
    items, splits, stats = load_source(data_cfg, cfg.seed)
    from shards.ctr import make_samples, manifest_params
    from shards.readers import read_profiles

    # SUBR (data.ctr.retrieval=subr, ReiT, data.retrieval.hybrid) embeds items with the LLM at --tokenizer
    splits = make_samples(data_cfg, splits, items, cfg.seed, args.tokenizer, os.path.join(args.out, "item_emb"))
    wants_profiles = data_cfg["task"] == "ctr" and data_cfg["ctr"]["profile"]
    profiles = read_profiles(data_cfg["source"], data_cfg["path"]) if wants_profiles else {}
    manifest = write_shards(items, splits, args.tokenizer, args.out, num_candidates=data_cfg["num_candidates"],
                            max_len=data_cfg["max_len"], samples_per_shard=data_cfg["samples_per_shard"], seed=cfg.seed,
                            workers=args.workers, stats=stats, progress=True, user_token=data_cfg["user_token"],
                            task=data_cfg["task"], profiles=profiles, extra_params=manifest_params(data_cfg),
                            domain=data_cfg["domain"])
    print(json.dumps(manifest["stats"], indent=1))


if __name__ == "__main__":
    main()
