from trainer.evaluate import first_line, judge, llara_metrics


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
