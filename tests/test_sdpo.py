"""S-DPO (train.objective=sdpo, trainer/objectives/): the loss (DPO's at k = 1), its negatives, its
sequences, the reference pass; the stage on the real stack in tests/test_sdpo_stage.py."""

import math
import os

import pytest
import torch

from trainer.objectives.sdpo import check_objective, draw_negatives, preference_rows, sdpo_loss


def test_with_one_negative_it_is_dpos_loss_and_its_gradient_prefers_the_true_item():
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(6, 2, generator=g, dtype=torch.float64)
    beta = 0.7
    loss, stats = sdpo_loss(policy, ref, beta)
    r = policy.detach() - ref
    dpo = -torch.nn.functional.logsigmoid(beta * (r[:, 0] - r[:, 1])).mean()
    assert torch.allclose(loss.detach(), dpo, rtol=0, atol=1e-12)
    loss.backward()
    # descending the loss raises the true item's log-likelihood and lowers the negative's
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()
    assert stats["samples"] == 6 and abs(stats["loss"] / 6 - dpo.item()) < 1e-9


def test_with_k_negatives_it_is_the_softmax_over_them():
    g = torch.Generator().manual_seed(1)
    policy, ref = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    beta, real = 1.3, torch.tensor([True, True, False, True])
    loss, stats = sdpo_loss(policy, ref, beta, real)
    r = policy - ref
    want = []
    for b in (0, 1, 3):
        s = sum(math.exp(beta * (r[b, j] - r[b, 0]).item()) for j in (1, 2, 3))
        want.append(-math.log(1 / (1 + math.exp(math.log(s)))))  # -log sigmoid(-log s)
    assert abs(loss.item() - sum(want) / 3) < 1e-12
    assert stats["samples"] == 3  # the filler adds nothing
    # equal rewards: each of k negatives is as likely as the true item, the loss is log(1 + k)
    same, _ = sdpo_loss(ref.clone(), ref, beta)
    assert abs(same.item() - math.log(4)) < 1e-12


def test_a_batch_of_fillers_gives_zero_with_a_graph():
    policy = torch.randn(2, 3, requires_grad=True)
    loss, stats = sdpo_loss(policy, torch.zeros(2, 3), 1.0, torch.tensor([False, False]))
    assert loss.item() == 0 and loss.requires_grad and stats["samples"] == 0


def test_negatives_come_from_the_candidates_and_a_resume_draws_the_same():
    cands, target = list(range(100, 120)), 107
    a = draw_negatives(cands, target, 3, seed=0, step=5, key="train-00000042")
    assert a == draw_negatives(cands, target, 3, seed=0, step=5, key="train-00000042")
    assert len(set(a)) == 3 and target not in a and set(a) <= set(cands)
    others = {tuple(draw_negatives(cands, target, 3, seed=0, step=s, key="train-00000042")) for s in range(6, 26)}
    assert len(others) > 10  # another step, other negatives
    assert draw_negatives(cands, target, 19, 0, 1, "k") and len(set(draw_negatives(cands, target, 19, 0, 1, "k"))) == 19
    with pytest.raises(ValueError, match="20 negatives asked for, it has 19 candidates"):
        draw_negatives(cands, target, 20, 0, 1, "k")


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=sdpo", "train.mode=hybrid"], "set model.init_from"),
    (["train.objective=sdpo", "model.init_from=runs/x"], "train.mode=curriculum, set train.mode=hybrid"),
    (["train.objective=sdpo", "model.init_from=runs/x", "train.mode=hybrid", "train.sdpo.negatives=20"],
     "train.sdpo.negatives=20 but a sample has 19 candidates besides the target"),
    (["train.objective=sdpo", "model.init_from=runs/x", "train.mode=hybrid", "data.task=ctr"], "data.task=ctr has none"),
])
def test_what_the_objective_needs_is_refused_with_one_line(overrides, message):
    from configs.schema import load_config

    with pytest.raises(ValueError, match=message):
        check_objective(load_config(None, overrides))


