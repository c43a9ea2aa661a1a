"""Train LLaRA with Ray Train x DeepSpeed ZeRO-3.

    python launch/train.py                                  # the embedded default (configs/llara_default.yaml)
    python launch/train.py --config my.yaml train.lr=5e-4   # a YAML, then key=value overrides
    ray job submit --working-dir . -- python launch/train.py output_dir=/shared/runs/x

Joins the Ray cluster named by ray.address or RAY_ADDRESS (as `ray job submit` sets it), or starts
a local one. Re-running with the same output_dir resumes from its newest complete checkpoint.
SIGTERM or SIGUSR1 (to this process, or to a worker) finishes the current optimizer step, writes a
checkpoint and exits with code 75. Exit codes: 0 done; 2 refused before training starts, with a
message (a bad config key or value, a model.base folder that is missing or holds a cut-short weight
file, raw data that is missing or malformed, bad shards, an output folder that is locked or not
writable, GPUs the cluster does not have); 75 stopped on request; 1 any other failure: an error on the
workers that no restart can fix (a config DeepSpeed refuses, a corrupt file, a full disk) ends the run
at once with its one line; a lost worker is restarted up to train.max_failures times first.

The project's modules are imported inside the functions here, after the config's checks: a start that
cannot succeed ends in about a second, before torch, Ray and DeepSpeed load.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the package is imported after the config's checks (main), not here
    from trainer.data.prepare import RunPaths

log = logging.getLogger("launch.train")
_LOCK = None  # the output folder's lock file, open for the life of the process


def raised_at(e: BaseException) -> str:
    """Where an exception was raised: 'raised at file:line in function', or what the pool worker sent."""
    cause = e.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":  # multiprocessing: the worker's frames
        lines = [line.strip() for line in str(cause).splitlines() if line.strip().startswith("File ")]
        return f"raised in a worker process, {lines[-1]}" if lines else "raised in a worker process"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"raised at {os.path.relpath(frame.filename)}:{frame.lineno} in {frame.name}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML merged over configs/llara_default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def connect_ray(cfg, out: str) -> None:
    """Join or start Ray (trainer/job/ray_cluster.py), then take SIGTERM/SIGUSR1 back from it."""
    from trainer.job import signals
    from trainer.job.ray_cluster import connect

    connect(cfg.ray.address, cfg.train.num_workers * cfg.train.cpus_per_worker, cfg.ray.object_store_mb,
            cfg.train.use_gpu, cfg.ray.auth)
    signals.install_driver_handlers(out)  # again: ray.init installs its own SIGTERM handler (it aborts the driver)


def lock_output_dir(output_dir: str):
    """Hold an exclusive lock on <output_dir>/.lock for the life of this process, or a ValueError."""
    import fcntl

    try:
        os.makedirs(output_dir, exist_ok=True)
        f = open(os.path.join(output_dir, ".lock"), "a+")
    except OSError as e:
        raise ValueError(f"output_dir {output_dir} is not writable: {e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise ValueError(f"another run is writing to {output_dir} (it holds {output_dir}/.lock: {f.read().strip()}); "
                         "wait for it or use another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def check_choices(cfg) -> None:
    """What the workers would refuse only after the data build and load_config's checks of single
    keys (configs/schema.py) do not cover, refused now (ValueError): the model.base folder and its weight
    files' headers, the raw data the source reads (when the run folder is not built yet), srec.path,
    train.deepspeed's keys, flash-attention in fp32, without a GPU or without its package, a Ray cluster to
    join without its token, train.objective's needs (a preference stage: a finished run to start from). The
    GPU's bf16 support is asked on the workers."""
    from shards.readers import check_source
    from trainer.job.ds_config import check_deepspeed_overrides
    from trainer.model.folder import check_base_folder
    from trainer.job.precision import resolve_precision
    from trainer.data.prepare import run_paths
    from trainer.job.ray_cluster import token_source
    from trainer.objectives.reference import check_init_from
    from trainer.objectives.sdpo import check_objective

    check_objective(cfg)
    if cfg.model.init_from:  # a stage reads its starting run's data and assets
        check_init_from(cfg.model.init_from)
    if cfg.model.base:
        check_base_folder(cfg.model.base)
    if not os.path.exists(run_paths(cfg.output_dir).stamp) and not cfg.model.init_from:  # a built run folder no longer reads the raw data
        check_source(cfg.data.source, cfg.data.path, cfg.data.items_path)
    if cfg.srec.path and not os.path.exists(cfg.srec.path):
        raise ValueError(f"srec.path={cfg.srec.path}: no such file or folder")
    precision = resolve_precision(cfg.train.precision, cfg.train.use_gpu, bf16_supported=True)
    check_deepspeed_overrides(cfg)
    if cfg.ray.auth == "token":  # a cluster to join needs its token: said now, not after the data build
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        token_source(starting=not address, address=address)
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util

        if not cfg.train.use_gpu:
            raise ValueError("model.attn_implementation=flash_attention_2 needs train.use_gpu=true (flash-attn runs on "
                             "CUDA only); use sdpa on CPU")
        if precision == "fp32":
            raise ValueError("model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only, and "
                             "train.precision=fp32 was asked: use train.precision=auto (or bf16/fp16), or sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 needs the flash-attn package on every node "
                             "(pip install flash-attn); or use sdpa")


