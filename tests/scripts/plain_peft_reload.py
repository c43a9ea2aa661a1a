"""Run docs/runs.md's plain transformers + peft lines (the block after <!-- plain-reload -->) on a trained
run's export and compare their hybrid logits with the project's own load_export on the same test
samples. Prints a JSON line: {"samples", "max_abs_diff"}."""

import json
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_lines() -> str:
    with open(os.path.join(REPO, "docs/runs.md")) as f:
        text = f.read()
    block = re.search(r"<!-- plain-reload -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/runs.md has no plain-reload block"
    return block.group(1)


def main():
    run = sys.argv[1]
    from shards.build import load_manifest
    from trainer.data.loader import collate
    from trainer.evaluation.evaluate import split_samples
    from trainer.model.export import load_export, read_export_meta
    from trainer.data.prepare import prepared_paths
    from trainer.model.srec import load_srec

    paths = prepared_paths(run)
    export = paths.export
    meta = read_export_meta(export)
    plain = {"export": export, "base": meta["base"]}
    exec(readme_lines(), plain)  # README's lines, as a user would paste them

    srec = load_srec(paths.srec).eval()
    ours, embed, tokenizer = load_export(export, meta["base"], srec.hidden, meta["injection"])
    samples = split_samples(paths, load_manifest(paths.data), "test", 4)
    batch = collate(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        vectors = srec.item_vectors(batch["unique_items"])
        with embed.inject(batch["slot_map"], vectors):
            want = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        positions = (batch["slot_map"] >= 0).nonzero()
        got = plain["hybrid_logits"](batch["input_ids"], batch["attention_mask"], positions,
                                     vectors[batch["slot_map"][positions[:, 0], positions[:, 1]]])
    mask = batch["attention_mask"].bool()
    print(json.dumps({"samples": len(samples), "max_abs_diff": (got - want)[mask].abs().max().item()}))


if __name__ == "__main__":
    main()
