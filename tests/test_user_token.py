"""The optional user-state token (data.user_token): "This user ([UserEmb]) has watched ...", whose
embedding is user_adapter(srec.user_state(history)). Off by default, with shards byte-identical to
the LLaRA-only build."""

import json
import os
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
import torch
from transformers import AutoTokenizer

from shards.build import load_manifest, load_source, sha256_file, write_shards
from shards.prompts import CTR_ANSWERS, CANS_EMB, HISTORY_EMB, LLARA_TEMPLATES, PH, USER_EMB, USER_TEMPLATES, tokenize_llara
from trainer.data.loader import collate, meta, read_shard

from conftest import SMALL

SYN = {"num_users": 40, "num_items": 60, "num_clusters": 10, "min_seq_len": 15, "max_seq_len": 30, "p_follow": 0.9}

# The tiny tokenizer that build_tokenizer makes from the small run's corpus (titles + LLaRA's templates
# + the CTR answers, as prepare builds it), and the shards/manifest that the build below makes with
# it, with the user token off. First recorded before the user token existed (commit 0fd1b0d), to show
# that adding it changed nothing; re-recorded at the commit that changed the synthetic data and the
# tokenizer's corpus on purpose (issue 10). The user token off must keep producing exactly these
# bytes. (A `tokenizers` release that trains BPE differently would change them too: re-record at a
# commit whose prompts are known unchanged.)
GOLDEN_TOKENIZER = "4688f9b5cc7c1216636b929e78b6797ee2f2f0c6f71e8f3e4d30372fe2f47cfb"
GOLDEN_CONFIG_HASH = "2a76f6af8ed593e39e889be5cb430852aa6a5c414554b4a872de13d63a539fd2"
GOLDEN_MANIFEST = "e6aa257f3365fefc7e870c903cef3dbb8f7dd596bb15ea0bbce45a0e313248d7"
GOLDEN_SHARDS = {
    "train-00000.tar": "70440dd4ef3ab198132bba1905b7279007355dbf58f178e99991646a113d3825",
    "train-00001.tar": "982ecef5c8c478aa427053583a34930a010b7ee207774877eb141d2faadb9c42",
    "train-00002.tar": "d666a8926f29b90ee6d216eb9b7eb220243394827aca2472c1bb453e7741fcc3",
    "train-00003.tar": "14865d2625c2231252d3e8b232a9e9da9822644607c0c796f79025faaee83c02",
    "val-00000.tar": "44dfddd96bb36b00fd86da69ef8122d3050b0bdbbc087d05f2748238badea4c0",
    "test-00000.tar": "ca6a1f1adcc83b1245452074ec1b0558a881721685ffadfc8131ecddd97fbea6",
}


