"""Train LLaRA with Ray Train x DeepSpeed ZeRO-3.

    python launch/train.py                                  # the embedded default (configs/llara_default.yaml)
    python launch/train.py --config my.yaml train.lr=5e-4   # a YAML, then key=value overrides
    ray job submit --working-dir . -- python launch/train.py output_dir=/shared/runs/x

Joins the Ray cluster named by ray.address or RAY_ADDRESS (as `ray job submit` sets it), or starts
a local one. Re-running with the same output_dir resumes from its newest complete checkpoint.
SIGTERM or SIGUSR1 (to this process, or to a worker) finishes the current optimizer step, writes a
checkpoint and exits with code 75. Exit codes: 0 done; 2 refused before training starts, with a
message (a bad config key or value, bad raw data or shards, an output folder that is locked or not
writable, GPUs the cluster does not have); 75 stopped on request; 1 any other failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import traceback

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
    """Join the cluster (ray.address or RAY_ADDRESS) or start a local one; once: a second call does nothing."""
    import ray

    from trainer import signals

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # each worker process installs its SIGUSR1 handler at start (trainer/signals.py)
    env = {"worker_process_setup_hook": "trainer.signals.install_worker_handlers"}
    if not cfg.train.use_gpu:
        env["env_vars"] = {"DS_ACCELERATOR": "cpu"}
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env)
    else:
        cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
        log.info("starting a local Ray cluster with %d CPUs", cpus)
        ray.init(num_cpus=cpus, object_store_memory=cfg.ray.object_store_mb * 2**20, runtime_env=env)
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
    """The choices the workers would refuse only after the data build, refused now (ValueError); the
    GPU's bf16 support is asked on the workers."""
    from trainer.curriculum import MODES
    from trainer.ds_config import check_deepspeed_overrides
    from trainer.model.hybrid_embedding import INJECTIONS
    from trainer.precision import resolve_precision
    from trainer.retrieval import check_embed_dtype

    resolve_precision(cfg.train.precision, cfg.train.use_gpu, bf16_supported=True)
    if cfg.train.mode not in MODES:
        raise ValueError(f"train.mode={cfg.train.mode!r}: expected {', '.join(MODES)}")
    if cfg.model.injection not in INJECTIONS:
        raise ValueError(f"model.injection={cfg.model.injection!r}: expected {' or '.join(INJECTIONS)}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage={cfg.train.zero_stage!r}: expected 0, 1, 2 or 3 (DeepSpeed's ZeRO stages)")
    check_embed_dtype(cfg.data.retrieval.dtype)
    check_deepspeed_overrides(cfg)


def prepare_run(cfg):
    """Lock the output folder, build (or reuse) the data and assets, check the shards: (output folder,
    run paths, the lock). A GPU run the cluster cannot place is refused before the data build."""
    from shards.build import check_manifest, load_manifest
    from shards.ctr import needs_retrieval
    from trainer import signals
    from trainer.config import to_dict
    from trainer.embed_job import embed_on_workers
    from trainer.prepare import prepare, run_paths

    out = run_paths(cfg.output_dir)["output_dir"]
    lock = lock_output_dir(out)
    signals.clear(out)
    signals.install_driver_handlers(out)
    if cfg.train.use_gpu:  # not left pending for ever
        from trainer.gpus import require_gpus

        connect_ray(cfg, out)
        require_gpus(cfg.train.num_workers, "train.use_gpu=true")
    embed = None
    if needs_retrieval(to_dict(cfg.data)):  # SUBR's item embeddings are computed on the Ray workers: Ray first
        connect_ray(cfg, out)
        embed = functools.partial(embed_on_workers, cfg)
    paths = prepare(cfg, embed=embed)
    # shards that do not match their manifest are refused before any worker starts (once, not per rank)
    check_manifest(paths["data"], load_manifest(paths["data"]), paths["llm"], verify_sha=cfg.data.verify_shards)
    return out, paths, lock


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from shards.safe_unpickle import UnsafePickle

    global _LOCK
    try:  # everything that can be refused is refused here, before the first training step (exit 2)
        check_choices(cfg)
        out, paths, _LOCK = prepare_run(cfg)  # the lock is held until the process exits
    except (ValueError, FileNotFoundError, UnsafePickle) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"  ({raised_at(e)})", file=sys.stderr)  # a bug that raises ValueError is found from here
        return 2
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.train_loop import train_worker

    connect_ray(cfg, out)
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={"cfg": to_dict(cfg), "paths": paths},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        # checkpoints are written by the workers into <output_dir>/checkpoints and reported to Ray in place
        # Ray deletes all but the newest train.keep_last of them (so its run snapshot stays true)
        run_config=RunConfig(storage_path=os.path.abspath(paths["output_dir"]), name="checkpoints",
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last if t.keep_last > 0 else None)),
    )
    trainer.fit()
    from trainer import signals

    if os.path.exists(os.path.join(out, signals.PREEMPTED_FILE)):
        with open(os.path.join(out, signals.PREEMPTED_FILE)) as f:
            print(f"\nstopped on request after checkpoint {f.read().strip()}; run the same command to resume "
                  f"(exit code {signals.EXIT_PREEMPTED})")
        return signals.EXIT_PREEMPTED

    metrics_path = os.path.join(paths["eval"], f"{cfg.eval.split}_metrics.json")
    with open(metrics_path) as f:
        m = json.load(f)
    if m.get("task") == "ctr":
        print(f"\n{cfg.eval.split} ({m['samples']} samples, mode={m['mode']}): CTR AUC {m['auc']:.4f} | "
              f"log loss {m['log_loss']:.4f} | accuracy {m['accuracy']:.4f}")
    else:
        print(f"\n{cfg.eval.split} ({m['samples']} samples, mode={m['mode']}): HitRatio@1 {m['hr@1_of_valid']:.4f} "
              f"(correct/valid, as LLaRA) | {m['hr@1_of_all']:.4f} (correct/all) | ValidRatio {m['valid_ratio']:.4f}")
    if "compare" in m:
        print(compare_text(m["compare"], m["mode"]))
    print(f"metrics: {metrics_path}")
    return 0


def compare_text(c: dict, mode: str) -> str:
    """The end-of-run table: the trained LLM read with hybrid and with text-only prompts, and the baselines."""
    names = {"llm_hybrid": f"LLM ({mode}-trained), hybrid prompts", "llm_text": f"LLM ({mode}-trained), text-only prompts",
             "srec": "frozen SRec alone", "popularity": "popularity", "random": "random"}
    lines = ["\ncandidates ranked by likelihood (every answer valid), same samples:",
             f"  {'':40s} {'HR@1':>7s} {'HR@5':>7s} {'NDCG@5':>7s}"]
    for key, label in names.items():
        if key in c:
            r = c[key]
            lines.append(f"  {label:40s} {r['hr@1']:7.4f} {r['hr@5']:7.4f} {r['ndcg@5']:7.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
