"""Pretrain, evaluate and save sequential recommenders (the SRec behind LLaRA's behaviour tokens).

    python launch/pretrain_srec.py --out runs/srec-ml100k data.source=ml-100k data.path=../shared/data/ml-100k
    python launch/pretrain_srec.py --out runs/srec --archs sasrec,gru4rec,caser      # compare, one table
    python launch/pretrain_srec.py --out runs/eval --evaluate runs/srec/sasrec,runs/srec/gru4rec   # saved ones
    python launch/pretrain_srec.py --out runs/llara-ml --import-llara ../shared/data/llara-srec/movielens.pt \\
        data.source=llara data.path=../shared/data/llara-data/movielens

Uses the config's data: section (the same readers and splits as the LLM's shards) and srec: section.
Each model is saved as <out>/<arch>/{model.safetensors,config.json,pretrain_report.json}; the test
split is evaluated with every protocol of trainer/srec/metrics.py next to popularity and random,
printed as a table and written to <out>/eval_<split>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("trainer.srec.pretrain").setLevel(logging.INFO)  # one line per epoch (Ctrl-C keeps the best)
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C / kill -INT works even when started with `&`
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default=None, help="comma-separated archs to train (default: srec.arch)")
    p.add_argument("--import-llara", default=None, help="LLaRA's rec_model .pt (or .state_dict.pt) to import instead")
    p.add_argument("--evaluate", default=None, help="comma-separated saved SRec folders to evaluate instead of training")
    p.add_argument("--split", default="test")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from shards.build import load_source
    from shards.samples import sample_candidates
    from trainer.config import ConfigError, load_config, to_dict
    from trainer.srec import save_srec
    from trainer.srec.metrics import Popularity, Random, evaluate, format_table
    from trainer.srec.pretrain import check_pretrain_args, pretrain

    try:
        cfg = load_config(a.config, a.overrides)
        if not (a.import_llara or a.evaluate):  # before the data is read
            for arch in (a.archs.split(",") if a.archs else [cfg.srec.arch]):
                check_pretrain_args(**dict(to_dict(cfg.srec), arch=arch))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = to_dict(cfg.data)
    items, splits, _stats = load_source(d, cfg.seed)
    num_items = len(items)
    test = [s for s in splits.get(a.split, []) if s["history"]]
    cands = [sample_candidates(s, num_items, d["num_candidates"], cfg.seed, a.split) for s in test]
    rows = {}
    os.makedirs(a.out, exist_ok=True)
    if a.import_llara:
        from trainer.srec.llara_import import load_llara_sasrec

        model = load_llara_sasrec(a.import_llara)
        if model.num_items != num_items:
            print(f"error: {a.import_llara} knows {model.num_items} items, the data has {num_items}", file=sys.stderr)
            return 2
        save_srec(model, os.path.join(a.out, "llara_sasrec"))
        rows["llara_sasrec (imported)"] = evaluate(model, test, num_items, cands, seed=cfg.seed)
    elif a.evaluate:
        from trainer.srec import load_srec

        for folder in a.evaluate.split(","):
            model = load_srec(folder).eval()
            if model.num_items != num_items:
                print(f"error: {folder} knows {model.num_items} items, the data has {num_items}", file=sys.stderr)
                return 2
            rows[os.path.basename(os.path.normpath(folder))] = evaluate(model, test, num_items, cands, seed=cfg.seed)
    else:
        s = to_dict(cfg.srec)
        s.pop("path")
        for arch in (a.archs.split(",") if a.archs else [s["arch"]]):
            s["arch"] = arch
            try:
                model, report = pretrain(splits, num_items, max_len=d["history_len"], seed=cfg.seed, progress=True, **s)
            except KeyboardInterrupt:  # after an epoch, pretrain keeps the best one; before, there is nothing
                print(f"\ninterrupted before {arch}'s first epoch finished: nothing saved for it", file=sys.stderr)
                return 130
            save_srec(model, os.path.join(a.out, arch))
            with open(os.path.join(a.out, arch, "pretrain_report.json"), "w") as f:
                json.dump(report, f, indent=1)
            rows[arch] = evaluate(model, test, num_items, cands, seed=cfg.seed)
    if not a.no_baselines:
        if splits.get("train"):
            rows["popularity"] = evaluate(Popularity(splits["train"], num_items), test, num_items, cands, seed=cfg.seed)
        else:  # e.g. LLaRA's MovieLens/Steam folders ship no train_data.df
            print("no train split in this data: the popularity baseline is left out", file=sys.stderr)
        rows["random"] = evaluate(Random(num_items, cfg.seed), test, num_items, cands, seed=cfg.seed)
    table = format_table(rows)
    print(f"\n{a.split} split, {len(test)} samples, {num_items} items\n{table}")
    with open(os.path.join(a.out, f"eval_{a.split}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(a.out, f"eval_{a.split}.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