def _build(tok_dir, out, user_token=False):
    from configs.schema import load_config, to_dict

    # the default data section (load_source reads a full one), a small synthetic set
    data = OmegaConf.merge(load_config().data, {"synthetic": SYN, "history_len": 10, "split": "loo", "kcore": 0})
    items, splits, stats = load_source(data, 5)
    return write_shards(items, splits, tok_dir, str(out), num_candidates=20, max_len=400, samples_per_shard=200,
                        seed=5, workers=1, stats=stats, user_token=user_token)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A prepared run with data.user_token=true: tokenizer with [UserEmb], tiny Llama, shards, SASRec."""
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("user_run")
    cfg = load_config(None, [f"output_dir={out}", *SMALL, "srec.epochs=1", "data.user_token=true",
                             "data.build_workers=1"])
    return cfg, prepare(cfg)


def _test_samples(paths, n=None):
    m = load_manifest(paths.data)
    shard = next(s for s in m["shards"] if s["split"] == "test")
    return list(read_shard(os.path.join(paths.data, shard["name"])))[:n]


def test_off_by_default_is_byte_identical_to_llara_only(small_run, tmp_path):
    from configs.schema import to_dict
    from trainer.model.tiny import build_tokenizer

    cfg, paths = small_run
    assert cfg.data.user_token is False
    assert USER_EMB not in AutoTokenizer.from_pretrained(paths.llm).get_vocab()
    items, _, _ = load_source(cfg.data, cfg.seed)
    corpus = [" " + t for _, t, _ in items] + list(LLARA_TEMPLATES) + list(CTR_ANSWERS)  # as prepare builds it
    tok = build_tokenizer(corpus * 4, cfg.model.tiny.vocab_size, str(tmp_path / "llm"))
    assert USER_EMB not in tok.get_vocab()
    assert sha256_file(str(tmp_path / "llm" / "tokenizer.json")) == GOLDEN_TOKENIZER
    assert sha256_file(os.path.join(paths.llm, "tokenizer.json")) == GOLDEN_TOKENIZER  # what prepare built
    m = _build(str(tmp_path / "llm"), tmp_path / "d")
    assert m["config_hash"] == GOLDEN_CONFIG_HASH and "user_token" not in m["params"]
    assert {s["name"]: s["sha256"] for s in m["shards"]} == GOLDEN_SHARDS
    assert sha256_file(str(tmp_path / "d" / "manifest.json")) == GOLDEN_MANIFEST
    s = next(iter(read_shard(str(tmp_path / "d" / "test-00000.tar"))))
    assert "user_pos" not in s and "histories" not in collate([s], 0)


def test_templates_name_the_user_once():
    assert len(USER_TEMPLATES) == len(LLARA_TEMPLATES)
    for plain, user in zip(LLARA_TEMPLATES, USER_TEMPLATES):
        assert user.count(USER_EMB) == 1 and user.replace(f" ({USER_EMB})", "") == plain
    assert USER_TEMPLATES[0].startswith(f"This user ({USER_EMB}) has watched [HistoryHere]")


def test_prompt_has_one_user_slot_at_its_position(user_run):
    cfg, paths = user_run
    tok = AutoTokenizer.from_pretrained(paths.llm)
    user_id = tok.convert_tokens_to_ids(USER_EMB)
    assert user_id not in (None, tok.unk_token_id)
    manifest = load_manifest(paths.data)
    assert manifest["params"]["user_token"] is True and manifest["params"]["templates"] == list(USER_TEMPLATES)
    assert manifest["config_hash"] != GOLDEN_CONFIG_HASH
    samples = _test_samples(paths)
    assert samples
    for s in samples:
        m, ids = meta(s), s["input_ids"]
        assert list(np.flatnonzero(ids == user_id)) == [s["user_pos"]]  # exactly one, where the record says
        assert s["user_pos"] < min(s["slot_pos"]) and s["user_pos"] < s["prompt_len"]
        assert tok.decode(ids[:s["user_pos"]]).endswith("user (")
        assert tok.decode(ids[s["user_pos"] + 1:s["user_pos"] + 3]).startswith(")")
        assert list(s["history"]) == m["history"]  # derived from the slot items, not stored twice
        assert list(s["slot_item"]) == m["history"] + m["candidates"]  # item slots as before
        hist_id, cans_id = tok.convert_tokens_to_ids(HISTORY_EMB), tok.convert_tokens_to_ids(CANS_EMB)
        assert list(ids[s["slot_pos"]]) == [hist_id] * len(m["history"]) + [cans_id] * len(m["candidates"])


def test_tokenize_refuses_a_tokenizer_without_the_user_token(small_run):
    _, paths = small_run
    tok = AutoTokenizer.from_pretrained(paths.llm)
    sample = {"user": 0, "history": [1, 2], "candidates": [3, 4], "target": 3}
    titles = [f"Movie {i}" for i in range(5)]
    plain = tokenize_llara(sample, titles, LLARA_TEMPLATES[0], tok, 400)
    assert "user_pos" not in plain
    with pytest.raises(ValueError, match=r"no \[UserEmb\] special token"):
        tokenize_llara(sample, titles, USER_TEMPLATES[0], tok, 400, user_token=True)
    from trainer.model.build import load_tokenizer

    with pytest.raises(ValueError, match=r"\[UserEmb\]"):
        load_tokenizer(paths.llm, user_token=True)


def test_collate_maps_user_slots_after_the_unique_items(user_run, small_run):
    _, paths = user_run
    samples = _test_samples(paths, 3)
    for left_pad, prompt_only in ((False, False), (True, True)):
        batch = collate(samples, 0, left_pad=left_pad, prompt_only=prompt_only)
        U, T = len(batch["unique_items"]), batch["input_ids"].shape[1]
        assert batch["histories"] == [list(s["history"]) for s in samples]
        for b, s in enumerate(samples):
            n = s["prompt_len"] if prompt_only else len(s["input_ids"])
            off = T - n if left_pad else 0
            assert batch["slot_map"][b, s["user_pos"] + off] == U + b
            assert (batch["slot_map"][b] >= U).sum() == 1  # only the user slot points past the items
    _, plain_paths = small_run
    plain = next(iter(read_shard(os.path.join(plain_paths.data, "test-00000.tar"))))
    with pytest.raises(ValueError, match="mixed"):
        collate([samples[0], plain], 0)


def _model(paths, user_token):
    from trainer.model.build import build_llara_model
    from trainer.model.srec import load_srec

    lora = {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    srec = load_srec(paths.srec).eval().requires_grad_(False)
    model, embed = build_llara_model(paths.llm, srec.hidden, lora, unfreeze=["lm_head"], user_token=user_token)
    return model, embed, srec


def test_user_adapter_exists_only_when_on(small_run, user_run):
    model, embed, srec = _model(small_run[1], False)
    assert embed.user_adapter is None and not any("user_adapter" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="user adapter absent"):
        with embed.inject(torch.full((1, 4), -1), torch.zeros(1, srec.hidden), torch.zeros(1, srec.hidden)):
            pass
    model, embed, srec = _model(user_run[1], True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.user_adapter.fc1" in n for n in trainable)
    with pytest.raises(ValueError, match="user_states missing"):
        with embed.inject(torch.full((1, 4), -1), torch.zeros(1, srec.hidden)):
            pass


def _capture(embed):
    """Record the hybrid embedding's inputs and outputs of every forward."""
    seen = []
    handle = embed.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach().clone(), out.detach().clone())))
    return seen, handle


