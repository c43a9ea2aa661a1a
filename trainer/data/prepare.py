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
from dataclasses import dataclass

from omegaconf import DictConfig

from configs.schema import to_dict
from shards.build import build_shards, load_source
from shards.ctr import needs_retrieval, pool_len
from shards.prompts import CTR_ANSWERS, CTR_TEMPLATES, templates
from trainer.model.build import prepare_tokenizer
from trainer.model.srec import load_srec, save_srec
from trainer.model.srec.llara_import import load_llara_sasrec
from trainer.model.srec.pretrain import check_pretrain_args, pretrain
from trainer.model.tiny import build_tiny_llama, build_tokenizer

log = logging.getLogger(__name__)

# Config keys added after runs were prepared, with the value that reproduces what those runs built:
# an old stamp without the key is read as having the default (it was built that way).
_ADDED_KEYS = {("data", "user_token"): False, ("srec", "positions"): "last", ("data", "task"): "llara",
               ("data", "ctr"): {"threshold": 4.0, "retrieval": "none", "reit": False, "few_shot": -1, "profile": True},
               ("data", "retrieval"): {"hybrid": False, "pool_len": 50, "order": "sequential", "template": "movie",
                                       "pooling": "mean", "pca_dim": 512, "batch_size": 32},
               ("data", "synthetic", "pattern"): "chain", ("data", "synthetic", "titles"): "pairs",
               ("data", "domain"): "movie", ("srec", "adam_beta2"): 0.999, ("srec", "init"): "default",
               ("data", "synthetic", "zipf_a"): 1.2, ("data", "retrieval", "dtype"): "float32",
               ("model", "attn_implementation"): "sdpa", ("data", "length_grouping"): 0,
               # before the key the first 5,000 validation users were read: the same SRec wherever there are no
               # more, so an old stamp reads as the new default (all) and its folder stays usable
               ("srec", "val_users"): -1, ("srec", "ffn_inner"): 0, ("srec", "activation"): "relu",
               ("srec", "norm"): "pre", ("srec", "attn_dropout"): -1.0, ("srec", "stop_metric"): "ndcg@10",
               ("srec", "init_std"): 0.02,
               # an SRec already built is reused as it is; the key changes how a new one is early-stopped
               ("srec", "eval_mask_history"): True, ("model", "init_from"): None}
# how the run reads, checks or computes, not what was built: these may change between runs of one folder
_RUNTIME_KEYS = (("data", "build_workers"), ("data", "verify_shards"), ("data", "loader_workers"),
                 ("model", "injection"), ("model", "attn_implementation"), ("data", "length_grouping"))


def _built_from(stamp: dict) -> dict:
    """The stamp without the runtime keys (a copy)."""
    out = json.loads(json.dumps(stamp))
    for section, key in _RUNTIME_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


@dataclass
class RunPaths:
    """Every place a run reads or writes under its output folder, named once here (run_paths). The names
    inside a folder belong to the module that writes it: shards/build.py (data/), trainer/job/checkpoint.py
    (checkpoints/step_N/), trainer/model/export.py (export/), trainer/job/signals.py (STOP, PREEMPTED)."""
    output_dir: str
    llm: str                # the LLM's folder: assets/llm (the tiny Llama), or model.base where it is
    tokenizer: str          # the run's tokenizer: assets/llm, or assets/tokenizer beside a model.base
    srec: str               # the frozen SRec's folder: assets/srec, or srec.path when that is a folder
    data: str               # the shards, manifest.json, items.json
    checkpoints: str
    logs: str
    eval: str
    export: str
    stamp: str              # assets/prepare.json: what the assets and shards were built from
    item_emb: str           # SUBR's cached item embeddings
    metrics: str            # logs/metrics.jsonl
    tensorboard: str
    loss_plot: str
    deepspeed_config: str
    ray: str                # Ray Train's run state, a folder per launch
    init_from: str | None = None  # a stage's starting run (model.init_from), whose llm/tokenizer/srec/data it reads


def run_paths(output_dir: str) -> RunPaths:
    out = os.path.abspath(output_dir)
    logs, assets = os.path.join(out, "logs"), os.path.join(out, "assets")
    return RunPaths(output_dir=out, llm=os.path.join(assets, "llm"), tokenizer=os.path.join(assets, "llm"),
                    srec=os.path.join(assets, "srec"), data=os.path.join(out, "data"),
                    checkpoints=os.path.join(out, "checkpoints"), logs=logs, eval=os.path.join(out, "eval"),
                    export=os.path.join(out, "export"), stamp=os.path.join(assets, "prepare.json"),
                    item_emb=os.path.join(assets, "item_emb"), metrics=os.path.join(logs, "metrics.jsonl"),
                    tensorboard=os.path.join(logs, "tensorboard"), loss_plot=os.path.join(logs, "loss.png"),
                    deepspeed_config=os.path.join(logs, "deepspeed_config.json"), ray=os.path.join(logs, "ray"))


