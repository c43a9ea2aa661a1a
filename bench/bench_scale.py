"""Scale run (issue #21): a ~0.5B-parameter Llama-2-shaped model with random weights through the
product's own commands on this CPU: launch/train.py (2 Ray workers, ZeRO-3, LoRA + adapter only,
micro-batch 1), stopped by a STOP file after a checkpoint, resumed by the same command to the end
(export, end-of-run evaluation), then launch/eval.py on the export. Not CI: minutes, gigabytes.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_scale.py --out /tmp/bench_scale                 # ~0.55B
    OMP_WAIT_POLICY=PASSIVE python bench/bench_scale.py --out /tmp/bench_scale_dbg --hidden 256 \
        --layers 2 --heads 4 --intermediate 688 --pad-vocab 0                               # to debug

What it measures and prints (also written to <out>/bench_scale.json):
- per-worker peak host RSS (VmHWM of the pids in <run>/logs/worker_*.pid, sampled until they
  exit; also the largest RssAnon seen) and the driver's, for each training run and for the eval
  workers of launch/eval.py (Ray worker processes under it), next to DeepSpeed's own ZeRO-3 estimate
  (deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs) and this run's own
  accounting of model states;
- checkpoint bytes per step_N folder with the current code (frozen base excluded), and the bytes
  of the same engine's checkpoint with exclude_frozen_parameters=False (as before issue #21): measured
  by a separate 2-rank script that builds the model as the trainer does and saves it both ways
  (--before measure, the default), and computed from the frozen parameter count;
- seconds per optimizer step from <run>/logs/metrics.jsonl (train.log_every=1: every step's phases);
- seconds of launch/eval.py --modes score on a few rows;
- on paper, for Llama-2-7B on 8 x 80 GB GPUs (ZeRO-3, bf16): parameter counts from the real
  classes on the meta device, DeepSpeed's estimate, per-GPU model states, activations per 512-token
  sample (saved tensors counted on the meta device), host RAM per worker, checkpoint bytes.

The model folder is written by trainer.model.stock.stock_folder (Llama-2's tokenizer conventions,
LlamaForCausalLM, fp32). Its tokenizer is a BPE trained on the synthetic titles and LLaRA's templates
(1,158 pieces at the default --tok-vocab 4000: the corpus runs out of merges); with --pad-vocab 32000
(the default) the model's embedding and head get Llama-2's 32,000 rows anyway (config.vocab_size padded; the rows past the
tokenizer are never looked up), so the embedding, head and logits have the real sizes. The run's
five added tokens ([PH], [HistoryEmb], [CansEmb], [ItemEmb], [PAD]) then fall inside the padding and
grow_vocab adds no rows. --analyse-only redoes the figures from <out>/bench_scale.json without runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LORA = {"r": 8, "alpha": 32, "dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
GiB, GB = 2 ** 30, 1e9


# ---- the model folder

def build_folder(folder: str, a) -> dict:
    """stock_folder with the synthetic titles (+ LLaRA's templates) as its tokenizer's corpus, fp32; the
    config's vocab_size padded to --pad-vocab when the tokenizer is shorter."""
    import torch

    import trainer.model.stock as stock
    from shards.build import load_source
    from shards.prompts import templates
    from configs.schema import load_config, to_dict

    spec = {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads or a.heads,
            "intermediate": a.intermediate, "tok_vocab": a.tok_vocab, "pad_vocab": a.pad_vocab, "users": a.users}
    stamp = os.path.join(folder, "bench_spec.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == spec:
        return {"seconds": 0.0, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(None, [f"data.synthetic.num_users={a.users}"])
    items, _, _ = load_source(cfg.data, cfg.seed)
    corpus = [" " + title for _, title, _ in items] * 4 + list(templates(False, "movie"))
    plain = stock.stock_config

    def padded(*args, **kw):  # the tokenizer's length, or Llama-2's 32,000 rows when that is more
        config = plain(*args, **kw)
        config.vocab_size = max(config.vocab_size, a.pad_vocab)
        return config

    stock.stock_config = padded
    t = time.time()
    try:
        stock.stock_folder(folder, "llama2", corpus, vocab_size=a.tok_vocab, hidden_size=a.hidden,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads or a.heads,
                           intermediate_size=a.intermediate, dtype=torch.float32, seed=0)
    finally:
        stock.stock_config = plain
    json.dump(spec, open(stamp, "w"))
    return {"seconds": time.time() - t, "reused": False}


def param_counts(config, added_vocab: int, dtype=None) -> dict:
    """The trainer's model (build_llara_model: grown vocabulary, hybrid embedding, LoRA, adapter) on the
    meta device: total / trainable / frozen parameters and the largest module's own parameters (what
    DeepSpeed's estimate calls the largest layer)."""
    import torch

    from trainer.model.build import build_llara_model

    with torch.device("meta"):
        model, _ = build_llara_model(config, 64, LORA, unfreeze=[], vocab_size=added_vocab,
                                     dtype=dtype or torch.float32)
    params = list(model.parameters())  # shared parameters once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "largest_layer": largest,
            "frozen_numels": [p.numel() for p in params if not p.requires_grad], "model": model}


def deepspeed_estimate(total: int, largest: int, gpus: int) -> dict:
    """DeepSpeed's own ZeRO-3 estimate for `gpus` ranks on one node, no offload, zero.Init: bytes per
    GPU (= per worker on a CPU run: the accelerator's memory is the host's) and per node's CPU."""
    import contextlib
    import io

    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    cpu, gpu, largest_mem = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False, cpu_offload_params=False,
        zero_init=True)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus, num_nodes=1)
    return {"per_gpu": gpu, "per_node_cpu": cpu, "largest_layer_bytes": largest_mem, "table": table.getvalue()}


