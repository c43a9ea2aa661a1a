"""All evaluation, for the end of training (trainer/train_loop.py) and for launch/eval.py.

Protocols, run per batch by `model_rows`:

    generate   LLaRA's: greedy generation through the injected embeddings, first line of the output.
               ValidRatio: the share of outputs naming exactly one candidate title. HitRatio@1 as
               LLaRA's public code defines it, correct / valid ("hr@1_of_valid"), and correct / all
               ("hr@1_of_all"); both are reported and labelled.
    score      the candidates ranked by the log-likelihood of their titles: HR@1, HR@5, NDCG@5
    ctr        P(yes) at the answer position on samples with a label: AUC, log loss, accuracy

and the baselines on the same candidates (the frozen SRec alone, popularity, random).

Each rank takes every world-th sample of the split (`rank_batches`: each sample exactly once); on a
ZeRO-3 engine every rank must run the same number of batches, since each forward gathers the
parameters collectively, so short batches are padded there. Rank 0 gathers the rows (`gather_rows`).

    evaluate_trained(...)   the end of training: on the DeepSpeed engine the workers trained
                            (trainer/train_loop.py writes <run>/eval/final_<split>/)
    eval_worker(job)        launch/eval.py: a whole model per worker (an export, a checkpoint's
                            partitions merged, or the untrained base), into <run>/eval/<what>_<split>/

Both write the same three files with write_outputs: metrics.json (summarize's numbers), predictions.csv
(one row per sample) and report.md (README "Evaluation" lists their fields).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shards.build import load_items, load_manifest
from trainer.data.loader import collate, meta, read_shard
from trainer.data.prepare import RunPaths
from trainer.evaluation.ranking import Popularity, Random, ranking_metrics, target_ranks
from trainer.evaluation.scoring import candidate_logliks, ctr_metrics, prompt_inputs, target_positions, yes_probability
from trainer.job.precision import TORCH_DTYPES, resolve_precision
from trainer.model.build import build_llara_model, load_tokenizer
from trainer.model.export import load_export, read_export_meta
from trainer.model.kernels.build import check_triton_compiler
from trainer.model.srec import load_srec

log = logging.getLogger("trainer.eval")
MODES = ("generate", "score", "ctr")


# ---- LLaRA's generation protocol

def first_line(text: str) -> str:
    text = text.lstrip()
    return text.split("\n", 1)[0].strip()


def judge(output: str, candidate_titles: list[str], target_title: str) -> tuple[bool, bool]:
    """(valid, correct): valid when exactly one candidate title occurs in the output's first line."""
    line = first_line(output)
    named = [t for t in candidate_titles if t in line]
    valid = len(named) == 1
    return valid, valid and named[0] == target_title


def llara_metrics(judgements: list[tuple[bool, bool]]) -> dict:
    n = len(judgements)
    valid = sum(v for v, _ in judgements)
    correct = sum(c for _, c in judgements)
    return {"samples": n, "valid_ratio": valid / n if n else 0.0,
            "hr@1_of_valid": correct / valid if valid else 0.0, "hr@1_of_all": correct / n if n else 0.0}


@torch.no_grad()
def generate(model, embed, srec, samples: list[dict], tokenizer, max_new_tokens: int, hybrid: bool,
             synced_gpus: bool, device) -> list[str]:
    """Greedy generation for a batch of samples (left-padded prompts); returns the decoded continuations."""
    batch = collate(samples, tokenizer.pad_token_id, left_pad=True, prompt_only=True)
    # hybrid: behaviour tokens injected; text: every placeholder, [UserEmb] included, becomes [PH]
    ids, ctx = prompt_inputs(embed, srec, batch, tokenizer.convert_tokens_to_ids("[PH]"), device, hybrid)
    with ctx:
        out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


# ---- samples, batches, rows

def is_ctr(manifest: dict) -> bool:
    return manifest["params"].get("task", "llara") == "ctr"  # manifests from before data.task are LLaRA's


def split_samples(paths: RunPaths, manifest: dict, split: str, max_samples: int) -> list[dict]:
    """The split's samples in shard order; the first max_samples of them when max_samples > 0."""
    samples = []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        samples.extend(read_shard(os.path.join(paths.data, shard["name"]), shard["count"]))
    if not samples:
        raise ValueError(f"the shards in {paths.data} have no {split!r} split")
    return samples[:max_samples] if max_samples > 0 else samples


