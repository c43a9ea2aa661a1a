"""The training job: what each Ray Train worker runs (launch/train.py starts train.num_workers of them).

    train_worker(config)
      setup            join the process group Ray set up (DeepSpeed reuses it), load the frozen SRec,
                       build the LLM + hybrid embedding + LoRA, wrap them in a DeepSpeed ZeRO engine,
                       open this rank's stream of the training shards
      resume           restore the newest complete checkpoint, if any: weights, optimizer, scheduler,
                       RNG, reader position (written by another number of workers: trainer/job/trainable_state.py);
                       none, and model.init_from given: start from that finished run's trained weights
      train            the loop: per optimizer step the curriculum says hybrid or text-only; per
                       micro-batch the SRec's vectors of the batch's unique items -> adapter ->
                       injected embeddings, loss on the answer tokens (train.objective=sdpo: the true
                       item's answer against k negatives', trainer/objectives/), backward, step; after each
                       optimizer step: log, report to Ray, checkpoint, stop when asked
      save_checkpoint  every train.checkpoint_every steps, on a stop request and at the end
      finish           the last checkpoint, the loss plot, the export, then evaluate (eval.split)

What it does not do: build data or assets (trainer/data/prepare.py, on the driver, before the workers
start), start Ray (trainer/job/ray_cluster.py).

A sample's path: shards/build.py wrote it as token ids + placeholder positions; trainer/data/loader.py
streams and pads it (slot_map says which unique item fills which position); here the SRec gives
the items' vectors; trainer/model/hybrid_embedding.py writes adapter(vector) at those positions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
import torch.distributed as dist

import trainer.job.checkpoint as ckpt
from shards.build import check_manifest, load_items, load_manifest
from shards.collectives import all_reduce_sums, any_rank
from shards.prompts import answer_token_ids, llara_answer
from trainer.data.curriculum import is_hybrid, warmup_cosine
from trainer.data.loader import SplitReader, rank_loader, user_states
from trainer.data.prepare import RunPaths
from trainer.evaluation.evaluate import evaluate_trained, write_outputs
from trainer.job import signals, trainable_state
from trainer.job.ds_config import deepspeed_config
from trainer.job.flops import model_shape, peak_flops, peak_memory_gib, throughput_flops
from trainer.job.precision import TORCH_DTYPES, resolve_precision
from trainer.model.build import build_llara_model, load_tokenizer, partitioned_loading
from trainer.model.export import export_model
from trainer.model.kernels.build import check_triton_compiler
from trainer.model.srec import load_srec, srec_hash
from trainer.objectives import reference
from trainer.objectives.sdpo import SDPO_LOGGED, draw_negatives, sdpo_step_loss

log = logging.getLogger("trainer")

PHASES = ("data", "forward", "backward", "optimizer")

# Ray Train's controller takes one report per worker each RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default; the worker's queue holds one), and a report made before the previous one was taken blocks
# the step until it is: with a report every 10 steps of 0.13 s that was ~0.7 s per report here, +50%
# on the step time. Metrics-only reports are therefore spaced by at least twice that interval (every
# step's record is in metrics.jsonl and TensorBoard anyway); checkpoint reports are never skipped.
RAY_REPORT_EVERY_S = 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


@dataclass
class Run:
    """What a worker holds for the job: built by setup, advanced by train."""
    cfg: DictConfig
    paths: RunPaths             # every file of the run (trainer/data/prepare.py)
    rank: int
    world: int
    device: torch.device
    manifest: dict              # the shards' manifest.json
    tokenizer: Any
    srec: Any                   # the frozen SRec (outside the engine)
    embed: Any                  # the LLM's hybrid embedding (inside the engine)
    engine: Any                 # DeepSpeed's engine around the peft LLM
    reader: Any                 # trainer/data/loader.py SplitReader over the training shards
    total_steps: int
    # order_world: the worker count whose layout the current epoch's sample order follows (trainer/data/loader.py;
    # it matters with data.length_grouping only): the run's own, but after a resize the old one until the epoch ends
    progress: dict = field(default_factory=dict)
    last_saved: int = -1        # the step of the newest checkpoint written or resumed from
    checkpoint: tuple = (None, None)  # (tag, trainer state) of the newest complete checkpoint when set up
    resizes: list = field(default_factory=list)  # {"step", "from", "to"} of each resume on another worker count
    partitioned_loading: Any = None  # ZeRO-3: transformers' DeepSpeed config, alive while the run is
    flops_shape: dict = field(default_factory=dict)  # trainer/job/flops.py model_shape
    peak_flops: float | None = None  # one device's peak FLOP/s in the run's precision (None on CPU: no MFU)
    precision: str = "fp32"     # the run's dtype policy (trainer/job/precision.py)
    start: dict | None = None   # model.init_from: the starting run's trained weights (S-DPO's reference too)
    answer_ids: Any = None      # train.objective=sdpo: item -> its answer's token ids

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: config = {"cfg": the run's config as a dict, "paths": run_paths}."""
    run = setup(OmegaConf.create(config["cfg"]), config["paths"])
    resume(run)
    if train(run) == "done":
        finish(run)