def activation_bytes(model, seq: int, heads: int, hidden: int, layers: int) -> dict:
    """Bytes autograd keeps for the backward of one sample of `seq` tokens (forward + the trainer's
    fp32 answer loss over every position), counted on the meta device: every tensor saved for backward,
    once per storage, parameters left out; no recomputation (the trainer enables none). transformers'
    default attention is sdpa; on the meta device that is torch's math path, which keeps the
    softmax probabilities (heads x seq x seq) and fp32 copies of q and k; a flash kernel (CUDA, or
    torch's CPU flash kernel for fp32) keeps q, k, v and the output in the model's dtype plus a
    logsumexp instead: "flash" is the total with that exchange made per layer."""
    import torch
    import torch.nn.functional as F

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = (s.nbytes(), tuple(t.shape))
        return t

    model.train()
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    total = sum(b for b, _ in seen.values())
    # the math path's own tensors: [heads, seq, seq] probabilities, [heads, seq, d] / [heads, d, seq] copies
    attention = sum(b for b, shape in seen.values() if len(shape) == 3 and shape[0] == heads and seq in shape[1:])
    probs = sum(b for b, shape in seen.values() if len(shape) == 3 and shape[0] == heads and shape[1:] == (seq, seq))
    itemsize = next(p for p in model.parameters() if not p.requires_grad).element_size()
    flash_kept = layers * (4 * seq * hidden * itemsize + heads * seq * 4)  # q, k, v, out + fp32 logsumexp
    logits_bytes = sum(b for b, shape in seen.values() if len(shape) == 2 and shape[0] == seq - 1)
    return {"total": total, "math_attention": attention, "attention_probs": probs,
            "flash": total - attention + flash_kept, "logits_fp32": logits_bytes, "seq": seq}


# ---- memory sampling

def _status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out or None