def check_resume(cfg, root: str) -> None:
    """A checkpoint to resume on another number of workers (or an elastic range): say what will happen, or
    refuse now (ValueError) what the workers would refuse: a global batch that cannot be split, a
    checkpoint from before resizable checkpoints."""
    from trainer.job import checkpoint as ckpt
    from trainer.job.trainable_state import FILE

    tag = ckpt.find_latest(root)
    if not tag:
        return
    state = ckpt.read_trainer_state(os.path.join(root, tag))
    for workers in range(cfg.train.min_workers or cfg.train.num_workers, cfg.train.num_workers + 1):
        accumulation = ckpt.accumulation_at(cfg.train, workers, state, tag)
        if workers != state["world_size"] and not os.path.exists(os.path.join(root, tag, FILE)):
            raise ValueError(f"checkpoint {tag} was written by {state['world_size']} workers before resizable "
                             f"checkpoints (it has no {FILE}); resume with train.num_workers={state['world_size']}")
        if workers == cfg.train.num_workers and workers != state["world_size"]:
            log.info("checkpoint %s was written by %d workers: resuming on %d, global batch %d kept (accumulation %d "
                     "-> %d)", tag, state["world_size"], workers, ckpt.global_batch_of(state),
                     state["config"]["train"]["grad_accum"], accumulation)


def prepare_run(cfg):
    """Lock the output folder, build (or reuse) the data and assets, check the shards: (output folder,
    run paths, the lock). A GPU run the cluster cannot place is refused before the data build."""
    from shards.build import check_manifest, load_manifest
    from shards.ctr import needs_retrieval
    from trainer.job import checkpoint as ckpt
    from trainer.job import signals
    from configs.schema import to_dict
    from shards.embed_job import embed_on_workers
    from trainer.job.ray_cluster import run_on_workers
    from trainer.data.prepare import prepare, run_paths

    out = run_paths(cfg.output_dir).output_dir
    lock = lock_output_dir(out)
    signals.clear(out)
    signals.install_driver_handlers(out)
    if cfg.train.use_gpu:  # not left pending for ever
        from trainer.job.gpus import require_gpus

        connect_ray(cfg, out)
        require_gpus(cfg.train.num_workers, "train.use_gpu=true")
    embed = None
    if needs_retrieval(cfg.data):  # SUBR's item embeddings are computed on the Ray workers: Ray first
        connect_ray(cfg, out)
        embed = functools.partial(embed_on_workers, cfg, run_on_workers=run_on_workers)
    if cfg.model.injection == "fused":  # built once here, under a lock that dies with its holder, before the workers need it
        from trainer.model.kernels.build import NoCompiler
        from trainer.model.kernels.cpu import load_library

        try:
            load_library()
        except NoCompiler as e:
            raise ValueError(str(e)) from None
    paths = prepare(cfg, embed=embed)
    check_resume(cfg, paths.checkpoints)

    # shards that do not match their manifest are refused before any worker starts (once, not per rank)
    check_manifest(paths.data, load_manifest(paths.data), paths.tokenizer, verify_sha=cfg.data.verify_shards)
    return out, paths, lock


