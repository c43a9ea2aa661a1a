"""Candidate scoring vs generation: samples per second, same model, same samples, same run.

  generate  LLaRA's protocol: greedy decoding (KV cache, left padding) of up to --max-new-tokens
            tokens, then the first line is matched against the candidate titles
  score     the prompt once, its KV cache repeated for the 20 candidates, one more forward over the
            candidates' titles: a log-likelihood per candidate (trainer/evaluation/scoring.py)

    OMP_WAIT_POLICY=PASSIVE python bench/bench_eval.py [--run runs/default] [--samples 64] [--batch 16]

--run uses a prepared run folder (its export if there is one, else the untrained model); without it
the embedded default is prepared in a temporary folder. One process, torch threads as set by
--threads. The last line prints the ratio.
"""

import argparse
import os
import tempfile
import time

import torch

from shards.build import load_items, load_manifest
from trainer.evaluation.evaluate import generate, load_model_for_eval, split_samples
from trainer.evaluation.scoring import candidate_logliks
from trainer.model.srec import load_srec


def timed(fn, samples, batch):
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch):
        fn(samples[i:i + batch])
    return len(samples) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from configs.schema import load_config
    from trainer.data.prepare import prepare, run_paths

    run = a.run or tempfile.mkdtemp(prefix="bench_eval_")
    cfg = load_config(None, [f"output_dir={run}"])
    paths = prepare(cfg) if not a.run else run_paths(run)
    srec = load_srec(paths.srec).eval()
    export = os.path.join(paths.output_dir, "export")
    if os.path.exists(os.path.join(export, "export.json")):
        source, what = {"export": export}, "the run's export"
    else:
        import json

        with open(paths.stamp) as f:
            source, what = {"zero_shot": True, "config": json.load(f)}, "the untrained model"
    model, embed, tok = load_model_for_eval(source, paths, srec.hidden)
    titles = load_items(paths.data)["titles"]
    samples = split_samples(paths, load_manifest(paths.data), "test", a.samples)
    gen = lambda chunk: generate(model, embed, srec, chunk, tok, a.max_new_tokens, True, False, "cpu")  # noqa: E731
    score = lambda chunk: candidate_logliks(model, embed, srec, chunk, tok, titles, True, "cpu")  # noqa: E731
    gen(samples[: a.batch]), score(samples[: a.batch])  # warm-up
    g, s = [], []
    for _ in range(a.repeats):  # alternate, so both see the same machine load
        g.append(timed(gen, samples, a.batch))
        s.append(timed(score, samples, a.batch))
    g, s = sorted(g)[len(g) // 2], sorted(s)[len(s) // 2]
    print(f"{what}, {len(samples)} test samples, batch {a.batch}, {a.threads} threads, median of {a.repeats}")
    print(f"generate ({a.max_new_tokens} new tokens max): {g:8.1f} samples/s")
    print(f"score (20 candidates):            {s:8.1f} samples/s")
    print(f"candidate scoring / generation: {s / g:.2f}x samples/s")


if __name__ == "__main__":
    main()
