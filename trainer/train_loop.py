"""The training loop: what every Ray Train worker runs.

    train_worker(config)
      1. join the process group Ray set up; DeepSpeed reuses it
      2. load the frozen SRec, the LLM + hybrid embedding + LoRA, wrap them in a DeepSpeed ZeRO engine
      3. resume from the newest complete checkpoint in <output_dir>/checkpoints, if any
      4. for each optimizer step: the curriculum says hybrid or text-only; stream this rank's
         micro-batches, SRec vectors of the batch's unique items -> adapter -> injected embeddings,
         loss on the answer tokens, backward, step
      5. checkpoint every N steps and at the end; evaluate on eval.split (HR@1 / ValidRatio, or CTR
         AUC / log loss / accuracy)

A sample's path: shards/build.py wrote it as token ids + placeholder positions; trainer/data.py
streams and pads it (slot_map says which unique item fills which position); here the SRec gives
the items' vectors; trainer/model/hybrid_embedding.py writes adapter(vector) at those positions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from trainer.collectives import all_reduce_scalar, any_rank
from trainer.ds_config import deepspeed_config
from trainer.precision import TORCH_DTYPES, resolve_precision

log = logging.getLogger("trainer")


def _setup_env(cfg) -> None:
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("ray", "ray.train", "deepspeed", "DeepSpeed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # some of Ray's loggers are named by their file's path (Ray Train's "Reporting training result ..."
    # line on every report), so no name above covers them: their info lines are dropped by where they come from
    import ray

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.pathname.startswith(ray_dir))


def _mean_over_ranks(x: float) -> float:
    return all_reduce_scalar(x) / dist.get_world_size()


PHASES = ("data", "forward", "backward", "optimizer")

# Ray Train's controller takes one report per worker each RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default; the worker's queue holds one), and a report made before the previous one was taken blocks
# the step until it is: with a report every 10 steps of 0.13 s that was ~0.7 s per report here, +50%
# on the step time. Metrics-only reports are therefore spaced by at least twice that interval (every
# step's record is in metrics.jsonl and TensorBoard anyway); checkpoint reports are never skipped.
RAY_REPORT_EVERY_S = 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


def _lap(phases: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] += now - since
    return now


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels != -100). A micro-batch of only
    fillers has no answer token: its loss is 0 and still carries a graph, so every rank runs backward."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def step_loss(engine, embed, srec, batch: dict, hybrid: bool, ph_id: int, device) -> torch.Tensor:
    """Forward one micro-batch; loss on the answer tokens only (labels are -100 elsewhere)."""
    from trainer.data import user_states
    ids = batch["input_ids"].to(device)
    slot_map = batch["slot_map"].to(device)
    attention = batch["attention_mask"].to(device)
    if not hybrid:
        # Text-only: placeholders become the plain [PH] token and no behaviour row is written. The
        # adapter still runs on one zero row that no position uses, so its gradient is an exact
        # zero: DeepSpeed would otherwise keep the previous step's gradient for parameters that took
        # no part in a step and apply it again (seen here as a resume that drifted from the
        # uninterrupted run after text-only steps).
        # The same holds for the user adapter (data.user_token), which also runs on a zero row; the
        # [UserEmb] position is in the slot map, so it becomes [PH] like the item placeholders.
        text_ids = torch.where(slot_map >= 0, torch.full_like(ids, ph_id), ids)
        zero = torch.zeros(1, srec.hidden, device=device)
        with embed.inject(torch.full_like(ids, -1), zero, zero if embed.user_adapter is not None else None):
            logits = engine(input_ids=text_ids, attention_mask=attention).logits
    else:
        with torch.no_grad():
            vectors = srec.item_vectors(batch["unique_items"].to(device))  # one call per batch, unique items
            users = user_states(srec, batch, device) if embed.user_adapter is not None else None  # one call per batch
        with embed.inject(slot_map, vectors, users):
            logits = engine(input_ids=ids, attention_mask=attention).logits
    return answer_loss(logits, batch["labels"].to(device))


def _truncate_metrics(path: str, step: int) -> None:
    """After a resume from `step`, drop the log lines of steps the interrupted run did after it."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _tensorboard(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (metrics.jsonl is still written)")
        return None
    return SummaryWriter(os.path.join(log_dir, "tensorboard"))


