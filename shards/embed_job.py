"""SUBR's item embeddings computed on the run's Ray workers, before the shards are built.

    embed_on_workers(cfg, items, llm_dir, cache_dir, run_on_workers=...)   # launch/train.py, through prepare(cfg, embed=...)

When the cache in cache_dir already holds the embeddings (this LLM, data.retrieval's template and
pooling and dtype, these item texts), nothing starts. Otherwise a short Ray Train job runs `embed_worker` on
train.num_workers workers (started by the runner it is given: trainer/job/ray_cluster.py run_on_workers, which
sets each worker process up): each loads the LLM, embeds its contiguous slice of the items
(shards/retrieval.py `cached_item_embeddings`: the slices are gathered over the process group Ray
set up, rank 0 writes the cache file), and rank 0 writes beside it which rank embedded which items
(item_emb-<key>.workers.json). prepare then reads the embeddings from the cache as before.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf

from configs.schema import Retrieval, to_dict
from shards.ctr import cached_embeddings, item_embeddings
from shards.retrieval import cache_entry, gather_rows, model_fingerprint, shard_bounds

log = logging.getLogger(__name__)


def report_path(retrieval: Retrieval, items, cache_dir: str, model_id: str) -> str:
    """The workers' report beside the cache file of these embeddings."""
    path, _, _ = cache_entry(cache_dir, model_id, retrieval.template, items, retrieval.pooling, dtype=retrieval.dtype)
    return path.removesuffix(".safetensors") + ".workers.json"


def embed_worker(config: dict) -> None:
    """What each Ray worker runs: embed this rank's slice of the items (the cache file is written by
    rank 0), then rank 0 records every rank's slice, process id and time."""
    cfg = OmegaConf.create(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # this worker's GPU with train.use_gpu (Ray made it the default), else CPU
    retrieval, items = cfg.data.retrieval, config["items"]
    start = time.time()
    item_embeddings(retrieval, items, config["llm_dir"], config["cache_dir"], config["model_id"], device)
    lo, hi = shard_bounds(len(items), rank, world)
    mine = torch.tensor([[rank, lo, hi, os.getpid(), round((time.time() - start) * 1000)]])
    every = gather_rows(mine, world)  # [world, 5]: of `world` rows, rank r's slice is row r
    if rank == 0:
        ranks = [{"rank": r, "first": first, "last": end - 1, "items": end - first, "pid": pid, "seconds": ms / 1000}
                 for r, first, end, pid, ms in every.tolist()]
        with open(report_path(retrieval, items, config["cache_dir"], config["model_id"]), "w") as f:
            json.dump({"items": len(items), "workers": world, "model": config["model_id"], "ranks": ranks}, f, indent=1)


def embed_on_workers(cfg, items, llm_dir: str, cache_dir: str, *, run_on_workers) -> dict | None:
    """Compute the items' embeddings on train.num_workers Ray workers (train.cpus_per_worker CPUs,
    a GPU each with train.use_gpu) and write them to the cache in cache_dir. Returns the workers'
    report (which rank embedded which items), or None when the cache already held them: no job.
    run_on_workers(fn, config, workers, cpus_per_worker, use_gpu, storage_path=, name=) runs the job
    (trainer/job/ray_cluster.py's, with Ray already connected)."""
    retrieval, cache_dir = cfg.data.retrieval, os.path.abspath(cache_dir)
    model_id = model_fingerprint(llm_dir)
    if cached_embeddings(retrieval, items, llm_dir, cache_dir, model_id) is not None:
        log.info("item embeddings: found in the cache %s", cache_dir)
        return None
    train_cfg = cfg.train
    log.info("item embeddings: %d items on %d Ray workers", len(items), train_cfg.num_workers)
    run_on_workers(embed_worker, {"cfg": to_dict(cfg), "items": items, "llm_dir": os.path.abspath(llm_dir),
                                  "cache_dir": cache_dir, "model_id": model_id},
                   train_cfg.num_workers, train_cfg.cpus_per_worker, train_cfg.use_gpu, storage_path=os.path.join(cache_dir, "ray"), name="embed")
    with open(report_path(retrieval, items, cache_dir, model_id)) as f:
        report = json.load(f)
    for w in report["ranks"]:
        log.info("item embeddings: worker %d (pid %d) embedded items %d..%d (%d items) in %.1f s, loading the LLM included",
                 w["rank"], w["pid"], w["first"], w["last"], w["items"], w["seconds"])
    return report
