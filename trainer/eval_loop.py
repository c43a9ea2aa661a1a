"""Evaluation on Ray workers (launch/eval.py): one trained model, one split, several protocols, and
the baselines on the same candidates.

Each worker loads the whole model (an export, or a checkpoint's ZeRO-3 partitions consolidated),
takes every world-th sample of the split (each sample exactly once), and runs the modes:

    generate   LLaRA's protocol: greedy generation, first line, ValidRatio, HR@1 (of valid / of all)
    score      the candidates ranked by the log-likelihood of their titles: HR@1, HR@5, NDCG@5
    ctr        P(yes) at the answer position on samples with a label: AUC, log loss, accuracy

Rank 0 gathers the rows, adds the baselines (the frozen SRec alone, popularity, random; computed
once on all samples) and writes <out>/metrics.json, predictions.csv and report.md.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from trainer.precision import TORCH_DTYPES, resolve_precision

log = logging.getLogger("trainer.eval")
MODES = ("generate", "score", "ctr")


def load_model_for_eval(source: dict, paths: dict, srec_dim: int, dtype: torch.dtype = torch.float32):
    """(model, hybrid embedding, tokenizer) from {"export": dir}, {"checkpoint": dir, "config": run config}
    or {"zero_shot": True, "config": prepared config} (the base LLM, nothing trained).

    A checkpoint's ZeRO partitions are merged with DeepSpeed's zero_to_fp32 reader, which unpickles
    DeepSpeed's own files (torch.load with weights_only=False): point it only at checkpoints your
    runs wrote. The merged weights must cover every trainable parameter of the rebuilt model."""
    if "export" in source:
        from trainer.export import load_export

        with open(os.path.join(source["export"], "export.json")) as f:
            meta = json.load(f)
        return load_export(source["export"], paths["llm"], srec_dim, meta.get("injection", "fused"), dtype)

    from trainer.model.build import build_llara_model, load_tokenizer

    cfg = source["config"]
    user_token = bool(cfg["data"].get("user_token", False))
    model, embed = build_llara_model(paths["llm"], srec_dim, cfg["model"]["lora"], unfreeze=cfg["model"]["unfreeze"],
                                     seed=cfg["seed"], injection=cfg["model"]["injection"], user_token=user_token,
                                     dtype=dtype)
    if source.get("zero_shot"):  # LoRA starts as the identity; the adapter is its seeded initialisation
        return model.eval(), embed, load_tokenizer(paths["llm"], user_token)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(source["checkpoint"].rstrip("/"))
    state = get_fp32_state_dict_from_zero_checkpoint(root, tag)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in state]
    if missing:
        raise ValueError(f"checkpoint {source['checkpoint']} lacks {len(missing)} trained parameters, e.g. {missing[:2]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(state[n])
    return model.eval(), embed, load_tokenizer(paths["llm"], user_token)


def split_samples(paths: dict, manifest: dict, split: str, max_samples: int) -> list[dict]:
    from trainer.data import read_shard

    samples = []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        samples.extend(read_shard(os.path.join(paths["data"], shard["name"]), shard["count"]))
    if not samples:
        raise ValueError(f"the shards in {paths['data']} have no {split!r} split")
    return samples[:max_samples] if max_samples > 0 else samples


def model_rows(model, embed, srec, tokenizer, titles, samples, modes, hybrid, batch_size, max_new_tokens, device) -> list[dict]:
    """One row per sample with what each mode gave."""
    from trainer.data import meta
    from trainer.evaluate import first_line, generate, judge
    from trainer.scoring import candidate_logliks, target_positions, target_ranks, yes_probability

    rows = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ms = [meta(s) for s in chunk]
        part = [{"key": s["key"], "user": m["user"], "target": m["target"], "candidates": m["candidates"]}
                for s, m in zip(chunk, ms)]
        if "generate" in modes:
            outs = generate(model, embed, srec, chunk, tokenizer, max_new_tokens, hybrid, synced_gpus=False, device=device)
            for r, out, m in zip(part, outs, ms):
                cand_titles = [titles[c] for c in m["candidates"]]
                valid, correct = judge(out, cand_titles, titles[m["target"]])
                named = [c for c in m["candidates"] if titles[c] in first_line(out)]
                r.update(generated=first_line(out), chosen=named[0] if valid else None, valid=valid, correct=correct)
        if "score" in modes:
            ll = candidate_logliks(model, embed, srec, chunk, tokenizer, titles, hybrid, device)
            tgt = target_positions(ms)
            for r, rank, row, m in zip(part, target_ranks(ll, tgt).tolist(), ll, ms):
                r.update(score_rank=rank, score_top1=m["candidates"][int(row.argmax())])
        if "ctr" in modes and all("label" in m for m in ms):
            for r, p, m in zip(part, yes_probability(model, embed, srec, chunk, tokenizer, hybrid, device).tolist(), ms):
                r.update(p_yes=p, label=int(m["label"]))
        rows.extend(part)
    return rows


def check_modes(manifest: dict, modes) -> None:
    """CTR shards (data.task=ctr) have no candidates: only the ctr mode applies to them."""
    if manifest["params"].get("task", "llara") == "ctr":
        bad = [m for m in modes if m != "ctr"]
        if bad:
            raise ValueError(f"mode(s) {', '.join(bad)} rank candidates, but these shards hold CTR samples "
                             "(data.task=ctr, no candidates): use --modes ctr")


def baseline_ranks(srec, samples: list[dict], train_targets: list[int] | None, num_items: int, seed: int) -> dict:
    """The target's rank among each sample's candidates for the SRec alone, popularity and random."""
    from trainer.data import meta
    from trainer.scoring import target_positions, target_ranks

    ms = [meta(s) for s in samples]
    cands = torch.as_tensor([m["candidates"] for m in ms])
    tgt = target_positions(ms)
    device = next(srec.parameters()).device  # the SRec stays where it is (a worker's GPU); its inputs go to it
    with torch.no_grad():
        history, lengths = srec.pad([m["history"] for m in ms])
        srec_scores = srec.scores(history.to(device), lengths.to(device)).cpu().gather(1, cands)
    rnd = torch.rand(cands.shape, generator=torch.Generator().manual_seed(seed))
    out = {"srec": target_ranks(srec_scores, tgt), "random": target_ranks(rnd, tgt)}
    if train_targets is not None:  # popularity: how often each item is a training target
        pop = torch.as_tensor(np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=num_items), dtype=torch.float32)
        out["popularity"] = target_ranks(pop[cands], tgt)
    return out


def summarize(rows: list[dict], baselines: dict, modes) -> dict:
    from trainer.evaluate import llara_metrics
    from trainer.scoring import ctr_metrics, ranking_metrics

    out = {"samples": len(rows)}
    if "generate" in modes:
        out["generate"] = llara_metrics([(r["valid"], r["correct"]) for r in rows])
    if "score" in modes:
        out["score"] = ranking_metrics(torch.as_tensor([r["score_rank"] for r in rows]))
    labelled = [r for r in rows if "p_yes" in r]
    if "ctr" in modes:
        out["ctr"] = ctr_metrics([r["label"] for r in labelled], [r["p_yes"] for r in labelled]) if labelled else \
            {"samples": 0, "note": "no sample of this split has a CTR label"}
    out["baselines"] = {name: ranking_metrics(ranks) for name, ranks in baselines.items()}
    return out


def write_outputs(out_dir: str, rows: list[dict], metrics: dict, titles: list[str], header: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    cols = ["key", "user", "target", "candidates", "generated", "chosen", "valid", "correct", "score_rank", "score_top1",
            "p_yes", "label"]
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "candidates": " ".join(map(str, r["candidates"]))})
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(metrics, header))


def report_markdown(m: dict, header: str) -> str:
    lines = [f"# Evaluation\n\n{header}\n\n{m['samples']} samples.\n"]
    if "generate" in m:
        g = m["generate"]
        lines.append(f"Generation (LLaRA's protocol): ValidRatio {g['valid_ratio']:.4f}, HitRatio@1 "
                     f"{g['hr@1_of_valid']:.4f} (correct / valid, as LLaRA's code) and {g['hr@1_of_all']:.4f} (correct / all).\n")
    rankers = ([("LLM, candidate scoring", m["score"])] if "score" in m else []) + \
        [(f"baseline: {k}", v) for k, v in m["baselines"].items()]
    if rankers:
        lines.append("| ranking of the candidates | HR@1 | HR@5 | NDCG@5 |\n|---|---:|---:|---:|")
    for name, r in rankers:
        lines.append(f"| {name} | {r['hr@1']:.4f} | {r['hr@5']:.4f} | {r['ndcg@5']:.4f} |")
    if "ctr" in m and m["ctr"].get("samples"):
        c = m["ctr"]
        lines.append(f"\nCTR ({c['samples']} labelled samples): AUC {c['auc']:.4f}, log loss {c['log_loss']:.4f}, "
                     f"accuracy {c['accuracy']:.4f}")
    return "\n".join(lines) + "\n"


def eval_worker(config: dict) -> None:
    """Ray Train worker: evaluate this rank's share, gather on rank 0, write the outputs there."""
    import ray.train
    import ray.train.torch

    from shards.build import load_items, load_manifest
    from trainer.data import meta
    from trainer.srec import load_srec

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    paths, a = config["paths"], config["args"]
    # On GPU (launch/eval.py --gpu; written with the same care, but run only on CPU here): the worker's
    # GPU, the LLM and adapter read in --precision (auto: bf16 where the GPU has it, else fp16, as
    # training picks; LoRA stays fp32, as peft keeps it), the SRec in fp32 (the adapter casts its vectors).
    device = ray.train.torch.get_device() if a.get("gpu") else torch.device("cpu")  # the GPU Ray gave it
    on_gpu = device.type == "cuda"
    precision = resolve_precision(a["precision"], on_gpu, on_gpu and torch.cuda.is_bf16_supported(),
                                  option="--precision", gpu_option="--gpu")
    srec = load_srec(paths["srec"]).eval().requires_grad_(False).to(device)
    model, embed, tokenizer = load_model_for_eval(config["source"], paths, srec.hidden, TORCH_DTYPES[precision])
    model.to(device)
    manifest = load_manifest(paths["data"])
    titles = load_items(paths["data"])["titles"]
    samples = split_samples(paths, manifest, a["split"], a["max_samples"])
    ctr_data = manifest["params"].get("task", "llara") == "ctr"
    check_modes(manifest, a["modes"])
    mine = samples[rank::world]
    rows = model_rows(model, embed, srec, tokenizer, titles, mine, a["modes"], a["hybrid"], a["batch_size"],
                      a["max_new_tokens"], device)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
        assert len(rows) == len(samples) and len({r["key"] for r in rows}) == len(rows)  # each sample exactly once
        has_train = any(sh["split"] == "train" for sh in manifest["shards"]) and not ctr_data
        train_targets = [meta(s)["target"] for s in split_samples(paths, manifest, "train", -1)] if has_train else None
        if not has_train:
            log.warning("the data has no training split: no popularity baseline")
        # CTR samples have no candidates to rank: no ranking baselines
        baselines = {} if ctr_data else baseline_ranks(srec, sorted(samples, key=lambda s: s["key"]), train_targets,
                                                       manifest["num_items"], a["seed"])
        metrics = summarize(rows, baselines, a["modes"])
        metrics["source"] = {k: v for k, v in config["source"].items() if k != "config"}
        metrics["split"], metrics["prompts"] = a["split"], "hybrid" if a["hybrid"] else "text"
        metrics["precision"] = precision
        write_outputs(a["out"], rows, metrics, titles, config["header"].replace("{precision}", precision))
        log.info("wrote %s", a["out"])
    ray.train.report({"done": True})
