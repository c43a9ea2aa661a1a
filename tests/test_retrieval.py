"""ReLLa's semantic user behaviour retrieval (shards/retrieval.py): item texts, LLM embeddings and
their cache, PCA, per-sample retrieval and the chunked catalogue top-k."""

import json
import os
import socket
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
import torch

from conftest import ray_as_the_product_starts_it
from shards.retrieval import (cached_item_embeddings, embed_items, item_texts, l2_normalize, model_fingerprint,
                               pca, retrieve, retrieved_items, topk_similar_items)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _must_not_embed(*args, **kwargs):
    raise AssertionError("embedded again")


ITEMS = [(0, "Silver Harbor", "Drama"), (1, "Quiet Storm", ""), (2, "Red Valley", "Comedy, Romance"),
         (3, "Blue Moon Rising Over The Long Empty Northern Road", "Adventure, Sci-Fi, War"), (4, "Dawn", "Horror")]


# ----------------------------------------------------------------------------- item texts

def test_item_texts_templates_and_item_forms():
    texts = item_texts(ITEMS, "movie")
    assert texts[0] == "Here is a movie. Its title is Silver Harbor. The movie's genre is Drama."
    assert texts[1] == "Here is a movie. Its title is Quiet Storm."  # no genre: no genre sentence
    as_json = {"raw_item_ids": [10, 11, 12, 13, 14], "titles": [t for _, t, _ in ITEMS], "genres": [g for *_, g in ITEMS]}
    assert item_texts(as_json, "movie") == texts
    assert item_texts([{"title": t, "genre": g} for _, t, g in ITEMS], "movie") == texts
    assert item_texts(ITEMS, "book")[0] == "Here is a book. Its title is Silver Harbor. The book's genre is Drama."
    assert item_texts(ITEMS, ("{title}!", " ({genre})"))[:2] == ["Silver Harbor! (Drama)", "Quiet Storm!"]
    with pytest.raises(ValueError, match="podcast"):
        item_texts(ITEMS, "podcast")


# ----------------------------------------------------------------------------- retrieval

def _hand_made_catalogue():
    """Unit vectors in 4-D. The target (item 9) is e0. Cosines to it: item 3 0.99, item 7 0.9,
    item 5 0.6, items 1, 2 and 8 0, items 4 and 6 negative."""
    def unit(*v):
        return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)
    vecs = torch.zeros(10, 4)
    vecs[9] = unit(1, 0, 0, 0)
    vecs[3] = unit(0.99, (1 - 0.99 ** 2) ** 0.5, 0, 0)
    vecs[7] = unit(0.9, 0, (1 - 0.81) ** 0.5, 0)
    vecs[5] = unit(0.6, 0, 0, 0.8)
    vecs[1], vecs[2], vecs[8] = unit(0, 1, 0, 0), unit(0, 0, 1, 0), unit(0, 0, 0, 1)
    vecs[4], vecs[6] = unit(-1, 0, 0, 0), unit(-0.5, 0.5, 0.5, 0.5)
    vecs[0] = unit(0, 1, 1, 0)
    return vecs


def test_retrieve_hand_made_catalogue_both_orders():
    vecs = _hand_made_catalogue()
    # time order, oldest first; item 7 is at position 1, item 3 at position 5, item 5 at position 3
    history = torch.tensor([[1, 7, 4, 5, 2, 3, 6, 8],
                            [8, 5, 7, -1, -1, -1, -1, -1],    # short history, padded
                            [6, 4, -1, -1, -1, -1, -1, -1]])  # only dissimilar items, fewer than k
    targets = torch.tensor([9, 9, 9])
    sim = retrieve(history, targets, vecs, k=3, order="similarity")
    assert sim.tolist() == [[5, 1, 3], [2, 1, 0], [0, 1, -1]]
    seq = retrieve(history, targets, vecs, k=3, order="sequential")
    assert seq.tolist() == [[1, 3, 5], [0, 1, 2], [0, 1, -1]]
    assert retrieved_items(history, sim).tolist() == [[3, 7, 5], [7, 5, 8], [6, 4, -1]]
    assert retrieved_items(history, seq).tolist() == [[7, 5, 3], [8, 5, 7], [6, 4, -1]]
    # lists of different lengths give the same answer as the padded tensor
    lists = [[1, 7, 4, 5, 2, 3, 6, 8], [8, 5, 7], [6, 4]]
    assert torch.equal(retrieve(lists, [9, 9, 9], vecs, k=3), sim)
    # k larger than the history: -1 fills the tail
    assert retrieve([[7, 3]], [9], vecs, k=4).tolist() == [[1, 0, -1, -1]]


