"""data.length_grouping (trainer/data/loader.py): batches of similar lengths with the reader's guarantees kept:
every sample exactly once per epoch, equal micro-batches per rank, a resume yields exactly the rest,
and off is the order of before, byte for byte."""
import numpy as np
import pytest

from shards.build import load_manifest
from trainer.data.loader import SplitReader, _raw_records, collate, rank_loader, record_length


def _shards(paths):
    return [s for s in load_manifest(paths.data)["shards"] if s["split"] == "train"]


def _readers(paths, world, micro=4, accum=1, grouping=8, seed=0):
    return [SplitReader(paths.data, _shards(paths), r, world, micro, seed, shuffle=True, grad_accum=accum,
                        length_grouping=grouping) for r in range(world)]


def _keys(batches, fillers=False):
    return [s["key"] for b in batches for s in b if fillers or not s["filler"]]


def _padded_share(batches) -> float:
    """Mean over micro-batches of padded positions / all positions (collate pads to the longest)."""
    shares = []
    for batch in batches:
        lengths = [len(s["input_ids"]) for s in batch]
        shares.append(1 - sum(lengths) / (len(lengths) * max(lengths)))
    return float(np.mean(shares))


def _order_before(paths, epoch, seed=0):
    """The order of before length grouping, written out from its rule: shards in an order drawn from
    (seed, epoch), samples inside shard s in one drawn from (seed, epoch, s). (key, llara.bin bytes)."""
    shards = _shards(paths)
    out = []
    for s in np.random.default_rng([seed, epoch]).permutation(len(shards)).tolist():
        records = list(_raw_records(f"{paths.data}/{shards[s]['name']}"))
        for i in np.random.default_rng([seed, epoch, s]).permutation(len(records)).tolist():
            out.append((records[i]["__key__"], records[i]["llara.bin"]))
    return out


@pytest.mark.parametrize("world,micro,accum,grouping", [(1, 7, 1, 8), (2, 4, 1, 8), (3, 5, 2, 2), (2, 4, 2, 1),
                                                        (3, 4, 1, 1000)])
def test_every_sample_exactly_once_and_equal_steps(small_run, world, micro, accum, grouping):
    _, paths = small_run
    readers = _readers(paths, world, micro, accum, grouping)
    per_rank = [list(r.rank_batches(epoch=0)) for r in readers]
    n = readers[0].num_samples
    assert all(len(b) == readers[0].batches_per_epoch() for b in per_rank)  # no rank waits for another
    assert all(len(batch) == micro for b in per_rank for batch in b)
    keys = [k for b in per_rank for k in _keys(b)]
    assert len(keys) == len(set(keys)) == n
    fillers = sum(s["filler"] for b in per_rank for batch in b for s in batch)
    assert fillers == readers[0].padded_length() - n < world * micro * accum


def test_each_window_holds_the_same_samples_as_before(small_run):
    """Grouping only reorders inside a window of N global batches: a sample moves by less than a window."""
    _, paths = small_run
    r = _readers(paths, world=2, micro=4, grouping=3)[0]
    before = [key for key, _ in _order_before(paths, epoch=2)]
    after = [rec["__key__"] for g, rec, _ in r.global_records(2) if not rec.get("__filler__")]
    window = 3 * r.global_batch
    assert after != before
    for w0 in range(0, len(before), window):
        assert sorted(after[w0:w0 + window]) == sorted(before[w0:w0 + window])


@pytest.mark.parametrize("world,micro", [(2, 4), (3, 2), (1, 4)])
def test_each_ranks_micro_batch_is_a_run_of_the_sorted_window(small_run, world, micro):
    """A micro-step (W x micro consecutive samples) is a run of the window's samples sorted by length,
    and rank r's micro-batch (every W-th sample from r) is the r-th part of that run: similar lengths."""
    _, paths = small_run
    r = _readers(paths, world=world, micro=micro, grouping=4)[0]
    lengths = [record_length(rec) for _, rec, _ in r.global_records(0)][:r.num_samples]
    window, step = 4 * r.global_batch, world * micro
    for w0 in range(0, len(lengths) - window + 1, window):
        ranked = sorted(lengths[w0:w0 + window])
        runs = {tuple(ranked[i:i + step]) for i in range(window - step + 1)}
        for m in range(w0, w0 + window, step):
            assert tuple(sorted(lengths[m:m + step])) in runs
            parts = [sorted(lengths[m + q:m + step:world]) for q in range(world)]
            assert all(parts[q][-1] <= parts[q + 1][0] for q in range(world - 1))


def test_order_depends_on_seed_and_epoch_only(small_run):
    _, paths = small_run
    a, b = _readers(paths, 2)[0], _readers(paths, 2)[0]
    keys = lambda r, e: [rec["__key__"] for _, rec, _ in r.global_records(e)]  # noqa: E731
    assert keys(a, 0) == keys(b, 0) and keys(a, 0) != keys(a, 1)
    assert keys(a, 0) != keys(_readers(paths, 2, seed=1)[0], 0)