def rank_batches(samples: list[dict], rank: int, world: int, batch_size: int, synced: bool) -> list[tuple[list, int]]:
    """This rank's share (every world-th sample) as (batch, number of real samples) pairs. synced: every
    rank gets the same number of batches, a short one filled up with copies of samples[0]."""
    mine = samples[rank::world]
    n_batches = math.ceil(math.ceil(len(samples) / world) / batch_size) if synced else math.ceil(len(mine) / batch_size)
    out = []
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        out.append((chunk + [samples[0]] * (batch_size - real) if synced else chunk, real))
    return out


def model_rows(model, embed, srec, tokenizer, titles, batches, modes, hybrid: bool, max_new_tokens: int, device,
               synced_gpus: bool = False, compare: bool = False, candidates_per_pass: int = 5) -> list[dict]:
    """One row per real sample of `batches` with what each mode gave; with `compare`, also the target's
    rank among the candidates by likelihood with hybrid and with text-only prompts (score_rank_hybrid,
    score_rank_text), whatever `hybrid` says."""
    rows = []
    for chunk, real in batches:
        ms = [meta(s) for s in chunk]
        part = [{"key": s["key"], "user": m["user"], "target": m["target"], "candidates": m["candidates"]}
                for s, m in zip(chunk, ms)]
        if "generate" in modes:
            outs = generate(model, embed, srec, chunk, tokenizer, max_new_tokens, hybrid, synced_gpus, device)
            for r, out, m in zip(part, outs, ms):
                valid, correct = judge(out, [titles[c] for c in m["candidates"]], titles[m["target"]])
                named = [c for c in m["candidates"] if titles[c] in first_line(out)]
                r.update(output=out, generated=first_line(out), chosen=named[0] if valid else None, valid=valid,
                         correct=correct)
        scorings = ([("score_rank", hybrid)] if "score" in modes else []) + \
            ([("score_rank_hybrid", True), ("score_rank_text", False)] if compare else [])
        for key, prompts in scorings:
            ll = candidate_logliks(model, embed, srec, chunk, tokenizer, titles, prompts, device, candidates_per_pass)
            for r, rank, row, m in zip(part, target_ranks(ll, target_positions(ms)).tolist(), ll, ms):
                r[key] = rank
                if key == "score_rank":
                    r["score_top1"] = m["candidates"][int(row.argmax())]
        if "ctr" in modes and all("label" in m for m in ms):
            for r, p, m in zip(part, yes_probability(model, embed, srec, chunk, tokenizer, hybrid, device).tolist(), ms):
                r.update(p_yes=p, label=int(m["label"]))
        rows.extend(part[:real])
    return rows


def gather_rows(rows: list[dict], world: int) -> list[dict] | None:
    """Every rank's rows on rank 0, sorted by sample key (each sample exactly once); None elsewhere."""
    if world == 1:
        return sorted(rows, key=lambda r: r["key"])
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() != 0:
        return None
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
    if len({r["key"] for r in rows}) != len(rows):
        raise RuntimeError("a sample was evaluated twice: the ranks' shares overlap")
    return rows


# ---- baselines and metrics

def baseline_ranks(srec, samples: list[dict], train_targets: list[int] | None, num_items: int, seed: int) -> dict:
    """The target's rank among each sample's candidates for the SRec alone, popularity and random."""
    ms = [meta(s) for s in samples]
    cands = torch.as_tensor([m["candidates"] for m in ms])
    tgt = target_positions(ms)
    device = next(srec.parameters()).device  # the SRec stays where it is (a worker's GPU); its inputs go to it
    with torch.no_grad():
        history, lengths = srec.pad([m["history"] for m in ms])
        srec_scores = srec.scores(history.to(device), lengths.to(device)).cpu().gather(1, cands)
    out = {"srec": target_ranks(srec_scores, tgt)}
    baselines = {"random": Random(num_items, seed)}
    if train_targets is not None:
        baselines["popularity"] = Popularity(train_targets, num_items)
    for name, scorer in baselines.items():  # scored over every item (1024 samples at a time), read on the candidates
        scores = torch.cat([scorer.scores(*scorer.pad([m["history"] for m in ms[i:i + 1024]])).gather(1, cands[i:i + 1024])
                            for i in range(0, len(ms), 1024)]) if ms else torch.zeros(cands.shape)
        out[name] = target_ranks(scores, tgt)
    return out