def main(argv=None) -> int:
    from trainer.job.console import keep_own_lines_whole

    keep_own_lines_whole()  # before anything imports Ray: every worker's own lines reach the console
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    from configs.schema import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from shards.safe_unpickle import UnsafePickle

    if not cfg.train.use_gpu:  # the driver imports DeepSpeed too (through transformers): no accelerator probe
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars while the assets are built
    global _LOCK
    try:  # everything that can be refused is refused here, before the first training step (exit 2)
        check_choices(cfg)
        out, paths, _LOCK = prepare_run(cfg)  # the lock is held until the process exits
    except (ValueError, FileNotFoundError, UnsafePickle) as e:
        # one line; where it was raised, so that a bug that raises ValueError is found from there too
        print(f"error: {e} ({raised_at(e)})", file=sys.stderr)
        return 2
    from trainer.job.ray_cluster import JobFailed, run_on_workers
    from trainer.train_loop import train_worker

    connect_ray(cfg, out)
    # the workers write (and prune) their checkpoints in <output_dir>/checkpoints; Ray's own run state
    # goes to logs/ray (trainer/job/ray_cluster.py)
    workers = (cfg.train.min_workers, cfg.train.num_workers) if cfg.train.min_workers else cfg.train.num_workers
    try:
        run_on_workers(train_worker, {"cfg": to_dict(cfg), "paths": paths}, workers,
                       cfg.train.cpus_per_worker, cfg.train.use_gpu, storage_path=paths.ray, name="train",
                       max_failures=cfg.train.max_failures)
    except JobFailed as e:  # no restart can fix it: said once, in one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    return print_outcome(cfg, paths)


def print_outcome(cfg, paths: RunPaths) -> int:
    """The run's last lines on the console, and the exit code: stopped on request, or the evaluation."""
    from trainer.job import signals

    preempted = os.path.join(paths.output_dir, signals.PREEMPTED_FILE)
    if os.path.exists(preempted):
        with open(preempted) as f:
            print(f"\nstopped on request after checkpoint {f.read().strip()}; run the same command to resume "
                  f"(exit code {signals.EXIT_PREEMPTED})")
        return signals.EXIT_PREEMPTED
    metrics_path = os.path.join(paths.eval, f"final_{cfg.eval.split}", "metrics.json")
    with open(metrics_path) as f:
        m = json.load(f)
    if "ctr" in m:
        c = m["ctr"]
        print(f"\n{cfg.eval.split} ({m['samples']} samples, mode={m['mode']}): CTR AUC {c['auc']:.4f} | "
              f"log loss {c['log_loss']:.4f} | accuracy {c['accuracy']:.4f}")
    else:
        g = m["generate"]
        print(f"\n{cfg.eval.split} ({m['samples']} samples, mode={m['mode']}): HitRatio@1 {g['hr@1_of_valid']:.4f} "
              f"(correct/valid, as LLaRA) | {g['hr@1_of_all']:.4f} (correct/all) | ValidRatio {g['valid_ratio']:.4f}")
    if "score_hybrid" in m:
        print(compare_text(m))
    print(f"metrics: {metrics_path}")
    return 0


def compare_text(m: dict) -> str:
    """The end-of-run table: the trained LLM read with hybrid and with text-only prompts, and the baselines."""
    rows = [(f"LLM ({m['mode']}-trained), hybrid prompts", m["score_hybrid"]),
            (f"LLM ({m['mode']}-trained), text-only prompts", m["score_text"])]
    names = {"srec": "frozen SRec alone", "popularity": "popularity", "random": "random"}
    rows += [(label, m["baselines"][key]) for key, label in names.items() if key in m["baselines"]]
    lines = ["\ncandidates ranked by likelihood (every answer valid), same samples:",
             f"  {'':40s} {'HR@1':>7s} {'HR@5':>7s} {'NDCG@5':>7s}"]
    lines += [f"  {label:40s} {r['hr@1']:7.4f} {r['hr@5']:7.4f} {r['ndcg@5']:7.4f}" for label, r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
