"""First optimizer steps of the LLaRA model with the fused injection, either under DeepSpeed ZeRO-3
on 2 gloo ranks (run with torch.distributed.run) or in one plain process; writes the losses as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/zero3_steps.py LLM_DIR OUT.json
    python tests/scripts/zero3_steps.py LLM_DIR OUT.json --single
    ... zero3_steps.py LLM_DIR OUT.json train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0

OUT.json: {"losses": [...], "engine": {how many parameters ZeRO-3 keeps whole on every rank, its prefetch
bucket size; empty with --single}}.

USER_TOKEN=1: the model has the user-state adapter and every sample a [UserEmb] slot (behaviour rows
[5 item vectors; 4 user states]); each rank passes all 4 user states, only its own samples' are used.
TEXT_ONLY=1: every step text-only (no slots); TEXT_STEPS=1,2: those steps only.
ACTIVATION_CHECKPOINTING=1: the decoder layers recomputed in backward (train.activation_checkpointing).
PRECISION=bf16|fp16: the model built in it and DeepSpeed's bf16/fp16 mode (trainer/job/precision.py); fp32 by default.
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


USER = bool(os.environ.get("USER_TOKEN"))


def batch(vocab, B=4, T=16, slots=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (B, T), generator=g)
    slot = torch.full((B, T), -1)
    for b in range(B):
        pos = torch.randperm(T - 4, generator=g)[:slots + USER]
        slot[b, pos[:slots]] = torch.randint(0, 5, (slots,), generator=g)
        if USER:
            slot[b, pos[slots]] = 5 + b  # the user-state row of sample b
    labels = torch.full((B, T), -100)
    labels[:, -4:] = ids[:, -4:]  # the same number of answer tokens in every sample
    vectors = torch.randn(5, 64, generator=g)
    users = torch.randn(B, 64, generator=g) if USER else None
    return ids, slot, labels, vectors, users


def main():
    llm, out, single = sys.argv[1], sys.argv[2], "--single" in sys.argv
    overrides = [a for a in sys.argv[3:] if "=" in a]
    from configs.schema import load_config
    from trainer.job.ds_config import check_deepspeed_overrides, deepspeed_config
    from trainer.model.build import build_llara_model
    from trainer.job.precision import TORCH_DTYPES
    from trainer.train_loop import answer_loss

    lora = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    precision = os.environ.get("PRECISION", "fp32")
    model, embed = build_llara_model(llm, 64, lora, unfreeze=os.environ.get("UNFREEZE", "lm_head").split(","), seed=0,
                                     dtype=TORCH_DTYPES[precision],
                                     injection=os.environ.get("INJECTION", "fused"), user_token=USER,
                                     activation_checkpointing=bool(os.environ.get("ACTIVATION_CHECKPOINTING")))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)  # SGD: rounding differences stay small (Adam amplifies them on step 1)
    vocab = model.get_input_embeddings().num_embeddings
    losses, engine_config = [], {}
    if single:
        for step in range(3):
            ids, slot, labels, vec, users = batch(vocab, seed=step)
            if os.environ.get("TEXT_ONLY") or str(step) in os.environ.get("TEXT_STEPS", "").split(","):
                slot = torch.full_like(slot, -1)
            with embed.inject(slot, vec, users):
                loss = answer_loss(model(input_ids=ids).logits, labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
    else:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        # the trainer's own DeepSpeed config (trainer/job/ds_config.py), with the key=value overrides given
        # after the arguments (train.deepspeed.* among them) and DeepSpeed's leave to use SGD
        cfg = load_config(None, [f"train.micro_batch={4 // world}", "train.grad_accum=1", "train.grad_clip=1.0",
                                 f"train.zero_stage={int(os.environ.get('ZERO_STAGE', 3))}",
                                 "train.deepspeed.zero_allow_untested_optimizer=true", *overrides])
        check_deepspeed_overrides(cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, precision))
        # what the engine runs with: parameters ZeRO-3 keeps whole on every rank, prefetching
        engine_config = {"persisted_parameters": sum(bool(getattr(p, "ds_persist", False)) for p in model.parameters()),
                         "prefetch_bucket_size": engine.zero_prefetch_bucket_size(),
                         "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
        for step in range(3):
            ids, slot, labels, vec, users = batch(vocab, seed=step)
            part = slice(rank * 4 // world, (rank + 1) * 4 // world)
            if os.environ.get("TEXT_ONLY") or str(step) in os.environ.get("TEXT_STEPS", "").split(","):
                slot = torch.full_like(slot, -1)
            with embed.inject(slot[part], vec, users):
                loss = answer_loss(engine(input_ids=ids[part]).logits, labels[part])
            engine.backward(loss)
            engine.step()
            t = torch.tensor([loss.item()], dtype=torch.float64)
            dist.all_reduce(t)
            losses.append(t.item() / world)
        if rank == 0:
            _write(out, losses, engine_config)
        # both ranks leave together, without running gloo's and DeepSpeed's destructors: a rank that tears its
        # process group down while the other still does can abort there ("terminate called without an active
        # exception", exit -6, seen here once in a few dozen runs) after the results were written
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _write(out, losses, engine_config)


def _write(out, losses, engine_config):
    with open(out, "w") as f:
        json.dump({"losses": losses, "engine": engine_config}, f)


if __name__ == "__main__":
    main()
