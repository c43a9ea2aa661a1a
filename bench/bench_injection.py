"""Behaviour-token injection, forward + backward, at LLaRA's shape scaled to a CPU.

Compares in one run:
  loop      LLaRA's way: per sample, per placeholder, one row written (with its host syncs)
  reference trainer/kernels/reference.py: one lookup + one gather + one where
  lookup    a plain embedding lookup with no injection (the floor)

    OMP_WAIT_POLICY=PASSIVE python bench/bench_injection.py [--hidden 1024] [--threads 2]

The last line prints the ratios.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from trainer.kernels.reference import inject_reference


def loop_injection(ids, weight, slot_map, behaviour):
    emb = F.embedding(ids, weight)
    for b in range(ids.shape[0]):
        positions = torch.nonzero(slot_map[b] >= 0).flatten()
        for p in positions.tolist():
            emb[b, p] = behaviour[slot_map[b, p].item()]
    return emb


def timed(fn, reps):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--slots", type=int, default=31)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    weight = torch.randn(a.vocab, a.hidden, generator=g, requires_grad=True)
    uniq = a.batch * a.slots // 2  # history and candidates repeat items
    behaviour = torch.randn(uniq, a.hidden, generator=g, requires_grad=True)
    slot_map = torch.full((a.batch, a.seq), -1)
    for b in range(a.batch):
        pos = torch.randperm(a.seq, generator=g)[: a.slots]
        slot_map[b, pos] = torch.randint(0, uniq, (a.slots,), generator=g)

    def run(f):
        def step():
            weight.grad = behaviour.grad = None
            f().sum().backward()
        return step

    t_loop = timed(run(lambda: loop_injection(ids, weight, slot_map, behaviour)), a.reps)
    t_ref = timed(run(lambda: inject_reference(ids, weight, slot_map, behaviour)), a.reps)
    t_lookup = timed(run(lambda: F.embedding(ids, weight)), a.reps)
    print(f"shape B={a.batch} T={a.seq} H={a.hidden} V={a.vocab} slots/sample={a.slots} threads={a.threads}")
    for name, t in (("loop (LLaRA)", t_loop), ("reference", t_ref), ("plain lookup", t_lookup)):
        print(f"{name:>14}: {t * 1e3:8.2f} ms  fwd+bwd")
    print(f"reference vs loop: {t_loop / t_ref:.1f}x faster | reference vs plain lookup: {t_ref / t_lookup:.2f}x the time")


if __name__ == "__main__":
    main()
