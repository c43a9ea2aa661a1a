"""launch/eval.py on a trained run: both sources (export, checkpoint), every mode, the baselines,
each sample exactly once, and the same answers as the trainer's own end-of-run evaluation."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, ray_logs

pytestmark = pytest.mark.slow  # launch/eval.py in subprocesses on conftest's trained_run (a Ray training)


@pytest.fixture(scope="module")
def run(trained_run):
    """conftest's trained run: 24 steps, checkpoints every 6, its own evaluation of 16 test samples."""
    return trained_run


def _eval(run, *args):
    return subprocess.run([sys.executable, "launch/eval.py", "--run", str(run), "--max-samples", "16", "--batch-size", "8",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_eval_of_the_export_and_of_the_checkpoint(run):
    r = _eval(run)
    assert r.returncode == 0, r.stderr[-3000:] + ray_logs(r.stderr)
    out = run / "eval" / "export_test"
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples"] == 16 and m["prompts"] == "hybrid"
    assert 0 <= m["generate"]["valid_ratio"] <= 1 and set(m["score"]) >= {"hr@1", "hr@5", "ndcg@5"}
    assert set(m["baselines"]) == {"srec", "popularity", "random"}
    assert m["ctr"]["samples"] == 0  # LLaRA's next-item samples carry no CTR label
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 16 and len({row["key"] for row in rows}) == 16  # each sample exactly once
    # the same greedy answers as the trainer's end-of-run evaluation of the same model
    trained = {row["key"]: row["output"] for row in csv.DictReader(open(run / "eval" / "final_test" / "predictions.csv"))}
    first = lambda s: s.lstrip().split("\n", 1)[0].strip()  # noqa: E731
    assert all(row["generated"] == first(trained[row["key"]]) for row in rows)
    assert "HitRatio@1" in (out / "report.md").read_text() and "baseline: srec" in r.stdout
    assert "(CPU, the LLM in fp32)" in (out / "report.md").read_text() and m["precision"] == "fp32"

    r = _eval(run, "--checkpoint", "latest", "--modes", "score")
    assert r.returncode == 0, r.stderr[-3000:] + ray_logs(r.stderr)
    c = json.loads((run / "eval" / "step_000024_test" / "metrics.json").read_text())
    ranks = lambda d: [row["score_rank"] for row in csv.DictReader(open(d / "predictions.csv"))]  # noqa: E731
    assert ranks(run / "eval" / "step_000024_test") == ranks(out)  # the checkpoint holds the exported model
    assert c["score"] == m["score"] and "generate" not in c


def test_bad_arguments_fail_before_ray(run, tmp_path):
    r = _eval(run, "--modes", "score,bogus")
    assert r.returncode == 2 and "unknown mode" in r.stderr
    r = _eval(tmp_path)
    assert r.returncode == 2 and "not a training run folder" in r.stderr
    r = _eval(run, "--checkpoint", "step_999999")
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr
    r = _eval(run, "--export", str(tmp_path))
    assert r.returncode == 2 and "is not an export" in r.stderr
    r = _eval(run, "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size=0: expected an integer >= 1" in r.stderr
    r = _eval(run, "--candidates-per-pass", "0")
    assert r.returncode == 2 and "--candidates-per-pass=0" in r.stderr
    r = _eval(run, "--precision", "half")
    assert r.returncode == 2 and "--precision='half': expected one of auto, bf16, fp16, fp32" in r.stderr


LLARA_ML = os.path.join(SHARED_DATA, "llara-data", "movielens")
LLARA_SREC = os.path.join(SHARED_DATA, "llara-srec", "movielens.pt")


@pytest.mark.skipif(not (os.path.exists(LLARA_ML) and os.path.exists(LLARA_SREC)),
                    reason="LLaRA's MovieLens test set or SASRec weights are not in ../shared/data")
def test_llaras_test_set_with_llaras_sasrec_as_the_srec(tmp_path):
    """Zero-shot evaluation on LLaRA's released MovieLens test rows with LLaRA's released SASRec: the
    SRec-alone baseline of launch/eval.py is what those weights give on the same candidates."""
    from configs.schema import load_config
    from trainer.data.prepare import prepare
    from trainer.model.srec import load_srec
    from trainer.model.srec.metrics import evaluate
    from trainer.evaluation.evaluate import split_samples
    from trainer.data.loader import meta
    from shards.build import load_manifest

    run = tmp_path / "llara-ml"
    cfg = load_config(None, [f"output_dir={run}", "data.source=llara", f"data.path={LLARA_ML}", f"srec.path={LLARA_SREC}",
                             "data.max_len=1024", "model.tiny.max_position_embeddings=1024"])
    paths = prepare(cfg)
    r = _eval(run, "--zero-shot", "--modes", "score", "--max-samples", "-1")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "eval" / "zero_shot_test" / "metrics.json").read_text())
    assert m["samples"] == 95  # LLaRA's MovieLens test rows (one with an empty history is not among them)
    samples = split_samples(paths, load_manifest(paths.data), "test", -1)
    rows = [{"history": meta(s)["history"], "target": meta(s)["target"]} for s in samples]
    want = evaluate(load_srec(paths.srec), rows, 1682, [meta(s)["candidates"] for s in samples])
    assert m["baselines"]["srec"]["hr@1"] == pytest.approx(want["cand20_hr@1"])
    assert m["baselines"]["srec"]["hr@1"] > 2 * m["baselines"]["random"]["hr@1"]  # the released SASRec carries signal