# ---- setup

def setup(cfg: DictConfig, paths: RunPaths) -> Run:
    import deepspeed  # lazy: reads DS_ACCELERATOR on import
    import ray  # lazy: only where a cluster is used
    import ray.train  # lazy: only where a cluster is used
    import ray.train.torch  # lazy: only where a cluster is used

    if cfg.train.use_gpu and cfg.model.injection == "fused":
        check_triton_compiler()  # a node without gcc/clang says so now, not in the first forward
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    # on GPU: the GPU Ray gave this worker (its index among the visible devices, which need not be the
    # local rank), made DeepSpeed's device too (build_engine); not run here (no GPU)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, cfg.train.use_gpu,
                                  cfg.train.use_gpu and torch.cuda.is_bf16_supported())
    log.info("rank %d of %d on Ray node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), os.uname().nodename)

    manifest, tokenizer, srec = load_inputs(cfg, paths, device)
    tag = ckpt.find_latest(paths.checkpoints)
    state = ckpt.read_trainer_state(os.path.join(paths.checkpoints, tag)) if tag else None
    # the accumulation for the workers Ray gave (an elastic range, or a resume on another count: the
    # checkpoint's global batch is kept); launch/train.py refused an impossible split before Ray started
    cfg.train.grad_accum = ckpt.accumulation_at(cfg.train, world, state, tag)
    ds_config = deepspeed_config(cfg, precision)
    loading = partitioned_loading(ds_config)  # ZeRO-3: each worker loads only its partition of the LLM
    model, embed = build_llara_model(paths.llm, srec.hidden, OmegaConf.to_container(cfg.model.lora),
                                     unfreeze=list(cfg.model.unfreeze), seed=cfg.seed,
                                     injection=cfg.model.injection, user_token=cfg.data.user_token,
                                     dtype=TORCH_DTYPES[precision],  # loaded in it: a 7B is 14 GB per worker, not 28
                                     vocab_size=len(tokenizer),  # a stock folder grows by LLaRA's tokens
                                     attn_implementation=cfg.model.attn_implementation,
                                     activation_checkpointing=cfg.train.activation_checkpointing)
    train_cfg = cfg.train
    reader = SplitReader(paths.data, [s for s in manifest["shards"] if s["split"] == "train"], rank, world,
                         train_cfg.micro_batch, cfg.seed, shuffle=True, grad_accum=train_cfg.grad_accum,
                         length_grouping=cfg.data.length_grouping)
    if reader.num_samples == 0:
        raise ValueError(f"no training samples in {paths.data}")
    steps_per_epoch = reader.batches_per_epoch() // train_cfg.grad_accum
    total_steps = train_cfg.max_steps if train_cfg.max_steps > 0 else train_cfg.epochs * steps_per_epoch
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine = build_engine(cfg, model, ds_config, device, total_steps, paths.deepspeed_config if rank == 0 else None)
    if rank == 0:
        log.info("global batch %d = micro %d x accumulation %d x workers %d; %d steps (%d per epoch); "
                 "ZeRO stage %d; %d trainable parameters", train_cfg.micro_batch * train_cfg.grad_accum * world,
                 train_cfg.micro_batch, train_cfg.grad_accum, world, total_steps, steps_per_epoch,
                 train_cfg.zero_stage, n_trainable)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, precision,
                      train_cfg.peak_tflops)
    run = Run(cfg, paths, rank, world, device, manifest, tokenizer, srec, embed, engine, reader, total_steps,
              progress={"global_step": 0, "epoch": 0, "position": 0, "hybrid_steps": 0, "order_world": world},
              checkpoint=(tag, state), partitioned_loading=loading, flops_shape=model_shape(model, embed),
              peak_flops=peak, precision=precision)
    if paths.init_from:  # a stage: its start (and S-DPO's reference), trainer/objectives/reference.py
        run.start = reference.starting_weights(paths.init_from)
        reference.check_names(engine, run.start, paths.init_from)
    if train_cfg.objective == "sdpo":
        run.answer_ids = answer_tokens(tokenizer, load_items(paths.data)["titles"])
    return run


