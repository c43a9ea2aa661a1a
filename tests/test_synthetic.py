from collections import Counter

import pytest

from shards.synthetic import generate

from conftest import synthetic


def test_deterministic_and_well_formed():
    cfg = synthetic(num_users=50, num_items=80)
    a, items = generate(cfg, 3)
    b, _ = generate(cfg, 3)
    assert a == b
    titles = [t for _, t, _ in items]
    assert len(set(titles)) == len(titles) == 80
    per_user = {}
    for u, i, r, ts in a:
        assert 0 <= i < 80 and 1 <= r <= 5
        per_user.setdefault(u, []).append(ts)
    assert len(per_user) == 50
    assert all(ts == sorted(ts) for ts in per_user.values())  # time-ordered
    assert all(cfg.min_seq_len <= len(ts) <= cfg.max_seq_len for ts in per_user.values())


def test_sequences_carry_a_learnable_signal():
    """The most frequent successor of an item is far more predictable than chance."""
    inter, _ = generate(synthetic(num_users=300, num_items=60, num_clusters=6), 1)
    seqs = {}
    for u, i, _, _ in inter:
        seqs.setdefault(u, []).append(i)
    trans = {}
    for s in seqs.values():
        for x, y in zip(s, s[1:]):
            trans.setdefault(x, Counter())[y] += 1
    # share of transitions that go to the 10 most common successors of their item (uniform: 10/60)
    top, total = 0, 0
    for c in trans.values():
        n = sum(c.values())
        top += sum(v for _, v in c.most_common(10))
        total += n
    assert top / total > 0.6


@pytest.mark.parametrize("bad, message", [(dict(pattern="cycle"), "data.synthetic.pattern='cycle': expected taste or chain"),
                                          (dict(titles="words"), "data.synthetic.titles='words': expected unique or pairs"),
                                          (dict(num_items=5000), "at most 4900 items have unique titles, asked 5000")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        generate(synthetic(num_users=2, **bad), 0)