def _plot_losses(metrics_file: str, out_png: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve PNG")
        return
    with open(metrics_file) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def resume_tag(reported, root: str) -> tuple[str | None, str]:
    """The checkpoint to resume from: the one last reported to Ray (what a FailureConfig restart is
    handed), if it is complete; else the newest complete one in the output folder (a new run of the
    same command, or a report that never reached Ray)."""
    from trainer.checkpoint import COMPLETE, find_latest

    if reported is not None:
        path = os.path.realpath(reported.path)
        if os.path.dirname(path) == os.path.realpath(root) and os.path.exists(os.path.join(path, COMPLETE)):
            return os.path.basename(path), "the checkpoint reported to Ray"
        log.warning("the checkpoint Ray handed over (%s) is not a complete checkpoint of %s: ignoring it", reported.path, root)
    return find_latest(root), "the newest complete checkpoint in the output folder"


def report_checkpoint(metrics: dict, root: str, step: int, is_main: bool) -> None:
    """Register a saved checkpoint with Ray Train (every rank calls this; rank 0 passes the folder).
    It already lies in the run's storage (RunConfig storage_path=output_dir, name="checkpoints"), so
    nothing is copied. Ray keeps the newest train.keep_last (CheckpointConfig) and deletes older ones:
    Ray's run snapshot must never name a folder that is gone, or the next run in this output folder
    (a resume) would be refused by Ray."""
    import ray.train

    from trainer.checkpoint import tag_for

    ckpt = ray.train.Checkpoint.from_directory(os.path.join(root, tag_for(step))) if is_main else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=tag_for(step),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = OmegaConf.create(config["cfg"])
    paths = config["paths"]
    _setup_env(cfg)
    import deepspeed

    from shards.build import check_manifest, load_manifest
    from trainer import signals
    from trainer.checkpoint import load_checkpoint, save_checkpoint, tag_for
    from trainer.export import export_model
    from trainer.curriculum import is_hybrid, warmup_cosine
    from trainer.data import SplitReader, rank_loader
    from trainer.model.build import build_llara_model, load_tokenizer
    from trainer.srec import load_srec, srec_hash

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    # on GPU: the GPU Ray gave this worker (its index among the visible devices, which need not be the
    # local rank), made DeepSpeed's device too (below); not run here (no GPU)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, cfg.train.use_gpu,
                                  cfg.train.use_gpu and torch.cuda.is_bf16_supported())
    is_main = rank == 0
    import ray

    log.info("rank %d of %d on Ray node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), os.uname().nodename)

    # ---- data, SRec, model
    manifest = load_manifest(paths["data"])
    check_manifest(paths["data"], manifest, paths["llm"], verify_sha=False)  # sha256s: once, by the driver
    user_token = bool(cfg.data.user_token)
    if bool(manifest["params"].get("user_token", False)) != user_token:
        raise ValueError(f"data.user_token={user_token} but the shards in {paths['data']} were built with "
                         f"user_token={manifest['params'].get('user_token', False)}: rebuild them")
    tokenizer = load_tokenizer(paths["llm"], user_token)
    ph_id = tokenizer.convert_tokens_to_ids("[PH]")
    srec = load_srec(paths["srec"]).to(device).eval().requires_grad_(False)  # frozen, outside the engine
    if srec.num_items != manifest["num_items"]:
        raise ValueError(f"the SRec at {paths['srec']} knows {srec.num_items} items, the shards' vocabulary has "
                         f"{manifest['num_items']}: refusing to start")
    model, embed = build_llara_model(paths["llm"], srec.hidden, OmegaConf.to_container(cfg.model.lora),
                                      unfreeze=list(cfg.model.unfreeze), seed=cfg.seed,
                                      injection=cfg.model.injection, user_token=user_token,
                                      dtype=TORCH_DTYPES[precision])  # loaded in it: a 7B is 14 GB per worker, not 28

    t = cfg.train
    reader = SplitReader(paths["data"], [s for s in manifest["shards"] if s["split"] == "train"], rank, world,
                         t.micro_batch, cfg.seed, shuffle=True, grad_accum=t.grad_accum)
    if reader.num_samples == 0:
        raise ValueError(f"no training samples in {paths['data']}")
    steps_per_epoch = reader.batches_per_epoch() // t.grad_accum
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    warmup = max(1, int(t.warmup_ratio * total_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # count before ZeRO-3 partitions them to shape (0,)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    ds_config = deepspeed_config(cfg, precision)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        args=SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup)),
    )
    if is_main:
        log.info("global batch %d = micro %d x accumulation %d x workers %d; %d steps (%d per epoch); "
                 "ZeRO stage %d; %d trainable parameters", t.micro_batch * t.grad_accum * world, t.micro_batch,
                 t.grad_accum, world, total_steps, steps_per_epoch, t.zero_stage, n_trainable)
        os.makedirs(paths["logs"], exist_ok=True)
        with open(os.path.join(paths["logs"], "deepspeed_config.json"), "w") as f:  # what the engine was given
            json.dump(ds_config, f, indent=1)
        if cfg.train.get("deepspeed"):
            log.info("DeepSpeed config with train.deepspeed merged in: %s", json.dumps(ds_config))

    # ---- resume
    state = {"global_step": 0, "epoch": 0, "position": 0, "hybrid_steps": 0}
    tag, source = resume_tag(ray.train.get_checkpoint(), paths["checkpoints"])
    if tag:
        with open(os.path.join(paths["checkpoints"], tag, "trainer_state.json")) as f:
            saved_world = json.load(f)["world_size"]
        if saved_world != world:  # checked before DeepSpeed reads partitions made for another world size
            raise ValueError(f"checkpoint {tag} was written by {saved_world} workers, this run has {world}; "
                             f"resume with train.num_workers={saved_world}")
        state = load_checkpoint(engine, paths["checkpoints"], tag, rank)
        if is_main:
            log.info("resumed from %s (%s): step %d, epoch %d, position %d", tag, source, state["global_step"],
                     state["epoch"], state["position"])
            _truncate_metrics(os.path.join(paths["logs"], "metrics.jsonl"), state["global_step"])

    def trainer_state() -> dict:
        return {**state, "world_size": world, "total_steps": total_steps, "config": OmegaConf.to_container(cfg),
                "manifest_hash": manifest["config_hash"], "srec_sha256": srec_hash(paths["srec"])}

    # ---- train
    os.makedirs(paths["logs"], exist_ok=True)
    with open(os.path.join(paths["logs"], f"worker_{rank}.pid"), "w") as f:  # for operators (and tests) to signal
        f.write(str(os.getpid()))
    metrics_file = os.path.join(paths["logs"], "metrics.jsonl")
    tb = _tensorboard(paths["logs"]) if is_main else None
    tokens_since = 0
    engine.train()
    signals.training(True)  # from here a SIGTERM to this worker finishes the step and checkpoints
    step_losses, t0, samples_since = [], time.time(), 0
    # Where a step's time goes, summed since the last logged step (host time: on CUDA the kernels run
    # asynchronously, so there the split shows launch cost and waits, not GPU time; verified on CPU).
    phases, steps_since = dict.fromkeys(PHASES, 0.0), 0
    last_report = time.monotonic()
    last_saved = state["global_step"] if tag else -1
    global_batch = world * t.micro_batch  # samples (fillers included) consumed per micro-step
    while state["global_step"] < total_steps:
        tick = time.perf_counter()
        for batch in rank_loader(reader, state["epoch"], state["position"], tokenizer.pad_token_id, cfg.data.loader_workers):
            tick = _lap(phases, "data", tick)
            hybrid = is_hybrid(t.mode, state["global_step"], total_steps, cfg.seed)
            loss = step_loss(engine, embed, srec, batch, hybrid, ph_id, device)
            tick = _lap(phases, "forward", tick)
            engine.backward(loss)
            tick = _lap(phases, "backward", tick)
            engine.step()
            step_losses.append(loss.item())
            tick = _lap(phases, "optimizer", tick)
            state["position"] += global_batch
            samples_since += global_batch
            tokens_since += int(batch["attention_mask"].sum()) * world
            if state["position"] % (t.grad_accum * global_batch):
                continue
            # ---- an optimizer step has finished
            state["global_step"] += 1
            steps_since += 1
            state["hybrid_steps"] += int(hybrid)
            step = state["global_step"]
            mean_loss = _mean_over_ranks(sum(step_losses) / len(step_losses))
            step_losses = []
            record = {"step": step, "loss": mean_loss, "lr": engine.get_lr()[0], "hybrid": hybrid,
                      "hybrid_share": state["hybrid_steps"] / step, "epoch": state["epoch"]}
            logging_step = step % t.log_every == 0 or step == total_steps
            if logging_step:  # throughput over the steps since the last logged one
                elapsed = time.time() - t0
                record["samples_per_s"] = samples_since / elapsed
                record["tokens_per_s"] = tokens_since / elapsed
                # ms per optimizer step: data, forward, backward, optimizer, and the rest (the loss
                # all-reduce, metrics, stop checks, Ray reports, checkpoints) as "other"
                per_step = {k: 1e3 * v / steps_since for k, v in phases.items()}
                per_step["other"] = 1e3 * elapsed / steps_since - sum(per_step.values())
                record.update({f"{k}_ms": round(v, 3) for k, v in per_step.items()})
                t0, samples_since, tokens_since = time.time(), 0, 0
                phases, steps_since = dict.fromkeys(PHASES, 0.0), 0
            if is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if logging_step:
                if is_main:
                    log.info("step %d/%d | loss %.4f | lr %.2e | %.1f samples/s | %.0f tokens/s | hybrid %.0f%% | "
                             "ms/step: data %.1f, fwd %.1f, bwd %.1f, optim %.1f, other %.1f", step, total_steps, mean_loss,
                             record["lr"], record["samples_per_s"], record["tokens_per_s"], 100 * record["hybrid_share"],
                             *(record[f"{k}_ms"] for k in (*PHASES, "other")))
                    if tb:
                        for k in ("loss", "lr", "hybrid_share", "samples_per_s", "tokens_per_s"):
                            tb.add_scalar(f"train/{k}", record[k], step)
            # a stop request (signal or STOP file) seen by any rank stops every rank after this step; a
            # metrics report to Ray is due when rank 0's clock says so (every rank reports, or none)
            report_due = logging_step and is_main and time.monotonic() - last_report >= RAY_REPORT_EVERY_S
            stop, report_due = any_rank(signals.requested(paths["output_dir"]), report_due)
            checkpointing = step % t.checkpoint_every == 0 or step == total_steps or stop
            if report_due and not checkpointing:  # a checkpoint's report carries the record
                ray.train.report(record)
                last_report = time.monotonic()
            if checkpointing:
                save_checkpoint(engine, paths["checkpoints"], step, trainer_state(), rank, keep_last=0)
                report_checkpoint(record, paths["checkpoints"], step, is_main)
                last_saved, last_report = step, time.monotonic()
            if stop:
                if is_main:
                    log.info("stop requested: checkpoint %s written at step %d; run again to resume", tag_for(step), step)
                    with open(os.path.join(paths["output_dir"], signals.PREEMPTED_FILE), "w") as f:
                        f.write(tag_for(step))
                signals.training(False)
                return
            if step >= total_steps:
                break
            tick = time.perf_counter()  # the bookkeeping above is "other"; the next wait is "data"
        if state["global_step"] < total_steps:  # the epoch is used up (fillers included)
            state["epoch"] += 1
            state["position"] = 0
    signals.training(False)
    if last_saved != state["global_step"]:
        save_checkpoint(engine, paths["checkpoints"], state["global_step"], trainer_state(), rank, keep_last=0)
        report_checkpoint({"step": state["global_step"]}, paths["checkpoints"], state["global_step"], is_main)
    if is_main:
        if tb:
            tb.close()
        _plot_losses(metrics_file, os.path.join(paths["logs"], "loss.png"))
    export_model(engine.module, tokenizer, os.path.join(paths["output_dir"], "export"), rank,
                 {"step": state["global_step"], "srec_sha256": srec_hash(paths["srec"]), "base": paths["llm"],
                  "srec": paths["srec"], "injection": cfg.model.injection})

    # ---- evaluate
    result = evaluate_on_workers(engine, embed, srec, tokenizer, paths, manifest, cfg, rank, world, device,
                                 hybrid=t.mode != "text")
    if is_main:
        result.update({"step": state["global_step"], "mode": t.mode, "checkpoint": tag_for(state["global_step"])})
        os.makedirs(paths["eval"], exist_ok=True)
        for out in (os.path.join(paths["eval"], f"{cfg.eval.split}_metrics.json"),
                    os.path.join(paths["checkpoints"], tag_for(state["global_step"]), f"{cfg.eval.split}_metrics.json")):
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
        if "auc" in result:
            log.info("%s: CTR AUC %.4f, log loss %.4f, accuracy %.4f on %d samples", cfg.eval.split,
                     result["auc"], result["log_loss"], result["accuracy"], result["samples"])
        else:
            log.info("%s: HR@1 %.4f (of valid) / %.4f (of all), ValidRatio %.4f on %d samples", cfg.eval.split,
                     result["hr@1_of_valid"], result["hr@1_of_all"], result["valid_ratio"], result["samples"])
    ray.train.report({"done": True, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})


def evaluate_on_workers(engine, embed, srec, tokenizer, paths, manifest, cfg, rank, world, device, hybrid) -> dict:
    """Each rank generates for its share of the split (the same number of batches on every rank, since
    ZeRO-3 gathers parameters collectively); rank 0 gathers the judgements and computes the metrics."""
    from shards.build import load_items
    from trainer.data import meta, read_shard
    from trainer.evaluate import generate, judge, llara_metrics
    from trainer.scoring import candidate_logliks, target_positions, target_ranks

    titles = load_items(paths["data"])["titles"]
    os.makedirs(paths["eval"], exist_ok=True)
    samples = []
    for shard in (s for s in manifest["shards"] if s["split"] == cfg.eval.split):
        samples.extend(read_shard(os.path.join(paths["data"], shard["name"]), shard["count"]))
    if cfg.eval.max_samples > 0:
        samples = samples[: cfg.eval.max_samples]
    mine = samples[rank::world]
    per_rank = math.ceil(len(samples) / world)
    bs = cfg.eval.batch_size
    n_batches = math.ceil(per_rank / bs)
    engine.eval()
    score_ranks = []
    if manifest["params"].get("task", "llara") == "ctr":  # ReLLa: P(yes) -> AUC, log loss, accuracy
        return _ctr_eval(engine, embed, srec, tokenizer, samples, mine, n_batches, bs, rank, world, device, hybrid)
    judgements = []
    for b in range(n_batches):
        chunk = mine[b * bs:(b + 1) * bs]
        real = len(chunk)
        chunk = chunk + [samples[0]] * (bs - real) if real < bs else chunk  # keep collectives in step
        outputs = generate(engine.module, embed, srec, chunk, tokenizer, cfg.eval.max_new_tokens, hybrid,
                           synced_gpus=world > 1, device=device)
        for s, out in zip(chunk[:real], outputs[:real]):
            judgements.append((s["key"], out, *judge(out, [titles[c] for c in meta(s)["candidates"]], titles[meta(s)["target"]])))
        if cfg.eval.compare:  # candidate scoring of the same model with hybrid and with text-only prompts
            tgt = target_positions([meta(s) for s in chunk])
            for prompts in ("hybrid", "text"):
                ll = candidate_logliks(engine.module, embed, srec, chunk, tokenizer, titles, prompts == "hybrid", device)
                for s, r in zip(chunk[:real], target_ranks(ll, tgt)[:real].tolist()):
                    score_ranks.append((s["key"], prompts, r))
    gathered = [None] * world
    dist.all_gather_object(gathered, (judgements, score_ranks))
    if rank != 0:
        return {}
    rows = sorted(j for part, _ in gathered for j in part)
    with open(os.path.join(paths["eval"], f"{cfg.eval.split}_predictions.jsonl"), "w") as f:
        for key, out, valid, correct in rows:
            f.write(json.dumps({"key": key, "output": out, "valid": valid, "correct": correct}) + "\n")
    result = llara_metrics([(v, c) for _, _, v, c in rows])
    if cfg.eval.compare:
        result["compare"] = compare_table(paths, manifest, srec, samples, [r for _, part in gathered for r in part], cfg.seed)
    return result


def compare_table(paths, manifest, srec, samples, score_ranks, seed) -> dict:
    """HR@1 / HR@5 / NDCG@5 on the same candidates: the LLM by candidate scoring with hybrid and with
    text-only prompts, the frozen SRec alone, popularity and random (trainer/eval_loop.py)."""
    from trainer.data import meta
    from trainer.eval_loop import baseline_ranks, split_samples
    from trainer.scoring import ranking_metrics

    out = {}
    for prompts in ("hybrid", "text"):
        out[f"llm_{prompts}"] = ranking_metrics(torch.as_tensor([r for _, p, r in sorted(score_ranks) if p == prompts]))
    train_targets = [meta(s)["target"] for s in split_samples(paths, manifest, "train", -1)]
    ordered = sorted(samples, key=lambda s: s["key"])
    for name, ranks in baseline_ranks(srec, ordered, train_targets, manifest["num_items"], seed).items():
        out[name] = ranking_metrics(ranks)
    return out


def _ctr_eval(engine, embed, srec, tokenizer, samples, mine, n_batches, bs, rank, world, device, hybrid) -> dict:
    """evaluate_on_workers for CTR shards: P(yes) per sample, the same number of batches on every rank."""
    from trainer.data import meta
    from trainer.scoring import ctr_metrics, yes_probability

    rows = []
    for b in range(n_batches):
        chunk = mine[b * bs:(b + 1) * bs]
        real = len(chunk)
        chunk = chunk + [samples[0]] * (bs - real) if real < bs else chunk  # keep collectives in step
        p = yes_probability(engine.module, embed, srec, chunk, tokenizer, hybrid, device).tolist()
        rows.extend((s["key"], p[i], int(meta(s)["label"])) for i, s in enumerate(chunk[:real]))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank != 0:
        return {}
    rows = sorted(r for part in gathered for r in part)
    return {"task": "ctr", **ctr_metrics([r[2] for r in rows], [r[1] for r in rows])}
