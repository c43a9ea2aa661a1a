"""ZeRO-3 memory per rank (parameters + gradients + optimizer state), 2 ranks against 1, same model.

    python bench/bench_zero_memory.py LLM_DIR            # runs world sizes 1 and 2, prints the ratio

LLM_DIR: a Hugging Face model folder (e.g. runs/default/assets/llm after a default run). Bytes
are counted from the tensors each rank holds after one optimizer step: its parameter partitions
(`ds_tensor`), its fp32 master partitions and Adam moments (the optimizer state), and its gradient
partitions. The model is the trainer's: LoRA + projector + the default's fully trained parameters.
"""

import json
import os
import subprocess
import sys

WORKER = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, deepspeed, torch.distributed as dist
from trainer.model.build import build_llara_model
torch.set_num_threads(1)
lora = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
model, embed = build_llara_model(sys.argv[1], 64, lora, unfreeze=["embed_tokens", "lm_head", "norm"])
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
deepspeed.init_distributed(dist_backend="gloo")
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
       "steps_per_print": 10**9, "gradient_clipping": 1.0}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
ids = torch.randint(10, 200, (2, 32))
loss = engine(input_ids=ids, labels=ids).loss
engine.backward(loss); engine.step()
params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
zopt = engine.optimizer
state = 0
for st in zopt.optimizer.state.values():
    state += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
masters = sum(t.numel() * t.element_size() for t in zopt.fp32_partitioned_groups_flat)
buf = getattr(zopt, "grad_partitions_flat_buffer", None)
grads = buf.numel() * buf.element_size() if torch.is_tensor(buf) else 0
out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "params": params, "optimizer_state": state,
       "fp32_masters": masters, "grads": grads}
out["total"] = params + state + masters + grads
print("MEM " + json.dumps(out), flush=True)
"""


def run(llm, world):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                        str(29600 + world), __file__, "--worker", llm], env=env, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("MEM ")]
    if not rows:
        raise SystemExit(r.stderr[-3000:])
    return rows


def main():
    if sys.argv[1] == "--worker":
        sys.argv = [sys.argv[0], sys.argv[2]]
        exec(WORKER, {"__name__": "__worker__"})
        return
    llm = sys.argv[1]
    one, two = run(llm, 1), run(llm, 2)
    per_rank_two = max(r["total"] for r in two)
    for name, rows in (("1 rank", one), ("2 ranks", two)):
        for r in rows:
            print(f"{name}, rank {r['rank']}: params {r['params'] / 2**20:.2f} MiB, fp32 masters {r['fp32_masters'] / 2**20:.2f} MiB, "
                  f"optimizer state {r['optimizer_state'] / 2**20:.2f} MiB, grads {r['grads'] / 2**20:.2f} MiB, "
                  f"total {r['total'] / 2**20:.2f} MiB")
    print(f"ratio: per-rank ZeRO-3 memory with 2 ranks is {per_rank_two / one[0]['total']:.3f}x that of 1 rank")


if __name__ == "__main__":
    main()
