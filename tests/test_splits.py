import os
import subprocess
import sys
import json
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import REPO, SHARED_DATA
from shards.samples import global_time_split, kcore_filter, leave_one_out, sample_candidates, user_split


def test_kcore_is_iterated():
    # user 3 has 1 interaction; dropping it leaves item 30 with 1, which must go too
    rows = [(1, 10, 5, 1), (1, 20, 5, 2), (2, 10, 5, 1), (2, 20, 5, 2), (3, 30, 5, 1), (1, 30, 5, 3)]
    kept = kcore_filter(rows, 2)
    assert {(u, i) for u, i, *_ in kept} == {(1, 10), (1, 20), (2, 10), (2, 20)}


def _kcore_rows(rows, k):  # the definition, row by row
    while True:
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
        if kept == rows:
            return rows
        rows = kept


@pytest.mark.parametrize("seed", range(4))
def test_the_compact_table_gives_the_row_by_row_results(seed):
    """kcore_filter, user_sequences and global_time_split work on numpy columns (shards/interactions.py):
    the same rows, sequences and samples as the row-by-row definitions, with tied timestamps kept in file
    order, and ratings read back as the numbers they were given as (ints stay ints)."""
    from shards.interactions import as_table
    from shards.samples import user_sequences

    rng = np.random.default_rng(seed)
    rows = [(int(u), int(i), int(r), int(t)) for u, i, r, t in
            zip(rng.integers(0, 60, 600), rng.integers(100, 200, 600), rng.integers(1, 6, 600), rng.integers(0, 50, 600))]
    kept = kcore_filter(rows, 5)
    assert list(kept) == _kcore_rows(rows, 5) and 0 < len(kept) < len(rows)  # repeated: users drop, then items
    dense = {raw: d for d, raw in enumerate(sorted({i for _, i, *_ in kept}))}
    seqs = user_sequences(kept, dense)
    by_user = {}
    for order, (u, i, _r, t) in enumerate(kept):
        by_user.setdefault(u, []).append((t, order, dense[i]))
    assert list(seqs) == sorted(by_user)
    assert all(seqs[u].tolist() == [d for *_, d in sorted(by_user[u])] for u in by_user)
    out = global_time_split(kept, dense, history_len=3)
    ordered = sorted((t, order, u, dense[i], r) for order, (u, i, r, t) in enumerate(kept))
    first = [s for s in out["train"]][0]
    seen_before = [row for row in ordered if row[2] == first["user"]][:first["position"]]
    assert first["history"] == [d for *_, d, _r in seen_before][-3:] and type(first["rating"]) is int
    assert sum(map(len, out.values())) == len(kept) - len(by_user)  # every interaction but each user's first
    assert type(list(as_table([(1, 2, 4.5, 3)]))[0][2]) is float


def test_the_table_holds_16_bytes_an_interaction_and_widens_a_column_that_does_not_fit():
    """The readers' TableBuilder keeps ids, timestamps and ratings in 4 bytes while they fit and widens a
    column to 8 the first time one does not (an id of 2^31, a rating float32 rounds): what is read back
    is always what was appended."""
    from shards.interactions import TableBuilder

    typical = [(7, 1193, 5.0, 978300760), (7, 661, 3.5, 978302109), (2**31 - 1, 0, 1.0, -5)]
    b = TableBuilder()
    for row in typical:
        b.append(row)
    t = b.table()
    assert sum(c.itemsize for c in (t.user, t.item, t.rating, t.timestamp)) == 16 and list(t) == typical
    wide = [(1, 2, 4.0, 3), (2**31, 5, 0.1, 1_700_000_000_000), (3, 2**40, float("inf"), 4)]
    b = TableBuilder()
    for row in wide:
        b.append(row)
    t = b.table()
    assert [c.itemsize for c in (t.user, t.item, t.rating, t.timestamp)] == [8, 8, 8, 8]
    assert list(t) == wide and type(t[0][2]) is float and type(t[0][0]) is int


def test_user_sequences_are_the_same_whatever_the_block_size(monkeypatch):
    """user_sequences maps and groups the sorted rows a block at a time: blocks that cut a user's run,
    or hold only part of one, give the same sequences; an unknown item names the first such record in the file."""
    import shards.samples as samples

    rng = np.random.default_rng(3)
    n = 500
    table = samples.as_table(list(zip(rng.integers(0, 40, n).tolist(), rng.integers(100, 130, n).tolist(),
                                      [1.0] * n, rng.integers(0, 9, n).tolist())))
    dense = {raw: d for d, raw in enumerate(range(100, 130))}
    whole = samples.user_sequences(table, dense)
    for block in (1, 7, 64):
        monkeypatch.setattr(samples, "_BLOCK", block)
        cut = samples.user_sequences(table, dense)
        assert list(cut) == list(whole) and all(cut[u].tolist() == whole[u].tolist() for u in whole)
    assert sum(map(len, whole.values())) == n and len(whole) == len(set(table.user.tolist()))
    table.item[[400, 12, 250]] = 999
    with pytest.raises(ValueError, match="record 13 names item 999"):
        samples.user_sequences(table, dense)