def test_retrieve_ties_prefer_the_more_recent_item():
    vecs = _hand_made_catalogue()
    # items 1, 2 and 8 are equally (un)related to the target; the same item twice is a tie too
    history = torch.tensor([[1, 3, 2, 8, 3, 4]])
    assert retrieve(history, [9], vecs, k=4).tolist() == [[4, 1, 3, 2]]
    assert retrieve(history, [9], vecs, k=4, order="sequential").tolist() == [[1, 2, 3, 4]]


def _loop_retrieve(history, target, vecs, k, order):
    """One sample at a time in Python: the plain definition."""
    scored = [(float(vecs[i] @ vecs[target]), p) for p, i in enumerate(history) if i >= 0]
    best = sorted(scored, key=lambda sp: (-sp[0], -sp[1]))[:k]
    pos = [p for _, p in best]
    if order == "sequential":
        pos = sorted(pos)
    return pos + [-1] * (k - len(pos))


@pytest.mark.parametrize("order", ["similarity", "sequential"])
def test_retrieve_matches_per_sample_loop_and_is_deterministic(order):
    g = torch.Generator().manual_seed(0)
    vecs = l2_normalize(torch.randn(200, 16, generator=g))
    lengths = torch.randint(1, 25, (64,), generator=g).tolist()
    history = [torch.randint(0, 200, (n,), generator=g).tolist() for n in lengths]
    targets = torch.randint(0, 200, (64,), generator=g)
    got = retrieve(history, targets, vecs, k=5, order=order, batch_size=7)
    assert got.tolist() == [_loop_retrieve(h, int(t), vecs, 5, order) for h, t in zip(history, targets)]
    assert torch.equal(got, retrieve(history, targets, vecs, k=5, order=order, batch_size=7))
    assert torch.equal(got, retrieve(history, targets, vecs, k=5, order=order, batch_size=1000))
    with pytest.raises(ValueError, match="order"):
        retrieve(history, targets, vecs, k=5, order="recent")


# ----------------------------------------------------------------------------- catalogue top-k

def test_topk_similar_items_matches_full_matrix_across_chunk_sizes():
    g = torch.Generator().manual_seed(1)
    vecs = l2_normalize(torch.randn(300, 24, generator=g))
    full = vecs @ vecs.T
    full.fill_diagonal_(float("-inf"))
    want_scores, want_ids = full.topk(6, dim=1)
    scores, ids = topk_similar_items(vecs, 6)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(scores, want_scores, atol=1e-6)
    for row_chunk, col_chunk in [(3, 5), (7, 3), (64, 50), (300, 300), (1000, 1000)]:
        s, i = topk_similar_items(vecs, 6, row_chunk=row_chunk, col_chunk=col_chunk)
        assert torch.equal(i, ids), (row_chunk, col_chunk)
        assert torch.allclose(s, scores, atol=1e-6)
    with_self = topk_similar_items(vecs, 6, exclude_self=False)[1]
    assert torch.equal(with_self[:, 0], torch.arange(300))
    assert torch.equal(with_self[:, 1:], ids[:, :5])
    with pytest.raises(ValueError, match="other items"):
        topk_similar_items(vecs[:5], 5)


def test_topk_similar_items_ties_go_to_the_lower_id_whatever_the_chunks():
    g = torch.Generator().manual_seed(2)
    vecs = l2_normalize(torch.randn(40, 8, generator=g))
    vecs[[5, 17, 33, 39]] = vecs[11].clone()  # five identical items: every one ties with the four others
    for row_chunk, col_chunk in [(1024, 2048), (3, 2), (1, 7), (40, 1)]:
        _, ids = topk_similar_items(vecs, 2, row_chunk=row_chunk, col_chunk=col_chunk)
        assert ids[11].tolist() == [5, 17], (row_chunk, col_chunk)
        assert ids[5].tolist() == [11, 17]
        assert ids[39].tolist() == [5, 11]


# ----------------------------------------------------------------------------- PCA

def test_pca_on_a_low_rank_set_keeps_the_retrieval_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(80, 3, generator=g) * torch.tensor([5.0, 2.0, 1.0])
    x = z @ torch.randn(3, 32, generator=g) + torch.randn(32, generator=g)  # rank 3 plus an offset
    y = pca(x, 3)
    assert y.shape == (80, 3)
    var = y.var(0)
    assert var[0] > var[1] > var[2]
    # rank-3 centred data: PCA to 3 dims is a rotation, so cosines (and the retrieval) are kept
    centred = l2_normalize(x - x.mean(0))
    reduced = l2_normalize(y)
    assert torch.allclose(centred @ centred.T, reduced @ reduced.T, atol=1e-4)
    history = torch.randint(0, 80, (20, 15), generator=g)
    targets = torch.randint(0, 80, (20,), generator=g)
    assert torch.equal(retrieve(history, targets, centred, 4), retrieve(history, targets, reduced, 4))
    # deterministic, signs included: the same input twice, and the rows in another order
    assert torch.equal(pca(x, 3), y)
    perm = torch.randperm(80, generator=g)
    assert torch.allclose(pca(x[perm], 3), y[perm], atol=1e-4)
    assert torch.allclose(pca(x, 3, chunk=7), y, atol=1e-4)
    assert pca(x, 512).shape == (80, 32)  # capped at min(N, H)
    assert pca(x[:10], 512).shape == (10, 10)


