"""SUBR retrieval (shards/retrieval.py) on a large random catalogue: time and peak memory.

Compares in one run:
  topk chunked     topk_similar_items over the whole catalogue (blocks, never N x N)
  topk naive       the full N x N similarity matrix, then topk (on a smaller N where it fits)
  topk chunked     the same smaller N, chunked (the like-for-like comparison with naive)
  retrieve         retrieve(): per sample the K most similar of its history, batched (gather + bmm)
  retrieve loop    the same, one sample at a time in Python (a plain per-sample loop)

The top-k timings are one run each (minutes at N=100,000); the retrieval ones the median of
--reps runs. Peak memory is the growth of the process' peak resident set (VmHWM, reset before each step with
/proc/self/clear_refs), since torch's allocations are invisible to tracemalloc. Catalogue vectors
are random unit rows (D=512 after PCA in ReLLa).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_retrieval.py [--items 100000] [--naive-items 20000]

The last line prints the ratios.
"""

import argparse
import time
from statistics import median

import torch

from shards.retrieval import l2_normalize, retrieve, topk_similar_items


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(fn):
    """(result, seconds, peak resident-set growth in MiB) of fn()."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_status_kb("VmHWM") - before) / 1024


def naive_topk(vecs, k):
    sims = vecs @ vecs.T
    sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1)


def loop_retrieve(history, targets, vecs, k):
    """Per sample: its history's vectors, dot products with the target, sorted, back to positions
    (history padding is at the end here, so positions in the unpadded list are positions)."""
    out = torch.full((len(history), k), -1, dtype=torch.long)
    for b, (h, t) in enumerate(zip(history.tolist(), targets.tolist())):
        h = [i for i in h if i >= 0]
        sims = vecs[h] @ vecs[t]
        best = torch.sort(sims.flip(0), descending=True, stable=True).indices[:k]  # ties: the more recent
        out[b, :len(best)] = len(h) - 1 - best
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--naive-items", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--history", type=int, default=60)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="retrieval timings: the median of this many runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    vecs = l2_normalize(torch.randn(args.items, args.dim, generator=g))
    catalogue_mib = vecs.numel() * 4 / 2**20
    print(f"catalogue {args.items} x {args.dim} float32 ({catalogue_mib:.0f} MiB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    small = vecs[:args.naive_items].clone()
    (ns, ni), t_naive, m_naive = measure(lambda: naive_topk(small, args.topk))
    (cs, ci), t_small, m_small = measure(lambda: topk_similar_items(small, args.topk))
    agree = (ci == ni).float().mean().item()
    print(f"topk naive   N={args.naive_items}: {t_naive:8.2f} s  peak +{m_naive:7.0f} MiB")
    print(f"topk chunked N={args.naive_items}: {t_small:8.2f} s  peak +{m_small:7.0f} MiB  (same ids as naive: {agree:.4f})")
    del ns, ni, cs, ci

    _, t_big, m_big = measure(lambda: topk_similar_items(vecs, args.topk))
    print(f"topk chunked N={args.items}: {t_big:8.2f} s  peak +{m_big:7.0f} MiB  "
          f"(a full N x N float32 matrix would be {args.items ** 2 * 4 / 2**30:.1f} GiB)")

    lengths = torch.randint(1, args.history + 1, (args.samples,), generator=g)
    history = torch.randint(0, args.items, (args.samples, args.history), generator=g)
    history[torch.arange(args.history)[None, :] >= lengths[:, None]] = -1
    targets = torch.randint(0, args.items, (args.samples,), generator=g)
    runs = [measure(lambda: retrieve(history, targets, vecs, args.k)) for _ in range(args.reps)]
    batched, t_ret, m_ret = runs[0][0], median(r[1] for r in runs), max(r[2] for r in runs)
    runs = [measure(lambda: loop_retrieve(history, targets, vecs, args.k)) for _ in range(args.reps)]
    looped, t_loop, m_loop = runs[0][0], median(r[1] for r in runs), max(r[2] for r in runs)
    agree = (batched == looped).all(1).float().mean().item()
    print(f"retrieve batched {args.samples} x {args.history}, K={args.k}: {t_ret:8.3f} s  peak +{m_ret:6.0f} MiB")
    print(f"retrieve loop    {args.samples} x {args.history}, K={args.k}: {t_loop:8.3f} s  peak +{m_loop:6.0f} MiB"
          f"  (same positions: {agree:.4f} of samples)")

    print(f"ratios: topk naive/chunked at N={args.naive_items} time {t_naive / t_small:.2f}x, "
          f"peak memory {m_naive / max(m_small, 1):.1f}x | topk N={args.items} {t_big:.0f} s, peak +{m_big:.0f} MiB | "
          f"retrieve loop/batched {t_loop / t_ret:.1f}x")


if __name__ == "__main__":
    main()