def answer_tokens(tokenizer, titles: list[str]):
    """item -> the token ids of its answer, as the shards hold the true item's (shards/prompts.py)."""
    cache = {}

    def ids(item: int) -> list[int]:
        if item not in cache:
            cache[item] = answer_token_ids(llara_answer(titles[item]), tokenizer)
        return cache[item]
    return ids


def load_inputs(cfg: DictConfig, paths: RunPaths, device) -> tuple[dict, Any, Any]:
    """(manifest, tokenizer, frozen SRec), checked against each other and the config."""
    manifest = load_manifest(paths.data)
    check_manifest(paths.data, manifest, paths.tokenizer, verify_sha=False)  # sha256s: once, by the driver
    built_with = bool(manifest["params"].get("user_token", False))  # manifests from before data.user_token: off
    if built_with != cfg.data.user_token:
        raise ValueError(f"data.user_token={cfg.data.user_token} but the shards in {paths.data} were built with "
                         f"user_token={built_with}: rebuild them")
    tokenizer = load_tokenizer(paths.tokenizer, cfg.data.user_token)
    srec = load_srec(paths.srec).to(device).eval().requires_grad_(False)  # frozen, outside the engine
    if srec.num_items != manifest["num_items"]:
        raise ValueError(f"the SRec at {paths.srec} knows {srec.num_items} items, the shards' vocabulary has "
                         f"{manifest['num_items']}: refusing to start")
    return manifest, tokenizer, srec


def build_engine(cfg: DictConfig, model, ds_config: dict, device, total_steps: int, config_file: str | None):
    """DeepSpeed's engine: AdamW on the trainable parameters, warm-up + cosine per optimizer step,
    ds_config (train.* with train.deepspeed merged in; written to config_file when given)."""
    import deepspeed  # lazy: reads DS_ACCELERATOR on import

    train_cfg = cfg.train
    warmup = max(1, int(train_cfg.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        args=SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup)),
    )
    if config_file:
        os.makedirs(os.path.dirname(config_file), exist_ok=True)
        with open(config_file, "w") as f:  # what the engine was given
            json.dump(ds_config, f, indent=1)
        if train_cfg.deepspeed:
            log.info("DeepSpeed config with train.deepspeed merged in: %s", json.dumps(ds_config))
    return engine


# ---- resume

def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint in the run's folder; nothing if there is none. On the
    worker count that wrote it through DeepSpeed's files; on another through trainer/job/trainable_state.py."""
    root, (tag, state) = run.paths.checkpoints, run.checkpoint
    if not tag:
        if run.is_main:  # a run killed before its first checkpoint starts over: its log lines go too
            _truncate_logs(run.paths, 0)
        if run.start is not None:  # a stage starts where its starting run ended
            reference.start_from(run.engine, run.start)
            if run.is_main:
                log.info("starting from %s: %d trained tensors", run.paths.init_from, len(run.start))
        dist.barrier()  # the sample logs are emptied before any rank appends to its own
        return
    check_epoch_order(run.cfg, state, tag, run.world)
    if state["world_size"] == run.world:
        ckpt.load_checkpoint(run.engine, root, tag, run.rank)
    else:
        ckpt.load_resized(run.engine, root, tag, state, run.rank, run.cfg.seed)
    run.progress = {key: state.get(key, default) for key, default in run.progress.items()}
    run.progress["order_world"] = state.get("order_world", state["world_size"])  # before it was recorded
    run.resizes = state.get("resizes", [])
    run.last_saved = run.progress["global_step"]
    if state["world_size"] != run.world:
        run.resizes = [*run.resizes, {"step": run.last_saved, "from": state["world_size"], "to": run.world}]
    if run.is_main:
        log.info("resumed from %s: step %d, epoch %d, position %d", tag, run.progress["global_step"],
                 run.progress["epoch"], run.progress["position"])
        if state["world_size"] != run.world:
            log.info("resize at step %d: %d -> %d workers; global batch %d = micro %d x accumulation %d x %d workers "
                     "(was accumulation %d); the trained state restored from %s and verified bit for bit; the rest "
                     "of epoch %d follows the %d-worker sample order", run.last_saved, state["world_size"], run.world,
                     ckpt.global_batch_of(state), run.cfg.train.micro_batch, run.cfg.train.grad_accum, run.world,
                     state["config"]["train"]["grad_accum"], trainable_state.FILE, run.progress["epoch"],
                     run.progress["order_world"])
        _truncate_logs(run.paths, run.progress["global_step"])
    dist.barrier()