# ----------------------------------------------------------------------------- LLM embeddings

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny Llama and tokenizer saved as a Hugging Face folder (as trainer/data/prepare.py does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model.tiny import build_tiny_llama, build_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny_llm"))
    tok = build_tokenizer(item_texts(ITEMS, "movie") * 4, 300, folder)
    build_tiny_llama(tok, folder, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=128, seed=0)
    return folder, AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_embed_items_shape_pooling_and_padding(tiny_llm):
    _, model, tok = tiny_llm
    texts = item_texts(ITEMS, "movie")
    mean = embed_items(model, tok, texts, batch_size=8, pooling="mean")
    last = embed_items(model, tok, texts, batch_size=8, pooling="last")
    assert mean.shape == last.shape == (5, 32) and mean.dtype == torch.float32
    assert not torch.allclose(mean, last, atol=1e-3)
    # item 4 is the shortest text and item 3 the longest: alone, or padded beside the others
    alone = embed_items(model, tok, [texts[4]], batch_size=1)
    assert torch.allclose(alone[0], mean[4], atol=1e-5)
    assert torch.allclose(embed_items(model, tok, [texts[4]], batch_size=1, pooling="last")[0], last[4], atol=1e-5)
    # the same as the model's own output_hidden_states, last layer, by hand
    ids = tok(texts[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(mean[2], hidden.mean(0), atol=1e-5)
    assert torch.allclose(last[2], hidden[-1], atol=1e-5)
    # each rank's contiguous slice, concatenated, is the whole
    parts = [embed_items(model, tok, texts, batch_size=2, rank=r, world=3) for r in range(3)]
    assert [len(p) for p in parts] == [1, 2, 2]
    assert torch.allclose(torch.cat(parts), mean, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        embed_items(model, tok, texts, pooling="max")


def test_embedding_cache_round_trip_and_corrupt_files(tiny_llm, tmp_path):
    folder, model, tok = tiny_llm
    model_id = model_fingerprint(folder)
    assert model_id == model_fingerprint(folder) and model_id != model_fingerprint(folder, name="other")
    first = cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, model, tok, batch_size=2)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    assert torch.allclose(first, embed_items(model, tok, item_texts(ITEMS, "movie")), atol=1e-5)
    # a hit never touches the model
    assert torch.equal(cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, None, _must_not_embed), first)
    # another template, pooling or model is another entry
    cached_item_embeddings(str(tmp_path), model_id, "book", ITEMS, model, tok)
    cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, model, tok, pooling="last")
    assert len(os.listdir(tmp_path)) == 3
    path = tmp_path / files[0]
    size = path.stat().st_size
    # truncated (a partial write): detected, recomputed and written again whole
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(AssertionError, match="embedded again"):
        cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, None, _must_not_embed)
    again = cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, model, tok, batch_size=2)
    assert torch.equal(again, first) and path.stat().st_size == size
    # one byte of the data changed (the header still parses): the checksum catches it
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="embedded again"):
        cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, None, _must_not_embed)
    assert torch.equal(cached_item_embeddings(str(tmp_path), model_id, "movie", ITEMS, model, tok, batch_size=2), first)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_half_precision_embeddings_have_their_own_cache_entry(tiny_llm, tmp_path):
    """data.retrieval.dtype: shards/ctr.py item_embeddings loads the LLM in it; the cache keeps the
    float32 and the bfloat16 embeddings apart, and they are close (pooled in float32)."""
    from shards.ctr import cached_embeddings, item_embeddings

    folder, _, _ = tiny_llm
    d = OmegaConf.create({"template": "movie", "pooling": "mean", "batch_size": 2, "dtype": "float32"})  # data.retrieval
    full = item_embeddings(d, ITEMS, folder, str(tmp_path))
    half_d = OmegaConf.merge(d, {"dtype": "bfloat16"})
    assert cached_embeddings(half_d, ITEMS, folder, str(tmp_path)) is None  # not the float32 entry
    half = item_embeddings(half_d, ITEMS, folder, str(tmp_path))
    assert half.dtype == torch.float32 and len(os.listdir(tmp_path)) == 2
    assert not torch.equal(half, full)  # really computed in bfloat16
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.99
    assert torch.equal(cached_embeddings(half_d, ITEMS, folder, str(tmp_path)), half)
    assert torch.equal(cached_embeddings(d, ITEMS, folder, str(tmp_path)), full)
    with pytest.raises(ValueError, match="data.retrieval.dtype='int8': expected one of float32, bfloat16, float16"):
        cached_embeddings(OmegaConf.merge(d, {"dtype": "int8"}), ITEMS, folder, str(tmp_path))