def test_step_injects_user_adapter_of_user_state_and_grads(user_run):
    from trainer.train_loop import step_loss

    cfg, paths = user_run
    tok = AutoTokenizer.from_pretrained(paths.llm)
    ph_id, user_id = tok.convert_tokens_to_ids(PH), tok.convert_tokens_to_ids(USER_EMB)
    model, embed, srec = _model(paths, True)
    samples = _test_samples(paths, 3)
    batch = collate(samples, tok.pad_token_id)
    U = len(batch["unique_items"])

    # hybrid step: the [UserEmb] row is user_adapter(user_state(that sample's history alone))
    seen, handle = _capture(embed)
    step_loss(model, embed, srec, batch, True, ph_id, "cpu").backward()
    handle.remove()
    (ids, out), = seen
    with torch.no_grad():
        items = embed.adapter(srec.item_vectors(batch["unique_items"]))
        for b, s in enumerate(samples):
            state = srec.user_state(*srec.pad([list(s["history"])]))
            assert torch.allclose(out[b, s["user_pos"]], embed.user_adapter(state)[0], atol=1e-5)
            assert not torch.allclose(out[b, s["user_pos"]], embed.adapter(state)[0], atol=1e-3)  # not the item adapter
            for pos in s["slot_pos"]:
                assert torch.equal(out[b, pos], items[batch["slot_map"][b, pos]])
        plain = torch.nn.functional.embedding(ids, embed.weight)
        keep = batch["slot_map"] < 0
        assert torch.equal(out[keep], plain[keep])
    assert int(ids[0, samples[0]["user_pos"]]) == user_id
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.user_adapter.parameters())
    assert all(p.grad.abs().sum() > 0 for p in embed.adapter.parameters())
    assert batch["slot_map"].max() == U + len(samples) - 1

    # text-only step: [UserEmb] becomes [PH]; both adapters get an exact zero gradient (not None)
    model.zero_grad(set_to_none=True)
    seen, handle = _capture(embed)
    step_loss(model, embed, srec, batch, False, ph_id, "cpu").backward()
    handle.remove()
    (ids, out), = seen
    assert not (ids == user_id).any() and int(ids[0, samples[0]["user_pos"]]) == ph_id
    assert torch.equal(ids[batch["slot_map"] >= 0], torch.full_like(ids[batch["slot_map"] >= 0], ph_id))
    for adapter in (embed.adapter, embed.user_adapter):
        assert all(p.grad is not None and not p.grad.any() for p in adapter.parameters())
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "lora_B" in n or "lm_head" in n)