def check_epoch_order(cfg: DictConfig, state: dict, tag: str, world: int) -> None:
    """Mid-epoch, the rest of the epoch's sample order depends on data.length_grouping, micro_batch and the
    global batch (trainer/data/loader.py): refuse to resume there with other values (samples would be lost or
    seen twice). At an epoch boundary any may change. (The worker count may change anywhere: a resize
    keeps the global batch and re-derives the accumulation, trainer/job/checkpoint.py accumulation_at.)"""
    if state["position"] == 0:
        return
    saved = state["config"]
    keys = (("data", "length_grouping", 0), ("train", "micro_batch", None))
    changed = [f"{section}.{key}={saved[section].get(key, old_default)} (now {cfg[section][key]})"
               for section, key, old_default in keys if saved[section].get(key, old_default) != cfg[section][key]]
    now = cfg.train.micro_batch * cfg.train.grad_accum * world
    if ckpt.global_batch_of(state) != now:
        changed.append(f"global batch {ckpt.global_batch_of(state)} (now {now})")
    if changed:
        raise ValueError(f"checkpoint {tag} is mid-epoch and was written with {', '.join(changed)}: the rest of the "
                         f"epoch's order depends on them; resume with the checkpoint's values")


def _truncate_logs(paths: RunPaths, step: int) -> None:
    """After a resume from `step`, drop the lines of steps the interrupted run did after it: metrics.jsonl
    and every rank's sample log (of any worker count). A line torn by a kill is dropped too."""
    samples = _samples_dir(paths)
    files = [paths.metrics] + ([os.path.join(samples, n) for n in os.listdir(samples)] if os.path.isdir(samples) else [])
    for path in files:
        if not os.path.exists(path):
            continue
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError):
                    pass  # torn by a kill while it was written
        with open(path, "w") as f:
            f.writelines(keep)


# ---- train

