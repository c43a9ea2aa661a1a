"""Raw interactions -> LLaRA samples -> tokenized webdataset tar shards + manifest.json.

    items, splits, stats = load_source(data, seed)        # data: the config's data section
    build_shards(data, seed, items, splits, stats, tokenizer_dir, out_dir, llm_dir=..., cache_dir=..., workers=...)
        = make_samples (shards/ctr.py: CTR labels, SUBR) + write_shards(items, splits, tokenizer_dir, out_dir, ...)

as `python launch/build_shards.py` runs them (and launch/train.py, through trainer/data/prepare.py).

A stopped build run again with the same arguments keeps the shards it already wrote (checked against
their sha256 in <out>/build-progress.jsonl) and goes on from there.

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

import hashlib
import json
import logging
import os
import re
import sys

import numpy as np
import webdataset as wds
import io
import multiprocessing as mp
import shutil
import tempfile
from collections import deque

from configs.schema import Data
from shards import readers
from shards.ctr import make_samples, manifest_params, pool_len
from shards.interactions import as_table
from shards.prompts import (CTR_TEMPLATES, check_domain, check_placeholder_tokens, templates, tokenize_ctr,
                            tokenize_llara)
from shards.samples import (SPLIT_SCHEMES, SPLITS, _SPLIT_CODE, build_vocab, global_time_split, kcore_filter,
                            leave_one_out, sample_candidates, user_sequences, user_split)
from shards.readers import read_profiles
from shards.synthetic import generate

log = logging.getLogger(__name__)
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


def _write_shard(f, records: list[dict]) -> None:
    """records as a tar stream into the binary file object f (deterministic headers: module docstring)."""
    writer = wds.TarWriter(f, user="llmrec", group="llmrec", mode=0o444, mtime=0, encoder=False)
    for rec in records:
        writer.write(rec)
    writer.close()


def load_source(data: Data, seed: int) -> tuple[list, dict, dict]:
    """Read the configured raw data and split it. Returns (items, splits, stats)."""
    src, path = data.source, data.path
    if src == "llara":
        items, splits = readers.read_llara_processed(path)
        return items, splits, {"source": src}
    if src == "synthetic":
        interactions, items = generate(data.synthetic, seed)
    else:
        if not path:
            raise ValueError(f"data.source={src!r} needs data.path")
        read = {"ml-100k": readers.read_movielens_100k, "ml-1m": readers.read_movielens_1m,
                "lastfm": readers.read_lastfm, "sequences": readers.read_sequences}
        if src == "generic":
            raw = readers.read_generic(path, data.items_path)
        elif src in read:
            raw = read[src](path)
        else:
            raise ValueError(f"data.source={src!r}: expected one of {', '.join(readers.SOURCES)}")
        interactions, items = raw.interactions, raw.items
        del raw  # the table below is then the only copy
    interactions = as_table(interactions)  # numpy columns (shards/interactions.py): 16-32 bytes an interaction
    n_raw = len(interactions)
    interactions = kcore_filter(interactions, data.kcore)
    vocab = build_vocab(interactions, items)
    n_kept = len(interactions)

    h = pool_len(data)  # history_len, or longer when SUBR picks the prompt's history from a pool
    split = data.split
    if split == "time":
        splits = global_time_split(interactions, vocab["dense"], h)
    else:
        if split not in ("loo", "sliding"):
            raise ValueError(f"data.split={split!r}: expected one of {', '.join(SPLIT_SCHEMES)}")
        seqs = user_sequences(interactions, vocab["dense"])
        interactions = None  # the sequences hold what the splits need: the table goes before they are made
        splits = leave_one_out(seqs, h) if split == "loo" else user_split(seqs, h, seed)
    items = [(d, vocab["titles"][d], vocab["genres"][d]) for d in range(len(vocab["raw_item_ids"]))]
    stats = {"source": src, "interactions": n_kept, "interactions_before_kcore": n_raw,
             # the users counted from their sequences: a sort of the user column would cost more memory
             "users": len(splits["train"].sequences), "raw_item_ids": vocab["raw_item_ids"]}
    return items, splits, stats


_TOKENIZER = None
_TITLES: list[str] = []
_LOADED_FOR = None
PROGRESS = "build-progress.jsonl"  # shards written so far by an unfinished build (resume_shards)


def _init_worker(tokenizer_dir, titles):
    global _TOKENIZER, _TITLES, _LOADED_FOR
    from transformers import AutoTokenizer  # lazy: heavy to import

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)
    _TITLES, _LOADED_FOR = titles, tokenizer_dir


_INIT_ERROR = None


def _init_pool_worker(tokenizer_dir, titles):
    """_init_worker for a multiprocessing Pool, whose initializer must not raise: a Pool restarts a process
    whose initializer failed, forever, and the build would wait without a word. The error is kept and
    raised by the first shard instead, which ends the build with it."""
    global _INIT_ERROR
    try:
        _init_worker(tokenizer_dir, titles)
    except Exception as e:  # noqa: BLE001 - reported by _encode_shard
        _INIT_ERROR = f"{type(e).__name__}: {e}"


def _encode_shard(args) -> bytes:
    """One shard's tar file, in memory, from its (index, split, sample) list and the build's settings."""
    if _INIT_ERROR:
        raise RuntimeError(f"a tokenizing process could not start: {_INIT_ERROR}")

    buf = io.BytesIO()
    _write_shard(buf, _encode_chunk(args))
    return buf.getvalue()


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


def tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
    """The files of a tokenizer folder a tokenizer may need (every plain file but model weights), by name:
    what a Ray task on another node loads the tokenizer from, so the build needs no shared file system."""
    names = sorted(n for n in os.listdir(tokenizer_dir)
                   if os.path.isfile(os.path.join(tokenizer_dir, n)) and not n.endswith(_WEIGHTS))
    out = {}
    for name in names:
        with open(os.path.join(tokenizer_dir, name), "rb") as f:
            out[name] = f.read()
    return out


def tokenizer_folder(files: dict[str, bytes]) -> str:
    """tokenizer_files written into a new private temporary folder (mkdtemp: no name another user can take)."""
    folder = tempfile.mkdtemp(prefix="llmrec-tokenizer-")
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


def _encode_shard_on_ray(tokenizer: tuple[str, dict[str, bytes]], titles, args) -> tuple[bytes, str]:
    """A Ray task: _encode_shard in a Ray worker process, on any node. The tokenizer comes as (a digest, its
    files) (tokenizer_files), loaded once per process from a private temporary folder, deleted once loaded.
    Returns the shard's bytes and the node it was encoded on (the build counts them)."""
    import ray  # lazy: only where a cluster is used

    global _LOADED_FOR
    digest, files = tokenizer
    if _LOADED_FOR != digest:
        folder = tokenizer_folder(files)
        try:
            _init_worker(folder, titles)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        _LOADED_FOR = digest
    return _encode_shard(args), ray.get_runtime_context().get_node_id()


