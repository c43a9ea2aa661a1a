"""The fused injection op against the reference: properties over shapes, dtypes and slot layouts,
float64 gradcheck, opcheck, torch.compile, and the Triton kernels under Triton's interpreter."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from trainer.model.kernels.inject import inject_fused, load
from trainer.model.kernels.reference import inject_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}


@st.composite
def cases(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    V, H, S = draw(st.integers(2, 30)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["none", "all", "first", "last", "random", "repeated"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    slot = torch.full((B, T), -1, dtype=torch.long)
    if layout == "all":
        slot = torch.randint(0, S, (B, T), generator=g)
    elif layout == "first":
        slot[:, 0] = torch.randint(0, S, (B,), generator=g)
    elif layout == "last":
        slot[:, -1] = torch.randint(0, S, (B,), generator=g)
    elif layout == "random":
        m = torch.rand(B, T, generator=g) < 0.4
        slot[m] = torch.randint(0, S, (int(m.sum()),), generator=g)
    elif layout == "repeated":  # the same item at many positions, as history and candidates do
        slot[torch.rand(B, T, generator=g) < 0.6] = 0
    ids = torch.randint(0, V, (B, T), generator=g)
    padding_idx = draw(st.one_of(st.none(), st.integers(0, V - 1)))
    if padding_idx is not None:  # some padding positions (right padding, as training batches have)
        ids[:, T - draw(st.integers(0, T)):] = padding_idx
    return ids, slot, V, H, S, padding_idx, seed


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(DTYPES))
def test_fused_equals_reference(case, dtype):
    ids, slot, V, H, S, padding_idx, seed = case
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(V, H, generator=g).to(dtype)
    b0 = torch.randn(S, H, generator=g).to(dtype)
    grad = torch.randn(*ids.shape, H, generator=g).to(dtype)
    outs = []
    for fn in (inject_fused, inject_reference):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = fn(ids, w, slot, b, padding_idx)
        out.backward(grad)
        outs.append((out, w.grad, b.grad))
    (o1, gw1, gb1), (o2, gw2, gb2) = outs
    assert torch.equal(o1, o2)  # a copy: exact in every dtype
    tol = TOL[dtype]
    assert torch.allclose(gw1.float(), gw2.float(), atol=tol * 10, rtol=tol)
    assert torch.allclose(gb1.float(), gb2.float(), atol=tol * 10, rtol=tol)
    if padding_idx is not None:
        assert not gw1[padding_idx].any()  # nn.Embedding's rule: no gradient to the padding row


def test_fused_equals_reference_when_split_over_threads():
    """Above 64 KiB of rows (forward) and 2M values to add (backward, then 256 columns a thread) the
    CPU kernels split their work over threads; the small property cases above never get there."""
    g = torch.Generator().manual_seed(3)
    B, T, V, H, S = 4, 1100, 50, 512, 40
    ids = torch.randint(0, V, (B, T), generator=g)
    slot = torch.randint(-1, S, (B, T), generator=g)  # about 97% slot rows; 4400 x 512 values to add
    grad = torch.randn(B, T, H, generator=g)
    outs = []
    for fn in (inject_fused, inject_reference):
        w = torch.randn(V, H, generator=torch.Generator().manual_seed(4)).requires_grad_()
        b = torch.randn(S, H, generator=torch.Generator().manual_seed(5)).requires_grad_()
        out = fn(ids, w, slot, b, 0)
        out.backward(grad)
        outs.append((out, w.grad, b.grad))
    (o1, gw1, gb1), (o2, gw2, gb2) = outs
    assert torch.equal(o1, o2)
    assert torch.allclose(gw1, gw2, atol=1e-4) and torch.allclose(gb1, gb2, atol=1e-4)


def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is a header template: built without -fopenmp it is a serial loop (it was, once,
    and every benchmark ran on one thread). The library must call OpenMP when torch uses it."""
    from trainer.model.kernels.cpu import load_library

    if not torch.backends.openmp.is_available():
        pytest.skip("this torch is built without OpenMP: at::parallel_for is serial everywhere")
    with open(load_library(), "rb") as f:
        assert b"GOMP_parallel" in f.read()


