import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from shards.build import check_manifest, load_items, load_manifest, load_source, write_shards
from shards.prompts import CANS_EMB, HISTORY_EMB, PromptTooLong
from shards.synthetic import SyntheticConfig, generate
from trainer.data import meta, read_shard


SYN = {"num_users": 40, "num_items": 60, "num_clusters": 10, "min_seq_len": 15, "max_seq_len": 30, "p_follow": 0.9}


def _build(tok_dir, out, seed=5, workers=1, **kw):
    from trainer.config import load_config, to_dict

    # the default data section (load_source reads a full one), a small synthetic set
    data = {**to_dict(load_config().data), "synthetic": SYN, "history_len": 10, "split": "loo", "kcore": 0}
    items, splits, stats = load_source(data, seed)
    params = dict(num_candidates=20, max_len=400, samples_per_shard=200, seed=seed, workers=workers, stats=stats)
    params.update(kw)
    return write_shards(items, splits, tok_dir, str(out), **params)


def test_samples_hold_what_llara_needs(small_run):
    cfg, paths = small_run
    manifest = load_manifest(paths["data"])
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    titles = load_items(paths["data"])["titles"]
    assert {s["split"] for s in manifest["shards"]} == {"train", "val", "test"}
    samples = list(read_shard(os.path.join(paths["data"], "test-00000.tar")))
    test_count = sum(x["count"] for x in manifest["shards"] if x["split"] == "test")
    assert len(samples) == test_count == manifest["stats"]["test_samples"] > 0
    for s in samples[:20]:
        m = meta(s)
        assert 1 <= len(m["history"]) <= 10 and len(m["candidates"]) == 20
        assert m["target"] in m["candidates"]
        assert not set(m["candidates"]) - {m["target"]} & set(m["history"])  # negatives avoid the history
        ids = s["input_ids"]
        # every placeholder sits where the manifest of slots says, and stands for the right item
        assert list(s["slot_item"]) == m["history"] + m["candidates"]
        tokens = ids[s["slot_pos"]]
        hist_id, cans_id = tok.convert_tokens_to_ids(HISTORY_EMB), tok.convert_tokens_to_ids(CANS_EMB)
        assert list(tokens) == [hist_id] * len(m["history"]) + [cans_id] * 20
        # the text just before each placeholder is that item's title
        for pos, item in zip(s["slot_pos"], s["slot_item"]):
            before = tok.decode(ids[max(0, pos - 8):pos])
            assert before.rstrip().endswith(titles[item])
        # loss only on the answer: the target title, a newline and eos
        answer = tok.decode(ids[s["label_mask"] == 1], skip_special_tokens=True)
        assert answer == " " + titles[m["target"]] + "\n"
        assert s["label_mask"][: m["prompt_len"]].sum() == 0 and ids[-1] == tok.eos_token_id


def test_build_is_byte_identical(small_run, tmp_path):
    _, paths = small_run
    a = _build(paths["llm"], tmp_path / "a")
    b = _build(paths["llm"], tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["config_hash"] == b["config_hash"]
    c = _build(paths["llm"], tmp_path / "c", seed=6)  # another seed: other data and candidates
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]


def test_validation_candidates_fixed(small_run, tmp_path):
    _, paths = small_run
    _build(paths["llm"], tmp_path / "a")
    _build(paths["llm"], tmp_path / "b", samples_per_shard=7)  # other sharding, same samples
    va = [meta(s)["candidates"] for s in read_shard(str(tmp_path / "a" / "val-00000.tar"))]
    vb = [meta(s)["candidates"] for n in sorted(os.listdir(tmp_path / "b")) if n.startswith("val-")
          for s in read_shard(str(tmp_path / "b" / n))]
    assert va == vb


def test_prompt_longer_than_limit_is_refused(small_run, tmp_path):
    _, paths = small_run
    with pytest.raises(PromptTooLong, match=r"the limit \(data.max_len\) is 50"):
        _build(paths["llm"], tmp_path / "x", max_len=50)