def _encode_chunk(args):
    """Tokenize one shard's (index, split, sample) list in a worker; returns its tar records in order."""
    chunk, num_items, num_candidates, max_len, seed, user_token, task, profiles, domain = args
    titles = _TITLES
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


def data_digest(titles: list[str], splits: dict) -> str:
    """sha256 of json.dumps([titles, splits], sort_keys=True), fed one sample at a time (the same bytes,
    never the whole text in memory)."""
    h = hashlib.sha256()
    h.update(b"[" + json.dumps(titles).encode() + b", {")
    for i, split in enumerate(sorted(splits)):
        h.update((", " if i else "").encode() + json.dumps(split).encode() + b": [")
        for j, sample in enumerate(splits[split]):
            h.update((", " if j else "").encode() + json.dumps(sample, sort_keys=True).encode())
        h.update(b"]")
    h.update(b"}]")
    return h.hexdigest()


def shard_plan(splits: dict, samples_per_shard: int):
    """(split, shard index, [(n, split, sample), ...]) for every shard, in order, one shard's samples at a
    time: a split's samples with a history, numbered by their place in the split, cut every
    samples_per_shard."""
    for split in SPLITS:
        shard, index = [], 0
        for n, sample in enumerate(splits.get(split, [])):
            if sample["history"]:
                shard.append((n, split, sample))
                if len(shard) == samples_per_shard:
                    yield split, index, shard
                    shard, index = [], index + 1
        if shard:
            yield split, index, shard


