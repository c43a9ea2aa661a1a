"""ReLLa's semantic user behaviour retrieval (SUBR): for a target item, keep the K history items
whose text is most similar to it, instead of the K most recent.

The pipeline, each step a plain function:

    texts = item_texts(items, "movie")                       # "Here is a movie. Its title is T. ..."
    emb   = cached_item_embeddings(cache_dir, model_fingerprint(model_dir), "movie", items,
                                   model, tokenizer, batch_size=32, pooling="mean")   # [N, H] float32
    vecs  = l2_normalize(pca(emb, 512))                      # [N, 512]; a dot product is the cosine
    pos   = retrieve(history, targets, vecs, k=30, order="sequential")   # [B, K] history positions
    ids   = retrieved_items(history, pos)                    # [B, K] item ids, -1 where none

and, over a whole catalogue, `topk_similar_items(vecs, k)` (chunked: never an N x N matrix).

Arguments, set by data.retrieval.* (configs/llara_default.yaml):
    template     a key of TEMPLATES (movie, book, artist, game, item) or a (head, genre_clause) pair
    pooling      "mean": average of the last hidden states over the text's tokens (ReLLa);
                 "last": the last token's hidden state
    batch_size   texts per forward when embedding; max_length: tokens kept per text
    dim          PCA dimensions (ReLLa: 512), capped at min(N, H)
    k, order     history items kept per sample; "similarity" (most similar first) or "sequential"
                 (the same K items in their original time order, ReLLa's "sequential" variant)

Histories are in time order, oldest first, padded with -1 (anywhere). Ties are broken the same way
every time: in `retrieve` the more recent history item wins, in `topk_similar_items` the lower item id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from shards.collectives import all_reduce_scalar, collective_device, rank_world

log = logging.getLogger(__name__)

# (head, genre clause): the genre clause is added only when the item has a genre.
TEMPLATES = {
    "movie": ("Here is a movie. Its title is {title}.", " The movie's genre is {genre}."),
    "book": ("Here is a book. Its title is {title}.", " The book's genre is {genre}."),
    "artist": ("Here is a music artist. Its name is {title}.", " The artist's genre is {genre}."),
    "game": ("Here is a game. Its title is {title}.", " The game's genre is {genre}."),
    "item": ("Here is an item. Its title is {title}.", " Its category is {genre}."),
}
POOLINGS = ("mean", "last")  # data.retrieval.pooling: hidden states -> item embedding
ORDERS = ("sequential", "similarity")  # data.retrieval.order: of the chosen history items


# ----------------------------------------------------------------------------- item texts

def _resolve_template(template) -> tuple[str, str]:
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"retrieval template {template!r}: expected one of {sorted(TEMPLATES)} or a (head, genre_clause) pair")
        return TEMPLATES[template]
    head, genre_clause = template
    return str(head), str(genre_clause)


def _titles_and_genres(items) -> tuple[list[str], list[str]]:
    """items.json's {"titles": [...], "genres": [...]}, or a list of (id, title, genre) as the readers
    return, or a list of {"title", "genre"} dicts. Item i is the i-th entry."""
    if isinstance(items, dict):
        titles = list(items["titles"])
        genres = list(items.get("genres") or [""] * len(titles))
        return titles, genres
    titles, genres = [], []
    for it in items:
        if isinstance(it, dict):
            titles.append(it["title"])
            genres.append(it.get("genre") or "")
        else:
            titles.append(it[1])
            genres.append(it[2] if len(it) > 2 and it[2] else "")
    return titles, genres


def item_texts(items, template="movie") -> list[str]:
    """One text per item, e.g. "Here is a movie. Its title is T. The movie's genre is G."
    (ReLLa's prompt); the genre sentence is left out for an item without a genre."""
    head, genre_clause = _resolve_template(template)
    titles, genres = _titles_and_genres(items)
    return [head.format(title=t) + (genre_clause.format(genre=g) if g else "") for t, g in zip(titles, genres)]


# ----------------------------------------------------------------------------- embedding

def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n rows that `rank` of `world` handles (sizes differ by at most 1)."""
    return n * rank // world, n * (rank + 1) // world


@torch.no_grad()
def embed_items(model, tokenizer, texts: list[str], batch_size: int = 32, pooling: str = "mean",
                rank: int = 0, world: int = 1, max_length: int = 128) -> torch.Tensor:
    """Embed this rank's slice of `texts` (see `shard_bounds`) with the LLM's last hidden states.

    Returns float32 [hi - lo, H]. "mean" averages over the text's tokens, "last" takes the last
    token. Texts are sorted by length before batching (less padding) and padded on the right, so
    under causal attention padding never reaches a real token: a text gets the same vector alone
    or in a batch, up to float rounding. The model's own last hidden state (after the final norm)
    is used, i.e. what `output_hidden_states=True` returns last, without computing the logits.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected 'mean' or 'last'")
    lo, hi = shard_bounds(len(texts), rank, world)
    ids = tokenizer(list(texts[lo:hi]), truncation=True, max_length=max_length)["input_ids"] if hi > lo else []
    if any(len(x) == 0 for x in ids):
        raise ValueError("an item text tokenizes to nothing")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(ids), model.config.hidden_size, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            lengths = torch.tensor([len(ids[i]) for i in rows])
            input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
            mask = torch.arange(input_ids.shape[1]) < lengths[:, None]
            inputs = dict(input_ids=input_ids.to(device), attention_mask=mask.long().to(device))
            if decoder is not None:  # the transformer without its head: no logits computed
                result = decoder(**inputs)
            else:
                result = model(**inputs, output_hidden_states=True)
            hidden = getattr(result, "last_hidden_state", None)
            hidden = (result.hidden_states[-1] if hidden is None else hidden).float().cpu()
            if pooling == "mean":
                pooled = hidden.masked_fill(~mask[..., None], 0).sum(1) / lengths[:, None]
            else:
                pooled = hidden[torch.arange(len(rows)), lengths - 1]
            out[torch.tensor(rows)] = pooled
    finally:
        model.train(was_training)
    return out


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's `shard_bounds` slice into the full [total, ...] tensor on every rank.
    Without torch.distributed initialised (one process) `local` is already everything."""
    rank, world = rank_world()
    if world == 1:
        return local
    size = max(hi - lo for lo, hi in (shard_bounds(total, r, world) for r in range(world)))
    device = collective_device()
    padded = local.new_zeros((size, *local.shape[1:]), device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)  # equal sizes: each slice padded to the largest
    parts = [p.to(local.device) for p in parts]
    return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, (shard_bounds(total, r, world) for r in range(world)))])


# ----------------------------------------------------------------------------- on-disk cache

def model_fingerprint(model_dir: str, name: str = "") -> str:
    """sha256 of a Hugging Face model folder's config.json and weight files (content, not dates),
    plus an optional name: the model part of the embedding cache key. Remembered in the process for
    as long as the files' sizes and modification times stay the same (a 7B folder is read once, not
    once per caller)."""
    files = sorted(f for f in os.listdir(model_dir)
                   if f == "config.json" or f.endswith((".safetensors", ".bin", ".pt")))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no config.json or weight files to fingerprint")
    stats = tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(os.path.join(model_dir, f))])
    return _content_fingerprint(os.path.realpath(model_dir), name, stats)


@functools.lru_cache(maxsize=16)
def _content_fingerprint(model_dir: str, name: str, stats: tuple) -> str:
    h = hashlib.sha256(name.encode())
    for f, _, _ in stats:
        h.update(f.encode())
        with open(os.path.join(model_dir, f), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


EMBED_DTYPES = ("float32", "bfloat16", "float16")  # data.retrieval.dtype: the LLM's weights while embedding


def check_embed_dtype(dtype: str) -> None:
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"data.retrieval.dtype={dtype!r}: expected one of {', '.join(EMBED_DTYPES)}")


def cache_key(model_id: str, template, pooling: str, max_length: int, texts: list[str], dtype: str = "float32") -> str:
    """sha256 of everything the embeddings depend on: model, template, pooling, truncation, texts and
    the dtype the LLM ran in (only when not float32: the float32 keys are those of before it was asked)."""
    check_embed_dtype(dtype)
    fields = {"model": model_id, "template": list(_resolve_template(template)), "pooling": pooling,
              "max_length": max_length, "texts": list(texts)}
    if dtype != "float32":
        fields["dtype"] = dtype
    blob = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def load_cached(path: str, key: str, n: int) -> torch.Tensor | None:
    """The cached [n, H] embeddings at `path`, or None when absent, unreadable (truncated, partial),
    written for another key, of the wrong shape, or when its data no longer matches its checksum."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            x = f.get_tensor("embeddings")
    except Exception as e:  # safetensors reports a truncated or garbled file as an error
        log.warning("item embedding cache %s is unreadable (%s); recomputing", path, e)
        return None
    if meta.get("key") != key or x.dim() != 2 or x.shape[0] != n or meta.get("sha256") != _tensor_sha256(x):
        log.warning("item embedding cache %s does not match (key, shape or checksum); recomputing", path)
        return None
    return x