def train(run: Run) -> str:
    """The loop, from run.progress to run.total_steps. Returns "done", or "stopped" when a stop was
    requested (a checkpoint was written at that step)."""
    train_cfg, progress = run.cfg.train, run.progress
    micro_step_samples = run.world * train_cfg.micro_batch  # samples (fillers included) per micro-step, all ranks
    step_samples = micro_step_samples * train_cfg.grad_accum  # per optimizer step
    ph_id = run.tokenizer.convert_tokens_to_ids("[PH]")
    meter, step_log, losses, tokens, heads = Throughput(), StepLog(run), [], 0, 0
    logged = {k: 0.0 for k in (SDPO_LOGGED if run.cfg.train.objective == "sdpo" else ())}  # the objective's sums besides the loss
    sample_log = _sample_log(run) if train_cfg.sample_log else None
    _write_pid(run)
    run.engine.train()
    signals.training(True)  # from here a SIGTERM to this worker finishes the step and checkpoints
    while progress["global_step"] < run.total_steps:
        meter.restart()
        run.reader.order_world = progress["order_world"]
        for batch in rank_loader(run.reader, progress["epoch"], progress["position"], run.tokenizer.pad_token_id,
                                 run.cfg.data.loader_workers):
            meter.lap("data")
            hybrid = is_hybrid(train_cfg.mode, progress["global_step"], run.total_steps, run.cfg.seed)
            loss, stats = micro_step_loss(run, batch, hybrid, ph_id)
            meter.lap("forward")
            run.engine.backward(loss)
            meter.lap("backward")
            run.engine.step()
            if batch["keys"]:  # a micro-batch of fillers only (at an epoch's end) has no loss to report
                losses.append(loss.item())
                logged = {k: v + stats[k] for k, v in logged.items()}
            if sample_log:
                sample_log.write(json.dumps({"step": progress["global_step"] + 1, "epoch": progress["epoch"],
                                             "position": progress["position"], "keys": batch["keys"]}) + "\n")
            meter.lap("optimizer")
            progress["position"] += micro_step_samples
            tokens += int(batch["attention_mask"].sum())  # this rank's; summed over ranks with the loss
            heads += len(batch["labels"]) * len(answer_positions(batch["labels"]))  # where the LM head ran
            if progress["position"] % step_samples:
                continue  # gradients accumulate until the optimizer step
            progress["global_step"] += 1
            progress["hybrid_steps"] += int(hybrid)
            loss, step_tokens, step_heads, means = _step_sums(losses, tokens, heads, logged)
            meter.count(step_samples, step_tokens, step_heads)
            record = step_log.record(loss, hybrid, meter, means)
            losses, tokens, heads, logged = [], 0, 0, dict.fromkeys(logged, 0.0)
            if sample_log:
                sample_log.flush()  # before the step's checkpoint: a resume from it keeps these lines
            if end_of_step(run, record, step_log):
                _close(step_log, sample_log)
                signals.training(False)
                return "stopped"
            if progress["global_step"] >= run.total_steps:
                break
            meter.restart()  # the bookkeeping above was "other"; the next wait is "data"
        if progress["global_step"] < run.total_steps:  # the epoch is used up (fillers included)
            progress["epoch"] += 1
            progress["position"] = 0
            progress["order_world"] = run.world  # a new epoch takes this run's own layout
    _close(step_log, sample_log)
    signals.training(False)
    return "done"


def micro_step_loss(run: Run, batch: dict, hybrid: bool, ph_id: int) -> tuple[torch.Tensor, dict]:
    """train.objective's loss of one micro-batch, and what it logs besides (sums over its real samples):
    sft, LLaRA's next-token loss (step_loss); sdpo, trainer/objectives/sdpo.py against k negatives drawn
    from each sample's candidates per (seed, step, sample)."""
    if run.cfg.train.objective == "sft":
        return step_loss(run.engine, run.embed, run.srec, batch, hybrid, ph_id, run.device), {}
    sdpo, step = run.cfg.train.sdpo, run.progress["global_step"] + 1
    negatives = [draw_negatives(c, t, sdpo.negatives, run.cfg.seed, step, key)
                 for c, t, key in zip(batch["candidates"], batch["targets"], batch["sample_keys"])]
    return sdpo_step_loss(run.engine, run.embed, run.srec, batch, run.start, negatives, run.answer_ids,
                          run.tokenizer.pad_token_id, sdpo.beta, run.device,
                          shared_prompt=sdpo.shared_prompt and not run.cfg.train.activation_checkpointing)