def test_export_round_trip_and_generation(user_run, tmp_path):
    from trainer.evaluation.evaluate import generate
    from trainer.model.export import export_model, load_export

    cfg, paths = user_run
    tok = AutoTokenizer.from_pretrained(paths.llm)
    model, embed, srec = _model(paths, True)
    with torch.no_grad():
        for p in embed.user_adapter.parameters():
            p.add_(0.01)  # differ from a fresh init, so loading is what makes them equal
    export_model(model, tok, str(tmp_path / "export"), 0, {"base": paths.llm})
    assert os.path.exists(tmp_path / "export" / "user_projector.safetensors")
    with open(tmp_path / "export" / "export.json") as f:
        info = json.load(f)
    assert info["user_projector"] and not any("user_adapter" in n for n in info["trained_base"])
    loaded, lembed, ltok = load_export(str(tmp_path / "export"), paths.llm, srec.hidden)
    for a, b in zip(embed.user_adapter.parameters(), lembed.user_adapter.parameters()):
        assert torch.equal(a, b)
    samples = _test_samples(paths, 2)
    model.eval()
    want = generate(model, embed, srec, samples, tok, 6, hybrid=True, synced_gpus=False, device="cpu")
    got = generate(loaded, lembed, srec, samples, ltok, 6, hybrid=True, synced_gpus=False, device="cpu")
    assert got == want and len(got) == 2
    generate(loaded, lembed, srec, samples, ltok, 2, hybrid=False, synced_gpus=False, device="cpu")  # text mode runs
    # read in bf16 (GPU evaluation): every weight in it, LoRA's too (the dtype policy, trainer/job/precision.py:
    # as training held them), the trained ones equal to the export's rounded to bf16
    half, hembed, _ = load_export(str(tmp_path / "export"), paths.llm, srec.hidden, dtype=torch.bfloat16)
    half_params = dict(half.named_parameters())
    assert {p.dtype for p in half_params.values()} == {torch.bfloat16}
    for a, b in zip(embed.user_adapter.parameters(), hembed.user_adapter.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b)
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p.to(torch.bfloat16), half_params[n]) for n, p in lora.items())


def test_prepare_refuses_a_changed_user_token_and_reads_old_stamps(small_run, user_run, tmp_path):
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    _, paths = user_run
    with pytest.raises(ValueError, match="another data config"):
        prepare(load_config(None, [f"output_dir={paths.output_dir}", *SMALL, "srec.epochs=1", "data.build_workers=1"]))
    # a folder prepared before the option existed (its stamp has no data.user_token) is reused when
    # off and refused when on
    _, small_paths = small_run
    out = tmp_path / "old"
    os.makedirs(out / "assets")
    with open(small_paths.stamp) as f:
        stamp = json.load(f)
    del stamp["data"]["user_token"]
    (out / "assets" / "prepare.json").write_text(json.dumps(stamp))
    assert prepare(load_config(None, [f"output_dir={out}", *SMALL])).output_dir == str(out)
    with pytest.raises(ValueError, match="another data config"):
        prepare(load_config(None, [f"output_dir={out}", *SMALL, "data.user_token=true"]))
    shutil.rmtree(out)


@pytest.mark.slow  # torchrun subprocesses (2 gloo ranks, ZeRO-3)
def test_zero3_two_ranks_with_the_user_token_match_one_process(user_run, tmp_path):
    """Optimizer steps hybrid, text-only, hybrid with the user adapter under DeepSpeed ZeRO-3 on 2 gloo
    ranks (no Ray) give the losses of one plain process. A user-adapter gradient left over from step 0
    and applied again in the text-only step (DeepSpeed keeps stale gradients of parameters unused in a
    step) would change step 2's loss."""
    import subprocess
    import sys

    from conftest import REPO

    _, paths = user_run
    script = os.path.join(REPO, "tests", "scripts", "zero3_steps.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", USER_TOKEN="1", TEXT_STEPS="1")
    env.pop("TEXT_ONLY", None)
    single = subprocess.run([sys.executable, script, paths.llm, str(tmp_path / "one.json"), "--single"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           script, paths.llm, str(tmp_path / "two.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("one", "two"))
    assert len(one) == len(two) == 3 and one[0] != one[2]  # the model trains
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
