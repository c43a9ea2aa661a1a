"""ReLLa CTR samples (shards/ctr.py, shards/prompts.py tokenize_ctr), ML-100K CTR samples from the real
files, and the whole CTR path on the embedded default: train, launch/eval.py --modes ctr, --zero-shot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
import torch

from shards.ctr import build_samples, few_shot, label_samples, pool_len
from shards.prompts import CTR_ANSWERS, HISTORY_EMB, ITEM_EMB, profile_sentence, render_ctr
from shards.samples import global_time_split

from conftest import REPO, SHARED_DATA, SMALL

# user, item, rating, timestamp: user 1 rates 6 items, user 2 rates 4
ROWS = [(1, 10, 5, 1), (1, 11, 2, 2), (1, 12, 4, 3), (1, 13, 1, 4), (1, 14, 5, 5), (1, 15, 3, 6),
        (2, 10, 1, 7), (2, 12, 5, 8), (2, 13, 4, 9), (2, 15, 2, 10)]
DENSE = {i: i - 10 for i in range(10, 16)}


def _cfg(**ctr):
    c = {"threshold": 4.0, "retrieval": "none", "reit": False, "few_shot": -1, "profile": True, **ctr}
    return OmegaConf.create({"task": "ctr", "history_len": 2, "ctr": c,
                             "retrieval": {"hybrid": False, "pool_len": 50, "order": "sequential", "template": "movie"}})


def _vecs():
    """Unit item vectors where item 0 and item 4 are identical, the rest orthogonal to them."""
    v = torch.eye(6)
    v[4] = v[0]
    return v


def test_labels_k_most_recent_and_ratings():
    d = _cfg()
    splits = global_time_split(ROWS, DENSE, pool_len(d), ratios=(0.6, 0.2, 0.2))
    out = build_samples(d, splits, seed=0)
    every = [s for rows in out.values() for s in rows]
    assert len(every) == 8  # 10 interactions, the first of each user has no history
    for s in every:
        assert s["label"] == int(s["rating"] >= 4)
        assert len(s["history"]) <= 2 and len(s["history"]) == len(s["history_ratings"])
    # user 1's 6th interaction (item 15) sees the 2 most recent items 13, 14 with ratings 1, 5
    s = next(s for s in every if s["user"] == 1 and s["target"] == 5)
    assert s["history"] == [3, 4] and s["history_ratings"] == [1, 5] and s["label"] == 0 and not s["retrieved"]


def test_threshold_that_leaves_one_class_is_refused():
    splits = global_time_split(ROWS, DENSE, 2, ratios=(0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="threshold"):
        label_samples(splits, 6.0, 2)
    loo = {"train": [{"user": 1, "history": [0], "target": 1, "position": 1}]}
    with pytest.raises(ValueError, match="split=time"):
        label_samples(loo, 4.0, 2)


def test_prompt_profile_slots_and_answer():
    titles = [f"Movie {c}" for c in "ABCDEF"]
    s = {"user": 1, "history": [0, 3], "history_ratings": [5.0, 1.0], "target": 4, "label": 1}
    prompt, answer = render_ctr(s, titles, {"gender": "F", "age": 25, "occupation": "writer"})
    assert prompt.startswith("The user is a female, aged 25, working as writer. ")
    assert f"1. Movie A {HISTORY_EMB} (5 stars), 2. Movie D {HISTORY_EMB} (1 stars)" in prompt
    assert f"Will the user like Movie E {ITEM_EMB}?" in prompt and answer == CTR_ANSWERS[0]
    assert render_ctr(dict(s, label=0), titles)[1] == CTR_ANSWERS[1]
    assert not render_ctr(s, titles)[0].startswith("The user is")  # no profile, no profile sentence
    assert profile_sentence({}) == ""


def test_subr_reit_doubles_each_example():
    d = _cfg(reit=True)
    d["history_len"] = 1
    splits = global_time_split(ROWS, DENSE, pool_len(d), ratios=(0.6, 0.2, 0.2))
    train = [s for s in splits["train"] if s["history"]]
    out = build_samples(d, splits, seed=0, item_vecs=_vecs())
    assert len(out["train"]) == 2 * len(train)
    assert [s["retrieved"] for s in out["train"]] == [False, True] * len(train)
    for (rec, ret), src in zip(zip(out["train"][::2], out["train"][1::2]), train):
        assert rec["target"] == ret["target"] == src["target"] and rec["label"] == ret["label"]
        assert rec["history"] == src["history"][-1:]
    # user 1 target item 14 (dense 4 == item 0's vector): SUBR picks item 0 from [0, 1, 2, 3], recent picks 3
    pair = next(i for i, s in enumerate(out["train"][::2]) if s["user"] == 1 and s["target"] == 4)
    assert out["train"][2 * pair]["history"] == [3] and out["train"][2 * pair + 1]["history"] == [0]
    assert out["train"][2 * pair + 1]["history_ratings"] == [5]
    assert not any(s["retrieved"] for s in out["test"])  # ctr.retrieval=none for evaluation


def test_ctr_splits_hold_arrays_not_samples_and_read_as_the_samples():
    """The time split and the CTR steps on it (labels, K most recent, SUBR's histories, ReiT's pairs) make each
    sample when it is read (issue 26: a build streams them). Memory held by 20,000 interactions' splits, with
    ReiT and SUBR: a few dozen bytes a sample (measured: 24; the lists of dicts before: 834). Read in any order, a sample is
    what it is when read in order (SUBR computes a block at a time)."""
    import tracemalloc

    from shards.retrieval import l2_normalize

    rng = np.random.default_rng(0)
    n = 20_000
    rows = list(zip(rng.integers(0, 600, n).tolist(), rng.integers(0, 500, n).tolist(), rng.integers(1, 6, n).tolist(),
                    rng.integers(0, 10**6, n).tolist()))
    dense = {i: i for i in range(500)}
    d = _cfg(retrieval="subr", reit=True)
    vecs = l2_normalize(torch.randn(500, 16))
    tracemalloc.start()
    try:
        splits = global_time_split(rows, dense, pool_len(d))
        out = build_samples(d, splits, seed=0, item_vecs=vecs)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    count = sum(len(v) for v in out.values())
    assert count > n and held / count < 100, (held, count)  # train doubled by ReiT
    train = out["train"]
    assert not isinstance(train, list) and [s["retrieved"] for s in train[:4]] == [False, True, False, True]
    picks = [len(train) - 1, 5000, 3, 9001, 3]
    in_order = {i: s for i, s in enumerate(train) if i in picks}
    assert [train[i] for i in picks] == [in_order[i] for i in picks] and train[-1] == in_order[len(train) - 1]
    with pytest.raises(IndexError):
        train[len(train)]


def test_few_shot_is_seeded_and_deterministic():
    rows = [{"i": i} for i in range(100)]
    a, b, c = few_shot(rows, 10, 0), few_shot(rows, 10, 0), few_shot(rows, 10, 1)
    assert a == b and a != c and len(a) == 10
    assert [r["i"] for r in a] == sorted(r["i"] for r in a)  # original order kept
    assert few_shot(rows, -1, 0) is rows
    with pytest.raises(ValueError, match="few_shot=101"):
        few_shot(rows, 101, 0)


def test_retrieval_hybrid_next_item_queries_the_last_item():
    d = OmegaConf.create({"task": "llara", "history_len": 2, "retrieval": {"hybrid": True, "pool_len": 5, "order": "sequential"}})
    splits = {"train": [{"user": 1, "history": [0, 1, 2, 4], "target": 5, "position": 4}]}
    out = build_samples(d, splits, seed=0, item_vecs=_vecs())
    assert out["train"][0]["history"] == [0, 4] and out["train"][0]["target"] == 5


def test_ml1m_without_ratings_names_the_file(tmp_path):
    from shards.readers import read_movielens_1m

    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        read_movielens_1m(str(tmp_path))


ML100K = os.path.join(SHARED_DATA, "ml-100k")


@pytest.mark.skipif(not os.path.exists(os.path.join(ML100K, "u.data")), reason=f"{ML100K} (u.data) is absent")
def test_ml100k_ctr_samples(tmp_path):
    from shards.build import load_source
    from shards.readers import read_profiles
    from configs.schema import load_config, to_dict

    d = load_config(None, ["data.source=ml-100k", f"data.path={ML100K}", "data.split=time", "data.task=ctr"]).data
    items, splits, _ = load_source(d, 0)
    out = build_samples(d, splits, seed=0)
    n = sum(len(v) for v in out.values())
    assert 99_000 < n < 100_000  # 100,000 ratings less each user's first
    labels = np.asarray([s["label"] for s in out["train"]])
    assert 0.5 < labels.mean() < 0.6  # ML-100K: 55% of ratings are >= 4
    profiles = read_profiles("ml-100k", ML100K)
    assert len(profiles) == 943
    s = out["test"][0]
    prompt, _ = render_ctr(s, [t for _, t, _ in items], profiles[s["user"]])
    assert prompt.startswith("The user is a ") and "stars)" in prompt and len(s["history"]) == 10


def _run(args, timeout):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.mark.slow  # launch/train.py and launch/eval.py in subprocesses
def test_ctr_end_to_end_on_the_embedded_default(tmp_path):
    """data.task=ctr on the synthetic default with SUBR + ReiT + few-shot: train (its evaluation gives AUC),
    then eval --modes ctr zero-shot: AUC / log loss / accuracy; generate/score are refused for CTR shards."""
    out = tmp_path / "ctr"
    _run(["launch/train.py", f"output_dir={out}", *SMALL, "data.task=ctr", "data.split=time", "data.ctr.few_shot=128",
          "data.ctr.reit=true", "data.ctr.retrieval=subr", "data.build_workers=1", "train.max_steps=6",
          "eval.max_samples=32", "srec.epochs=1"], 900)
    m = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else \
        json.loads((out / "data" / "manifest.json").read_text())
    assert m["params"]["task"] == "ctr" and m["stats"]["train_samples"] == 256  # 128 few-shot x 2 (ReiT)
    t = json.loads((out / "eval" / "final_test" / "metrics.json").read_text())["ctr"]
    assert 0 <= t["auc"] <= 1
    # launch/eval.py: ReLLa's zero-shot setting (the base LLM, no adapter). Its --export path is the same for
    # both tasks (tests/test_eval.py) and the trained model's CTR scoring is the end-of-run evaluation above
    _run(["launch/eval.py", "--run", str(out), "--zero-shot", "--modes", "ctr", "--max-samples", "48"], 600)
    c = json.loads((out / "eval" / "zero_shot_test" / "metrics.json").read_text())["ctr"]
    assert c["samples"] == 48 and 0 <= c["auc"] <= 1 and c["log_loss"] > 0 and 0 <= c["accuracy"] <= 1
    p = subprocess.run([sys.executable, "launch/eval.py", "--run", str(out), "--modes", "generate"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--modes ctr" in p.stderr