def test_gradcheck_float64_and_frozen_weight():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (2, 5), generator=g)
    w = torch.randn(20, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    slot = torch.full((2, 5), -1)
    slot[0, 1], slot[1, 4], slot[1, 0], slot[0, 4] = 2, 0, 2, 2
    assert torch.autograd.gradcheck(lambda w, b: inject_fused(ids, w, slot, b), (w, b))
    frozen = w.detach()
    assert inject_fused(ids, frozen, slot, b.detach()).grad_fn is None  # nothing to differentiate: no node
    inject_fused(ids, frozen, slot, b).sum().backward()  # LoRA: the embedding is frozen
    assert frozen.grad is None and torch.equal(b.grad[2], torch.full((6,), 3.0, dtype=torch.float64))


def _op_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (2, 5), generator=g)
    w = torch.randn(20, 6, generator=g, requires_grad=True)
    b = torch.randn(3, 6, generator=g, requires_grad=True)
    slot = torch.full((2, 5), -1)
    slot[0, 1], slot[1, 4] = 2, 0
    return g, ids, w, slot, b


def test_opcheck():
    g, ids, w, slot, b = _op_inputs()
    load()
    torch.library.opcheck(torch.ops.llmrec.inject.default, (ids, w, slot, b, -1))
    grad = torch.randn(2, 5, 6, generator=g)
    for weight_grad in (True, False):
        torch.library.opcheck(torch.ops.llmrec.inject_backward.default, (grad, ids, slot, 3, 20, 0, weight_grad))


@pytest.mark.slow  # torch.compile: Inductor's compile-worker subprocesses and g++ (5 s cached, ~20 s cold)
def test_torch_compile():
    _, ids, w, slot, b = _op_inputs()
    load()
    compiled = torch.compile(lambda i, w, s, b: inject_fused(i, w, s, b) * 2, fullgraph=True)
    assert torch.equal(compiled(ids, w, slot, b), inject_fused(ids, w, slot, b) * 2)


def test_bad_slots_and_ids_are_refused():
    w, b = torch.randn(10, 4), torch.randn(2, 4)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="names behaviour row 5, only 2 rows given"):
        inject_fused(ids, w, torch.tensor([[-1, 5, -1]]), b)
    with pytest.raises(RuntimeError, match="token id 12 out of range"):
        inject_fused(torch.tensor([[0, 12, 1]]), w, torch.full((1, 3), -1), b)
    with pytest.raises(ValueError, match="must have the shape of token_ids"):
        inject_fused(ids, w, torch.full((1, 4), -1), b)
    # the CUDA (Triton) kernels: a tensor left on another device is named before any kernel runs
    from trainer.model.kernels.inject import _inject_backward_cuda, _inject_cuda

    with pytest.raises(ValueError, match="slot_map on meta"):
        _inject_cuda(ids, w, torch.full((1, 3), -1, device="meta"), b, -1)
    with pytest.raises(ValueError, match="grad on meta"):
        _inject_backward_cuda(torch.empty(1, 3, 4, device="meta"), ids, torch.full((1, 3), -1), 2, 10, -1, False)


TRITON_SCRIPT = r"""
import torch
from trainer.model.kernels.inject import inject_backward_reference as inject_backward
from trainer.model.kernels.reference import inject_reference
from trainer.model.kernels.triton_kernels import inject_backward_triton, inject_forward_triton
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for H in (1, 40, 130):
        ids = torch.randint(0, 50, (3, 9), generator=g)
        ids[2, -3:] = 0
        slot = torch.full((3, 9), -1)
        slot[0, 0], slot[2, 8], slot[1, 2], slot[1, 3], slot[0, 8] = 1, 3, 1, 1, 0
        w = torch.randn(50, H, generator=g).to(dtype)
        b = torch.randn(4, H, generator=g).to(dtype)
        assert torch.equal(inject_forward_triton(ids, w, slot, b), inject_reference(ids, w, slot, b)), (dtype, H)
        grad = torch.randn(3, 9, H, generator=g).to(dtype)
        for weight_grad in (True, False):
            tw, tb = inject_backward_triton(grad, ids, slot, 4, 50, 0, weight_grad)
            rw, rb = inject_backward(grad.float(), ids, slot, 4, 50, 0, weight_grad)
            # summed in float32, rounded once to the dtype (bfloat16 keeps 8 bits: rtol 2^-8)
            assert torch.allclose(tb.float(), rb, atol=1e-2, rtol=2 ** -8), (dtype, H)
            assert tw.shape == rw.shape and torch.allclose(tw.float(), rw, atol=1e-2, rtol=2 ** -8), (dtype, H)
print("TRITON OK")
"""


