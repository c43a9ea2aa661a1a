from trainer.evaluation.evaluate import first_line, judge, llara_metrics


def test_first_line_and_judge():
    cands = ["Silver Harbor", "Golden River", "Lost Tower"]
    assert first_line(" Silver Harbor\nGolden River") == "Silver Harbor"
    assert judge(" Silver Harbor\nGolden River", cands, "Silver Harbor") == (True, True)
    assert judge("Golden River", cands, "Silver Harbor") == (True, False)
    assert judge("Golden River Silver Harbor", cands, "Silver Harbor") == (False, False)  # two titles
    assert judge("nothing", cands, "Silver Harbor") == (False, False)


def test_metrics_both_hit_ratios():
    m = llara_metrics([(True, True), (True, False), (False, False), (True, True)])
    assert m["valid_ratio"] == 0.75
    assert m["hr@1_of_valid"] == 2 / 3 and m["hr@1_of_all"] == 0.5
    assert llara_metrics([])["valid_ratio"] == 0.0


def test_rank_batches_take_each_sample_once_and_keep_ranks_in_step():
    """Every sample on exactly one rank; synced (ZeRO-3) gives every rank the same number of full-size
    batches, the filler copies not counted as real."""
    from trainer.evaluation.evaluate import rank_batches

    samples = [{"key": f"s{i:02d}"} for i in range(11)]
    for synced in (False, True):
        per_rank = [rank_batches(samples, rank, 3, 2, synced) for rank in range(3)]
        real = [s["key"] for batches in per_rank for chunk, n in batches for s in chunk[:n]]
        assert sorted(real) == [s["key"] for s in samples]
        if synced:
            assert {len(batches) for batches in per_rank} == {2}  # ceil(ceil(11 / 3) / 2)
            assert all(len(chunk) == 2 for batches in per_rank for chunk, _ in batches)
    assert [n for _, n in rank_batches(samples, 2, 3, 2, synced=True)] == [2, 1]


def test_throughput_meter_splits_a_step_into_phases(monkeypatch):
    """ms per step by phase, with the time no phase claimed as "other"; a summary starts a new window."""
    import trainer.train_loop as loop

    clock = {"t": 100.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(loop.time, "time", lambda: clock["t"])
    meter = loop.Throughput()
    for _ in range(2):  # two optimizer steps: data 10 ms, forward 30, backward 50, optimizer 5, then 5 of bookkeeping
        for phase, ms in (("data", 10), ("forward", 30), ("backward", 50), ("optimizer", 5)):
            clock["t"] += ms / 1e3
            meter.lap(phase)
        meter.count(16, 1000, 40)
        clock["t"] += 0.005
        meter.restart()
    out = meter.summary(steps=2)
    assert {k: round(out[f"{k}_ms"], 6) for k in ("data", "forward", "backward", "optimizer", "other")} == \
        {"data": 10, "forward": 30, "backward": 50, "optimizer": 5, "other": 5}
    assert round(out["samples_per_s"], 6) == 32 / 0.2 and round(out["tokens_per_s"], 6) == 2000 / 0.2
    assert round(out["head_positions_per_s"], 6) == 80 / 0.2
    clock["t"] += 1.0
    meter.count(8, 0, 0)
    assert round(meter.summary(steps=1)["samples_per_s"], 6) == 8.0  # the new window only