def test_manifest_must_match_shards_and_tokenizer(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "m"
    manifest = _build(paths["llm"], out)
    check_manifest(str(out), manifest, paths["llm"])  # fine as built
    other_tok = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(other_tok)
    with pytest.raises(ValueError, match="rebuild the shards"):
        check_manifest(str(out), manifest, str(other_tok))
    shard = out / "train-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="train-00000.tar does not match its sha256"):
        check_manifest(str(out), manifest, paths["llm"])


def test_truncated_shard_names_itself(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "t"
    _build(paths["llm"], out)
    shard = out / "train-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3 + 100])
    with pytest.raises(RuntimeError, match="train-00000.tar is truncated or corrupt"):
        list(read_shard(str(shard)))


def test_unknown_item_in_interactions_is_named():
    from shards.samples import build_vocab, user_sequences

    inter, items = generate(SyntheticConfig(num_users=10, num_items=60, seed=5))
    inter = inter + [(0, 999, 5, 10**10)]
    vocab = build_vocab(inter, items)
    with pytest.raises(ValueError, match=f"record {len(inter)} names item 999"):
        user_sequences(inter, vocab["dense"])


def test_item_id_outside_vocabulary_in_a_sample(small_run, tmp_path):
    _, paths = small_run
    items = [(i, f"Title {i}", "") for i in range(30)]
    splits = {"train": [{"user": 0, "history": [1, 2, 3], "target": 4, "position": 3},
                        {"user": 1, "history": [5, 31], "target": 6, "position": 2}]}
    with pytest.raises(ValueError, match=r"train sample 1 \(user 1\): item id 31 is outside the vocabulary 0..29"):
        write_shards(items, splits, paths["llm"], str(tmp_path / "v"), num_candidates=20, max_len=400,
                     samples_per_shard=10, seed=0, workers=1)


def test_empty_history_is_dropped_and_counted(small_run, tmp_path):
    _, paths = small_run
    items = [(i, f"Title {i}", "") for i in range(30)]
    splits = {"train": [{"user": 0, "history": [], "target": 4, "position": 0},
                        {"user": 0, "history": [4], "target": 5, "position": 1}]}
    m = write_shards(items, splits, paths["llm"], str(tmp_path / "e"), num_candidates=20, max_len=400,
                     samples_per_shard=10, seed=0, workers=1)
    assert m["stats"]["train_dropped_empty_history"] == 1 and m["stats"]["train_samples"] == 1


@pytest.mark.slow  # a spawned pool of 2 build workers (new interpreters)
def test_parallel_build_equals_serial(small_run, tmp_path):
    _, paths = small_run
    a = _build(paths["llm"], tmp_path / "a", workers=1)
    b = _build(paths["llm"], tmp_path / "b", workers=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_shard_cut_at_a_record_boundary_is_caught(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "cut"
    manifest = _build(paths["llm"], out)
    shard = out / "train-00000.tar"
    import tarfile

    with tarfile.open(shard) as t:  # keep the first 10 records (2 members each), drop the rest cleanly
        members = t.getmembers()[:20]
        kept = {m.name: t.extractfile(m).read() for m in members}
    with tarfile.open(shard, "w") as t:
        import io

        for name, data in kept.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    count = next(s["count"] for s in manifest["shards"] if s["name"] == "train-00000.tar")
    with pytest.raises(RuntimeError, match=f"train-00000.tar is truncated or corrupt: it holds 10 samples, the manifest says {count}"):
        list(read_shard(str(shard), count))


def test_webdataset_reads_our_shards_the_same(small_run):
    import webdataset as wds

    _, paths = small_run
    path = os.path.join(paths["data"], "test-00000.tar")
    ours = list(read_shard(path))
    theirs = list(wds.WebDataset(path, shardshuffle=False, nodesplitter=lambda u: u, empty_check=False))
    assert [s["key"] for s in ours] == [r["__key__"] for r in theirs]
    assert all(json.loads(r["meta.json"]) == meta(s) for s, r in zip(ours, theirs))
    assert all(np.array_equal(np.frombuffer(r["llara.bin"], "<i4")[3:3 + len(s["input_ids"])], s["input_ids"])
               for s, r in zip(ours, theirs))


def test_corrupt_tar_header_is_named(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "hdr"
    _build(paths["llm"], out)
    shard = out / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # a byte inside the first member's header: its checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="val-00000.tar is truncated or corrupt"):
        list(read_shard(str(shard)))
