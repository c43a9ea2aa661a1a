"""ReLLa CTR samples (data.task=ctr) and retrieval-enhanced histories (SUBR) for both tasks.

A CTR sample is the time split's sample (shards.samples.global_time_split: every interaction with a
non-empty history, all interactions cut 8:1:1 by time) with a label:

    {"user", "history", "history_ratings", "target", "rating", "label", "position", "retrieved"}

label = 1 when the user's rating of the target is >= data.ctr.threshold (MovieLens: 4). The history
shown is either the K = data.history_len most recent items, or (data.ctr.retrieval=subr) the K
items of the user's last data.retrieval.pool_len that are most similar to the target (ReLLa's SUBR,
shards/retrieval.py), ordered by data.retrieval.order.

Every split stays a sequence of samples made when read (shards.samples.Windows underneath, and the
wrappers below for the labels, the K most recent, SUBR's histories in blocks, ReiT's pairs): the shard
build streams them and memory does not grow with the number of samples.

Training set (in this order): few-shot (data.ctr.few_shot=N: N training samples drawn with a
generator seeded by (seed, 13), kept in their original order), then ReiT (data.ctr.reit: each of
those in two versions, K most recent and SUBR-retrieved, 1:1, next to each other). Validation and
test samples use the data.ctr.retrieval setting.

Retrieval-enhanced hybrid prompts (data.retrieval.hybrid, beyond both papers): the SUBR-chosen
history is written as LLaRA hybrid items (title + behaviour token). For CTR the query is the
target (as ReLLa); for the next-item task the target is what is predicted, so the query is the
user's most recent item: the K items of the last pool_len most similar to it, which keeps the most
recent item and adds the earlier ones closest to it (no leak of the target).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from configs.schema import Data, Retrieval
from shards.retrieval import (cached_item_embeddings, l2_normalize, model_fingerprint, pca,
                              read_cached_item_embeddings, retrieve)

log = logging.getLogger(__name__)

TASKS = ("llara", "ctr")  # data.task
CTR_RETRIEVALS = ("none", "subr")  # data.ctr.retrieval


class Mapped(Sequence):
    """fn(rows[i]) for i in `index` (default: every row), made when read."""

    def __init__(self, rows, fn, index=None):
        self.rows, self.fn, self.index = rows, fn, None if index is None else np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.rows) if self.index is None else len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.fn(self.rows[i if self.index is None else int(self.index[i])])


class _MadeWhenRead(Sequence):
    """A sequence whose sample i is self.sample(i), 0 <= i < len: slices give lists, negative i counts from
    the end, anything else is an IndexError (which also ends iteration)."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.sample(i % len(self))


