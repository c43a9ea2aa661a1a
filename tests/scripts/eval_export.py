"""Load a run's export in a fresh process with no DeepSpeed, generate for the samples the trained
engine evaluated, and compare with the engine's outputs. Prints a JSON line."""

import csv
import json
import os
import sys

import torch


def main():
    out = sys.argv[1]
    from shards.build import load_manifest
    from trainer.data.loader import read_shard
    from trainer.evaluation.evaluate import generate
    from trainer.model.export import load_export
    from trainer.model.srec import load_srec

    with open(os.path.join(out, "export", "export.json")) as f:
        meta = json.load(f)
    srec = load_srec(meta["srec"])
    model, embed, tok = load_export(os.path.join(out, "export"), meta["base"], srec.hidden, meta["injection"])
    with open(os.path.join(out, "eval", "final_test", "predictions.csv"), newline="") as f:
        preds = {r["key"]: r["output"] for r in csv.DictReader(f)}
    data = os.path.join(out, "data")
    samples = [s for sh in load_manifest(data)["shards"] if sh["split"] == "test"
               for s in read_shard(os.path.join(data, sh["name"])) if s["key"] in preds]
    same = 0
    for i in range(0, len(samples), 8):
        chunk = samples[i:i + 8]
        outs = generate(model, embed, srec, chunk, tok, 12, hybrid=True, synced_gpus=False, device="cpu")
        same += sum(o == preds[s["key"]] for o, s in zip(outs, chunk))
    print(json.dumps({"compared": len(samples), "same": same, "deepspeed_imported": "deepspeed" in sys.modules}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
