import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from conftest import ray_as_the_product_starts_it, synthetic
from shards.build import check_manifest, load_items, load_manifest, load_source, write_shards
from shards.prompts import CANS_EMB, HISTORY_EMB, PromptTooLong
from shards.synthetic import generate
from trainer.data.loader import meta, read_shard


SYN = {"num_users": 40, "num_items": 60, "num_clusters": 10, "min_seq_len": 15, "max_seq_len": 30, "p_follow": 0.9}


def _build(tok_dir, out, seed=5, workers=1, **kw):
    from configs.schema import load_config, to_dict

    # the default data section (load_source reads a full one), a small synthetic set
    data = OmegaConf.merge(load_config().data, {"synthetic": SYN, "history_len": 10, "split": "loo", "kcore": 0})
    items, splits, stats = load_source(data, seed)
    params = dict(num_candidates=20, max_len=400, samples_per_shard=200, seed=seed, workers=workers, stats=stats)
    params.update(kw)
    return write_shards(items, splits, tok_dir, str(out), **params)


def test_samples_hold_what_llara_needs(small_run):
    cfg, paths = small_run
    manifest = load_manifest(paths.data)
    tok = AutoTokenizer.from_pretrained(paths.llm)
    titles = load_items(paths.data)["titles"]
    assert {s["split"] for s in manifest["shards"]} == {"train", "val", "test"}
    samples = list(read_shard(os.path.join(paths.data, "test-00000.tar")))
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
    a = _build(paths.llm, tmp_path / "a")
    b = _build(paths.llm, tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["config_hash"] == b["config_hash"]
    c = _build(paths.llm, tmp_path / "c", seed=6)  # another seed: other data and candidates
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]


def test_validation_candidates_fixed(small_run, tmp_path):
    _, paths = small_run
    _build(paths.llm, tmp_path / "a")
    _build(paths.llm, tmp_path / "b", samples_per_shard=7)  # other sharding, same samples
    va = [meta(s)["candidates"] for s in read_shard(str(tmp_path / "a" / "val-00000.tar"))]
    vb = [meta(s)["candidates"] for n in sorted(os.listdir(tmp_path / "b")) if n.startswith("val-")
          for s in read_shard(str(tmp_path / "b" / n))]
    assert va == vb


def test_prompt_longer_than_limit_is_refused(small_run, tmp_path):
    _, paths = small_run
    with pytest.raises(PromptTooLong, match=r"the limit \(data.max_len\) is 50"):
        _build(paths.llm, tmp_path / "x", max_len=50)