def test_leave_one_out():
    out = leave_one_out({7: [1, 2, 3, 4, 5]}, history_len=2)
    assert [(s["history"], s["target"]) for s in out["test"]] == [([3, 4], 5)]
    assert [(s["history"], s["target"]) for s in out["val"]] == [([2, 3], 4)]
    assert [(s["history"], s["target"]) for s in out["train"]] == [([1], 2), ([1, 2], 3)]


def test_user_split_sliding_windows():
    seqs = {u: list(range(u * 10, u * 10 + 5)) for u in range(20)}
    out = user_split(seqs, history_len=3, seed=0)
    users = {k: {s["user"] for s in v} for k, v in out.items()}
    assert len(users["train"]) == 16 and len(users["val"]) == 2 and len(users["test"]) == 2
    assert not users["train"] & users["test"] and not users["val"] & users["test"]
    assert len(out["train"]) == 16 * 4  # every window of a training user
    t = out["test"][0]
    assert t["target"] == seqs[t["user"]][-1] and t["history"] == seqs[t["user"]][-4:-1]


def test_global_time_split():
    rows = [(u, 100 + k, 4 if k % 2 else 2, u * 1000 + k) for u in range(1, 3) for k in range(10)]
    dense = {100 + k: k for k in range(10)}
    out = global_time_split(rows, dense, history_len=3)
    # 20 interactions cut 16/2/2 by time; user 2's are all later than user 1's
    assert {s["user"] for s in out["test"]} == {2} and all(s["target"] in (8, 9) for s in out["test"])
    s = out["test"][-1]
    assert s["history"] == [6, 7, 8] and s["history_ratings"] == [2, 4, 2] and s["rating"] == 4
    assert len(out["train"]) + len(out["val"]) + len(out["test"]) == 18  # each user's first has no history


def test_candidates_are_seeded_per_sample():
    s = {"user": 4, "history": [1, 2, 3], "target": 9, "position": 3}
    a = sample_candidates(s, 100, 20, seed=0, split="test")
    assert a == sample_candidates(dict(s), 100, 20, seed=0, split="test")
    assert a != sample_candidates(s, 100, 20, seed=1, split="test")
    assert len(set(a)) == 20 and 9 in a and not {1, 2, 3} & set(a)
    with pytest.raises(ValueError, match="only 5 items are outside the history"):
        sample_candidates({"user": 1, "history": list(range(9)), "target": 9, "position": 9}, 15, 20, 0, "test")


def test_movielens_100k_reads_and_splits_as_published():
    folder = os.path.join(SHARED_DATA, "ml-100k")
    if not os.path.exists(folder):
        pytest.skip(f"{folder} is absent (real data sets live in ../shared/data)")
    from shards.build import load_source
    from configs.schema import load_config, to_dict

    data = OmegaConf.merge(load_config().data, {"source": "ml-100k", "path": folder})
    items, splits, st = load_source(data, 0)
    assert st["users"] == 943 and len(items) == 1682 and st["interactions"] == 100_000
    assert len(splits["test"]) == len(splits["val"]) == 943
    assert len(splits["train"]) == 100_000 - 3 * 943  # every user's first item has no history


@pytest.mark.slow  # python launch/build_shards.py in a subprocess, with a local Ray cluster
def test_build_cli_on_ray(small_run, tmp_path):
    """python launch/build_shards.py --ray: the shards encoded as Ray tasks (2 at a time, on the local cluster it
    starts), the same bytes as the in-process build; the manifest counts every sample; progress is shown."""
    from shards.build import load_source, write_shards
    from configs.schema import load_config, to_dict

    _, paths = small_run
    out = tmp_path / "cli"
    data = ["data.synthetic.num_users=60", "data.synthetic.num_items=80", "data.samples_per_shard=300"]
    cmd = [sys.executable, "launch/build_shards.py", "--tokenizer", paths.llm, "--out", str(out), "--workers", "2", "--ray",
           *data]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting a local Ray cluster with 2 CPUs" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    st = m["stats"]
    assert st["users"] == 60 and st["items"] == 80 and st["test_samples"] == st["val_samples"] == 60
    assert "tokenizing train" in r.stderr and "sample/s" in r.stderr  # progress: the split, the rate (and ETA)
    assert sum(s["count"] for s in m["shards"]) == st["train_samples"] + 2 * 60
    cfg = load_config(None, data)
    d = to_dict(cfg.data)
    items, splits, stats = load_source(cfg.data, cfg.seed)
    here = write_shards(items, splits, paths.llm, str(tmp_path / "here"), num_candidates=d["num_candidates"],
                        max_len=d["max_len"], samples_per_shard=d["samples_per_shard"], seed=cfg.seed, workers=1,
                        stats=stats)
    assert here == m
    for s in m["shards"]:
        assert (out / s["name"]).read_bytes() == (tmp_path / "here" / s["name"]).read_bytes()