@pytest.mark.parametrize("world,micro,accum", [(2, 4, 1), (3, 5, 2), (1, 4, 4)])
def test_resume_position_gives_the_rest_in_order(small_run, world, micro, accum):
    _, paths = small_run
    readers = _readers(paths, world, micro, accum, grouping=2)
    window = 2 * readers[0].global_batch
    padded, step = readers[0].padded_length(), world * micro
    # inside the first window, on a window boundary, inside a later window, among the fillers, at the end
    starts = [3 * step, window, window + 5 * step, padded - step, padded]
    for r in readers:
        full = [(s["key"], s["input_ids"].tobytes(), s["filler"]) for b in r.rank_batches(epoch=3) for s in b]
        for start in starts:
            rest = [(s["key"], s["input_ids"].tobytes(), s["filler"]) for b in r.rank_batches(epoch=3, start=start)
                    for s in b]
            assert rest == full[start // world:], start
    # the global order from a position is the tail of the whole epoch's, whatever the rank
    whole = [(g, rec["__key__"]) for g, rec, _ in readers[0].global_records(3)]
    assert [(g, rec["__key__"]) for g, rec, _ in readers[-1].global_records(3, window + step)] == whole[window + step:]


def test_loader_workers_keep_the_order(small_run):
    _, paths = small_run
    r = _readers(paths, world=2)[1]
    direct = [collate(b, 0)["keys"] for b in r.rank_batches(epoch=0)]
    for workers in (0, 2):
        assert [b["keys"] for b in rank_loader(r, 0, 0, pad_token_id=0, num_workers=workers)] == direct


def test_padded_share_drops(small_run):
    _, paths = small_run
    def share(n):
        return _padded_share([b for r in _readers(paths, 2, grouping=n) for b in r.rank_batches(0)])

    off, on = share(0), [share(n) for n in (1, 2, 8)]
    assert on[0] < off and on[1] < off / 2 and on[2] < off / 4, (off, on)


def test_off_is_the_order_of_before_byte_for_byte(small_run):
    _, paths = small_run
    for epoch in (0, 1):
        before = _order_before(paths, epoch)
        for world in (1, 2):
            readers = _readers(paths, world, micro=4, grouping=0)
            got = [(rec["__key__"], rec["llara.bin"]) for _, rec, _ in readers[0].global_records(epoch)]
            assert got[:len(before)] == before
            fillers = got[len(before):]
            assert len(fillers) == readers[0].padded_length() - len(before)
            assert all(f == before[0] for f in fillers)  # a filler copies the epoch's first sample


def test_negative_grouping_is_refused(small_run):
    _, paths = small_run
    with pytest.raises(ValueError, match="length_grouping"):
        _readers(paths, 1, grouping=-1)


def test_config_key():
    from configs.schema import ConfigError, load_config

    assert load_config(None, []).data.length_grouping == 0  # off by default
    assert load_config(None, ["data.length_grouping=8"]).data.length_grouping == 8
    with pytest.raises(ConfigError, match="data.length_grouping"):
        load_config(None, ["data.length_grouping=-1"])


@pytest.mark.parametrize("new_world", [1, 3])
def test_a_resize_mid_window_keeps_each_sample_once_in_the_old_layout(small_run, new_world):
    """A resume on another worker count keeps the global batch (12 = micro 2 x 3 x 2 workers = 2 x 2 x 3 =
    2 x 6 x 1) and reads the rest of the epoch in the old worker count's layout (order_world): each sample
    once, every rank the same number of micro-batches. In the new count's own layout the window's samples
    would be dealt otherwise: some seen twice, some never."""
    _, paths = small_run
    G, micro, grouping = 12, 2, 4
    old = _readers(paths, 2, micro, accum=G // (2 * micro), grouping=grouping)
    done = 7 * G  # 7 optimizer steps, 84 samples: mid-way through the second window of 4 x 12 (48..95)
    seen = [s["key"] for r in old for b in list(r.rank_batches(epoch=2))[:done // (2 * micro)] for s in b
            if not s["filler"]]
    new = _readers(paths, new_world, micro, accum=G // (new_world * micro), grouping=grouping)
    for r in new:
        r.order_world = 2
    rest = [list(r.rank_batches(epoch=2, start=done)) for r in new]
    assert len({len(b) for b in rest}) == 1  # equal micro-batches per rank
    keys = seen + [k for b in rest for k in _keys(b)]
    assert len(keys) == len(set(keys)) == new[0].num_samples
    for r in new:
        r.order_world = 0  # the new count's own layout for the rest: not the same samples
    naive = seen + [k for r in new for k in _keys(list(r.rank_batches(epoch=2, start=done)))]
    assert len(set(naive)) < new[0].num_samples