def test_manifest_must_match_shards_and_tokenizer(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "m"
    manifest = _build(paths.llm, out)
    check_manifest(str(out), manifest, paths.llm)  # fine as built
    other_tok = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(paths.llm)
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(other_tok)
    with pytest.raises(ValueError, match="rebuild the shards"):
        check_manifest(str(out), manifest, str(other_tok))
    shard = out / "train-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="train-00000.tar does not match its sha256"):
        check_manifest(str(out), manifest, paths.llm)


def test_truncated_shard_names_itself(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "t"
    _build(paths.llm, out)
    shard = out / "train-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3 + 100])
    with pytest.raises(RuntimeError, match="train-00000.tar is truncated or corrupt"):
        list(read_shard(str(shard)))


def test_unknown_item_in_interactions_is_named():
    from shards.samples import build_vocab, user_sequences

    inter, items = generate(synthetic(num_users=10, num_items=60), 5)
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
        write_shards(items, splits, paths.llm, str(tmp_path / "v"), num_candidates=20, max_len=400,
                     samples_per_shard=10, seed=0, workers=1)


def test_empty_history_is_dropped_and_counted(small_run, tmp_path):
    _, paths = small_run
    items = [(i, f"Title {i}", "") for i in range(30)]
    splits = {"train": [{"user": 0, "history": [], "target": 4, "position": 0},
                        {"user": 0, "history": [4], "target": 5, "position": 1}]}
    m = write_shards(items, splits, paths.llm, str(tmp_path / "e"), num_candidates=20, max_len=400,
                     samples_per_shard=10, seed=0, workers=1)
    assert m["stats"]["train_dropped_empty_history"] == 1 and m["stats"]["train_samples"] == 1


@pytest.mark.slow  # a spawned pool of 2 build workers (new interpreters)
def test_parallel_build_equals_serial(small_run, tmp_path):
    _, paths = small_run
    a = _build(paths.llm, tmp_path / "a", workers=1)
    b = _build(paths.llm, tmp_path / "b", workers=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_shard_cut_at_a_record_boundary_is_caught(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "cut"
    manifest = _build(paths.llm, out)
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
    path = os.path.join(paths.data, "test-00000.tar")
    ours = list(read_shard(path))
    theirs = list(wds.WebDataset(path, shardshuffle=False, nodesplitter=lambda u: u, empty_check=False))
    assert [s["key"] for s in ours] == [r["__key__"] for r in theirs]
    assert all(json.loads(r["meta.json"]) == meta(s) for s, r in zip(ours, theirs))
    assert all(np.array_equal(np.frombuffer(r["llara.bin"], "<i4")[3:3 + len(s["input_ids"])], s["input_ids"])
               for s, r in zip(ours, theirs))


def test_corrupt_tar_header_is_named(small_run, tmp_path):
    _, paths = small_run
    out = tmp_path / "hdr"
    _build(paths.llm, out)
    shard = out / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # a byte inside the first member's header: its checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="val-00000.tar is truncated or corrupt"):
        list(read_shard(str(shard)))


def _same_build(a, b):
    """Two build folders hold the same manifest and the same bytes in every shard."""
    ma, mb = load_manifest(str(a)), load_manifest(str(b))
    assert ma == mb
    for s in ma["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes(), s["name"]


def test_data_digest_is_the_sha256_of_the_whole_json():
    import hashlib

    from shards.build import data_digest

    titles = ["A \u00e9", 'B "q"']
    splits = {"train": [{"user": 1, "history": [0], "target": 1, "position": 1}, {"user": 2, "history": [], "target": 0}],
              "val": [], "test": [{"user": 1, "history": [0, 1], "target": 0, "position": 2, "rating": 4.5}]}
    whole = hashlib.sha256(json.dumps([titles, splits], sort_keys=True).encode()).hexdigest()
    assert data_digest(titles, splits) == whole
    assert data_digest(titles, {}) == hashlib.sha256(json.dumps([titles, {}]).encode()).hexdigest()


def test_at_most_window_shards_are_in_flight_and_they_come_back_in_order():
    """The streamed build's scheduler (shards/build.py _in_order): a shard kept from a stopped build (args
    None) takes its place in the order without being encoded; never more than `window` encodings at once."""
    from shards.build import _in_order

    started, waited = [], []

    def submit(args):
        started.append(args)
        assert len(started) - len(waited) <= 3, "more than the window in flight"
        return lambda: waited.append(args) or f"bytes {args}"

    tasks = [(n, None if n in (0, 4, 5, 11) else n) for n in range(12)]
    out = list(_in_order(submit, iter(tasks), 3))
    assert [tag for tag, _ in out] == list(range(12))
    assert [data for _, data in out] == [None if n in (0, 4, 5, 11) else f"bytes {n}" for n in range(12)]
    assert started == waited == [n for n in range(12) if n not in (0, 4, 5, 11)]


@pytest.mark.slow  # python launch/build_shards.py in subprocesses, SIGKILLed
def test_a_killed_build_resumes_from_the_shards_it_wrote(small_run, tmp_path):
    """SIGKILL of the CLI build part way; one of the shards it recorded is then cut short. The same command
    keeps the others (not written again: same inode and mtime), writes the cut one and the rest, and ends
    with the shards and manifest of an uninterrupted build."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from shards.build import PROGRESS

    _, paths = small_run
    out = tmp_path / "build"
    cmd = [sys.executable, "launch/build_shards.py", "--tokenizer", paths.llm, "--out", str(out), "--workers", "1",
           "data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.samples_per_shard=100"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / PROGRESS
    t0 = time.time()
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 6):  # a header and 5 shards
        assert proc.poll() is None and time.time() - t0 < 300, "the build ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = [json.loads(line) for line in progress.read_text().splitlines()[1:] if line.endswith("}")]
    assert not (out / "manifest.json").exists() and len(recorded) >= 5
    cut = out / recorded[1]["name"]
    with open(cut, "r+b") as f:
        f.truncate(1000)
    kept = {e["name"]: ((out / e["name"]).stat().st_ino, (out / e["name"]).stat().st_mtime_ns) for e in recorded
            if e["name"] != cut.name}

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {len(recorded) - 1} shards" in r.stderr, r.stderr[:3000]
    assert "sample/s" in r.stderr and "tokenizing train" in r.stderr  # the bar: rate and ETA, the split
    for name, (inode, mtime) in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (inode, mtime), name
    assert not progress.exists()
    reference = tmp_path / "reference"
    at = cmd.index("--out") + 1
    r = subprocess.run([*cmd[:at], str(reference), *cmd[at + 1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_build(out, reference)


@pytest.mark.slow  # a Ray cluster of two nodes (two raylets on this machine), driven from this process
def test_ray_tasks_on_two_nodes_write_the_same_shards_with_1_2_3_workers(small_run, tmp_path, monkeypatch, caplog):
    """The build as Ray tasks on a cluster of two nodes (1 CPU + 2 CPUs) writes the same bytes and manifest
    as one local process, with 1, 2 and 3 tasks at a time; with 3 the tasks run on both nodes. The tasks get
    the tokenizer as its files through the object store, not as a path: the folder is deleted once the
    driver has read it, so no task can load it from the disk (a node without a shared file system)."""
    import logging
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    import shards.build as build

    _, paths = small_run
    local = tmp_path / "local"
    _build(paths.llm, local, workers=1)
    read_files = build.tokenizer_files

    def read_then_delete(folder):
        files = read_files(folder)
        shutil.rmtree(folder)
        return files

    monkeypatch.setattr(build, "tokenizer_files", read_then_delete)
    caplog.set_level(logging.INFO, logger="shards.build")
    store = {"object_store_memory": 128 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **store})
    cluster.add_node(num_cpus=2, **store)
    try:
        with ray_as_the_product_starts_it(address=cluster.address):
            cluster.wait_for_nodes()
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            for workers in (1, 2, 3):
                tokenizer = shutil.copytree(paths.llm, tmp_path / f"copy{workers}" / os.path.basename(paths.llm))
                caplog.clear()
                _build(str(tokenizer), tmp_path / f"ray{workers}", workers=workers, ray_tasks=True)
                assert not tokenizer.exists()
                _same_build(tmp_path / f"ray{workers}", local)
                line = [r.getMessage() for r in caplog.records if "as Ray tasks on" in r.getMessage()]
                assert len(line) == 1, caplog.text
                if workers == 3:
                    assert "on 2 node(s)" in line[0], line[0]
    finally:
        cluster.shutdown()


def test_a_tokenizing_process_that_cannot_start_ends_the_build_with_its_error(tmp_path, monkeypatch):
    """A Pool restarts a process whose initializer raised, forever: the build's initializer keeps the error
    and the first shard raises it (what a spawned process does, run here)."""
    import shards.build as build

    monkeypatch.setattr(build, "_INIT_ERROR", None)
    build._init_pool_worker(str(tmp_path / "no-tokenizer"), ["a"])
    with pytest.raises(RuntimeError, match="a tokenizing process could not start: .*no-tokenizer"):
        build._encode_shard(([], 1, 20, 100, 0, False, "llara", {}, "movie"))


def test_a_progress_file_with_bad_lines_keeps_only_the_shards_it_can_check(tmp_path):
    """build-progress.jsonl as a stopped build or a hand left it: lines that are not a shard entry of this
    folder (cut short, not an object, a name outside the folder or of another form, a count that is not a
    number, a digest that does not match, bytes that are not text) are left out, and the shard is written
    again; nothing raises."""
    import hashlib

    from shards.build import PROGRESS, resume_shards

    out = tmp_path / "build"
    out.mkdir()

    def shard(path, data):
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    good = {"name": "train-00000.tar", "split": "train", "count": 3, "sha256": shard(out / "train-00000.tar", b"one")}
    outside = shard(tmp_path / "outside.tar", b"two")  # a file whose digest the line gives, outside the folder
    lines = [json.dumps({"config_hash": "h"}), json.dumps(good),
             '{"name": "train-00001.tar", "split": "tr',  # cut short
             json.dumps([good]),
             json.dumps({**good, "name": "../outside.tar", "sha256": outside}),
             json.dumps({**good, "name": "valid-00000.tar"}),  # its split says train
             json.dumps({**good, "name": "train-00002.tar", "count": "3", "sha256": shard(out / "train-00002.tar", b"three")}),
             json.dumps({**good, "name": "train-00003.tar", "sha256": "0" * 64}),
             json.dumps({"name": "train-00004.tar"})]
    (out / PROGRESS).write_bytes("\n".join(lines).encode() + b"\n\xff\xfe{\n")
    assert resume_shards(str(out), "h") == {"train-00000.tar": good}
    assert resume_shards(str(out), "another config") == {}  # another build's progress: start over
    (out / PROGRESS).write_text("[1, 2]\n" + json.dumps(good) + "\n")  # a header that is not one
    assert resume_shards(str(out), "h") == {}