def _children_map() -> dict:
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        for c in kids.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Peak VmHWM / RssAnon of the driver, of each pid in <run>/logs/worker_*.pid (every 0.2 s) and of
    every Ray worker process under the driver ("ray::..." command lines, every 1 s), until stopped;
    also the largest sum of RssAnon over the driver's whole process tree (Ray's daemons included)."""

    def __init__(self, driver_pid: int, logs: str | None):
        super().__init__(daemon=True)
        self.driver, self.logs, self.done = driver_pid, logs, threading.Event()
        self.peaks: dict[str, dict] = {}
        self.tree_anon = 0
        self.load = []  # the 1-minute load average every ~10 s (the machine is shared)

    def _note(self, name: str, st: dict | None) -> None:
        if not st:
            return
        p = self.peaks.setdefault(name, {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0})
        for k in p:
            p[k] = max(p[k], st.get(k, 0))

    def sample_once(self, tree: bool) -> None:
        self._note("driver", _status(self.driver))
        if self.logs and os.path.isdir(self.logs):
            for name in sorted(os.listdir(self.logs)):
                m = re.fullmatch(r"worker_(\d+)\.pid", name)
                if m:
                    try:
                        pid = int(open(os.path.join(self.logs, name)).read().strip())
                    except (OSError, ValueError):
                        continue
                    self._note(f"worker_{m.group(1)}", _status(pid))
        if tree:
            anon = 0
            for pid in _descendants(self.driver):
                st = _status(pid)
                if not st:
                    continue
                anon += st.get("RssAnon", 0)
                if _cmdline(pid).startswith("ray::"):
                    self._note(f"ray_pid_{pid}", st)
            self.tree_anon = max(self.tree_anon, anon)

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            self.sample_once(tree=n % 5 == 0)
            if n % 50 == 0:
                self.load.append(round(os.getloadavg()[0], 2))
            n += 1
            time.sleep(0.2)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"peaks": self.peaks, "tree_rss_anon_max": self.tree_anon}


# ---- the runs

def train_args(a, run_dir: str, base: str) -> list[str]:
    return [f"output_dir={run_dir}", f"model.base={base}", "model.unfreeze=[]", "data.max_len=512",
            f"data.synthetic.num_users={a.users}", f"srec.epochs={a.srec_epochs}", "train.num_workers=2",
            "train.zero_stage=3", "train.micro_batch=1", f"train.max_steps={a.steps}",
            f"train.checkpoint_every={a.checkpoint_every}", "train.log_every=1", f"eval.max_samples={a.eval_rows}",
            "eval.batch_size=4", "eval.compare=false", "eval.max_new_tokens=4", *a.overrides]


def run_logged(cmd: list[str], log_path: str, logs_dir: str | None, on_poll=None, timeout: float = 3600) -> dict:
    """Run cmd with the repo as cwd, output to log_path, sampling memory; on_poll() every 0.5 s."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid, logs_dir)
        sampler.start()
        while proc.poll() is None:
            if on_poll:
                on_poll()
            if time.time() - t > timeout:
                proc.terminate()
            time.sleep(0.5)
    mem = sampler.stop()
    return {"rc": proc.returncode, "seconds": time.time() - t, **mem, "loadavg_1min": sampler.load}


def tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def folder_bytes(path: str) -> dict:
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return {"total": sum(files.values()), "files": files}


def checkpoint_sizes(run_dir: str) -> dict:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return {}
    return {t: folder_bytes(os.path.join(root, t)) for t in sorted(os.listdir(root)) if t.startswith("step_")}


def step_seconds(metrics_path: str) -> list[dict]:
    recs = [json.loads(line) for line in open(metrics_path) if line.strip()]
    out = []
    for r in recs:
        if "forward_ms" not in r:
            continue
        phases = {k: r[f"{k}_ms"] / 1e3 for k in ("data", "forward", "backward", "optimizer", "other")}
        out.append({"step": r["step"], **phases, "total": sum(phases.values()),
                    "tokens_per_sample": r["tokens_per_s"] / r["samples_per_s"]})
    return out


# ---- checkpoint bytes before issue #21 (frozen base included), measured

