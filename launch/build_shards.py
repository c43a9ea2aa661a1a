"""Build the tokenized shards of a data set, without training (launch/train.py builds them itself when
they are missing).

    python launch/build_shards.py --tokenizer runs/default/assets/llm --out /data/ml100k-shards \
        data.source=ml-100k data.path=../shared/data/ml-100k data.split=loo
    RAY_ADDRESS=<head>:6379 python launch/build_shards.py --ray ...   # the shards encoded as Ray tasks on a cluster

A stopped build run again with the same arguments keeps the shards it already wrote (checked against
their sha256 in <out>/build-progress.jsonl) and goes on from there. What a shard holds: shards/build.py.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import ConfigError, load_config  # noqa: E402
from shards.build import build_shards, load_source  # noqa: E402
from trainer.job.ray_cluster import connect  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML merged over configs/llara_default.yaml (its data: section is used)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer (or model) folder")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=0,
                   help="tokenizing processes, or with --ray Ray tasks at a time (0 = every core here / every CPU of the cluster)")
    p.add_argument("--ray", action="store_true",
                   help="encode the shards as Ray tasks on the cluster at ray.address (else RAY_ADDRESS, else a local one)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.source=ml-100k data.path=../shared/data/ml-100k")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.exit(2, f"error: {e}\n")
    workers = args.workers
    if args.ray:
        import ray  # only with --ray: a local build starts no Ray

        try:  # e.g. no token to join the cluster: one line, not a traceback
            connect(cfg.ray.address, args.workers or os.cpu_count() or 1, cfg.ray.object_store_mb, False, cfg.ray.auth)
        except ValueError as e:
            p.exit(2, f"error: {e}\n")
        workers = workers or int(ray.cluster_resources().get("CPU", 1))
    items, splits, stats = load_source(cfg.data, cfg.seed)
    # SUBR (data.ctr.retrieval=subr, ReiT, data.retrieval.hybrid) embeds items with the LLM at --tokenizer
    manifest = build_shards(cfg.data, cfg.seed, items, splits, stats, args.tokenizer, args.out, llm_dir=args.tokenizer,
                            cache_dir=os.path.join(args.out, "item_emb"), workers=workers, progress=True,
                            ray_tasks=args.ray)
    print(json.dumps(manifest["stats"], indent=1))


if __name__ == "__main__":
    main()