def resume_shards(out_dir: str, config_hash: str) -> dict[str, dict]:
    """The shards an unfinished build of the same data and settings wrote (PROGRESS), each checked against
    its recorded sha256: {name: manifest entry}. A shard whose bytes do not match is left out (written
    again), and so is a line that is not such an entry (cut short when the build stopped, or edited: a
    name that is not a shard's of this folder, a count that is not a number); a PROGRESS of other settings
    is ignored (the build starts over)."""
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    header = _json_object(lines[0]) if lines else None
    if header is None or header.get("config_hash") != config_hash:
        return {}
    for line in lines[1:]:
        entry = _json_object(line)
        if entry is None or not _is_shard_entry(entry):
            continue
        shard = os.path.join(out_dir, entry["name"])
        if os.path.isfile(shard) and sha256_file(shard) == entry["sha256"]:
            done[entry["name"]] = entry
    return done


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_shard_entry(entry: dict) -> bool:
    """What the build itself records for a shard: {"name": "<split>-NNNNN.tar", "split", "count", "sha256"}."""
    name, split, count, digest = (entry.get(k) for k in ("name", "split", "count", "sha256"))
    return (split in SPLITS and isinstance(name, str) and re.fullmatch(rf"{split}-\d{{5}}\.tar", name) is not None
            and type(count) is int and count > 0 and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None)


def _in_order(submit, tasks, window: int):
    """(tag, shard bytes) for each (tag, args) of `tasks`, in task order: submit(args) starts a shard's
    encoding and returns a function that waits for its bytes; at most `window` shards in flight (bounded
    memory, unlike Pool.imap, which takes every task at once). args None (a shard kept from a stopped
    build) gives None in its place."""
    pending = deque()
    for tag, args in tasks:
        while len(pending) >= window or (pending and pending[0][1] is None):
            tag_, wait = pending.popleft()
            yield tag_, wait and wait()
        pending.append((tag, None if args is None else submit(args)))
    while pending:
        tag_, wait = pending.popleft()
        yield tag_, wait and wait()


def _submitter(tokenizer_dir: str, titles: list[str], workers: int, ray_tasks: bool):
    """(submit, close): where shards are encoded. Ray tasks of one CPU each on the connected cluster, a
    pool of `workers` spawned processes, or this process (workers=1)."""
    if ray_tasks:
        import ray  # lazy: only where a cluster is used

        files = tokenizer_files(tokenizer_dir)
        digest = hashlib.sha256(json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in files.items()}).encode())
        titles_ref, tokenizer_ref = ray.put(titles), ray.put((digest.hexdigest(), files))
        remote = ray.remote(num_cpus=1, max_retries=2)(_encode_shard_on_ray)
        nodes: dict[str, int] = {}

        def submit(args):
            ref = remote.remote(tokenizer_ref, titles_ref, args)

            def result():
                data, node = ray.get(ref)
                nodes[node] = nodes.get(node, 0) + 1
                return data
            return result

        def close():
            if nodes:
                log.info("encoded %d shards as Ray tasks on %d node(s): %s", sum(nodes.values()), len(nodes),
                         ", ".join(f"{node[:8]} {n}" for node, n in sorted(nodes.items())))
        return submit, close
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_dir, titles))

        def close():
            pool.close()
            pool.join()
        return (lambda args: pool.apply_async(_encode_shard, (args,)).get), close
    _init_worker(tokenizer_dir, titles)

    def encode_here(args):  # in this process, at once
        data = _encode_shard(args)
        return lambda: data
    return encode_here, lambda: None