@pytest.mark.slow  # a Python subprocess under Triton's interpreter
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TRITON OK" in r.stdout, r.stderr[-3000:]


BAD_ROWS = [  # (token ids, slot_map) of 1 x 4 with V=10, S=2: each a row the CPU kernel refuses
    ([0, 12, 1, 2], [-1, -1, -1, -1]), ([0, -1, 1, 2], [-1, -1, -1, -1]), ([0, 10, 1, 2], [-1, -1, -1, -1]),
    ([0, 1, 1, 2], [-1, 5, -1, -1]), ([0, 99, 1, 2], [-1, -1, 7, -1]),  # the first bad row is reported
    ([0, 1, 99, 2], [-1, 3, -1, -1]),
]

TRITON_IDS_SCRIPT = r"""
import json, os, sys
import torch
from trainer.model.kernels.inject import inject_backward_reference
from trainer.model.kernels.triton_kernels import inject_backward_triton, inject_forward_triton
bad = json.loads(sys.argv[1])
w, b = torch.randn(10, 4), torch.randn(2, 4)
errors = []
for ids, slot in bad:
    try:
        inject_forward_triton(torch.tensor([ids]), w, torch.tensor([slot]), b)
        errors.append(None)
    except RuntimeError as e:
        errors.append(str(e))
# an id out of range at a slot position is not read (the behaviour row is): no error, as on CPU
ok = inject_forward_triton(torch.tensor([[99, 1]]), w, torch.tensor([[1, -1]]), b)
assert torch.equal(ok[0], torch.stack([b[1], w[1]]))
# without the check (LLMREC_INJECT_CHECK_IDS=0) nothing is read or written out of bounds: the bad row is zeros,
# and the backward drops its gradient
os.environ["LLMREC_INJECT_CHECK_IDS"] = "0"
ids, slot = torch.tensor([[3, 12, -5, 4]]), torch.tensor([[-1, -1, -1, 9]])
out = inject_forward_triton(ids, w, slot, b)
assert torch.equal(out[0, 0], w[3]) and not out[0, 1:].any()
grad = torch.randn(1, 4, 4)
gw, gb = inject_backward_triton(grad, ids, slot, 2, 10, -1, True)
rw, rb = inject_backward_reference(grad[:, :1], ids[:, :1], slot[:, :1], 2, 10, -1, True)
assert torch.allclose(gw, rw) and torch.allclose(gb, rb)
print(json.dumps(errors))
"""


@pytest.mark.slow  # a Python subprocess under Triton's interpreter
def test_triton_forward_refuses_bad_ids_as_the_cpu_kernel_does():
    """The Triton forward used to read any row an id named (out of bounds on GPU, silently); now it raises
    the CPU kernel's RuntimeError, word for word, for every row the CPU kernel refuses."""
    import json

    pytest.importorskip("triton")
    cpu = []
    w, b = torch.randn(10, 4), torch.randn(2, 4)
    for ids, slot in BAD_ROWS:
        with pytest.raises(RuntimeError) as e:
            inject_fused(torch.tensor([ids]), w, torch.tensor([slot]), b)
        cpu.append(str(e.value).splitlines()[0])
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_IDS_SCRIPT, json.dumps(BAD_ROWS)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == cpu
    assert cpu[0] == "inject: token id 12 out of range [0, 10)"
    assert cpu[3] == "inject: slot_map names behaviour row 5, only 2 rows given"


def test_hybrid_embedding_fused_equals_reference(small_run):
    from trainer.model.build import build_llara_model

    cfg, paths = small_run
    outs = []
    for injection in ("fused", "reference"):
        model, embed = build_llara_model(paths.llm, 64, dict(cfg.model.lora), injection=injection, seed=3)
        ids = torch.randint(10, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        slot = torch.full((2, 12), -1)
        slot[0, 3], slot[1, 11], slot[1, 2] = 0, 1, 0
        vec = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
        with embed.inject(slot, vec):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.item(), embed.adapter.fc1.weight.grad.clone()))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-6)