class Interleaved(_MadeWhenRead):
    """a[0], b[0], a[1], b[1], ... (ReiT's pairs) for two sequences of one length, made when read."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return 2 * len(self.a)

    def sample(self, i: int):
        return (self.a, self.b)[i % 2][i // 2]


class Retrieved(_MadeWhenRead):
    """retrieve_histories over rows, computed a block of `block` samples at a time when read (the block
    read last is kept: the shard build reads in order)."""

    def __init__(self, rows, item_vecs, k: int, order: str, query: str = "target", block: int = 4096):
        self.rows, self.item_vecs, self.k, self.order, self.query, self.block = rows, item_vecs, k, order, query, block
        self._cached = (None, [])

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int):
        b = i // self.block
        if self._cached[0] != b:
            rows = [self.rows[j] for j in range(b * self.block, min(len(self), (b + 1) * self.block))]
            self._cached = (b, retrieve_histories(rows, self.item_vecs, self.k, self.order, self.query))
        return self._cached[1][i - b * self.block]


def _kept(rows, keep: np.ndarray):
    """The rows where `keep` is true, made when read (rows itself when every one is kept)."""
    return rows if keep.all() else Mapped(rows, lambda s: s, np.flatnonzero(keep))


def with_history(rows):
    """rows without the samples whose history is empty (one pass; nothing copied when none is)."""
    return _kept(rows, np.fromiter((bool(s["history"]) for s in rows), bool, len(rows)))


def label_samples(splits: dict, threshold: float, history_len: int) -> dict:
    """Add `label` (rating >= threshold) to every time-split sample; warn of a split with one class,
    refuse data whose samples are all one class. The labels are counted in one pass; the labelled
    samples are made when read."""
    out, positives, total = {}, 0, 0
    for split, rows in splits.items():
        if len(rows) and "rating" not in rows[0]:
            raise ValueError("data.task=ctr needs ratings on every sample: use data.split=time (ReLLa's split)")
        has, liked = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
        for j, s in enumerate(rows):  # one pass: which samples have a history, which are positive
            has[j], liked[j] = bool(s["history"]), float(s["rating"]) >= threshold
        rows, pos = _kept(rows, has), int(liked[has].sum())
        out[split] = Mapped(rows, lambda s: dict(s, label=int(float(s["rating"]) >= threshold), retrieved=False))
        if len(rows) and pos in (0, len(rows)):  # AUC is undefined on it
            log.warning("data.ctr.threshold=%s: all %d %s samples are %s", threshold, len(rows), split,
                        "positive" if pos else "negative")
        positives, total = positives + pos, total + len(rows)
    if not total:
        raise ValueError("data.task=ctr: no sample has a history")
    if positives in (0, total):
        raise ValueError(f"data.ctr.threshold={threshold}: every one of the {total} samples is "
                         f"{'positive' if positives else 'negative'} (ratings >= threshold are positive); pick a "
                         "threshold inside the data's rating range")
    return out


def recent(sample: dict, k: int) -> dict:
    return dict(sample, history=list(sample["history"][-k:]), history_ratings=list(sample.get("history_ratings", [])[-k:]),
                retrieved=False)


def retrieve_histories(samples: list[dict], item_vecs, k: int, order: str, query: str = "target") -> list[dict]:
    """Each sample with its history replaced by the k items SUBR picks (query: the target, or the
    most recent history item); ratings follow their items. (Retrieved: the same, made when read.)"""
    if not samples:
        return []
    hist = [s["history"] for s in samples]
    q = [s["target"] if query == "target" else s["history"][-1] for s in samples]
    pos = retrieve(hist, torch.as_tensor(q), item_vecs, k, order=order).tolist()
    out = []
    for s, p in zip(samples, pos):
        keep = [i for i in p if i >= 0]
        new = dict(s, history=[s["history"][i] for i in keep], retrieved=True)
        if "history_ratings" in s:
            new["history_ratings"] = [s["history_ratings"][i] for i in keep]
        out.append(new)
    return out


def few_shot(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n of rows, drawn without replacement by a generator seeded by (seed, 13), in their original order."""
    if n < 0:
        return rows
    if n == 0 or n > len(rows):
        raise ValueError(f"data.ctr.few_shot={n}: the training split has {len(rows)} samples; use 1..{len(rows)} "
                         "or -1 for all")
    pick = np.sort(np.random.default_rng([seed, 13]).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in pick]


def needs_retrieval(data: Data) -> bool:
    """SUBR's item vectors are needed: CTR with SUBR or ReiT, or retrieval-enhanced hybrid prompts."""
    return bool(data.task == "ctr" and (data.ctr.retrieval == "subr" or data.ctr.reit) or data.retrieval.hybrid)


def pool_len(data: Data) -> int:
    """History length the split keeps before the prompt's K are chosen."""
    return max(data.history_len, data.retrieval.pool_len) if needs_retrieval(data) else data.history_len


