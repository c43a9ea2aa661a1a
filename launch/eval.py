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


log = logging.getLogger("launch.eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's output_dir (prepared: data, tokenizer, SRec)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint tag of the run (step_000600) or 'latest'")
    src.add_argument("--export", help="an export folder (default: <run>/export)")
    src.add_argument("--zero-shot", action="store_true",
                     help="the run's base LLM with untrained LoRA and adapter (ReLLa's zero-shot setting)")
    p.add_argument("--split", default="test")
    p.add_argument("--modes", default="generate,score,ctr", help="comma-separated: generate, score, ctr")
    p.add_argument("--prompts", choices=["hybrid", "text"], default=None,
                   help="behaviour tokens injected or placeholders as [PH] (default: as the run trained)")
    p.add_argument("--max-samples", type=int, default=-1, help="the first N samples of the split (-1: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--candidates-per-pass", type=int, default=5,
                   help="score: candidates scored together after one prompt forward (each holds a copy of the "
                        "prompt's KV cache; as eval.candidates_per_pass)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker; default: CPU")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster to join (default: RAY_ADDRESS, as ray job submit sets it; else a local one)")
    p.add_argument("--ray-auth", choices=("token", "disabled"), default="token",
                   help="Ray's token authentication, as ray.auth (disabled: unsafe on a shared network)")
    p.add_argument("--object-store-mb", type=int, default=512, help="a local cluster's object store (as ray.object_store_mb)")
    p.add_argument("--precision", default="auto",
                   help="auto | bf16 | fp16 | fp32: what the LLM and adapter are read in, as train.precision: "
                        "auto is bf16 on a GPU that has it, fp16 on one that has not, fp32 on CPU; bf16/fp16 need --gpu")
    p.add_argument("--seed", type=int, default=0, help="the random baseline's seed")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def resolve_source(args, paths: dict) -> tuple[dict, dict, str]:
    """({"export": dir}, {"checkpoint": dir, "config": ...} or {"zero_shot": True, "config": ...}, the
    run's training config if known, a short name)."""
    from trainer.job.checkpoint import COMPLETE, find_latest, read_trainer_state
    from trainer.model.export import EXPORT_META

    if args.checkpoint:
        tag = find_latest(paths["checkpoints"]) if args.checkpoint == "latest" else args.checkpoint
        checkpoint = os.path.join(paths["checkpoints"], tag or "")
        if not tag or not os.path.exists(os.path.join(checkpoint, COMPLETE)):
            raise ValueError(f"no complete checkpoint {args.checkpoint!r} in {paths['checkpoints']}")
        run_cfg = read_trainer_state(checkpoint)["config"]
        return {"checkpoint": checkpoint, "config": run_cfg}, run_cfg, tag
    if args.zero_shot:
        with open(paths["stamp"]) as f:  # the run's prepared config: base model, LoRA shape, injection
            prepared = json.load(f)
        return {"zero_shot": True, "config": prepared}, None, "zero_shot"
    export = os.path.abspath(args.export or paths["export"])
    if not os.path.exists(os.path.join(export, EXPORT_META)):
        raise ValueError(f"{export} is not an export (no {EXPORT_META}); train first, or pass --checkpoint")
    tag = find_latest(paths["checkpoints"])
    run_cfg = read_trainer_state(os.path.join(paths["checkpoints"], tag))["config"] if tag else None
    return {"export": export}, run_cfg, "export"


def check_arguments(args) -> tuple[list[str], dict, tuple]:
    """(modes, run paths, resolve_source's answer), or a ValueError: everything refused before Ray
    starts (the GPU's bf16 support is asked on the workers)."""
    from shards.build import MANIFEST, load_manifest
    from trainer.evaluation.evaluate import MODES, check_modes
    from trainer.job.precision import resolve_precision
    from trainer.data.prepare import prepared_paths

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; expected some of {', '.join(MODES)}")
    for option in ("batch_size", "max_new_tokens", "candidates_per_pass", "workers", "cpus_per_worker", "object_store_mb"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')}={getattr(args, option)}: expected an integer >= 1")
    if args.max_samples == 0 or args.max_samples < -1:
        raise ValueError(f"--max-samples={args.max_samples}: expected -1 (all) or an integer >= 1")
    resolve_precision(args.precision, args.gpu, bf16_supported=True, option="--precision")
    paths = prepared_paths(args.run)
    if not os.path.exists(os.path.join(paths["data"], MANIFEST)):
        raise ValueError(f"{args.run} is not a training run folder (no data/{MANIFEST})")
    check_modes(load_manifest(paths["data"]), modes)
    return modes, paths, resolve_source(args, paths)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        modes, paths, (source, run_cfg, name) = check_arguments(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.gpu:  # the driver imports DeepSpeed too (through transformers): no accelerator probe
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer.evaluation.evaluate import EvalJob, eval_worker
    from trainer.job.gpus import require_gpus
    from trainer.job.ray_cluster import JobFailed, connect, run_on_workers

    hybrid = (args.prompts or ("text" if run_cfg and run_cfg["train"]["mode"] == "text" else "hybrid")) == "hybrid"
    out = os.path.abspath(args.out or os.path.join(paths["eval"], f"{name}_{args.split}"))
    header = (f"Run `{paths['output_dir']}`, {name}, split `{args.split}`, prompts "
              f"{'hybrid (behaviour tokens)' if hybrid else 'text-only'}, {args.workers} workers"
              f"{' (GPU' if args.gpu else ' (CPU'}, the LLM in {{precision}}).")  # the workers fill in what they chose
    job = EvalJob(paths=paths, source=source, split=args.split, modes=modes, hybrid=hybrid, max_samples=args.max_samples,
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  candidates_per_pass=args.candidates_per_pass, seed=args.seed, out=out, gpu=args.gpu,
                  precision=args.precision, threads=args.cpus_per_worker, header=header)
    try:
        connect(args.ray_address, args.workers * args.cpus_per_worker, args.object_store_mb, args.gpu, args.ray_auth)
        if args.gpu:
            require_gpus(args.workers, "--gpu")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_on_workers(eval_worker, {"job": job}, args.workers, args.cpus_per_worker, args.gpu,
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
