import pytest
import torch

from trainer.model.kernels.reference import inject_reference
from trainer.model.build import build_llara_model, load_tokenizer
from trainer.model.hybrid_embedding import HybridEmbedding


def _loop_injection(ids, weight, slot_map, behaviour):
    """LLaRA's way: per sample, per placeholder, one row written."""
    out = weight[ids].clone()
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if slot_map[b, t] >= 0:
                out[b, t] = behaviour[slot_map[b, t]]
    return out


def test_reference_injection_matches_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 17), generator=g)
    weight = torch.randn(50, 8, generator=g)
    beh = torch.randn(5, 8, generator=g)
    slot = torch.full((3, 17), -1)
    slot[0, 0], slot[0, 16], slot[1, 3], slot[1, 4], slot[2, 9] = 0, 4, 2, 2, 1
    assert torch.equal(inject_reference(ids, weight, slot, beh), _loop_injection(ids, weight, slot, beh))
    with pytest.raises(IndexError, match="behaviour row 7"):
        inject_reference(ids, weight, torch.full_like(slot, 7), beh)


def test_hybrid_embedding_in_peft_model(small_run):
    cfg, paths = small_run
    model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora))
    assert model.get_input_embeddings() is embed and isinstance(embed, HybridEmbedding)
    base_weight = model.get_base_model().model.embed_tokens.weight
    assert embed.weight is base_weight  # the LLM's own parameter, not a copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("adapter" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.weight") for n in trainable)

    tok = load_tokenizer(paths.llm)
    ids = torch.randint(10, len(tok), (2, 12))
    slot = torch.full((2, 12), -1)
    slot[0, 3], slot[1, 11] = 0, 1
    vectors = torch.randn(2, 64)
    plain = embed(ids)
    with embed.inject(slot, vectors):
        hybrid = embed(ids)
        decode_step = embed(ids[:, :1])  # another shape: a plain lookup (generation's decode steps)
    behaviour = embed.adapter(vectors)
    assert torch.allclose(hybrid[0, 3], behaviour[0]) and torch.allclose(hybrid[1, 11], behaviour[1])
    keep = slot < 0
    assert torch.equal(hybrid[keep], plain[keep])
    assert torch.equal(decode_step, plain[:, :1])
    assert torch.equal(embed(ids), plain)  # disarmed after the block


def test_adapter_gradient_only_in_hybrid_steps(small_run):
    cfg, paths = small_run
    model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora))
    ids = torch.randint(10, 100, (2, 12))
    slot = torch.full((2, 12), -1)
    slot[:, 2] = 0
    labels = ids.clone()
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in embed.adapter.parameters())
    with embed.inject(slot, torch.randn(1, 64)):
        model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.adapter.parameters())


def test_text_only_training_step_gives_the_adapter_an_exact_zero_gradient(small_run):
    """The training step (not just the model): hybrid steps give the adapter a gradient; text-only
    steps give it an exact zero (a fresh one: DeepSpeed would re-apply a stale one otherwise)."""
    from trainer.model.srec import build_srec
    from trainer.train_loop import step_loss

    cfg, paths = small_run
    model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora))
    srec = build_srec("sasrec", 50, hidden=64).eval()
    ids = torch.randint(10, 100, (2, 12))
    slot = torch.full((2, 12), -1)
    slot[:, 2], slot[1, 5] = 0, 1
    labels = ids.clone()
    batch = {"input_ids": ids, "slot_map": slot, "attention_mask": torch.ones_like(ids), "labels": labels,
             "unique_items": torch.tensor([3, 7])}
    step_loss(model, embed, srec, batch, True, 5, "cpu").backward()
    assert all(p.grad.abs().sum() > 0 for p in embed.adapter.parameters())
    model.zero_grad(set_to_none=True)
    step_loss(model, embed, srec, batch, False, 5, "cpu").backward()
    assert all(p.grad is not None and not p.grad.any() for p in embed.adapter.parameters())
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "lora_B" in n)