def _shard_batch(paths, n=3):
    from shards.build import load_items, load_manifest
    from trainer.data.loader import collate, read_shard
    from trainer.model.build import load_tokenizer

    shard = next(s for s in load_manifest(paths.data)["shards"] if s["split"] == "train")
    samples = [s for _, s in zip(range(n), read_shard(os.path.join(paths.data, shard["name"])))]
    tokenizer = load_tokenizer(paths.tokenizer, False)
    return collate(samples, tokenizer.pad_token_id), tokenizer, load_items(paths.data)["titles"]


def test_the_true_items_row_is_the_shards_own_sequence(small_run):
    """preference_rows' first row per sample, the prompt and the true item's answer tokenized as the stage
    does, is token for token the sequence the SFT stage trained on, with the same labels and slots."""
    from trainer.train_loop import answer_tokens

    _, paths = small_run
    batch, tokenizer, titles = _shard_batch(paths)
    negatives = [draw_negatives(c, t, 2, 0, 1, k) for c, t, k in zip(batch["candidates"], batch["targets"], batch["sample_keys"])]
    rows = preference_rows(batch, negatives, answer_tokens(tokenizer, titles), tokenizer.pad_token_id)
    assert rows["input_ids"].shape[0] == 3 * 3
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        for key in ("input_ids", "labels", "slot_map"):
            assert torch.equal(rows[key][3 * b, :n], batch[key][b, :n]), key
        assert int(rows["attention_mask"][3 * b].sum()) == n
        for j, item in enumerate(negatives[b], start=1):  # a negative's row: the same prompt, its own answer
            row = rows["input_ids"][3 * b + j]
            p = batch["prompt_lens"][b]
            assert torch.equal(row[:p], batch["input_ids"][b, :p])
            answer = tokenizer.decode(row[p:int(rows["attention_mask"][3 * b + j].sum())])
            assert answer.startswith(" " + titles[item] + "\n")