BEFORE_WORKER = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, deepspeed, torch.distributed as dist
from transformers import AutoTokenizer
from trainer.model.build import build_llara_model, partitioned_loading
torch.set_num_threads(1)
base, tokenizer_dir, ds_config_file, out = sys.argv[1:5]
lora = json.loads(sys.argv[5])
deepspeed.init_distributed(dist_backend="gloo")
ds_config = json.load(open(ds_config_file))
loading = partitioned_loading(ds_config)  # as the trainer: zero.Init, partition by partition
model, embed = build_llara_model(base, 64, lora, unfreeze=[], vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
for tag, exclude in (("with_frozen", False), ("without_frozen", True)):
    engine.save_checkpoint(out, tag=tag, save_latest=False, exclude_frozen_parameters=exclude)
dist.barrier()
print("DONE", flush=True)
"""


def measure_before(base: str, run_dir: str, out: str) -> dict:
    """Both ways of saving, same engine, no step taken (the optimizer's moments do not exist yet, so
    the difference of the two folders is what the frozen base adds; the trainer's own checkpoint
    plus that difference is what a checkpoint held before issue #21)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    script = os.path.join(out, "worker.py")
    with open(script, "w") as f:
        f.write(BEFORE_WORKER)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29651", script,
           base, os.path.join(run_dir, "assets", "tokenizer"), os.path.join(run_dir, "logs", "deepspeed_config.json"),
           out, json.dumps(LORA)]
    log = os.path.join(out, "log.txt")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        return {"error": f"rc {r.returncode}", "log_tail": tail(log)}
    sizes = {tag: folder_bytes(os.path.join(out, tag)) for tag in ("with_frozen", "without_frozen")}
    result = {"seconds": time.time() - t, "with_frozen": sizes["with_frozen"]["total"],
              "without_frozen": sizes["without_frozen"]["total"], "files": {k: v["files"] for k, v in sizes.items()}}
    for tag in ("with_frozen", "without_frozen"):
        shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # gigabytes: keep the numbers only
    return result


# ---- Llama-2-7B on paper

def paper_7b(ckpt_bytes_per_trainable: float = 12.0) -> dict:
    """Llama-2-7B (32 layers x 4096, intermediate 11008, 32 heads, vocab 32000 + LLaRA's 5 added
    tokens), LoRA r=8 on the 7 projections + the adapter, ZeRO-3 over 8 GPUs in bf16."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, bos_token_id=1, eos_token_id=2)
    c = param_counts(config, 32000 + 5, dtype=torch.bfloat16)
    model = c.pop("model")
    for p in model.parameters():  # DeepSpeed's bf16 engine casts every parameter (peft made LoRA's fp32)
        p.data = p.data.to(torch.bfloat16)
    act = activation_bytes(model, 512, 32, 4096, 32)
    c.pop("frozen_numels")
    gpus = 8
    states = {
        "frozen_bf16_per_gpu": c["frozen"] * 2 / gpus,
        # bf16 weight + bf16 gradient + fp32 master + fp32 Adam m and v
        "trainable_per_gpu": c["trainable"] * (2 + 2 + 4 + 4 + 4) / gpus,
    }
    states["total_per_gpu"] = sum(states.values())
    return {"params": c, "deepspeed_estimate": deepspeed_estimate(c["total"], c["largest_layer"], gpus),
            "model_states": states, "activations_512": act,
            "largest_layer_bf16": c["largest_layer"] * 2,
            "full_load_host_per_worker": c["frozen"] * 2 + c["trainable"] * 2,
            "checkpoint_now": c["trainable"] * ckpt_bytes_per_trainable,
            "checkpoint_before": c["trainable"] * ckpt_bytes_per_trainable + c["frozen"] * 2}


# ---- main

def run_all(a, out: str, base: str, run_dir: str, logs: str, res: dict) -> None:
    """The runs: the model folder, training stopped at a checkpoint (run 1) and resumed (run 2), then
    launch/eval.py on the export; their figures go into res."""
    res["build"] = build_folder(base, a)
    print(f"model folder {base}: " + ("reused" if res["build"]["reused"] else f"built in {res['build']['seconds']:.0f} s"),
          flush=True)

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "launch/train.py", *train_args(a, run_dir, base)]
    res["command"] = "OMP_WAIT_POLICY=PASSIVE python launch/train.py " + " ".join(train_args(a, run_dir, base))
    print(res["command"], flush=True)

    # run 1: stopped by a STOP file once step --stop-after's checkpoint is complete
    from trainer.job.checkpoint import COMPLETE, tag_for

    marker = os.path.join(run_dir, "checkpoints", tag_for(a.stop_after), COMPLETE)
    stop_written = {}

    def stop_when_saved():
        if not stop_written and os.path.exists(marker):
            with open(os.path.join(run_dir, "STOP"), "w") as f:
                f.write("bench_scale")
            stop_written["at"] = time.time()

    r1 = run_logged(cmd, os.path.join(out, "train1.log"), logs, on_poll=stop_when_saved)
    r1["checkpoints"] = checkpoint_sizes(run_dir)
    res["run1"] = r1
    print(f"run 1: exit {r1['rc']} after {r1['seconds']:.0f} s (75 = stopped at a checkpoint)", flush=True)
    if r1["rc"] != 75:
        print(tail(os.path.join(out, "train1.log"), 60))
        res["failed"] = "run 1"
    else:
        for name in os.listdir(logs):  # run 2's workers write their own
            if re.fullmatch(r"worker_\d+\.pid", name):
                os.remove(os.path.join(logs, name))
        r2 = run_logged(cmd, os.path.join(out, "train2.log"), logs)
        r2["checkpoints"] = checkpoint_sizes(run_dir)
        text = open(os.path.join(out, "train2.log"), errors="replace").read()
        m = re.search(r"resumed from (step_\d+): step (\d+)", text)
        r2["resumed_from"] = m.group(1) if m else None
        res["run2"] = r2
        print(f"run 2: exit {r2['rc']} after {r2['seconds']:.0f} s; resumed from {r2['resumed_from']}", flush=True)
        if r2["rc"] != 0:
            print(tail(os.path.join(out, "train2.log"), 60))
            res["failed"] = "run 2"

    if "failed" not in res:
        ecmd = [sys.executable, "launch/eval.py", "--run", run_dir, "--max-samples", str(a.eval_rows),
                "--batch-size", "4", "--modes", "score"]
        res["eval_command"] = "OMP_WAIT_POLICY=PASSIVE python " + " ".join(ecmd[1:])
        ev = run_logged(ecmd, os.path.join(out, "eval.log"), None)
        res["eval"] = ev
        print(f"launch/eval.py: exit {ev['rc']} after {ev['seconds']:.0f} s", flush=True)
        if ev["rc"] != 0:
            print(tail(os.path.join(out, "eval.log"), 60))
            res["failed"] = "eval"


def model_figures(a, out: str, base: str, run_dir: str, logs: str, res: dict, prev: dict, t_all: float) -> None:
    """The model's numbers: parameter counts, activations, DeepSpeed's estimate, checkpoint sizes (with and
    without the frozen base), the steps' timings and Llama-2-7B on paper; written to bench_scale.json."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    tok_dir = os.path.join(run_dir, "assets", "tokenizer")
    run_vocab = len(AutoTokenizer.from_pretrained(tok_dir)) if os.path.isdir(tok_dir) else config.vocab_size
    counts = param_counts(config, run_vocab)
    steps = step_seconds(os.path.join(logs, "metrics.jsonl")) if os.path.exists(os.path.join(logs, "metrics.jsonl")) else []
    seq = max([s["tokens_per_sample"] for s in steps] or [512])
    model = counts.pop("model")
    acts = {f"{n}": activation_bytes(model, n, config.num_attention_heads, config.hidden_size,
                                     config.num_hidden_layers) for n in sorted({round(seq), 512})}
    frozen_numels = counts.pop("frozen_numels")
    res["model"] = {"config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                "num_attention_heads", "num_key_value_heads",
                                                                "intermediate_size")},
                    "stock_tokenizer": len(AutoTokenizer.from_pretrained(base)), "run_tokenizer": run_vocab,
                    **counts, "activations_fp32": acts}
    res["deepspeed_estimate"] = deepspeed_estimate(counts["total"], counts["largest_layer"], 2)
    # this run's model states per worker: fp32 partitions of every weight, and for the trainable ones
    # also the gradient, the fp32 master copy and Adam's two moments (ZeRO-3 keeps a separate master)
    res["model_states_per_worker"] = (counts["frozen"] * 4 + counts["trainable"] * (4 + 4 + 4 + 8)) / 2
    # what the frozen base adds to a checkpoint: its ZeRO-3 partitions (ceil(numel / 2) per rank), fp32
    res["frozen_fragments_computed"] = sum(-(-n // 2) * 2 * 4 for n in frozen_numels)

    ckpts = {**res.get("run1", {}).get("checkpoints", {}), **res.get("run2", {}).get("checkpoints", {})}
    if ckpts:
        now = max(v["total"] for v in ckpts.values())
        res["checkpoint_now"] = now
        res["checkpoint_before_computed"] = now + res["frozen_fragments_computed"]
        if a.before == "measure" and "before" not in res and os.path.exists(os.path.join(logs, "deepspeed_config.json")):
            print("measuring a checkpoint with the frozen base (2 ranks, exclude_frozen_parameters=False) ...", flush=True)
            res["before"] = measure_before(base, run_dir, os.path.join(out, "before"))
        if "before" in res and "error" not in res["before"]:
            res["checkpoint_before_measured"] = now + res["before"]["with_frozen"] - res["before"]["without_frozen"]
    res["steps"] = steps
    if ckpts:  # fp32 master + Adam's two moments = 12 B per trained parameter, the rest is small files
        res["checkpoint_bytes_per_trainable"] = res["checkpoint_now"] / counts["trainable"]
    res["paper_7b"] = paper_7b(12.0)
    if not a.analyse_only:
        res["seconds_total"] = time.time() - t_all
    else:
        res["seconds_total"] = prev.get("seconds_total", 0)
    with open(os.path.join(out, "bench_scale.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    report(res)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads (Llama-2-7B has no GQA)")
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--tok-vocab", type=int, default=4000, help="the BPE's target size (the corpus may give fewer)")
    p.add_argument("--pad-vocab", type=int, default=32000, help="embedding rows at least this many (0: the tokenizer's)")
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--srec-epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--stop-after", type=int, default=2, help="write STOP once this step's checkpoint is complete")
    p.add_argument("--eval-rows", type=int, default=4)
    p.add_argument("--before", choices=["measure", "compute"], default="measure")
    p.add_argument("--analyse-only", action="store_true",
                   help="no runs: redo the figures from <out>/bench_scale.json and the run folder")
    p.add_argument("overrides", nargs="*", help="more key=value for launch/train.py")
    a = p.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    base, run_dir = os.path.join(out, "base"), os.path.join(out, "run")
    logs = os.path.join(run_dir, "logs")
    res = {"args": vars(a)}
    t_all = time.time()

    if a.analyse_only:
        with open(os.path.join(out, "bench_scale.json")) as f:
            prev = json.load(f)
        res.update({k: prev[k] for k in ("build", "command", "eval_command", "run1", "run2", "eval", "before", "failed")
                    if k in prev})
    else:
        prev = {}
        run_all(a, out, base, run_dir, logs, res)
    model_figures(a, out, base, run_dir, logs, res, prev, t_all)


def report(res: dict) -> None:
    m = res["model"]
    print(f"\nmodel: Llama-2-shaped, {m['config']['num_hidden_layers']} layers x {m['config']['hidden_size']}, "
          f"{m['config']['num_attention_heads']} heads, intermediate {m['config']['intermediate_size']}, "
          f"embedding rows {m['config']['vocab_size']} (stock tokenizer {m['stock_tokenizer']}, run tokenizer "
          f"{m['run_tokenizer']}); fp32")
    print(f"parameters: total {m['total']:,}, trainable {m['trainable']:,} (LoRA r=8 x 7 projections + adapter), "
          f"frozen {m['frozen']:,}, largest layer {m['largest_layer']:,}")
    ds = res["deepspeed_estimate"]
    print(f"DeepSpeed's estimate (2 GPUs, no offload, zero.Init): per GPU {ds['per_gpu'] / GiB:.2f} GiB, "
          f"per node CPU {ds['per_node_cpu'] / GiB:.2f} GiB")
    print(ds["table"].rstrip())
    print(f"this run's model states per worker (fp32 weights / 2 + trainable x 20 B / 2): "
          f"{res['model_states_per_worker'] / GiB:.2f} GiB")
    for n, act in m["activations_fp32"].items():
        print(f"activations counted for one {n}-token sample (fp32): {act['total'] / GiB:.2f} GiB with the math "
              f"attention path, {act['flash'] / GiB:.2f} GiB with a flash kernel (logits {act['logits_fp32'] / GiB:.2f} GiB)")
    for run in ("run1", "run2", "eval"):
        if run not in res:
            continue
        r = res[run]
        peaks = r["peaks"]
        line = ", ".join(f"{k} {v['VmHWM'] / GiB:.2f} GiB (anon {v['RssAnon'] / GiB:.2f}, file {v['RssFile'] / GiB:.2f})"
                         for k, v in sorted(peaks.items()) if k.startswith(("worker", "driver")))
        # the pid files appear once training starts: their anon/file maxima leave out the loading; the
        # Ray processes (sampled from their start, every second) show rank 0's memory-mapped weight files
        rays = sorted((v for k, v in peaks.items() if k.startswith("ray_pid")), key=lambda v: -v["VmHWM"])[:2]
        if rays:
            line += "; largest Ray processes " + ", ".join(
                f"{v['VmHWM'] / GiB:.2f} GiB (anon {v['RssAnon'] / GiB:.2f}, file {v['RssFile'] / GiB:.2f})" for v in rays)
        load = r.get("loadavg_1min") or [0]
        print(f"{run}: exit {r['rc']}, {r['seconds']:.0f} s (load average {min(load):.1f}-{max(load):.1f}); peak RSS: "
              f"{line}; process tree anon max {r['tree_rss_anon_max'] / GiB:.2f} GiB")
        for tag, v in sorted(r.get("checkpoints", {}).items()):
            print(f"  {tag}: {v['total']:,} bytes: " + ", ".join(f"{k} {b:,}" for k, b in sorted(v["files"].items())))
    if "checkpoint_now" in res:
        print(f"checkpoint now {res['checkpoint_now']:,} bytes; before (+ frozen fragments, computed) "
              f"{res['checkpoint_before_computed']:,}" + (f"; before (measured) {res['checkpoint_before_measured']:,}"
                                                         if "checkpoint_before_measured" in res else ""))
    if "before" in res:
        print(f"  the 2-rank save both ways: {json.dumps({k: v for k, v in res['before'].items() if k != 'files'})}")
    steps = res["steps"]
    for s in steps:
        print(f"  step {s['step']}: {s['total']:.1f} s, {s['tokens_per_sample']:.0f} tokens/sample (data {s['data']:.2f}, forward {s['forward']:.1f}, backward "
              f"{s['backward']:.1f}, optimizer {s['optimizer']:.2f}, other {s['other']:.1f})")
    compute = [s["forward"] + s["backward"] + s["optimizer"] + s["data"] for s in steps]
    p7 = res["paper_7b"]
    print(f"\nLlama-2-7B on paper: total {p7['params']['total']:,}, trainable {p7['params']['trainable']:,}, "
          f"largest layer {p7['params']['largest_layer']:,}; DeepSpeed's estimate per GPU (8 GPUs) "
          f"{p7['deepspeed_estimate']['per_gpu'] / GiB:.2f} GiB; model states per GPU "
          f"{p7['model_states']['total_per_gpu'] / GB:.2f} GB; activations per 512-token sample "
          f"{p7['activations_512']['total'] / GB:.2f} GB (math attention; {p7['activations_512']['flash'] / GB:.2f} GB with flash); "
          f"checkpoint now {p7['checkpoint_now'] / GB:.2f} GB, before {p7['checkpoint_before'] / GB:.2f} GB")
    w = [v["VmHWM"] for k, v in res.get("run2", res.get("run1", {})).get("peaks", {}).items() if k.startswith("worker")]
    w += [v["VmHWM"] for k, v in res.get("run1", {}).get("peaks", {}).items() if k.startswith("worker")]
    before = res.get("checkpoint_before_measured", res.get("checkpoint_before_computed", 0))
    print(f"\nsummary: {m['total'] / 1e9:.3f}B params | worker peak RSS {max(w) / GiB if w else float('nan'):.2f} GiB vs "
          f"DeepSpeed per GPU {ds['per_gpu'] / GiB:.2f} GiB | checkpoint {res.get('checkpoint_now', 0) / 2**20:.1f} MiB now vs "
          f"{before / 2**20:.1f} MiB before | {statistics.median(compute) if compute else float('nan'):.1f} s/step compute, "
          f"{statistics.median([s['total'] for s in steps]) if steps else float('nan'):.1f} s/step all | eval "
          f"{res.get('eval', {}).get('seconds', float('nan')):.0f} s | total {res['seconds_total'] / 60:.1f} min"
          + (f" | FAILED: {res['failed']}" if "failed" in res else ""))


if __name__ == "__main__":
    main()
