"""The shard build at scale (issue 26): `python launch/build_shards.py` on a generated `generic` CSV of N
interactions (N / 50 users with 50 each, 20,000 items, leave-one-out), peak RSS and samples/s, for this
tree's build and, with --baseline-rev, the build of an older revision measured in the same run. Not CI:
minutes per million interactions on 2 cores.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_build.py --out /tmp/bench_build --interactions 1000000,5000000 \
        --baseline-rev 66b4610 --baseline-interactions 1000000 --ray-workers 1,2 --ray-interactions 200000

Prints one row per (build, size): samples, seconds, samples/s, the main process's peak RSS and the peak of
the main process and its tokenizing processes together (with --ray-workers, the build as Ray tasks on a
local cluster the build starts, N workers: Ray's processes count as its children); then the memory ratio
(largest size over smallest) of each build, this tree's samples/s and peak RSS against the baseline's at
each size, and the last line: Ray with the most workers against Ray with the fewest. Writes the rows to
<out>/bench_build.json. The CSV and the shards are written under --out (about 5.5 GB of shards per
million interactions: delete them after). --stop-after S stops the builds at the largest size after S
seconds (marked "stopped"): the peak RSS of the load and of the shards written by then, the samples/s
over that part; the streamed build's memory does not grow after the load (at most 2 x workers shards
in flight), so the peak is the build's, but the row is not a whole build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_csv(folder: str, interactions: int, items: int, seed: int = 0) -> tuple[str, str]:
    """users x 50 interactions, item ids drawn uniformly, increasing timestamps per user."""
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    inter, item_path = os.path.join(folder, "interactions.csv"), os.path.join(folder, "items.csv")
    if not os.path.exists(inter):
        rng = np.random.default_rng(seed)
        users = interactions // 50
        with open(inter + ".tmp", "w") as f:
            f.write("user,item,timestamp\n")
            for u in range(users):
                picks = rng.integers(0, items, size=50)
                f.write("".join(f"{u},{int(i)},{t}\n" for t, i in enumerate(picks)))
        os.replace(inter + ".tmp", inter)
    if not os.path.exists(item_path):
        with open(item_path, "w") as f:
            f.write("item,title,genre\n" + "".join(f"{i},Item number {i} of the catalogue,genre {i % 17}\n" for i in range(items)))
    return inter, item_path


def tokenizer(folder: str) -> str:
    out = os.path.join(folder, "tokenizer")
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        from trainer.model.tiny import build_tokenizer

        build_tokenizer([f"Item number {i} of the catalogue" for i in range(2000)], 2000, out)
    return out


def measure(cmd: list[str], cwd: str, env: dict, out_dir: str, stop_after: float = 0) -> dict:
    """Run cmd; poll the RSS of it and its children every 0.2 s. With stop_after, SIGKILL the build (its
    whole session) after that many seconds and count the samples of the shards it recorded as written
    (out_dir/build-progress.jsonl): the row is then marked "stopped"."""
    import signal

    import psutil

    t0 = time.monotonic()
    # stderr to a file: the build's progress bar writes more than a pipe holds, and nothing reads it until the end
    err_file = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True,
                            start_new_session=True)
    main, total, stopped = 0, 0, False
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = p.memory_info().rss
            kids = sum(c.memory_info().rss for c in p.children(recursive=True))
            main, total = max(main, rss), max(total, rss + kids)
        except psutil.Error:
            pass
        if stop_after and time.monotonic() - t0 > stop_after:
            os.killpg(proc.pid, signal.SIGKILL)
            stopped = True
            break
        time.sleep(0.2)
    out, _ = proc.communicate()
    seconds = time.monotonic() - t0
    if stopped:
        try:
            with open(os.path.join(out_dir, "build-progress.jsonl")) as f:
                entries = [json.loads(line) for line in f][1:]  # the first line is the header
        except FileNotFoundError:  # stopped before its first shard, or a build that keeps no record
            entries = []
        return {"samples": sum(e["count"] for e in entries), "seconds": seconds, "main_peak_gb": main / 2**30,
                "total_peak_gb": total / 2**30, "stopped": True}
    err_file.seek(0)
    err = err_file.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    stats = json.loads(out[out.index("{"):])
    samples = sum(stats[f"{s}_samples"] for s in ("train", "val", "test"))
    return {"samples": samples, "seconds": seconds, "main_peak_gb": main / 2**30, "total_peak_gb": total / 2**30}


def checkout(rev: str, folder: str) -> str:
    """The project's files at `rev` (git archive), to run its build from."""
    os.makedirs(folder, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--interactions", default="1000000,5000000")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--baseline-rev", default=None, help="a git revision whose build is measured too")
    p.add_argument("--baseline-interactions", default="",
                   help="the sizes the baseline runs at (default: every size); the build before issue 26 holds ~5 KB "
                        "a sample: 5M interactions would need ~25 GB")
    p.add_argument("--ray-workers", default="", help="e.g. 1,2: this tree's build as Ray tasks with each count")
    p.add_argument("--ray-interactions", type=int, default=0, help="the size the Ray rows run at (default: every size)")
    p.add_argument("--stop-after", type=float, default=0,
                   help="seconds: stop the builds at the largest size then, counting the samples written so far "
                        "(peak RSS of the load and the first shards; samples/s over that part)")
    a = p.parse_args()
    sizes = [int(x) for x in a.interactions.split(",")]
    os.makedirs(a.out, exist_ok=True)
    tok = tokenizer(a.out)
    # (name, source tree, build options, the sizes it runs at)
    trees = [("this tree", REPO, ["--workers", str(a.workers)], sizes)]
    if a.baseline_rev:
        base = checkout(a.baseline_rev, tempfile.mkdtemp(dir=a.out, prefix="rev-"))
        base_sizes = [int(x) for x in a.baseline_interactions.split(",")] if a.baseline_interactions else sizes
        trees.insert(0, (f"baseline {a.baseline_rev}", base, ["--workers", str(a.workers)], base_sizes))
    trees += [(f"Ray, {n} worker{'s' if n > 1 else ''}", REPO, ["--ray", "--workers", str(n)],
               [a.ray_interactions] if a.ray_interactions else sizes)
              for n in (int(x) for x in a.ray_workers.split(",") if x)]
    rows = []
    print("| build | interactions | samples | seconds | samples/s | main peak RSS | with tokenizing processes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in sorted({size for *_, tree_sizes in trees for size in tree_sizes}):
        inter, items = write_csv(os.path.join(a.out, f"csv-{n}"), n, a.items)
        for name, tree, how, tree_sizes in trees:
            if n not in tree_sizes:
                continue
            out = os.path.join(a.out, f"shards-{n}-{len(rows)}")
            cli = ["launch/build_shards.py"] if os.path.exists(os.path.join(tree, "launch", "build_shards.py")) else ["-m", "shards.build"]
            cmd = [sys.executable, *cli, "--tokenizer", tok, "--out", out, *how, "data.source=generic",
                   f"data.path={inter}", f"data.items_path={items}", "data.split=loo",
                   f"data.samples_per_shard={a.samples_per_shard}", "data.max_len=4096"]
            env = dict(os.environ, PYTHONPATH=tree)
            stop = a.stop_after if n == max(sizes) else 0
            r = {"build": name, "interactions": n, **measure(cmd, tree, env, out, stop)}
            rows.append(r)
            print(f"| {name}{' (stopped)' if r.get('stopped') else ''} | {n:,} | {r['samples']:,} | {r['seconds']:.0f} | "
                  f"{r['samples'] / r['seconds']:,.0f} | {r['main_peak_gb']:.2f} GB | {r['total_peak_gb']:.2f} GB |", flush=True)
            subprocess.run(["rm", "-rf", out], check=True)
    with open(os.path.join(a.out, "bench_build.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for name, *_ in trees:
        mine = [r for r in rows if r["build"] == name]
        if len(mine) < 2:
            continue
        print(f"{name}: main peak RSS at {sizes[-1]:,} / at {sizes[0]:,} interactions = "
              f"{mine[-1]['main_peak_gb'] / mine[0]['main_peak_gb']:.2f}x")
    if a.baseline_rev:
        for n in trees[0][3]:
            base, new = (next(r for r in rows if r["interactions"] == n and r["build"] == t) for t, *_ in trees[:2])
            print(f"{n:,} interactions: this tree / baseline: peak RSS {new['main_peak_gb'] / base['main_peak_gb']:.2f}x, "
                  f"samples/s {(new['samples'] / new['seconds']) / (base['samples'] / base['seconds']):.2f}x")

    ray_rows = [t[0] for t in trees if t[0].startswith("Ray")]
    if len(ray_rows) > 1:
        few, many = ([r for r in rows if r["build"] == t][-1] for t in (ray_rows[0], ray_rows[-1]))
        print(f"{many['interactions']:,} interactions, {many['build']} / {few['build']}: samples/s "
              f"{(many['samples'] / many['seconds']) / (few['samples'] / few['seconds']):.2f}x, "
              f"peak RSS (all processes) {many['total_peak_gb'] / few['total_peak_gb']:.2f}x")


if __name__ == "__main__":
    main()
