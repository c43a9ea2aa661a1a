"""Evaluate a trained LLaRA model on Ray workers, the papers' ways and faster ways, with baselines.

    python launch/eval.py --run runs/default                          # the run's export, test split
    python launch/eval.py --run runs/default --checkpoint latest --split val --modes score
    ray job submit --working-dir . -- python launch/eval.py --run /shared/runs/x --workers 8

Modes (trainer/evaluation/evaluate.py): generate (LLaRA's protocol: greedy generation, ValidRatio, HR@1 of
valid and of all), score (rank the candidates by the log-likelihood of their titles: HR@1, HR@5,
NDCG@5), ctr (P(yes): AUC, log loss, accuracy; on samples with a CTR label). The frozen SRec alone,
popularity and random are ranked on the same candidates. Writes metrics.json, predictions.csv and
report.md to --out (default <run>/eval/<checkpoint or export>_<split>/) and prints the report.
Exit codes: 0 done; 2 refused before evaluating, with a message (bad arguments, no such
checkpoint or export, GPUs the cluster does not have); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import ConfigError, allowed, load_config, schema_of  # noqa: E402
from shards.build import MANIFEST, load_manifest  # noqa: E402
from trainer.data.prepare import RunPaths, prepared_paths  # noqa: E402
from trainer.evaluation.evaluate import MODES, check_modes  # noqa: E402
from trainer.job.checkpoint import COMPLETE, find_latest, read_trainer_state  # noqa: E402
from trainer.job.precision import resolve_precision  # noqa: E402
from trainer.model.export import EXPORT_META  # noqa: E402

log = logging.getLogger("launch.eval")

# The flags that are config keys: aliases of `key=value` (configs/schema.py checks them; their defaults are
# configs/llara_default.yaml's). A refused value is named by the flag the user gave.
ALIASES = {"--split": "eval.split", "--max-samples": "eval.max_samples", "--batch-size": "eval.batch_size",
           "--max-new-tokens": "eval.max_new_tokens", "--candidates-per-pass": "eval.candidates_per_pass",
           "--workers": "train.num_workers", "--cpus-per-worker": "train.cpus_per_worker",
           "--precision": "train.precision", "--ray-address": "ray.address", "--ray-auth": "ray.auth",
           "--object-store-mb": "ray.object_store_mb", "--seed": "seed"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's output_dir (prepared: data, tokenizer, SRec)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint tag of the run (step_000600) or 'latest'")
    src.add_argument("--export", help="an export folder (default: <run>/export)")
    src.add_argument("--zero-shot", action="store_true",
                     help="the run's base LLM with untrained LoRA and adapter (ReLLa's zero-shot setting)")
    p.add_argument("--modes", default="generate,score,ctr", help="comma-separated: generate, score, ctr")
    p.add_argument("--prompts", choices=["hybrid", "text"], default=None,
                   help="behaviour tokens injected or placeholders as [PH] (default: as the run trained)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true); default: CPU")
    p.add_argument("--out", default=None)
    p.add_argument("--config", default=None, help="a YAML merged over configs/llara_default.yaml (its eval:, ray: keys)")
    for flag, key in ALIASES.items():
        p.add_argument(flag, default=None, help=f"{key}: {allowed(*schema_of(key))} (default: the YAML's)")
    p.add_argument("overrides", nargs="*", help="key=value, as launch/train.py: eval.*, ray.*, train.num_workers, ...")
    return p.parse_args(argv)


def eval_config(args):
    """The config with the flags (as their keys) and then the key=value arguments over it; a ConfigError
    names the flag when a flag gave the refused value."""
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in ALIASES}
    flags = {flag: value for flag, value in given.items() if value is not None}
    overrides = [f"{ALIASES[flag]}={value}" for flag, value in flags.items()]
    overrides += ["train.use_gpu=true"] if args.gpu else []
    try:
        return load_config(args.config, overrides + list(args.overrides))
    except ConfigError as e:
        message = str(e)
        for flag in flags:
            if message.startswith(ALIASES[flag] + "="):
                message = flag + message[len(ALIASES[flag]):]
        raise ConfigError(message) from None


def resolve_source(args, paths: RunPaths) -> tuple[dict, dict, str]:
    """({"export": dir}, {"checkpoint": dir, "config": ...} or {"zero_shot": True, "config": ...}, the
    run's training config if known, a short name)."""
    if args.checkpoint:
        tag = find_latest(paths.checkpoints) if args.checkpoint == "latest" else args.checkpoint
        checkpoint = os.path.join(paths.checkpoints, tag or "")
        if not tag or not os.path.exists(os.path.join(checkpoint, COMPLETE)):
            raise ValueError(f"no complete checkpoint {args.checkpoint!r} in {paths.checkpoints}")
        run_cfg = read_trainer_state(checkpoint)["config"]
        return {"checkpoint": checkpoint, "config": run_cfg}, run_cfg, tag
    if args.zero_shot:
        with open(paths.stamp) as f:  # the run's prepared config: base model, LoRA shape, injection
            prepared = json.load(f)
        return {"zero_shot": True, "config": prepared}, None, "zero_shot"
    export = os.path.abspath(args.export or paths.export)
    if not os.path.exists(os.path.join(export, EXPORT_META)):
        raise ValueError(f"{export} is not an export (no {EXPORT_META}); train first, or pass --checkpoint")
    tag = find_latest(paths.checkpoints)
    run_cfg = read_trainer_state(os.path.join(paths.checkpoints, tag))["config"] if tag else None
    return {"export": export}, run_cfg, "export"


def check_arguments(args) -> tuple:
    """(config, modes, run paths, resolve_source's answer), or a ValueError: everything refused before Ray
    starts (the GPU's bf16 support is asked on the workers)."""
    cfg = eval_config(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; expected some of {', '.join(MODES)}")
    resolve_precision(cfg.train.precision, cfg.train.use_gpu, bf16_supported=True,
                      option="--precision" if args.precision is not None else "train.precision")
    paths = prepared_paths(args.run)
    if not os.path.exists(os.path.join(paths.data, MANIFEST)):
        raise ValueError(f"{args.run} is not a training run folder (no data/{MANIFEST})")
    check_modes(load_manifest(paths.data), modes)
    return cfg, modes, paths, resolve_source(args, paths)


def main(argv=None) -> int:
    from trainer.job.console import keep_own_lines_whole

    keep_own_lines_whole()  # before anything imports Ray: every worker's own lines reach the console
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg, modes, paths, (source, run_cfg, name) = check_arguments(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu, workers, split = cfg.train.use_gpu, cfg.train.num_workers, cfg.eval.split
    if not gpu:  # the driver imports DeepSpeed too (through transformers): no accelerator probe
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer.evaluation.evaluate import EvalJob, eval_worker  # after DS_ACCELERATOR: DeepSpeed reads it when imported
    from trainer.job.gpus import require_gpus
    from trainer.job.ray_cluster import JobFailed, connect, run_on_workers

    hybrid = (args.prompts or ("text" if run_cfg and run_cfg["train"]["mode"] == "text" else "hybrid")) == "hybrid"
    out = os.path.abspath(args.out or os.path.join(paths.eval, f"{name}_{split}"))
    header = (f"Run `{paths.output_dir}`, {name}, split `{split}`, prompts "
              f"{'hybrid (behaviour tokens)' if hybrid else 'text-only'}, {workers} workers"
              f"{' (GPU' if gpu else ' (CPU'}, the LLM in {{precision}}).")  # the workers fill in what they chose
    ev = cfg.eval
    job = EvalJob(paths=paths, source=source, split=split, modes=modes, hybrid=hybrid, max_samples=ev.max_samples,
                  batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, candidates_per_pass=ev.candidates_per_pass,
                  seed=cfg.seed, out=out, gpu=gpu, precision=cfg.train.precision, threads=cfg.train.cpus_per_worker,
                  header=header)
    try:
        connect(cfg.ray.address, workers * cfg.train.cpus_per_worker, cfg.ray.object_store_mb, gpu, cfg.ray.auth)
        if gpu:
            require_gpus(workers, "--gpu" if args.gpu else "train.use_gpu=true")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_on_workers(eval_worker, {"job": job}, workers, cfg.train.cpus_per_worker, gpu,
                       storage_path=os.path.join(out, "ray"), name="eval")
    except JobFailed as e:  # no restart can fix it: said once, in one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(out, "report.md")) as f:
        print("\n" + f.read())
    print(f"written: {out}/metrics.json, predictions.csv, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
