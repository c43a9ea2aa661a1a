"""Candidate scoring and CTR scores against brute force, and the metrics on known cases."""

import math
import os

import numpy as np
import pytest
import torch

from shards.build import load_items, load_manifest
from trainer.data.loader import meta, read_shard
from trainer.model.build import build_llara_model, load_tokenizer
from trainer.evaluation.ranking import ranking_metrics, target_ranks
from trainer.evaluation.scoring import (answer_token_ids, auc, candidate_logliks, ctr_metrics, prompt_inputs,
                                        target_positions, yes_probability)
from trainer.model.srec import load_srec


@pytest.fixture(scope="module")
def setup(small_run):
    cfg, paths = small_run
    torch.manual_seed(0)
    srec = load_srec(paths.srec)
    model, embed = build_llara_model(paths.llm, srec.hidden, dict(cfg.model.lora))
    model.eval()
    tok = load_tokenizer(paths.llm)
    manifest = load_manifest(paths.data)
    shard = next(s for s in manifest["shards"] if s["split"] == "test")
    samples = list(read_shard(os.path.join(paths.data, shard["name"]), shard["count"]))[:3]
    return model, embed, srec, tok, samples, load_items(paths.data)["titles"]


def _brute_force(model, embed, srec, tok, sample, title, hybrid):
    """log p(" title\\n" | prompt) from one forward over prompt + title, no padding, no cache."""
    from trainer.data.loader import collate

    batch = collate([sample], tok.pad_token_id, left_pad=True, prompt_only=True)
    ids, ctx = prompt_inputs(embed, srec, batch, tok.convert_tokens_to_ids("[PH]"), "cpu", hybrid)
    ans = torch.as_tensor([tok(" " + title + "\n", add_special_tokens=False)["input_ids"]])
    full = torch.cat([ids, ans], 1)
    slot = torch.cat([batch["slot_map"], torch.full_like(ans, -1)], 1)
    if hybrid:
        ctx = embed.inject(slot, srec.item_vectors(batch["unique_items"]))
    with torch.no_grad(), ctx:
        logp = model(input_ids=full).logits.float().log_softmax(-1)
    P = ids.shape[1]
    return sum(logp[0, P - 1 + j, ans[0, j]].item() for j in range(ans.shape[1]))


@pytest.mark.parametrize("hybrid", [True, False])
@pytest.mark.filterwarnings("error:`past_key_values`:FutureWarning")  # the cache goes by transformers' current name
def test_candidate_logliks_match_one_forward_per_candidate(setup, hybrid):
    model, embed, srec, tok, samples, titles = setup
    # prompts of different lengths in one batch: left padding, position ids and the repeated cache matter
    got = candidate_logliks(model, embed, srec, samples, tok, titles, hybrid, "cpu")
    C = len(meta(samples[0])["candidates"])
    assert got.shape == (len(samples), C) and torch.isfinite(got).all()
    for b in (0, 2):
        for c in (0, C - 1):
            want = _brute_force(model, embed, srec, tok, samples[b], titles[meta(samples[b])["candidates"][c]], hybrid)
            assert abs(got[b, c].item() - want) < 1e-3, (b, c, got[b, c].item(), want)


@pytest.mark.parametrize("per_pass", [1, 3, 7])
def test_candidates_scored_a_few_at_a_time_give_the_scores_of_all_at_once(setup, per_pass):
    """Bounded memory (at most per_pass copies of the prompt's cache) and the same scores as one pass
    over every candidate (float rounding apart: other batch shapes)."""
    model, embed, srec, tok, samples, titles = setup
    C = len(meta(samples[0])["candidates"])
    every = candidate_logliks(model, embed, srec, samples, tok, titles, True, "cpu", candidates_per_pass=C)
    got = candidate_logliks(model, embed, srec, samples, tok, titles, True, "cpu", candidates_per_pass=per_pass)
    assert torch.allclose(got, every, rtol=0, atol=1e-4), (got - every).abs().max()
    assert torch.equal(got.argsort(1, descending=True)[:, :1], every.argsort(1, descending=True)[:, :1])


def test_yes_probability_is_the_softmax_of_the_two_logits(setup):
    model, embed, srec, tok, samples, _ = setup
    p = yes_probability(model, embed, srec, samples[:1], tok, True, "cpu")
    from trainer.data.loader import collate

    batch = collate(samples[:1], tok.pad_token_id, left_pad=True, prompt_only=True)
    ids, ctx = prompt_inputs(embed, srec, batch, tok.convert_tokens_to_ids("[PH]"), "cpu", True)
    prefix, yes, no = answer_token_ids(tok)
    assert yes != no and tok.decode(prefix + [yes]).strip().startswith("Y") and tok.decode(prefix + [no]).strip().startswith("N")
    ctx = embed.inject(torch.cat([batch["slot_map"], torch.full((1, len(prefix)), -1)], 1),
                       srec.item_vectors(batch["unique_items"]))
    with torch.no_grad(), ctx:
        logits = model(input_ids=torch.cat([ids, torch.tensor([prefix], dtype=torch.long)], 1)).logits[0, -1]
    assert abs(p.item() - 1 / (1 + math.exp(logits[no].item() - logits[yes].item()))) < 1e-5


def test_target_ranks_and_ranking_metrics():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.2], [0.1, 0.3, 0.2]])
    ranks = target_ranks(scores, torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [0, 1, 1]  # a tie counts against the target for candidates listed before it
    m = ranking_metrics(ranks)
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 2 / math.log2(3)) / 3)


def test_target_positions_and_a_target_missing_from_its_candidates():
    metas = [{"user": 1, "target": 7, "candidates": [3, 7, 9]}, {"user": 2, "target": 3, "candidates": [3, 4]}]
    assert target_positions(metas).tolist() == [1, 0]
    with pytest.raises(ValueError, match="user 5: target 8 is not among"):
        target_positions([{"user": 5, "target": 8, "candidates": [3, 4]}])


def test_auc_logloss_accuracy_on_known_cases():
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5  # a tie is half right
    assert auc([1, 0, 1, 0, 1], [0.3, 0.2, 0.2, 0.4, 0.9]) == pytest.approx(3.5 / 6)  # the 0.2-0.2 pair counts half
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    m = ctr_metrics([1, 0], [0.8, 0.4])
    assert m["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2) and m["accuracy"] == 1.0
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.random(200)
    pairs = [(a, b) for a in s[y == 1] for b in s[y == 0]]
    assert auc(y, s) == pytest.approx(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]))


def test_answer_tokens_must_start_the_answer_words(tmp_path):
    """A tokenizer that splits " Yes." as " " + "Yes." would make the " " logit the Yes score: refused."""
    from trainer.model.tiny import build_tokenizer

    tok = build_tokenizer([" Naso Tower", " Nuvo Tide", "Yes."] * 4, 300, str(tmp_path))
    with pytest.raises(ValueError, match="does not start the answer word"):
        answer_token_ids(tok)