def save_cached(path: str, key: str, x: torch.Tensor) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    x = x.contiguous()
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"embeddings": x}, tmp, metadata={"key": key, "sha256": _tensor_sha256(x)})
    os.replace(tmp, path)


def cache_entry(cache_dir: str, model_id: str, template, items, pooling: str = "mean",
                max_length: int = 128, dtype: str = "float32") -> tuple[str, str, list[str]]:
    """(path, key, texts): where the embeddings of these items' texts are cached, under which key."""
    texts = item_texts(items, template)
    key = cache_key(model_id, template, pooling, max_length, texts, dtype)
    return os.path.join(cache_dir, f"item_emb-{key}.safetensors"), key, texts


def read_cached_item_embeddings(cache_dir: str, model_id: str, template, items, *, pooling: str = "mean",
                                max_length: int = 128, dtype: str = "float32") -> torch.Tensor | None:
    """The cached [N, H] embeddings `cached_item_embeddings` would return without embedding, or None."""
    path, key, texts = cache_entry(cache_dir, model_id, template, items, pooling, max_length, dtype)
    return load_cached(path, key, len(texts))


def cached_item_embeddings(cache_dir: str, model_id: str, template, items, model, tokenizer, *,
                           batch_size: int = 32, pooling: str = "mean", max_length: int = 128,
                           dtype: str = "float32") -> torch.Tensor:
    """Every item's embedding [N, H] float32, read from `cache_dir` when a valid file for this exact
    (model_id, template, pooling, max_length, texts, dtype) exists, else computed and written; `dtype`
    names what the model's weights are in (the caller loaded it so), as part of the key.

    Under torch.distributed every rank must call this: the ranks agree on whether all of them hit
    the cache; if not, each embeds its slice, the slices are gathered, and rank 0 writes the file.
    """
    path, key, texts = cache_entry(cache_dir, model_id, template, items, pooling, max_length, dtype)
    x = load_cached(path, key, len(texts))
    rank, world = rank_world()
    if world > 1:
        if not all_reduce_scalar(float(x is not None), op=dist.ReduceOp.MIN):
            x = None
    if x is not None:
        return x
    lo, hi = shard_bounds(len(texts), rank, world)
    log.info("rank %d of %d: embedding items %d..%d of %d", rank, world, lo, hi - 1, len(texts))
    local = embed_items(model, tokenizer, texts, batch_size, pooling, rank, world, max_length)
    x = gather_rows(local, len(texts))
    if rank == 0:
        save_cached(path, key, x)
    if world > 1:
        dist.barrier()
    return x