def source_paths(output_dir: str, model_base: str | None, srec_path: str | None) -> RunPaths:
    """run_paths with the run's sources in place: model.base's folder as the LLM, used where it is
    (the run's tokenizer, the base's plus LLaRA's tokens, then lives in assets/tokenizer), and an
    SRec folder given as srec.path (LLaRA's .pt is imported into assets/srec)."""
    paths = run_paths(output_dir)
    if model_base:
        paths.llm = os.path.abspath(model_base)
        paths.tokenizer = os.path.join(paths.output_dir, "assets", "tokenizer")
    if srec_path and not str(srec_path).endswith(".pt"):
        paths.srec = os.path.abspath(srec_path)
    return paths


def prepared_paths(output_dir: str) -> RunPaths:
    """The paths of a run prepared before (launch/eval.py): its sources read from its stamp."""
    paths = run_paths(output_dir)
    if not os.path.exists(paths.stamp):
        return paths
    with open(paths.stamp) as f:
        stamp = json.load(f)
    if stamp["model"].get("init_from"):  # a stage: its starting run's sources (stage_paths)
        return _reading_from(paths, prepared_paths(stamp["model"]["init_from"]))
    return source_paths(output_dir, stamp["model"].get("base"), stamp["srec"].get("path"))


def prepare(cfg: DictConfig, embed=None) -> RunPaths:
    """Build (or reuse) the run's assets and shards; returns run_paths. embed(items, llm_dir, cache_dir),
    when given, computes SUBR's item embeddings into the cache before the shards need them (launch/train.py
    does it on the Ray workers); without it they are computed here, in this process."""
    paths = source_paths(cfg.output_dir, cfg.model.base, cfg.srec.path)
    stamp = {"seed": cfg.seed, "data": to_dict(cfg.data), "model": to_dict(cfg.model), "srec": to_dict(cfg.srec)}
    if cfg.model.init_from:
        return stage_paths(cfg, stamp)
    if os.path.exists(paths.stamp):
        check_stamp(paths, stamp)
        log.info("reusing data and assets in %s", paths.output_dir)
        return paths
    templates(cfg.data.user_token, cfg.data.domain)  # an unknown data.domain stops here, before any work
    if not cfg.srec.path:
        check_pretrain_args(cfg.srec)  # so does a bad srec.* choice (the SRec is trained last)
    items, splits, stats = load_source(cfg.data, cfg.seed)
    build_llm(cfg, items, paths)
    manifest = prepare_shards(cfg, items, splits, stats, paths, embed)
    build_srec(cfg, splits, manifest["num_items"], paths)
    with open(paths.stamp, "w") as f:
        json.dump(stamp, f, indent=1)
    return paths


def stage_paths(cfg: DictConfig, stamp: dict) -> RunPaths:
    """A stage started from a finished run (model.init_from) reads that run's data, LLM, tokenizer and SRec
    where they are; its config must be the one they were built from (else a ValueError naming the section)."""
    start = prepared_paths(cfg.model.init_from)
    if not os.path.exists(start.stamp):
        raise ValueError(f"model.init_from={cfg.model.init_from} is not a run folder: it has no {start.stamp}")
    without_start = json.loads(json.dumps(stamp))
    without_start["model"]["init_from"] = None
    check_stamp(start, without_start, f"model.init_from={cfg.model.init_from} was prepared with another "
                                      "{changed} config than this stage's: a stage trains on its starting run's "
                                      "data, tokenizer and SRec; give the same {changed} settings")
    stamp = dict(stamp, model=dict(stamp["model"], init_from=start.output_dir))  # absolute: read from anywhere
    paths = _reading_from(run_paths(cfg.output_dir), start)
    os.makedirs(os.path.dirname(paths.stamp), exist_ok=True)
    if os.path.exists(paths.stamp):
        check_stamp(paths, stamp)
    else:
        with open(paths.stamp, "w") as f:
            json.dump(stamp, f, indent=1)
    return paths


def _reading_from(paths: RunPaths, start: RunPaths) -> RunPaths:
    """A stage's paths: its own folder, its starting run's LLM, tokenizer, SRec and data."""
    paths.llm, paths.tokenizer, paths.srec, paths.data = start.llm, start.tokenizer, start.srec, start.data
    paths.init_from = start.output_dir
    return paths