def step_loss(engine, embed, srec, batch: dict, hybrid: bool, ph_id: int, device) -> torch.Tensor:
    """Forward one micro-batch; loss on the answer tokens only (labels are -100 elsewhere). The LM head
    runs at the positions that predict an answer token only (logits_to_keep): no [B, T, V] logits."""
    ids = batch["input_ids"].to(device)
    slot_map = batch["slot_map"].to(device)
    attention = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    positions = answer_positions(labels)
    forward = dict(attention_mask=attention, logits_to_keep=positions, use_cache=False)
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
            logits = engine(input_ids=text_ids, **forward).logits
    else:
        with torch.no_grad():
            vectors = srec.item_vectors(batch["unique_items"].to(device))  # one call per batch, unique items
            users = user_states(srec, batch, device) if embed.user_adapter is not None else None  # one call per batch
        with embed.inject(slot_map, vectors, users):
            logits = engine(input_ids=ids, **forward).logits
    return answer_loss(logits, labels, positions)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits the loss reads: t where any sample's token t+1 is an answer token
    (LLaRA's answer is a title, ~5-15 of ~300-500 tokens; the samples' answers end where their
    prompts do, so the union over the batch stays small)."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels != -100). logits: [B, T, V] of
    every position, or [B, K, V] of `positions` only (answer_positions; the same loss). A micro-batch of
    only fillers has no answer token: its loss is 0 and still carries a graph, so every rank runs backward."""
    targets = labels[:, 1:] if positions is None else labels[:, positions + 1]
    logits = (logits[:, :-1] if positions is None else logits).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def end_of_step(run: Run, record: dict, step_log: StepLog) -> bool:
    """After an optimizer step: report to Ray, checkpoint, and stop when any rank was asked to (a
    signal or the STOP file); every rank decides the same. Returns True when the run stops here."""
    step = record["step"]
    # rank 0's clock says whether a metrics report is due, shared with the stop flag in one collective
    stop, report_due = any_rank(signals.requested(run.paths.output_dir), step_log.report_due(record))
    if step % run.cfg.train.checkpoint_every == 0 or step == run.total_steps or stop:
        save_checkpoint(run)
    if report_due:
        step_log.report(record)
    if stop and run.is_main:
        log.info("stop requested: checkpoint %s written at step %d; run again to resume", ckpt.tag_for(step), step)
        with open(os.path.join(run.paths.output_dir, signals.PREEMPTED_FILE), "w") as f:
            f.write(ckpt.tag_for(step))
    return stop


def _step_sums(losses: list[float], tokens: int, heads: int, logged: dict) -> tuple[float, float, float, dict]:
    """One collective per step: (the step's loss, tokens, LM-head positions, the objective's logged means), over
    every rank. The loss is the mean of the micro-batches' losses, fillers-only ones left out (an epoch's last
    step would otherwise report a loss lowered by their zeros, by how many the layout made); the logged means
    are per real sample."""
    total, count, tokens, heads, *sums = all_reduce_sums(sum(losses), len(losses), tokens, heads, *logged.values())
    sums = dict(zip(logged, sums))
    means = {k: v / max(sums["samples"], 1) for k, v in sums.items() if k != "samples"}
    return total / max(count, 1), tokens, heads, means


def _close(step_log, sample_log) -> None:
    step_log.close()
    if sample_log:
        sample_log.close()


def _sample_log(run: Run):
    """logs/samples/rank<r>.jsonl, appended to: a line per micro-batch with the optimizer step it belongs to
    and the keys of its real samples (train.sample_log; fillers are not listed)."""
    folder = _samples_dir(run.paths)
    os.makedirs(folder, exist_ok=True)
    return open(os.path.join(folder, f"rank{run.rank}.jsonl"), "a")


def _samples_dir(paths: RunPaths) -> str:
    return os.path.join(paths.logs, "samples")


def _write_pid(run: Run) -> None:
    """logs/worker_<rank>.pid: for operators (and tests) to signal this worker."""
    os.makedirs(run.paths.logs, exist_ok=True)
    with open(os.path.join(run.paths.logs, f"worker_{run.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


class Throughput:
    """Samples/s, tokens/s and ms per optimizer step by phase (data, forward, backward, optimizer, and
    the rest as "other": the loss all-reduce, logging, stop checks, Ray reports, checkpoints), over the
    steps since the last summary. Host time: on CUDA the kernels run asynchronously, so there the split
    shows launch cost and waits, not GPU time (verified on CPU only)."""

    def __init__(self):
        self._reset()
        self.restart()

    def _reset(self) -> None:
        self.since, self.phases = time.time(), dict.fromkeys(PHASES, 0.0)
        self.samples = self.tokens = self.head_positions = self.steps = 0

    def restart(self) -> None:
        """The next lap starts now."""
        self.tick = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the last lap (or restart) went to `phase`."""
        now = time.perf_counter()
        self.phases[phase] += now - self.tick
        self.tick = now

    def count(self, samples: float, tokens: float, head_positions: float) -> None:
        """An optimizer step's samples (fillers included), tokens and LM-head positions, over every rank."""
        self.samples += samples
        self.tokens += tokens
        self.head_positions += head_positions

    def summary(self, steps: int) -> dict:
        """The figures over the last `steps` optimizer steps; starts the next window."""
        elapsed = time.time() - self.since
        per_step = {k: 1e3 * v / steps for k, v in self.phases.items()}
        per_step["other"] = 1e3 * elapsed / steps - sum(per_step.values())
        out = {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed,
               "head_positions_per_s": self.head_positions / elapsed,
               **{f"{k}_ms": round(v, 3) for k, v in per_step.items()}}
        self._reset()
        return out