def build_samples(data: Data, splits: dict, seed: int, item_vecs=None) -> dict:
    """The prompt samples of every split from the source's splits (histories up to pool_len(data))."""
    k, retrieval = data.history_len, data.retrieval
    if data.task == "llara":
        if not retrieval.hybrid:
            return splits
        return {s: Retrieved(with_history(rows), item_vecs, k, retrieval.order, query="last") for s, rows in splits.items()}
    if data.task not in TASKS:
        raise ValueError(f"data.task={data.task!r}: expected llara or ctr")
    ctr = data.ctr
    if ctr.retrieval not in CTR_RETRIEVALS:
        raise ValueError(f"data.ctr.retrieval={ctr.retrieval!r}: expected none or subr")
    subr = ctr.retrieval == "subr" or retrieval.hybrid
    labelled = label_samples(splits, float(ctr.threshold), k)
    out = {}
    for split, rows in labelled.items():
        if split == "train":
            rows = few_shot(rows, int(ctr.few_shot), seed)
            if ctr.reit:
                out[split] = Interleaved(Mapped(rows, lambda s: recent(s, k)), Retrieved(rows, item_vecs, k, retrieval.order))
                continue
        out[split] = Retrieved(rows, item_vecs, k, retrieval.order) if subr else Mapped(rows, lambda s: recent(s, k))
    return out


def cached_embeddings(retrieval: Retrieval, items, llm_dir: str, cache_dir: str, model_id: str | None = None):
    """The items' LLM embeddings [N, H] when cache_dir already holds them for this LLM and
    data.retrieval's template, pooling and dtype, else None. model_id: model_fingerprint(llm_dir), if known."""
    return read_cached_item_embeddings(cache_dir, model_id or model_fingerprint(llm_dir), retrieval.template, items,
                                       pooling=retrieval.pooling, dtype=retrieval.dtype)


def item_embeddings(retrieval: Retrieval, items, llm_dir: str, cache_dir: str, model_id: str | None = None,
                    device=None):
    """The items' LLM embeddings [N, H] float32, read from cache_dir or computed and written there with
    the LLM's weights in data.retrieval.dtype (pooled in float32). Under torch.distributed every rank
    calls this and embeds its slice (shards/retrieval.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when embeddings are computed

    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=getattr(torch, retrieval.dtype)).to(device or "cpu")
    return cached_item_embeddings(cache_dir, model_id or model_fingerprint(llm_dir), retrieval.template, items, model,
                                  tok, batch_size=int(retrieval.batch_size), pooling=retrieval.pooling,
                                  dtype=retrieval.dtype)


def item_vectors(retrieval: Retrieval, items, llm_dir: str, cache_dir: str):
    """SUBR's unit item vectors [N, dim] from the LLM at llm_dir (cached in cache_dir; the LLM is
    loaded only when the cache misses)."""
    model_id = model_fingerprint(llm_dir)
    emb = cached_embeddings(retrieval, items, llm_dir, cache_dir, model_id)
    if emb is None:
        emb = item_embeddings(retrieval, items, llm_dir, cache_dir, model_id)
    log.info("SUBR: %d item embeddings of size %d, PCA to %d", *emb.shape, retrieval.pca_dim)
    return l2_normalize(pca(emb, retrieval.pca_dim))


def make_samples(data: Data, splits: dict, items, seed: int, llm_dir: str, cache_dir: str) -> dict:
    """build_samples with the item vectors computed (or read from cache) only when retrieval is on."""
    vecs = item_vectors(data.retrieval, items, llm_dir, os.path.abspath(cache_dir)) if needs_retrieval(data) else None
    return build_samples(data, splits, seed, vecs)


def manifest_params(data: Data) -> dict:
    """What the manifest records about CTR sampling and retrieval; {} for the default (LLaRA, no
    retrieval), so its manifest and config hash stay as they were."""
    out = {}
    if data.task == "ctr":
        out["ctr"] = dict(data.ctr)
    if needs_retrieval(data):
        out["retrieval"] = dict(data.retrieval)
        if out["retrieval"]["dtype"] == "float32":  # as before the key existed: the same config hash
            del out["retrieval"]["dtype"]
    return out