def check_stamp(paths: RunPaths, stamp: dict, message: str = "") -> None:
    """Refuse an output folder prepared from another data, model or SRec config (a ValueError)."""
    with open(paths.stamp) as f:
        old = json.load(f)
    for (*parents, key), value in _ADDED_KEYS.items():
        node = old
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(key, copy.deepcopy(value))  # never the constant itself
    old, new = _built_from(old), _built_from(stamp)
    if old != new:
        changed = ", ".join(sorted(k for k in new if old.get(k) != new[k]))
        raise ValueError(message.format(changed=changed) if message else
                         f"{paths.output_dir} was prepared with another {changed} config; "
                         "use a new output_dir (or the old config) so checkpoints match their data and model")


def build_llm(cfg: DictConfig, items, paths: RunPaths) -> None:
    """The run's tokenizer and LLM: model.base's folder with its tokenizer grown by LLaRA's tokens
    (trainer/model/build.py prepare_tokenizer; the model grows to match when it is loaded), or the
    tiny Llama and its tokenizer built in assets/llm."""
    user_token = cfg.data.user_token
    if cfg.model.base:
        tokenizer, added = prepare_tokenizer(paths.llm, paths.tokenizer, user_token)
        log.info("tokenizer of %s with %s added (%d tokens) in %s", paths.llm, ", ".join(added) or "nothing",
                 len(tokenizer), paths.tokenizer)
        return
    log.info("building the tokenizer and the tiny Llama in %s", paths.llm)
    # titles as prompts hold them, after a space: " Silver Harbor" is then two whole-word tokens
    # (trained on bare titles, BPE learned "Silver" and split " Silver" into " S"+"il"+"v"+"er")
    # and ReLLa's answers, so that " Yes" and " No" are whole tokens (CTR scoring reads their logits)
    corpus = [" " + t for _, t, _ in items] + list(templates(user_token, cfg.data.domain)) + list(CTR_ANSWERS)
    if cfg.data.task == "ctr":  # only then: the default tokenizer stays byte-identical
        corpus += list(CTR_TEMPLATES) + [f"{n}. ({r} stars), Yes. No." for n in range(1, 11) for r in range(1, 6)]
    tokenizer = build_tokenizer(corpus * 4, cfg.model.tiny.vocab_size, paths.llm, user_token=user_token)
    tiny = cfg.model.tiny
    build_tiny_llama(tokenizer, paths.llm, tiny.hidden_size, tiny.num_layers, tiny.num_heads,
                     tiny.intermediate_size, tiny.max_position_embeddings, cfg.seed)


def prepare_shards(cfg: DictConfig, items, splits: dict, stats: dict, paths: RunPaths, embed) -> dict:
    """Samples -> prompts -> tokenized shards in data/ (SUBR's item embeddings first, if needed); the manifest."""
    if embed is not None and needs_retrieval(cfg.data):
        embed(items, paths.llm, paths.item_emb)  # make_samples then finds them in the cache
    log.info("building shards in %s", paths.data)
    manifest = build_shards(cfg.data, cfg.seed, items, splits, stats, paths.tokenizer, paths.data,
                            llm_dir=paths.llm, cache_dir=paths.item_emb, workers=cfg.data.build_workers)
    log.info("data: %s", {k: v for k, v in manifest["stats"].items()})
    return manifest


def build_srec(cfg: DictConfig, splits: dict, num_items: int, paths: RunPaths) -> None:
    """The frozen SRec: srec.path's folder as it is, LLaRA's .pt imported, or one pretrained here on
    the same splits (on the history_len most recent items, as the prompts' K); its item count checked."""
    if cfg.srec.path and str(cfg.srec.path).endswith(".pt"):

        log.info("importing LLaRA's SASRec from %s", cfg.srec.path)
        save_srec(load_llara_sasrec(cfg.srec.path), paths.srec)
    elif not cfg.srec.path:
        history_len = cfg.data.history_len
        if pool_len(cfg.data) != history_len:
            splits = {name: [dict(x, history=x["history"][-history_len:]) for x in rows] for name, rows in splits.items()}
        log.info("pretraining %s (%d epochs at most)", cfg.srec.arch, cfg.srec.epochs)
        model, report = pretrain(splits, num_items, cfg.srec, max_len=history_len, seed=cfg.seed)
        save_srec(model, paths.srec)
        with open(os.path.join(paths.srec, "pretrain_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        log.info("%s: best validation NDCG@10 %.4f (full ranking, %s)", cfg.srec.arch, report["best_val_ndcg@10"],
                 report["full_ranking"])
    n = load_srec(paths.srec).num_items
    if n != num_items:
        raise ValueError(f"the SRec at {paths.srec} knows {n} items, the shards' vocabulary has "
                         f"{num_items}; use an SRec trained on this data set")