# ----------------------------------------------------------------------------- PCA, cosine

@torch.no_grad()
def pca(x: torch.Tensor, dim: int = 512, chunk: int = 16384) -> torch.Tensor:
    """Project the centred rows of x [N, H] onto the top `dim` principal axes (dim capped at
    min(N, H)); float32 [N, dim].

    Exact, from the H x H covariance and `torch.linalg.eigh` (O(N H^2) work, O(H^2) extra memory):
    each row chunk's product in float32, the sum in float64. Deterministic: each axis' sign is fixed so that
    its largest-magnitude coordinate is positive.
    """
    n, h = x.shape
    dim = min(dim, n, h)
    mean32 = (sum(x[i:i + chunk].double().sum(0) for i in range(0, n, chunk)) / n).float()
    cov = torch.zeros(h, h, dtype=torch.float64)
    for i in range(0, n, chunk):
        c = x[i:i + chunk].float() - mean32
        cov += (c.T @ c).double()
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    axes = vecs[:, -dim:].flip(1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    axes = (axes * signs).float()
    return torch.cat([(x[i:i + chunk].float() - mean32) @ axes for i in range(0, n, chunk)])


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows, so that a dot product is the cosine similarity."""
    return F.normalize(x.float(), dim=1)


# ----------------------------------------------------------------------------- retrieval

def pad_histories(history) -> torch.Tensor:
    """A [B, L] long tensor from a tensor or a list of lists (right-padded with -1)."""
    if isinstance(history, torch.Tensor):
        return history.long()
    length = max((len(h) for h in history), default=0)
    out = torch.full((len(history), length), -1, dtype=torch.long)
    for b, h in enumerate(history):
        out[b, :len(h)] = torch.as_tensor(list(h), dtype=torch.long)
    return out


@torch.no_grad()
def retrieve(history, target_ids, item_vecs: torch.Tensor, k: int, order: str = "similarity",
             batch_size: int = 64) -> torch.Tensor:
    """For each sample, the positions in its history of the k items most similar to its target.

    history: [B, L] item ids in time order (oldest first), -1 for padding, or a list of lists.
    target_ids: [B]. item_vecs: [N, D], unit rows (see `l2_normalize`) for cosine similarity.
    Returns long [B, k]: positions into history, most similar first ("similarity") or ascending,
    i.e. time order ("sequential"); -1 fills the tail when a history has fewer than k items.
    Ties go to the more recent item. Work is batched: per `batch_size` samples one gather of the
    history vectors [b, L, D] and one bmm with the targets (small batches keep that gather in
    cache; on a 2-core CPU 64 was fastest of 16..1024).
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected 'similarity' or 'sequential'")
    history = pad_histories(history)
    targets = torch.as_tensor(target_ids, dtype=torch.long)
    b_all, length = history.shape
    out = torch.full((b_all, k), -1, dtype=torch.long)
    take = min(k, length)
    for s in range(0, b_all, batch_size):
        h = history[s:s + batch_size]
        valid = h >= 0
        sims = torch.bmm(item_vecs[h.clamp(min=0)], item_vecs[targets[s:s + batch_size]].unsqueeze(2)).squeeze(2)
        sims = sims.masked_fill(~valid, float("-inf"))
        # Reverse time, then a stable sort: among equal similarities the more recent comes first.
        _, idx = torch.sort(sims.flip(1), dim=1, descending=True, stable=True)
        pos = length - 1 - idx[:, :take]
        pos = pos.masked_fill(~valid.gather(1, pos), -1)
        if order == "sequential":
            pos = torch.where(pos < 0, length, pos).sort(dim=1).values
            pos = pos.masked_fill(pos == length, -1)
        out[s:s + batch_size, :take] = pos
    return out


def retrieved_items(history, positions: torch.Tensor) -> torch.Tensor:
    """The item ids at `positions` (from `retrieve`) in `history`; -1 stays -1."""
    history = pad_histories(history)
    return torch.where(positions >= 0, history.gather(1, positions.clamp(min=0)), -1)


# ----------------------------------------------------------------------------- catalogue top-k

_LOW32 = 1 << 32


def _sort_keys(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like (score descending, then column ascending): the float32 bits mapped
    to an order-preserving int32 in the high half, (2^32 - 1 - column) in the low half. One
    `topk` on them is exact and tie-free, whatever the chunking."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, -(1 << 31) - 1 - bits)
    return ordered * _LOW32 + (_LOW32 - 1 - cols)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = keys >> 32
    cols = _LOW32 - 1 - (keys & (_LOW32 - 1))
    bits = torch.where(ordered >= 0, ordered, -(1 << 31) - 1 - ordered).to(torch.int32)
    return bits.view(torch.float32), cols


def _block_topk_keys(sims: torch.Tensor, c0: int, k: int) -> torch.Tensor:
    """The k best sort keys of each row of a block whose first column is item c0.

    A float topk of k + 1 first (fast); only a row whose (k+1)-th best score equals its k-th (a tie
    across the cut, whose winner topk leaves unspecified) is redone with keys over the whole row.
    """
    vals, idx = sims.topk(min(k + 1, sims.shape[1]), dim=1)
    keys = _sort_keys(vals[:, :k], idx[:, :k] + c0)
    if vals.shape[1] > k and (tied := vals[:, k] == vals[:, k - 1]).any():
        rows = tied.nonzero().flatten()
        cols = torch.arange(c0, c0 + sims.shape[1])
        keys[rows] = _sort_keys(sims[rows], cols.expand(len(rows), -1)).topk(k, dim=1).values
    return keys.sort(dim=1, descending=True).values


@torch.no_grad()
def topk_similar_items(item_vecs: torch.Tensor, k: int, row_chunk: int = 1024, col_chunk: int = 2048,
                       exclude_self: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For every item, the k most similar items by dot product (cosine for unit rows).

    Returns (scores float32 [N, k], ids long [N, k]), best first; equal scores go to the lower id,
    whatever the chunk sizes (other chunk sizes can round a score differently in its last bit).
    Memory: one [row_chunk, col_chunk] block of scores (plus its int64 keys) at a time and a
    running [row_chunk, 2k] merge, never N x N.
    """
    n = item_vecs.shape[0]
    if k > n - int(exclude_self):
        raise ValueError(f"k={k} but only {n - int(exclude_self)} other items")
    vecs = item_vecs.float().contiguous()
    scores_out = torch.empty(n, k, dtype=torch.float32)
    ids_out = torch.empty(n, k, dtype=torch.long)
    for r0 in range(0, n, row_chunk):
        rows = vecs[r0:r0 + row_chunk]
        best = None
        for c0 in range(0, n, col_chunk):
            cols = vecs[c0:c0 + col_chunk]
            sims = rows @ cols.T
            if exclude_self:
                lo, hi = max(r0, c0), min(r0 + len(rows), c0 + len(cols))
                if lo < hi:
                    d = torch.arange(lo, hi)
                    sims[d - r0, d - c0] = float("-inf")
            top = _block_topk_keys(sims, c0, min(k, sims.shape[1]))
            if best is not None:
                top = torch.cat([best, top], 1)
                top = top.topk(min(k, top.shape[1]), dim=1).values
            best = top
        scores_out[r0:r0 + len(rows)], ids_out[r0:r0 + len(rows)] = _decode_keys(best)
    return scores_out, ids_out