class StepLog:
    """Each optimizer step's record: every step to logs/metrics.jsonl; every train.log_every steps
    (and the last) also throughput, a console line and TensorBoard; to Ray Train at most every
    RAY_REPORT_EVERY_S. Every rank builds the same record; rank 0 writes."""

    def __init__(self, run: Run):
        self.run, self.steps_since_summary = run, 0
        self.tensorboard = _tensorboard(run.paths.tensorboard) if run.is_main else None
        self.last_report = time.monotonic()

    def logging_step(self, step: int) -> bool:
        return step % self.run.cfg.train.log_every == 0 or step == self.run.total_steps

    def record(self, loss: float, hybrid: bool, meter: Throughput, objective: dict) -> dict:
        progress, step = self.run.progress, self.run.progress["global_step"]
        record = {"step": step, "loss": loss, "lr": self.run.engine.get_lr()[0], "hybrid": hybrid,
                  "hybrid_share": progress["hybrid_steps"] / step, "epoch": progress["epoch"], "world_size": self.run.world,
                  **objective}
        if self.run.resizes and self.run.resizes[-1]["step"] == step - 1:  # the first step after a resize
            record["resized_from"] = self.run.resizes[-1]["from"]
        self.steps_since_summary += 1
        if self.logging_step(step):
            record.update(meter.summary(self.steps_since_summary))
            record.update(self.utilisation(record))
            self.steps_since_summary = 0
        if self.run.is_main:
            self.write(record)
        return record

    def utilisation(self, record: dict) -> dict:
        """MFU over the window (None without a known peak: CPU) and peak memory (trainer/job/flops.py)."""
        run = self.run
        flops, mfu = throughput_flops(run.flops_shape, record["samples_per_s"], record["tokens_per_s"],
                                      record["head_positions_per_s"], run.peak_flops, run.world)
        memory, kind = peak_memory_gib(run.device)
        return {"tflops_per_s": flops / 1e12, "mfu": mfu, "peak_memory_gib": round(memory, 3), "memory": kind}

    def write(self, record: dict) -> None:
        with open(self.run.paths.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.logging_step(record["step"]):
            return
        mfu = f"MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else f"{record['tflops_per_s']:.2f} TFLOP/s"
        log.info("step %d/%d | loss %.4f | lr %.2e | %.1f samples/s | %.0f tokens/s | %s | peak %s %.2f GiB | "
                 "hybrid %.0f%% | ms/step: data %.1f, fwd %.1f, bwd %.1f, optim %.1f, other %.1f", record["step"],
                 self.run.total_steps, record["loss"], record["lr"], record["samples_per_s"], record["tokens_per_s"], mfu,
                 record["memory"].replace("_", " "), record["peak_memory_gib"], 100 * record["hybrid_share"],
                 *(record[f"{k}_ms"] for k in (*PHASES, "other")))
        if "reward_margin" in record:
            log.info("step %d S-DPO | reward margin %.4f | true item above every negative %.1f%% | log p(true item) %.3f",
                     record["step"], record["reward_margin"], 100 * record["reward_accuracy"], record["chosen_logp"])
        if self.tensorboard:
            for k in ("loss", "lr", "hybrid_share", "samples_per_s", "tokens_per_s", "tflops_per_s", "mfu",
                      "peak_memory_gib", "reward_margin", "reward_accuracy", "chosen_logp"):
                if record.get(k) is not None:
                    self.tensorboard.add_scalar(f"train/{k}", record[k], record["step"])

    def report_due(self, record: dict) -> bool:
        """Rank 0's answer to whether a metrics report to Ray is due (other ranks: False)."""
        return (self.logging_step(record["step"]) and self.run.is_main
                and time.monotonic() - self.last_report >= RAY_REPORT_EVERY_S)

    def report(self, record: dict) -> None:
        import ray.train  # lazy: only where a cluster is used

        ray.train.report(record)
        self.last_report = time.monotonic()

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def _tensorboard(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (metrics.jsonl is still written)")
        return None
    return SummaryWriter(log_dir)


# ---- checkpoints

def save_checkpoint(run: Run) -> None:
    """Write the checkpoint of the current step (collective); keep the newest train.keep_last."""
    step = run.progress["global_step"]
    ckpt.save_checkpoint(run.engine, run.paths.checkpoints, step, trainer_state(run), run.rank, run.cfg.train.keep_last)
    run.last_saved = step


def trainer_state(run: Run) -> dict:
    """trainer_state.json: where the run is, and what it was run with (checked on resume and by eval)."""
    engine = run.engine
    return {**run.progress, "world_size": run.world, "total_steps": run.total_steps,
            "global_batch": run.world * run.cfg.train.micro_batch * run.cfg.train.grad_accum, "resizes": run.resizes,
            "scheduler": engine.lr_scheduler.state_dict(),  # for a resize (DeepSpeed's files hold it too)
            "engine_steps": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
            "config": OmegaConf.to_container(run.cfg), "manifest_hash": run.manifest["config_hash"],
            "srec_sha256": srec_hash(run.paths.srec)}


# ---- finish

def finish(run: Run) -> None:
    """After the last step: its checkpoint (if that step wrote none), the loss plot, the export, and
    the evaluation (rank 0 writes eval/final_<split>/ and a copy of its metrics into the last checkpoint)."""
    import ray.train  # lazy: only where a cluster is used

    step = run.progress["global_step"]
    if run.last_saved != step:
        save_checkpoint(run)
    if run.is_main:
        _plot_losses(run.paths.metrics, run.paths.loss_plot)
    export_model(run.engine.module, run.tokenizer, run.paths.export, run.rank,
                 {"step": step, "srec_sha256": srec_hash(run.paths.srec), "base": run.paths.llm,
                  "srec": run.paths.srec, "injection": run.cfg.model.injection})
    result = evaluate(run)
    ray.train.report({"done": True, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})


def evaluate(run: Run) -> dict:
    """trainer/evaluation/evaluate.py on eval.split with the trained engine (collective): rank 0 writes
    eval/final_<split>/ (metrics.json, predictions.csv, report.md, as launch/eval.py does), a copy of
    metrics.json into the last checkpoint as <split>_metrics.json, logs the figures and returns the
    metrics; the other ranks return {}."""
    eval_cfg, step = run.cfg.eval, run.progress["global_step"]
    hybrid = run.cfg.train.mode != "text"
    rows, metrics = evaluate_trained(run.engine, run.embed, run.srec, run.tokenizer, run.paths, run.manifest, run.cfg,
                                     run.rank, run.world, run.device, hybrid=hybrid)
    if not run.is_main:
        return metrics
    metrics.update({"split": eval_cfg.split, "prompts": "hybrid" if hybrid else "text", "precision": run.precision,
                    "source": {"final": ckpt.tag_for(step)}, "step": step, "mode": run.cfg.train.mode})
    out = os.path.join(run.paths.eval, f"final_{eval_cfg.split}")
    write_outputs(out, rows, metrics, f"The end of training: step {step}, train.mode {run.cfg.train.mode}, split "
                                      f"`{eval_cfg.split}`, {metrics['prompts']} prompts, {run.precision}.")
    shutil.copyfile(os.path.join(out, "metrics.json"),
                    os.path.join(run.paths.checkpoints, ckpt.tag_for(step), f"{eval_cfg.split}_metrics.json"))
    if "ctr" in metrics:
        c = metrics["ctr"]
        log.info("%s: CTR AUC %.4f, log loss %.4f, accuracy %.4f on %d samples", eval_cfg.split,
                 c["auc"], c["log_loss"], c["accuracy"], c["samples"])
    else:
        g = metrics["generate"]
        log.info("%s: HR@1 %.4f (of valid) / %.4f (of all), ValidRatio %.4f on %d samples", eval_cfg.split,
                 g["hr@1_of_valid"], g["hr@1_of_all"], g["valid_ratio"], g["samples"])
    return metrics


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