def run_baselines(paths: RunPaths, manifest: dict, srec, samples: list[dict], seed: int) -> dict:
    """baseline_ranks on the samples in key order, popularity counted on the run's training split (if any)."""
    has_train = any(s["split"] == "train" for s in manifest["shards"])
    if not has_train:
        log.warning("the data has no training split: no popularity baseline")
    train_targets = [meta(s)["target"] for s in split_samples(paths, manifest, "train", -1)] if has_train else None
    return baseline_ranks(srec, sorted(samples, key=lambda s: s["key"]), train_targets, manifest["num_items"], seed)


SCORINGS = {"score_rank": "score", "score_rank_hybrid": "score_hybrid", "score_rank_text": "score_text"}


def summarize(rows: list[dict], baselines: dict, modes) -> dict:
    """metrics.json's numbers, the same for the end of training and launch/eval.py (README "Evaluation")."""
    out = {"samples": len(rows)}
    if "generate" in modes:
        out["generate"] = llara_metrics([(r["valid"], r["correct"]) for r in rows])
    for key, name in SCORINGS.items():  # candidate scoring: with the run's prompts, or both (eval.compare)
        if (key == "score_rank" and "score" in modes) or (rows and key in rows[0]):
            out[name] = ranking_metrics(torch.as_tensor([r[key] for r in rows]))
    labelled = [r for r in rows if "p_yes" in r]
    if "ctr" in modes:
        out["ctr"] = ctr_metrics([r["label"] for r in labelled], [r["p_yes"] for r in labelled]) if labelled else \
            {"samples": 0, "note": "no sample of this split has a CTR label"}
    out["baselines"] = {name: ranking_metrics(ranks) for name, ranks in baselines.items()}
    return out


# ---- the end of training

def evaluate_trained(engine, embed, srec, tokenizer, paths: RunPaths, manifest: dict, cfg, rank: int, world: int,
                     device, hybrid: bool) -> tuple[list[dict] | None, dict]:
    """The trained engine on eval.split (collective: every rank calls it): rank 0 gets (rows, metrics),
    as summarize gives them (generation, or CTR; with eval.compare also the candidates ranked by
    likelihood with hybrid and with text-only prompts, next to the baselines); the other ranks (None, {})."""
    titles = load_items(paths.data)["titles"]
    samples = split_samples(paths, manifest, cfg.eval.split, cfg.eval.max_samples)
    ctr = is_ctr(manifest)
    compare = bool(cfg.eval.compare) and not ctr
    modes = ("ctr",) if ctr else ("generate",)
    engine.eval()
    batches = rank_batches(samples, rank, world, cfg.eval.batch_size, synced=True)
    rows = model_rows(engine.module, embed, srec, tokenizer, titles, batches, modes, hybrid, cfg.eval.max_new_tokens,
                      device, synced_gpus=world > 1, compare=compare, candidates_per_pass=cfg.eval.candidates_per_pass)
    rows = gather_rows(rows, world)
    if rows is None:
        return None, {}
    baselines = run_baselines(paths, manifest, srec, samples, cfg.seed) if compare else {}
    return rows, summarize(rows, baselines, modes)


# ---- launch/eval.py's workers

@dataclass
class EvalJob:
    """What launch/eval.py asks every evaluation worker to do."""
    paths: RunPaths
    source: dict           # {"export": dir} | {"checkpoint": dir, "config": ...} | {"zero_shot": True, "config": ...}
    split: str
    modes: list
    hybrid: bool
    max_samples: int
    batch_size: int
    max_new_tokens: int
    candidates_per_pass: int
    seed: int
    out: str
    gpu: bool
    precision: str
    threads: int
    header: str            # the report's first line; {precision} is filled in by the workers