def write_shards(items, splits, tokenizer_dir: str, out_dir: str, *, num_candidates: int, max_len: int,
                 samples_per_shard: int, seed: int, workers: int = 0, stats: dict | None = None,
                 progress: bool = False, user_token: bool = False, task: str = "llara",
                 profiles: dict | None = None, extra_params: dict | None = None, domain: str = "movie",
                 ray_tasks: bool = False) -> dict:
    """Tokenize every sample (in `workers` processes; 0 = every core) and write shards + manifest.
    With user_token the prompts name the user's state ([UserEmb], see shards/prompts.py).
    task="ctr": the samples are shards/ctr.py's labelled ones, written as ReLLa prompts (with the
    user's profile from `profiles` where there is one); the manifest then records task and template.
    extra_params (e.g. retrieval settings) go into the manifest's params and config hash.
    domain (data.domain: movie, game, artist) picks the LLaRA template set, recorded as the manifest's
    templates (the CTR template does not change with it).

    Streamed: each shard is encoded by a worker (a spawned process, or with ray_tasks a Ray task of one
    CPU on the connected cluster, `workers` at a time), returned as its tar bytes, written here (to a
    temporary name, then renamed) and recorded in out_dir/build-progress.jsonl; at most 2 x workers
    shards are in flight. The bytes and the manifest are the same whatever the number of workers and
    wherever they run. A build stopped part way and run again with the same data and settings keeps the
    shards already written whose bytes match their recorded sha256 (resume_shards). Memory here: the
    samples themselves plus 2 x workers encoded shards, whatever the data set's size."""
    check_domain(domain)
    if task not in ("llara", "ctr"):
        raise ValueError(f"data.task={task!r}: expected llara or ctr")
    if task == "ctr" and user_token:
        raise ValueError("data.user_token=true is not supported with data.task=ctr")
    os.makedirs(out_dir, exist_ok=True)
    titles = [t for _, t, _ in items]
    stats = dict(stats or {})
    raw_ids = stats.pop("raw_item_ids", list(range(len(items))))
    params = {"num_candidates": num_candidates, "max_len": max_len, "samples_per_shard": samples_per_shard,
              "seed": seed, "templates": list(templates(user_token, domain))}
    if user_token:  # only when on: the default manifest (and its config_hash) stays as it was
        params["user_token"] = True
    if task == "ctr":  # likewise: only CTR manifests name a task
        params["task"], params["templates"] = "ctr", list(CTR_TEMPLATES)
    params.update(extra_params or {})
    manifest = _new_manifest(len(items), titles, splits, params, stats, tokenizer_dir)
    from transformers import AutoTokenizer  # heavy: only once a build is under way

    check_placeholder_tokens(AutoTokenizer.from_pretrained(tokenizer_dir), user_token, tokenizer_dir)
    profiles = profiles or {}

    def encode_args(shard):  # what a worker needs to encode one shard (_encode_shard)
        return (shard, len(items), num_candidates, max_len, seed, user_token, task,
                {s["user"]: profiles[s["user"]] for _, _, s in shard if s["user"] in profiles}, domain)

    total = sum(manifest["stats"][f"{split}_samples"] for split in SPLITS)
    manifest["shards"] = _stream_shards(out_dir, splits, samples_per_shard, manifest["config_hash"], encode_args,
                                        tokenizer_dir, titles, workers or os.cpu_count() or 1, ray_tasks,
                                        total if progress else None)
    with open(os.path.join(out_dir, ITEMS), "w") as f:
        json.dump({"raw_item_ids": raw_ids, "titles": titles, "genres": [g for _, _, g in items]}, f)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.remove(os.path.join(out_dir, PROGRESS))
    return manifest


