"""Save the trained state on one number of DeepSpeed ranks and restore it on another
(trainer/job/trainable_state.py), on gloo ranks started with torch.distributed.run.

    python -m torch.distributed.run --nproc_per_node 2 resize_state.py LLM_DIR DIR save
    python -m torch.distributed.run --nproc_per_node 1 resize_state.py LLM_DIR DIR load

save: two AdamW steps on a batch of 6 samples split over the ranks, then FILE written to DIR, then a
third step; DIR/save.json: the third step's loss and the whole trained parameters after it.
load: the same model built fresh (other initial values: seed 1), FILE restored and verified (verify
raises on any difference), the third step taken; DIR/load.json: the same figures.
ZERO_STAGE (default 3) picks the stage.
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


def batch(vocab, step, B=6, T=16):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(10, vocab, (B, T), generator=g)
    slot = torch.full((B, T), -1)
    for b in range(B):
        slot[b, torch.randperm(T - 4, generator=g)[:3]] = torch.randint(0, 5, (3,), generator=g)
    labels = torch.full((B, T), -100)
    labels[:, -4:] = ids[:, -4:]  # the same number of answer tokens in every sample: equal means
    return ids, slot, labels, torch.randn(5, 64, generator=g)


def main():
    llm, out, phase = sys.argv[1:4]
    import deepspeed
    import torch.distributed as dist

    from trainer.job import trainable_state
    from configs.schema import load_config
    from trainer.job.ds_config import deepspeed_config
    from trainer.model.build import build_llara_model
    from trainer.train_loop import answer_loss

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lora = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model, embed = build_llara_model(llm, 64, lora, unfreeze=["lm_head"], seed=0 if phase == "save" else 1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = load_config(None, [f"train.micro_batch={6 // world}", "train.grad_accum=1", "train.grad_clip=1.0",
                             f"train.zero_stage={int(os.environ.get('ZERO_STAGE', 3))}"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, "fp32"))
    vocab = model.get_input_embeddings().num_embeddings

    def step(n):
        ids, slot, labels, vec = batch(vocab, n)
        part = slice(rank * 6 // world, (rank + 1) * 6 // world)
        with embed.inject(slot[part], vec):
            loss = answer_loss(engine(input_ids=ids[part]).logits, labels[part])
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / world

    result = {"world": world}
    if phase == "save":
        step(0), step(1)
        os.makedirs(out, exist_ok=True)
        result["bytes"] = trainable_state.save(engine, out, rank)
    else:
        result.update(trainable_state.restore(engine, out))
        trainable_state.verify(engine, out)  # raises on any difference
        result["verified"] = True
    result["loss"] = step(2)
    after = {k: v.tolist() for k, v in trainable_state.gather(engine).items() if k.startswith("param.")}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out, f"{phase}.json"), "w") as f:
            json.dump({**result, "after": after}, f)


if __name__ == "__main__":
    main()
