import pytest

from trainer.data.curriculum import is_hybrid, warmup_cosine


def test_curriculum_is_a_function_of_seed_and_step():
    a = [is_hybrid("curriculum", s, 400, seed=1) for s in range(400)]
    assert a == [is_hybrid("curriculum", s, 400, seed=1) for s in range(400)]
    assert a != [is_hybrid("curriculum", s, 400, seed=2) for s in range(400)]
    assert not a[0]
    first, last = sum(a[:100]) / 100, sum(a[300:]) / 100
    assert first < 0.25 < 0.7 < last  # probability step/total: text-only early, hybrid late


def test_modes():
    assert all(is_hybrid("hybrid", s, 10, 0) for s in range(10))
    assert not any(is_hybrid("text", s, 10, 0) for s in range(10))
    with pytest.raises(ValueError, match="train.mode"):
        is_hybrid("sometimes", 0, 10, 0)


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] < 0.01
