"""Everything a run needs on disk before the workers start, built once on the driver:

    <output_dir>/assets/llm/     tokenizer + LLM as a Hugging Face folder (the tiny Llama by default)
    <output_dir>/data/           webdataset shards + manifest.json + items.json
    <output_dir>/assets/srec/    the frozen SRec (safetensors + config.json)
    <output_dir>/assets/prepare.json   the config sections these were built from

A second call with the same config reuses them (that is how a re-run resumes). A different data,
model or SRec config in the same output folder is refused: it would not match the checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import os

from omegaconf import DictConfig

from trainer.config import to_dict

log = logging.getLogger(__name__)

# Config keys added after runs were prepared, with the value that reproduces what those runs built:
# an old stamp without the key is read as having the default (it was built that way).
_ADDED_KEYS = {("data", "user_token"): False, ("srec", "positions"): "last", ("data", "task"): "llara",
               ("data", "ctr"): {"threshold": 4.0, "retrieval": "none", "reit": False, "few_shot": -1, "profile": True},
               ("data", "retrieval"): {"hybrid": False, "pool_len": 50, "order": "sequential", "template": "movie",
                                       "pooling": "mean", "pca_dim": 512, "batch_size": 32},
               ("data", "synthetic", "pattern"): "chain", ("data", "synthetic", "titles"): "pairs",
               ("data", "domain"): "movie", ("srec", "adam_beta2"): 0.999, ("srec", "init"): "default",
               ("data", "synthetic", "zipf_a"): 1.2, ("data", "retrieval", "dtype"): "float32"}
# how the run reads, checks or computes, not what was built: these may change between runs of one folder
_RUNTIME_KEYS = (("data", "build_workers"), ("data", "verify_shards"), ("data", "loader_workers"),
                 ("model", "injection"))


def _built_from(stamp: dict) -> dict:
    """The stamp without the runtime keys (a copy)."""
    out = json.loads(json.dumps(stamp))
    for section, key in _RUNTIME_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def run_paths(output_dir: str) -> dict:
    out = os.path.abspath(output_dir)
    return {"output_dir": out, "llm": os.path.join(out, "assets", "llm"), "srec": os.path.join(out, "assets", "srec"),
            "data": os.path.join(out, "data"), "checkpoints": os.path.join(out, "checkpoints"),
            "logs": os.path.join(out, "logs"), "eval": os.path.join(out, "eval"),
            "stamp": os.path.join(out, "assets", "prepare.json"), "item_emb": os.path.join(out, "assets", "item_emb")}


def prepare(cfg: DictConfig, embed=None) -> dict:
    """Build (or reuse) the run's assets and shards; returns run_paths. embed(items, llm_dir, cache_dir),
    when given, computes SUBR's item embeddings into the cache before the shards need them (launch/train.py
    does it on the Ray workers); without it they are computed here, in this process."""
    paths = run_paths(cfg.output_dir)
    stamp = {"seed": cfg.seed, "data": to_dict(cfg.data), "model": to_dict(cfg.model), "srec": to_dict(cfg.srec)}
    if os.path.exists(paths["stamp"]):
        with open(paths["stamp"]) as f:
            old = json.load(f)
        for (*parents, key), value in _ADDED_KEYS.items():
            node = old
            for name in parents:
                node = node.get(name) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.setdefault(key, copy.deepcopy(value))  # never the constant itself
        old, new = _built_from(old), _built_from(stamp)
        if old != new:
            changed = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(f"{paths['output_dir']} was prepared with another {', '.join(changed)} config; "
                             "use a new output_dir (or the old config) so checkpoints match their data and model")
        log.info("reusing data and assets in %s", paths["output_dir"])
        return paths

    from transformers import AutoTokenizer

    from shards.build import load_source, write_shards
    from shards.ctr import make_samples, manifest_params, needs_retrieval, pool_len
    from shards.prompts import CTR_ANSWERS, CTR_TEMPLATES, templates
    from shards.readers import read_profiles
    from trainer.model.build import load_tokenizer
    from trainer.model.tiny import build_tiny_llama, build_tokenizer
    from trainer.srec import save_srec
    from trainer.srec.pretrain import check_pretrain_args, pretrain

    d = to_dict(cfg.data)
    user_token = bool(d["user_token"])
    llara_templates = templates(user_token, d["domain"])  # an unknown data.domain stops here, before any work
    if not cfg.srec.path:
        check_pretrain_args(**to_dict(cfg.srec))  # so does a bad srec.* choice (the SRec is trained last)
    items, splits, stats = load_source(d, cfg.seed)
    if cfg.model.base:
        paths["llm"] = os.path.abspath(cfg.model.base)
        AutoTokenizer.from_pretrained(paths["llm"])  # fail early if it is not a tokenizer folder
        if user_token:
            load_tokenizer(paths["llm"], user_token=True)  # it must know [UserEmb]: an error names it
    else:
        log.info("building the tokenizer and the tiny Llama in %s", paths["llm"])
        # titles as prompts hold them, after a space: " Silver Harbor" is then two whole-word tokens
        # (trained on bare titles, BPE learned "Silver" and split " Silver" into " S"+"il"+"v"+"er")
        # and ReLLa's answers, so that " Yes" and " No" are whole tokens (CTR scoring reads their logits)
        corpus = [" " + t for _, t, _ in items] + list(llara_templates) + list(CTR_ANSWERS)
        if d["task"] == "ctr":  # only then: the default tokenizer stays byte-identical
            corpus += list(CTR_TEMPLATES) + [f"{n}. ({r} stars), Yes. No." for n in range(1, 11) for r in range(1, 6)]
        tokenizer = build_tokenizer(corpus * 4, cfg.model.tiny.vocab_size, paths["llm"], user_token=user_token)
        t = cfg.model.tiny
        build_tiny_llama(tokenizer, paths["llm"], t.hidden_size, t.num_layers, t.num_heads,
                         t.intermediate_size, t.max_position_embeddings, cfg.seed)
    srec_splits = splits
    if pool_len(d) != d["history_len"]:  # the SRec sees the history_len most recent, as the prompts' K
        srec_splits = {k: [dict(x, history=x["history"][-d["history_len"]:]) for x in v] for k, v in splits.items()}
    if embed is not None and needs_retrieval(d):
        embed(items, paths["llm"], paths["item_emb"])  # make_samples then finds them in the cache
    prompt_splits = make_samples(d, splits, items, cfg.seed, paths["llm"], paths["item_emb"])
    profiles = read_profiles(d["source"], d.get("path")) if d["task"] == "ctr" and d["ctr"]["profile"] else {}
    log.info("building shards in %s", paths["data"])
    manifest = write_shards(items, prompt_splits, paths["llm"], paths["data"], num_candidates=d["num_candidates"],
                            max_len=d["max_len"], samples_per_shard=d["samples_per_shard"], seed=cfg.seed,
                            workers=d["build_workers"], stats=stats, user_token=user_token, task=d["task"],
                            profiles=profiles, extra_params=manifest_params(d), domain=d["domain"])
    log.info("data: %s", {k: v for k, v in manifest["stats"].items()})
    if cfg.srec.path and not str(cfg.srec.path).endswith(".pt"):
        paths["srec"] = os.path.abspath(cfg.srec.path)
    elif cfg.srec.path:
        from trainer.srec.llara_import import load_llara_sasrec

        log.info("importing LLaRA's SASRec from %s", cfg.srec.path)
        save_srec(load_llara_sasrec(cfg.srec.path), paths["srec"])
    else:
        s = to_dict(cfg.srec)
        s.pop("path")
        log.info("pretraining %s (%d epochs at most)", s["arch"], s["epochs"])
        model, report = pretrain(srec_splits, manifest["num_items"], max_len=cfg.data.history_len, seed=cfg.seed, **s)
        save_srec(model, paths["srec"])
        with open(os.path.join(paths["srec"], "pretrain_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        log.info("%s: best validation NDCG@10 %.4f", s["arch"], report["best_val_ndcg@10"])
    from trainer.srec import load_srec

    n = load_srec(paths["srec"]).num_items
    if n != manifest["num_items"]:
        raise ValueError(f"the SRec at {paths['srec']} knows {n} items, the shards' vocabulary has "
                         f"{manifest['num_items']}; use an SRec trained on this data set")
    with open(paths["stamp"], "w") as f:
        json.dump(stamp, f, indent=1)
    return paths