_WORKER = """
import json, sys, types, torch, torch.distributed as dist
from shards.collectives import exit_together
from shards.retrieval import cached_item_embeddings, embed_items, gather_rows, item_texts
rank, port, cache, items = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

class Model(torch.nn.Module):  # a stand-in LLM (no transformers import: quick to start): embeddings + cumsum
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.config = torch.nn.Embedding(128, 6), types.SimpleNamespace(hidden_size=6)
    def forward(self, input_ids, attention_mask, output_hidden_states):
        return types.SimpleNamespace(hidden_states=[self.emb(input_ids).cumsum(1)])

class Tok:
    pad_token_id = 0
    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[1 + ord(c) % 127 for c in t][:max_length] for t in texts]}

rows = gather_rows(torch.arange(5 * rank // 2, 5 * (rank + 1) // 2), 5)
emb = cached_item_embeddings(cache, "stub", "movie", items, Model(), Tok(), batch_size=2)
alone = embed_items(Model(), Tok(), item_texts(items, "movie"))  # rank=0, world=1: everything, here
print(json.dumps({"rows": rows.tolist(), "emb": emb.tolist(), "alone": alone.tolist()}), flush=True)
exit_together()
"""


@pytest.mark.slow  # two Python subprocesses (gloo ranks)
def test_embedding_spread_over_two_gloo_ranks(tmp_path):
    """Two processes: each embeds its slice, the slices are gathered, rank 0 alone writes the cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cache = str(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), port, cache, json.dumps(ITEMS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["rows"] == results[1]["rows"] == [0, 1, 2, 3, 4]
    want = torch.tensor(results[0]["alone"])
    assert want.shape == (5, 6)
    for r in results:
        assert torch.allclose(torch.tensor(r["emb"]), want, atol=1e-5)
    assert len(os.listdir(cache)) == 1  # written once, by rank 0
    assert torch.allclose(cached_item_embeddings(cache, "stub", "movie", ITEMS, None, _must_not_embed), want, atol=1e-5)


@pytest.mark.slow  # starts Ray
def test_item_embeddings_spread_over_two_ray_workers(tiny_llm, tmp_path, monkeypatch):
    """launch/train.py's embedding job (shards/embed_job.py): two Ray workers each embed a disjoint slice,
    the cached matrix is the single-process `embed_items` result, and a second call starts no job."""
    import ray
    import ray.train.torch

    from shards.ctr import cached_embeddings
    from configs.schema import load_config, to_dict
    from shards.embed_job import embed_on_workers
    from trainer.job.ray_cluster import run_on_workers

    folder, model, tok = tiny_llm
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.num_workers=2", "train.cpus_per_worker=1",
                             "data.retrieval.batch_size=2"])
    cache = str(tmp_path / "item_emb")
    with ray_as_the_product_starts_it(num_cpus=2, object_store_mb=256):
        report = embed_on_workers(cfg, ITEMS, folder, cache, run_on_workers=run_on_workers)
        # (a) one slice per worker process: disjoint, together every item once
        ranks = sorted(report["ranks"], key=lambda w: w["rank"])
        assert [w["rank"] for w in ranks] == [0, 1] and report["items"] == len(ITEMS)
        assert [(w["first"], w["last"], w["items"]) for w in ranks] == [(0, 1, 2), (2, 4, 3)]
        assert len({w["pid"] for w in ranks} | {os.getpid()}) == 3
        # (b) the cache holds what one process embeds alone
        got = cached_embeddings(cfg.data.retrieval, ITEMS, folder, cache)
        want = embed_items(model, tok, item_texts(ITEMS, "movie"), batch_size=2)
        assert got is not None and got.shape == want.shape == (5, 32)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()

        # (c) a second call finds them in the cache: no Ray Train job
        def no_job(*args, **kwargs):
            raise AssertionError("a Ray Train job was started")

        monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_job)
        assert embed_on_workers(cfg, ITEMS, folder, cache, run_on_workers=run_on_workers) is None


def test_model_fingerprint_is_remembered_until_the_files_change(tmp_path):
    """Read once per process (a 7B folder is large), yet a changed weight file is a new fingerprint."""
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    first = model_fingerprint(str(tmp_path))
    from shards.retrieval import _content_fingerprint

    hits = _content_fingerprint.cache_info().hits
    assert model_fingerprint(str(tmp_path)) == first
    assert _content_fingerprint.cache_info().hits == hits + 1  # not read again
    weights.write_bytes(b"b" * 64)  # same size; a new modification time
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_fingerprint(str(tmp_path)) != first