def load_model_for_eval(source: dict, paths: RunPaths, srec_dim: int, dtype: torch.dtype = torch.float32):
    """(model, hybrid embedding, tokenizer) from {"export": dir}, {"checkpoint": dir, "config": run config}
    or {"zero_shot": True, "config": prepared config} (the base LLM, nothing trained).

    A checkpoint's ZeRO partitions are merged with DeepSpeed's zero_to_fp32 reader, which unpickles
    DeepSpeed's own files (torch.load with weights_only=False): point it only at checkpoints your
    runs wrote. The merged weights must cover every trainable parameter of the rebuilt model."""
    if "export" in source:

        injection = read_export_meta(source["export"]).get("injection", "fused")  # exports before model.injection
        return load_export(source["export"], paths.llm, srec_dim, injection, dtype)

    run_cfg = source["config"]
    user_token = bool(run_cfg["data"].get("user_token", False))  # runs from before data.user_token had none
    tokenizer = load_tokenizer(paths.tokenizer, user_token)
    model, embed = build_llara_model(paths.llm, srec_dim, run_cfg["model"]["lora"],
                                     unfreeze=run_cfg["model"]["unfreeze"], seed=run_cfg["seed"],
                                     injection=run_cfg["model"]["injection"], user_token=user_token, dtype=dtype,
                                     vocab_size=len(tokenizer))
    if source.get("zero_shot"):  # LoRA starts as the identity; the adapter is its seeded initialisation
        return model.eval(), embed, tokenizer
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: reads DS_ACCELERATOR on import

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
    return model.eval(), embed, tokenizer


def check_modes(manifest: dict, modes) -> None:
    """CTR shards (data.task=ctr) have no candidates: only the ctr mode applies to them."""
    if is_ctr(manifest):
        bad = [m for m in modes if m != "ctr"]
        if bad:
            raise ValueError(f"mode(s) {', '.join(bad)} rank candidates, but these shards hold CTR samples "
                             "(data.task=ctr, no candidates): use --modes ctr")


def eval_worker(config: dict) -> None:
    """Ray Train worker of launch/eval.py: evaluate this rank's share, gather on rank 0, write there."""
    import ray.train  # lazy: only where a cluster is used
    import ray.train.torch  # lazy: only where a cluster is used

    job: EvalJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # On GPU (--gpu; written with the same care, but run only on CPU here): the worker's GPU, the LLM and
    # adapter read in --precision (auto: bf16 where the GPU has it, else fp16, as training picks; on CPU
    # fp32 unless asked: DeepSpeed's CPU accelerator runs bf16 and fp16 too), LoRA in it as well
    # (trainer/job/precision.py), the SRec in fp32 (the adapter casts its vectors).
    device = ray.train.torch.get_device() if job.gpu else torch.device("cpu")  # the GPU Ray gave it
    on_gpu = device.type == "cuda"
    precision = resolve_precision(job.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported(),
                                  option="--precision")
    srec = load_srec(job.paths.srec).eval().requires_grad_(False).to(device)
    model, embed, tokenizer = load_model_for_eval(job.source, job.paths, srec.hidden, TORCH_DTYPES[precision])
    if on_gpu and embed.injection == "fused":  # its Triton kernels need a C compiler here: said before the first batch
        check_triton_compiler()
    model.to(device)
    manifest = load_manifest(job.paths.data)
    titles = load_items(job.paths.data)["titles"]
    samples = split_samples(job.paths, manifest, job.split, job.max_samples)
    check_modes(manifest, job.modes)
    batches = rank_batches(samples, rank, world, job.batch_size, synced=False)  # a whole model per worker
    rows = gather_rows(model_rows(model, embed, srec, tokenizer, titles, batches, job.modes, job.hybrid,
                                  job.max_new_tokens, device, candidates_per_pass=job.candidates_per_pass), world)
    if rows is not None:
        assert len(rows) == len(samples)  # each sample exactly once
        # CTR samples have no candidates to rank: no ranking baselines
        baselines = {} if is_ctr(manifest) else run_baselines(job.paths, manifest, srec, samples, job.seed)
        metrics = summarize(rows, baselines, job.modes)
        metrics["source"] = {k: v for k, v in job.source.items() if k != "config"}
        metrics["split"], metrics["prompts"] = job.split, "hybrid" if job.hybrid else "text"
        metrics["precision"] = precision
        write_outputs(job.out, rows, metrics, job.header.replace("{precision}", precision))
        log.info("wrote %s", job.out)
    ray.train.report({"done": True})


# ---- reports

def write_outputs(out_dir: str, rows: list[dict], metrics: dict, header: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    cols = ["key", "user", "target", "candidates", "output", "generated", "chosen", "valid", "correct", "score_rank",
            "score_top1", "score_rank_hybrid", "score_rank_text", "p_yes", "label"]
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
    names = {"score": "LLM, candidate scoring", "score_hybrid": "LLM, hybrid prompts", "score_text": "LLM, text-only prompts"}
    rankers = [(label, m[key]) for key, label in names.items() if key in m] + \
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
