"""Memory at scale (issue #23): logits only at answer positions, activation checkpointing, the
attention kernel choice."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (3, 20), generator=g)
    slot = torch.full((3, 20), -1)
    slot[:, 2], slot[1, 6] = 0, 1
    labels = torch.full((3, 20), -100)
    labels[0, 14:18], labels[1, 10:13], labels[2, 16:20] = ids[0, 14:18], ids[1, 10:13], ids[2, 16:20]
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # a right-padded sample
    return {"input_ids": ids, "slot_map": slot, "attention_mask": mask, "labels": labels,
            "unique_items": torch.tensor([3, 7])}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_only_logits_give_the_full_computations_loss_and_gradients(small_run):
    """step_loss applies the LM head at the answer positions only; the loss and every gradient equal
    those of the [B, T, V] logits (the LM head's rows are the same per position)."""
    from trainer.model.build import build_llara_model
    from trainer.model.srec import build_srec
    from trainer.train_loop import answer_loss, answer_positions, step_loss

    cfg, paths = small_run
    model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora), unfreeze=list(cfg.model.unfreeze))
    model.eval()  # no LoRA dropout: both passes see the same network
    srec = build_srec("sasrec", 50, hidden=64).eval()
    batch = _batch(model.get_input_embeddings().num_embeddings)
    assert answer_positions(batch["labels"]).tolist() == [9, 10, 11, 13, 14, 15, 16, 17, 18]
    kept = step_loss(model, embed, srec, batch, True, 5, "cpu")
    kept.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        vectors = srec.item_vectors(batch["unique_items"])
    with embed.inject(batch["slot_map"], vectors):
        full = answer_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
    full.backward()
    got = _grads(model)
    assert torch.allclose(kept, full, rtol=1e-6, atol=1e-6), (kept.item(), full.item())
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name
    fillers = dict(batch, labels=torch.full_like(batch["labels"], -100))  # no answer at all: 0, still a graph
    loss = step_loss(model, embed, srec, fillers, True, 5, "cpu")
    assert loss.item() == 0 and loss.requires_grad


def test_activation_checkpointing_gives_the_same_loss_and_gradients(small_run):
    from trainer.model.build import build_llara_model
    from trainer.model.srec import build_srec
    from trainer.train_loop import step_loss

    cfg, paths = small_run
    srec = build_srec("sasrec", 50, hidden=64).eval()
    results = []
    for checkpointing in (False, True):
        model, embed = build_llara_model(paths.llm, 64, {**cfg.model.lora, "dropout": 0.0},
                                         unfreeze=list(cfg.model.unfreeze), activation_checkpointing=checkpointing)
        model.train()
        mlp = model.get_base_model().model.layers[0].mlp  # inside the checkpointed forward (the layer's own hooks are not)
        calls = []
        mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # a post-hook may not run: the recomputation stops
        # as soon as it has what backward needs
        batch = _batch(model.get_input_embeddings().num_embeddings)
        loss = step_loss(model, embed, srec, batch, True, 5, "cpu")
        forward_calls = len(calls)
        loss.backward()
        assert forward_calls == 1 and len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        results.append((loss.detach(), _grads(model)))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-5, atol=1e-7), name
    assert any(".adapter." in n for n in grads1)  # the injection before the first layer still gets its gradient


def test_flash_attention_and_deepspeeds_own_checkpointing_are_refused_before_anything_starts():
    from launch.train import check_choices
    from configs.schema import load_config

    with pytest.raises(ValueError, match=r"flash_attention_2 needs train.use_gpu=true"):
        check_choices(load_config(None, ["model.attn_implementation=flash_attention_2"]))
    with pytest.raises(ValueError, match=r"train.deepspeed.activation_checkpointing is set by the trainer "
                                         r"\(train.activation_checkpointing"):
        check_choices(load_config(None, ["train.deepspeed.activation_checkpointing.partition_activations=true"]))
    from configs.schema import ConfigError

    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash': expected one of sdpa, eager"):
        load_config(None, ["model.attn_implementation=flash"])


@pytest.mark.slow
def test_activation_checkpointing_under_zero3_on_two_ranks_matches_one_process(small_run, tmp_path):
    """The decoder layers recomputed in backward under ZeRO-3 (its parameter hooks fire again in the
    recomputation), with LoRA and the fused injection: the losses of one plain process without it."""
    _, paths = small_run
    script = os.path.join(REPO, "tests", "scripts", "zero3_steps.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, script, paths.llm, str(tmp_path / "one.json"), "--single"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          script, paths.llm, str(tmp_path / "two.json")], cwd=REPO,
                         env=dict(env, ACTIVATION_CHECKPOINTING="1"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = [json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0][0] != losses[0][2]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