@pytest.mark.slow  # torchrun subprocesses (2 gloo ranks, ZeRO-3)
def test_zero3_two_ranks_match_one_process(small_run, tmp_path):
    """The fused injection under DeepSpeed ZeRO-3 on 2 gloo ranks: the first optimizer steps give the
    losses of a single plain process on the same global batch. Three times: with the trainer's DeepSpeed
    config as built from train.*, with ZeRO-3 knobs set through train.deepspeed (every parameter
    partitioned, the small ones too; no prefetching), which the engine must run with, and at
    train.zero_stage=2 (README: the stage for LoRA when the base fits on every GPU)."""
    import json

    _, paths = small_run
    script = os.path.join(REPO, "tests", "scripts", "zero3_steps.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    def run(launcher, name, extra):
        r = subprocess.run([*launcher, script, paths.llm, str(tmp_path / name), *extra], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / name).read_text())

    one = run([sys.executable], "one.json", ["--single"])["losses"]
    assert len(one) == 3 and one[0] != one[2]  # the model trains
    knobs = {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}
    for name, overrides in (("two.json", {}), ("two_knobs.json", knobs), ("two_stage2.json", None)):
        two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
                  name, ["train.zero_stage=2"] if overrides is None  # README's choice for LoRA when the base fits
                  else [f"train.deepspeed.zero_optimization.{k}={v}" for k, v in overrides.items()])
        assert two["losses"] == pytest.approx(one, rel=1e-5, abs=1e-6), name
        assert two["engine"]["dtypes"] == ["torch.float32"]
        if overrides is None:
            assert two["engine"]["persisted_parameters"] == 0  # nothing partitioned: ZeRO-2 keeps parameters whole
        elif overrides:
            assert (two["engine"]["persisted_parameters"], two["engine"]["prefetch_bucket_size"]) == (0, 0)
        else:  # DeepSpeed's defaults: small parameters (norms, LoRA, adapter) kept whole, prefetching on
            assert two["engine"]["persisted_parameters"] > 0 and two["engine"]["prefetch_bucket_size"] > 0


@pytest.mark.slow  # torchrun subprocesses (1 and 2 gloo ranks, ZeRO-3 and ZeRO-2)
def test_half_precision_under_zero3_and_zero2_on_two_ranks_matches_one_process(small_run, tmp_path):
    """The GPU's precisions on DeepSpeed's CPU accelerator: the model (base, LoRA, adapter) in bf16 under
    ZeRO-3 and ZeRO-2 on 2 gloo ranks gives the losses of one bf16 DeepSpeed process on the same global
    batch, within 1e-3 relative (bf16 keeps 8 bits of mantissa, 3.9e-3 relative per value; measured here:
    5e-5 at the third step, from the order of the gradients' reduction). fp16 (with DeepSpeed's loss
    scaling) under ZeRO-3 on 2 ranks gives the fp32 single process's losses within the same 1e-3. Every
    parameter is in the run's dtype: peft's upcast of LoRA to fp32 made ZeRO-3 fail in deepspeed.initialize
    with a bare AssertionError (trainer/job/precision.py)."""
    import json

    _, paths = small_run
    script = os.path.join(REPO, "tests", "scripts", "zero3_steps.py")

    def run(nproc, precision, stage, name):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PRECISION=precision, ZERO_STAGE=str(stage))
        launcher = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(nproc), "--standalone"]
        r = subprocess.run([*launcher, script, paths.llm, str(tmp_path / name), *(["--single"] if nproc == 0 else [])],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / name).read_text())

    one = run(1, "bf16", 3, "one_bf16.json")
    assert one["engine"]["dtypes"] == ["torch.bfloat16"] and one["losses"][0] != one["losses"][2]
    for stage in (3, 2):
        two = run(2, "bf16", stage, f"two_bf16_zero{stage}.json")
        assert two["engine"]["dtypes"] == ["torch.bfloat16"]
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-3), stage
    fp32 = run(0, "fp32", 3, "single_fp32.json")["losses"]
    assert one["losses"] != fp32  # bf16 is not fp32 under another name
    fp16 = run(2, "fp16", 3, "two_fp16.json")
    assert fp16["engine"]["dtypes"] == ["torch.float16"]
    assert fp16["losses"] == pytest.approx(fp32, rel=1e-3)
