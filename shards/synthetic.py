"""A synthetic, MovieLens-like data set whose next item is predictable from behaviour, not from titles.

Every item belongs to one hidden *taste cluster*. With `pattern="taste"` (the default) each user has a
favourite cluster and their next item is drawn from it with probability `p_follow`, otherwise from
any cluster; with `pattern="chain"` the next item's cluster follows the last item's (c -> c + 1 mod C)
with probability `p_follow`, otherwise it is one of the user's two favourites. Inside a cluster,
items are drawn by a Zipf popularity.

Titles are drawn independently of the clusters, so a title says nothing about which cluster an item
is in: the signal lives in the interaction sequences, which a sequential recommender learns and
behaviour tokens carry. With `titles="unique"` (the default) a title is a made-up name that belongs to
one item only plus a random noun ("Sonu Tower"); with `titles="pairs"` it is two common words
("Silver Harbor") that many items share.

Why these defaults (measured, BENCHMARKS.md "Fidelity"): the LLM names its answer by title, so to
use a behaviour token it must learn which titles go with which cluster. With shared words, a title's
first token says nothing about the item and only the word pair does, a conjunction the tiny Llama
did not learn in 600 steps; a one-item first word makes it a per-item lookup. And under "chain" the
LLM must attend to the one most recent item, while under "taste" every history item says the same.

Output is the generic raw form the shard builder reads: an interactions table
(user, item, rating, timestamp) and an items table (item, title, genre). The settings are the config's
data.synthetic section (their defaults: configs/llara_default.yaml), the generator seeded by `seed`.
"""

from __future__ import annotations

import numpy as np

from configs.schema import Synthetic

ADJECTIVES = (
    "Silver Golden Hidden Broken Silent Crimson Frozen Burning Distant Lonely Wild Secret Last "
    "First Dark Bright Lost Final Electric Midnight Scarlet Iron Glass Velvet Paper Hollow Quiet "
    "Endless Savage Gentle Northern Southern Ancient Modern Little Grand Bitter Sweet Lucky Restless"
).split()
NOUNS = (
    "Harbor River Empire Garden Mirror Kingdom Road Shadow Island Letter Summer Winter Station "
    "Forest Desert Ocean Castle Bridge Planet Machine Stranger Promise Voyage Dream Legacy Signal "
    "Horizon Orchard Canyon Lantern Compass Meadow Tower Circus Harvest Tide Frontier Echo Valley Storm"
).split()
GENRES = "Action Adventure Comedy Drama Fantasy Horror Mystery Romance Sci-Fi Thriller Western".split()
PATTERNS = ("taste", "chain")  # data.synthetic.pattern
TITLE_KINDS = ("unique", "pairs")  # data.synthetic.titles


CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def make_unique_titles(num_items: int, rng: np.random.Generator) -> list[str]:
    """Titles whose first word (a made-up two-syllable name) belongs to one item only."""
    names = [a + b + c + d for a in CONSONANTS for b in VOWELS for c in CONSONANTS for d in VOWELS]
    if num_items > len(names):
        raise ValueError(f"synthetic data: at most {len(names)} items have unique titles, asked {num_items}")
    chosen = rng.choice(len(names), size=num_items, replace=False)
    return [f"{names[i].capitalize()} {NOUNS[int(rng.integers(len(NOUNS)))]}" for i in chosen]


def make_titles(num_items: int, rng: np.random.Generator) -> list[str]:
    pairs = [(a, n) for a in ADJECTIVES for n in NOUNS]
    if num_items > len(pairs):
        raise ValueError(f"synthetic data: at most {len(pairs)} items have distinct titles, asked {num_items}")
    chosen = rng.choice(len(pairs), size=num_items, replace=False)
    return [f"{pairs[i][0]} {pairs[i][1]}" for i in chosen]


def generate(cfg: Synthetic, seed: int) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, str, str]]]:
    """Return (interactions, items). interactions: (user, item, rating, timestamp), time-ordered per user."""
    if cfg.pattern not in PATTERNS:
        raise ValueError(f"data.synthetic.pattern={cfg.pattern!r}: expected taste or chain")
    if cfg.titles not in TITLE_KINDS:
        raise ValueError(f"data.synthetic.titles={cfg.titles!r}: expected unique or pairs")
    rng = np.random.default_rng(seed)
    titles = make_unique_titles(cfg.num_items, rng) if cfg.titles == "unique" else make_titles(cfg.num_items, rng)
    genres = rng.choice(GENRES, size=cfg.num_items)
    cluster_of = rng.integers(0, cfg.num_clusters, size=cfg.num_items)
    members = [np.flatnonzero(cluster_of == c) for c in range(cfg.num_clusters)]
    members = [m if len(m) else rng.integers(0, cfg.num_items, size=1) for m in members]
    popularity = []
    for m in members:
        w = 1.0 / np.arange(1, len(m) + 1) ** cfg.zipf_a
        popularity.append(w / w.sum())

    interactions = []
    for user in range(cfg.num_users):
        favourites = rng.choice(cfg.num_clusters, size=2, replace=False)
        length = int(rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1))
        t = int(rng.integers(880_000_000, 890_000_000))
        cluster = int(rng.choice(favourites))
        seen: set[int] = set()
        for _ in range(length):
            for _attempt in range(20):
                item = int(rng.choice(members[cluster], p=popularity[cluster]))
                if item not in seen:
                    break
            seen.add(item)
            rating = 5 if cluster_of[item] in favourites else int(rng.integers(1, 5))
            interactions.append((user, item, rating, t))
            t += int(rng.integers(60, 86_400))
            if cfg.pattern == "taste":  # the user's first favourite, else any cluster
                cluster = int(favourites[0]) if rng.random() < cfg.p_follow else int(rng.integers(cfg.num_clusters))
            elif rng.random() < cfg.p_follow:
                cluster = (int(cluster_of[item]) + 1) % cfg.num_clusters
            else:
                cluster = int(rng.choice(favourites))
    items = [(i, titles[i], str(genres[i])) for i in range(cfg.num_items)]
    return interactions, items