def _new_manifest(num_items: int, titles: list[str], splits: dict, params: dict, stats: dict, tokenizer_dir: str) -> dict:
    """The manifest before its shards: params, the config hash (params and the data's digest), the
    tokenizer's sha256 and each split's sample counts."""
    config_hash = hashlib.sha256(json.dumps({**params, "data": data_digest(titles, splits)}, sort_keys=True)
                                 .encode()).hexdigest()
    manifest = {
        "format": 1, "num_items": num_items, "pad_item_id": num_items,
        "tokenizer": {"name": os.path.basename(os.path.normpath(tokenizer_dir)), "sha256": tokenizer_hash(tokenizer_dir)},
        "config_hash": config_hash, "params": params, "stats": {**stats, "items": num_items}, "shards": [],
    }
    for split in SPLITS:
        rows = splits.get(split, [])
        kept = sum(1 for s in rows if s["history"])
        manifest["stats"][f"{split}_samples"] = kept
        manifest["stats"][f"{split}_dropped_empty_history"] = len(rows) - kept
    return manifest


def _stream_shards(out_dir: str, splits: dict, samples_per_shard: int, config_hash: str, encode_args,
                   tokenizer_dir: str, titles: list[str], workers: int, ray_tasks: bool, total: int | None) -> list[dict]:
    """Encode every shard on the workers (those a stopped build wrote are kept: resume_shards), write each
    as it comes back, in order, and record it in PROGRESS; returns the manifest's shard entries. total:
    the samples to count on a progress bar, None for no bar."""
    done = resume_shards(out_dir, config_hash)
    with open(os.path.join(out_dir, PROGRESS), "w") as f:  # the kept shards first: a second stop loses none
        f.write(json.dumps({"config_hash": config_hash}) + "\n" + "".join(json.dumps(e) + "\n" for e in done.values()))
    bar = None
    if total is not None:
        from tqdm import tqdm  # lazy: only with a progress bar

        bar = tqdm(total=total, unit="sample", desc="tokenizing", smoothing=0.1, dynamic_ncols=True)
        if done:
            bar.write(f"resuming: {len(done)} shards ({sum(e['count'] for e in done.values())} samples) already "
                      f"written and checked against their sha256", file=sys.stderr)

    def tasks():
        for split, index, shard in shard_plan(splits, samples_per_shard):
            name = f"{split}-{index:05d}.tar"
            kept = name in done and done[name]["count"] == len(shard)  # its split is in its name (resume_shards)
            yield (name, split, len(shard)), None if kept else encode_args(shard)

    entries = []
    submit, close = _submitter(tokenizer_dir, titles, workers, ray_tasks)
    try:
        with open(os.path.join(out_dir, PROGRESS), "a") as log_file:
            for (name, split, count), data in _in_order(submit, tasks(), 2 * workers):
                if data is None:  # written by the stopped build
                    entry = done[name]
                else:
                    path = os.path.join(out_dir, name)
                    with open(path + ".tmp", "wb") as f:
                        f.write(data)
                    os.replace(path + ".tmp", path)
                    entry = {"name": name, "split": split, "count": count, "sha256": hashlib.sha256(data).hexdigest()}
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                entries.append(entry)
                if bar is not None:
                    if not bar.desc.endswith(split):
                        bar.set_description(f"tokenizing {split}")
                    bar.update(count)
    finally:
        if bar is not None:
            bar.close()
        close()
    return entries


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}: build the shards first (python launch/build_shards.py)")
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


def build_shards(data: Data, seed: int, items, splits: dict, stats: dict, tokenizer_dir: str, out_dir: str, *,
                 llm_dir: str, cache_dir: str, workers: int, progress: bool = False, ray_tasks: bool = False) -> dict:
    """The shards of the config's data section from load_source's output: the prompt samples (with SUBR's
    item vectors, computed with the LLM at llm_dir or read from cache_dir, where retrieval is on), the
    users' profiles for CTR prompts, then write_shards. Returns the manifest."""
    samples = make_samples(data, splits, items, seed, llm_dir, cache_dir)
    profiles = read_profiles(data.source, data.path) if data.task == "ctr" and data.ctr.profile else {}
    return write_shards(items, samples, tokenizer_dir, out_dir, num_candidates=data.num_candidates, max_len=data.max_len,
                        samples_per_shard=data.samples_per_shard, seed=seed, workers=workers, stats=stats,
                        progress=progress, user_token=data.user_token, task=data.task, profiles=profiles,
                        extra_params=manifest_params(data), domain=data.domain, ray_tasks=ray_tasks)
