"""Pretrain, evaluate and save sequential recommenders (the SRec behind LLaRA's behaviour tokens).

    python launch/pretrain_srec.py --out runs/srec-ml100k data.source=ml-100k data.path=../shared/data/ml-100k
    python launch/pretrain_srec.py --out runs/srec --archs sasrec,gru4rec,caser      # compare, one table
    python launch/pretrain_srec.py --out runs/eval --evaluate runs/srec/sasrec,runs/srec/gru4rec   # saved ones
    python launch/pretrain_srec.py --out runs/llara-ml --import-llara ../shared/data/llara-srec/movielens.pt \\
        data.source=llara data.path=../shared/data/llara-data/movielens

Uses the config's data: section (the same readers and splits as the LLM's shards) and srec: section.
Each model is saved as <out>/<arch>/{model.safetensors,config.json,pretrain_report.json}; the test
split is evaluated with every protocol of trainer/model/srec/metrics.py next to popularity and random,
printed as a table and written to <out>/eval_<split>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from omegaconf import OmegaConf


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default=None, help="comma-separated archs to train (default: srec.arch)")
    p.add_argument("--import-llara", default=None, help="LLaRA's rec_model .pt (or .state_dict.pt) to import instead")
    p.add_argument("--evaluate", default=None, help="comma-separated saved SRec folders to evaluate instead of training")
    p.add_argument("--split", default="test")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("trainer.model.srec.pretrain").setLevel(logging.INFO)  # one line per epoch (Ctrl-C keeps the best)
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C / kill -INT works even when started with `&`
    args = parse_args(argv)
    from shards.build import load_source
    from shards.samples import sample_candidates
    from configs.schema import ConfigError, load_config
    from trainer.model.srec.metrics import evaluate, format_table, protocol
    from trainer.model.srec.pretrain import check_pretrain_args

    try:
        cfg = load_config(args.config, args.overrides)
        if not (args.import_llara or args.evaluate):  # before the data is read
            for arch in (args.archs.split(",") if args.archs else [cfg.srec.arch]):
                check_pretrain_args(OmegaConf.merge(cfg.srec, {"arch": arch}))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items, splits, _stats = load_source(cfg.data, cfg.seed)
    num_items = len(items)
    test = [s for s in splits.get(args.split, []) if s["history"]]
    cands = [sample_candidates(s, num_items, cfg.data.num_candidates, cfg.seed, args.split) for s in test]
    os.makedirs(args.out, exist_ok=True)
    rows = {}
    try:
        for name, model in srec_models(args, cfg, splits, num_items):
            rows[name] = evaluate(model, test, num_items, cands, seed=cfg.seed, mask_history=cfg.srec.eval_mask_history)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # after an epoch, pretrain keeps the best one; before, there is nothing
        arch = e.args[0] if e.args else "the model"
        print(f"\ninterrupted before {arch}'s first epoch finished: nothing saved for it", file=sys.stderr)
        return 130
    if not args.no_baselines:
        rows.update(baseline_rows(splits, test, num_items, cands, cfg.seed, cfg.srec.eval_mask_history))
    table = format_table(rows)
    ranking = protocol(cfg.srec.eval_mask_history) + ("" if cfg.srec.eval_mask_history else " (srec.eval_mask_history=false)")
    print(f"\n{args.split} split, {len(test)} samples, {num_items} items; full ranking: {ranking}\n{table}")
    with open(os.path.join(args.out, f"eval_{args.split}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, f"eval_{args.split}.md"), "w") as f:
        f.write(f"full ranking: {ranking}\n\n{table}\n")
    return 0


def srec_models(args, cfg, splits: dict, num_items: int):
    """(name, model) for each SRec to evaluate: LLaRA's imported, saved folders, or pretrained here
    (each saved to <out>/<arch>/ with its report). A model for another item count is a ValueError."""
    from trainer.model.srec import load_srec, save_srec
    from trainer.model.srec.pretrain import pretrain

    def checked(model, source: str):
        if model.num_items != num_items:
            raise ValueError(f"{source} knows {model.num_items} items, the data has {num_items}")
        return model

    if args.import_llara:
        from trainer.model.srec.llara_import import load_llara_sasrec

        model = checked(load_llara_sasrec(args.import_llara), args.import_llara)
        save_srec(model, os.path.join(args.out, "llara_sasrec"))
        yield "llara_sasrec (imported)", model
        return
    if args.evaluate:
        for folder in args.evaluate.split(","):
            yield os.path.basename(os.path.normpath(folder)), checked(load_srec(folder).eval(), folder)
        return
    for arch in (args.archs.split(",") if args.archs else [cfg.srec.arch]):
        try:
            model, report = pretrain(splits, num_items, OmegaConf.merge(cfg.srec, {"arch": arch}),
                                     max_len=cfg.data.history_len, seed=cfg.seed, progress=True)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(arch) from None  # main says which model has nothing saved
        save_srec(model, os.path.join(args.out, arch))
        with open(os.path.join(args.out, arch, "pretrain_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        yield arch, model


def baseline_rows(splits: dict, test: list, num_items: int, cands: list, seed: int, mask_history: bool = True) -> dict:
    """Popularity (training targets; left out when the data has no training split) and random."""
    from trainer.evaluation.ranking import Popularity, Random
    from trainer.model.srec.metrics import evaluate

    rows = {}
    if splits.get("train"):
        rows["popularity"] = evaluate(Popularity([s["target"] for s in splits["train"]], num_items), test, num_items, cands, seed=seed,
                                      mask_history=mask_history)
    else:  # e.g. LLaRA's MovieLens/Steam folders ship no train_data.df
        print("no train split in this data: the popularity baseline is left out", file=sys.stderr)
    rows["random"] = evaluate(Random(num_items, seed), test, num_items, cands, seed=seed, mask_history=mask_history)
    return rows


if __name__ == "__main__":
    sys.exit(main())
