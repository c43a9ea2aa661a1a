"""A synthetic, MovieLens-like data set with a learnable sequential signal.

Every item belongs to one hidden *taste cluster*. A user's next item is drawn from the cluster that
follows the cluster of their last item (c -> c + 1 mod C) with probability `p_follow`, otherwise
from one of the user's favourite clusters. Inside a cluster, items are drawn by a Zipf popularity.

Titles are two random words ("Silver Harbor") drawn independently of the cluster, so a title says
nothing about which cluster an item is in: the signal that predicts the next item lives in the
interaction sequences, which a sequential recommender learns and behaviour tokens carry.

Output is the generic raw form the shard builder reads: an interactions table
(user, item, rating, timestamp) and an items table (item, title, genre).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 500
    num_items: int = 300
    num_clusters: int = 10
    min_seq_len: int = 15
    max_seq_len: int = 30
    p_follow: float = 0.9
    zipf_a: float = 1.2
    seed: int = 0


def make_titles(num_items: int, rng: np.random.Generator) -> list[str]:
    pairs = [(a, n) for a in ADJECTIVES for n in NOUNS]
    if num_items > len(pairs):
        raise ValueError(f"synthetic data: at most {len(pairs)} items have distinct titles, asked {num_items}")
    chosen = rng.choice(len(pairs), size=num_items, replace=False)
    return [f"{pairs[i][0]} {pairs[i][1]}" for i in chosen]


def generate(cfg: SyntheticConfig) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, str, str]]]:
    """Return (interactions, items). interactions: (user, item, rating, timestamp), time-ordered per user."""
    rng = np.random.default_rng(cfg.seed)
    titles = make_titles(cfg.num_items, rng)
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
            if rng.random() < cfg.p_follow:
                cluster = (int(cluster_of[item]) + 1) % cfg.num_clusters
            else:
                cluster = int(rng.choice(favourites))
    items = [(i, titles[i], str(genres[i])) for i in range(cfg.num_items)]
    return interactions, items
