"""Refuse a GPU job that the Ray cluster cannot place, instead of waiting for GPUs forever (Ray
Train would keep the job pending with no message)."""

from __future__ import annotations


def require_gpus(workers: int, switch: str) -> None:
    """A ValueError naming `switch` when the connected Ray cluster has fewer GPUs than `workers` (the
    launchers print it and exit 2)."""
    import ray  # lazy: only where a cluster is used

    have = int(ray.cluster_resources().get("GPU", 0))
    if have < workers:
        raise ValueError(f"{switch} asks for {workers} workers with a GPU each, the Ray cluster has {have} "
                         f"GPU(s); give fewer workers, add GPU nodes, or run on CPU")