class _Engine(torch.nn.Module):
    """What sdpo_step_loss needs of DeepSpeed's engine: a forward and .module (ZeRO itself: the stage test)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def test_the_reference_pass_uses_the_starting_weights_and_puts_the_trained_ones_back(small_run, monkeypatch):
    import trainer.objectives.sdpo as sdpo
    from trainer.job.trainable_state import trained_parameters
    from trainer.model.build import build_llara_model
    from trainer.model.srec import build_srec
    from trainer.train_loop import answer_tokens

    seen = []  # the (policy, reference) log-likelihoods each call hands to the loss
    monkeypatch.setattr(sdpo, "sdpo_loss", lambda policy, ref, *a: seen.append((policy, ref)) or sdpo_loss(policy, ref, *a))
    cfg, paths = small_run
    batch, tokenizer, titles = _shard_batch(paths, 4)

    def model():
        m, e = build_llara_model(paths.llm, 64, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze),
                                 vocab_size=len(tokenizer))
        return _Engine(m.eval()), e  # eval: no dropout, so a pass with the starting weights is the policy's own

    engine, embed = model()
    srec = build_srec("sasrec", 200, hidden=64).eval()
    negatives = [draw_negatives(c, t, 3, 0, 1, k) for c, t, k in zip(batch["candidates"], batch["targets"], batch["sample_keys"])]
    args = (negatives, answer_tokens(tokenizer, titles), tokenizer.pad_token_id, 1.0, "cpu")
    start = {n: p.detach().clone() for n, p in trained_parameters(engine)}
    loss, stats = sdpo.sdpo_step_loss(engine, embed, srec, batch, start, *args)
    assert abs(loss.item() - math.log(4)) < 1e-5 and abs(stats["reward_margin"]) < 1e-4  # policy == reference
    with torch.no_grad():  # trained weights that differ from the start
        for _, p in trained_parameters(engine):
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in trained_parameters(engine)}
    loss, _ = sdpo.sdpo_step_loss(engine, embed, srec, batch, start, *args)
    for n, p in trained_parameters(engine):  # put back bit for bit
        assert torch.equal(p, trained[n]), n
    assert not engine.module.training  # and in the mode it was in
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained_parameters(engine))
    policy, ref = seen[-1]
    # a second model that holds the start itself: its own log-likelihoods are the reference the swap gave
    twin, twin_embed = model()
    with torch.no_grad():
        for n, p in trained_parameters(twin):
            p.copy_(start[n])
        sdpo.sdpo_step_loss(twin, twin_embed, srec, batch, start, *args)
    twin_policy = seen[-1][0]
    assert torch.allclose(ref, twin_policy, atol=1e-5), (ref - twin_policy).abs().max()
    assert (policy.detach() - ref).abs().max() > 1e-3  # and the trained model's differ from them


def test_a_prompt_run_once_for_its_answers_gives_the_whole_rows_likelihoods_and_gradients(small_run):
    """shared_prompt_logps (each prompt once, its keys and values repeated for its 1 + k answers) gives the
    log-likelihoods and the gradients of the B x (1 + k) whole sequences, prompts of different lengths."""
    from trainer.job.trainable_state import trained_parameters
    from trainer.model.build import build_llara_model
    from trainer.model.srec import build_srec
    from trainer.objectives.sdpo import answer_rows, shared_prompt_logps, whole_rows_logps
    from trainer.train_loop import answer_tokens

    cfg, paths = small_run
    batch, tokenizer, titles = _shard_batch(paths, 4)
    assert len(set(batch["prompt_lens"])) > 1  # the padding after the shorter prompts is exercised
    model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze),
                                     vocab_size=len(tokenizer))
    model.eval()  # no dropout: the two computations see the same function
    engine = _Engine(model)
    torch.manual_seed(3)
    with torch.no_grad():  # LoRA's B starts at zero: make every trained tensor count
        for _, p in trained_parameters(engine):
            p.add_(0.05 * torch.randn_like(p))
    srec = build_srec("sasrec", 200, hidden=64).eval()
    with torch.no_grad():
        vectors = srec.item_vectors(batch["unique_items"])
    negatives = [draw_negatives(c, t, 3, 0, 1, k) for c, t, k in zip(batch["candidates"], batch["targets"], batch["sample_keys"])]
    full = answer_tokens(tokenizer, titles)  # the synthetic titles are all as long: shorten odd items' answers
    answer_ids = lambda item: full(item)[item % 2:]  # noqa: E731
    answers, mask = answer_rows(batch, negatives, answer_ids, tokenizer.pad_token_id)
    assert len(set(mask.sum(1).tolist())) > 1  # answers of different lengths too
    rows = preference_rows(batch, negatives, answer_ids, tokenizer.pad_token_id)
    weights = torch.randn(4, 4)
    results = []
    for logps in (lambda: shared_prompt_logps(model, embed, batch, vectors, None, answers, mask, "cpu"),
                  lambda: whole_rows_logps(model, embed, rows, vectors, None, 4)):
        model.zero_grad()
        values = logps()
        (values * weights).sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in trained_parameters(engine)}))
    (shared, shared_grads), (whole, whole_grads) = results
    assert shared.shape == (4, 4) and (shared < 0).all()
    assert torch.allclose(shared, whole, atol=1e-4), (shared - whole).abs().max()
    assert set(shared_grads) == set(whole_grads) and any(g.abs().sum() > 0 for g in shared_grads.values())
    for n, g in shared_grads.items():
        assert torch.allclose(g, whole_grads[n], rtol=1e-3, atol=1e-5), (n, (g - whole_grads[n]).abs().max())


def test_the_lastfm_stage_config_is_its_starting_runs_data_model_and_srec():
    """configs/llara_lastfm_sdpo.yaml repeats llara_lastfm.yaml's sections that the stage's start check compares."""
    from configs.schema import load_config, to_dict

    sft, stage = load_config("configs/llara_lastfm.yaml"), load_config("configs/llara_lastfm_sdpo.yaml")
    assert to_dict(stage.data) == to_dict(sft.data) and to_dict(stage.srec) == to_dict(sft.srec)
    assert dict(to_dict(stage.model), init_from=None) == to_dict(sft.model)
    assert stage.model.init_from == sft.output_dir and stage.seed == sft.seed
    check_objective(stage)
