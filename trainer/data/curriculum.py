"""LLaRA's curriculum, keyed by (seed, optimizer step) so every rank and every resume agrees.

At optimizer step s of S a step is hybrid with probability s / S, otherwise text-only. LLaRA keeps
this counter inside its dataloader workers, which restart every epoch; here it is a pure function.
"""

from __future__ import annotations

import numpy as np


MODES = ("curriculum", "hybrid", "text")  # train.mode


def is_hybrid(mode: str, step: int, total_steps: int, seed: int) -> bool:
    if mode == "hybrid":
        return True
    if mode == "text":
        return False
    if mode != "curriculum":
        raise ValueError(f"train.mode={mode!r}: expected curriculum, hybrid or text")
    u = np.random.default_rng([seed, 0xC0FFEE, step]).random()
    return bool(u < step / max(1, total_steps))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))
