import random

import pytest
import torch

from shards.samples import build_vocab, leave_one_out, user_sequences
from shards.synthetic import SyntheticConfig, generate
from trainer.srec.pretrain import hit_rate, pretrain_sasrec
from trainer.srec.sasrec import SASRec, load_srec, save_srec


def test_save_load_roundtrip(tmp_path):
    m = SASRec(30, hidden=16, max_len=5).eval()
    save_srec(m, str(tmp_path))
    m2 = load_srec(str(tmp_path)).eval()
    h = torch.tensor([[30, 30, 1, 2, 3]])
    assert torch.equal(m.user_state(h), m2.user_state(h))
    assert torch.equal(m.item_vectors(torch.tensor([0, 29])), m2.item_vectors(torch.tensor([0, 29])))


def test_item_id_out_of_range():
    m = SASRec(30, hidden=16, max_len=5)
    with pytest.raises(IndexError, match="items 0..29"):
        m.item_vectors(torch.tensor([3, 30]))


def test_pretrained_sasrec_beats_random():
    inter, items = generate(SyntheticConfig(num_users=300, num_items=100, seed=2))
    vocab = build_vocab(inter, items)
    splits = leave_one_out(user_sequences(inter, vocab["dense"]), 10)
    model, report = pretrain_sasrec(splits, 100, hidden=32, blocks=1, heads=1, max_len=10, dropout=0.1,
                                    epochs=6, lr=0.005, batch_size=128, seed=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert report["test_hr@10"] > 3 * 10 / 100  # random full ranking: HR@10 = 0.10
