"""S-DPO: softmax DPO with several negatives ("On Softmax Direct Preference Optimization for
Recommendation", NeurIPS 2024), the preference stage after LLaRA's next-token stage (train.objective=sdpo).

Per prompt x with the true item p and k negatives d_1..d_k drawn from its candidates:

    loss = -log sigmoid( -log sum_j exp( beta * (r(d_j) - r(p)) ) ),   r(y) = log pi(y|x) - log pi_ref(y|x)

where log pi(y|x) is the summed log-likelihood of the answer " <title>\\n<eos>" (the answer the SFT stage
learned) under the model being trained, and pi_ref the model the stage starts from (model.init_from;
trainer/objectives/reference.py swaps its weights in for a no-grad pass). With k = 1 it is DPO's loss.

    negatives = draw_negatives(candidates, target, k, seed, step, key)   # the same on every resume
    answers = answer_rows(batch, negatives, answer_ids)                  # B x (1 + k) answers
    logps = shared_prompt_logps(model, batch, answers)                   # [B, 1 + k]: a prompt once, its answers after
    loss, stats = sdpo_loss(logps_policy, logps_reference, beta, real)
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.loader import user_states
from trainer.evaluation.scoring import answers_after_prompt, cache_of
from trainer.objectives.reference import reference

OBJECTIVES = ("sft", "sdpo")  # train.objective
# what a step logs besides the loss (means over the step's samples; "samples" is their count)
SDPO_LOGGED = ("reward_margin", "reward_accuracy", "chosen_logp", "samples")


def draw_negatives(candidates: list[int], target: int, k: int, seed: int, step: int, key: str) -> list[int]:
    """k distinct negatives from the sample's candidates (the target left out), from a generator keyed
    by (seed, optimizer step, sample key): a resumed run draws the same ones, another step others."""
    pool = [c for c in candidates if c != target]
    if k > len(pool):
        raise ValueError(f"sample {key}: {k} negatives asked for, it has {len(pool)} candidates besides the target")
    rng = np.random.default_rng([seed, 0x5D90, step, zlib.crc32(key.encode())])
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def answer_rows(batch: dict, negatives: list[list[int]], answer_ids, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B x (1 + k), L] each sample's answers, the true item's first, then each negative's, right-padded,
    and their mask. answer_ids(item) -> the answer's token ids (" <title>\\n" and eos, as the shards
    tokenize it)."""
    answers = [torch.as_tensor(answer_ids(item), dtype=torch.long)
               for b, target in enumerate(batch["targets"]) for item in [target, *negatives[b]]]
    L = max(len(a) for a in answers)
    ids = torch.full((len(answers), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(answers), L), dtype=torch.long)
    for i, a in enumerate(answers):
        ids[i, :len(a)], mask[i, :len(a)] = a, 1
    return ids, mask


def preference_rows(batch: dict, negatives: list[list[int]], answer_ids, pad_token_id: int) -> dict:
    """Each sample's prompt followed by the true item's answer, then by each negative's: [B x (1 + k), T']
    input_ids, attention_mask, labels (the answer's tokens, -100 elsewhere) and slot_map (the prompt's;
    it points into the batch's own unique_items and user rows, so the SRec runs on the batch as it is).
    The whole sequences: train.sdpo.shared_prompt=false, and under activation checkpointing (no cache)."""
    rows, slots, labels = [], [], []
    for b, n in enumerate(batch["prompt_lens"]):
        prompt, slot = batch["input_ids"][b, :n], batch["slot_map"][b, :n]
        for item in [batch["targets"][b], *negatives[b]]:
            answer = torch.as_tensor(answer_ids(item), dtype=torch.long)
            rows.append(torch.cat([prompt, answer]))
            slots.append(torch.cat([slot, torch.full_like(answer, -1)]))
            labels.append(torch.cat([torch.full((n,), -100, dtype=torch.long), answer]))
    T = max(len(r) for r in rows)
    out = {"input_ids": torch.full((len(rows), T), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), T), dtype=torch.long),
           "labels": torch.full((len(rows), T), -100, dtype=torch.long),
           "slot_map": torch.full((len(rows), T), -1, dtype=torch.long)}
    for i, (r, s, lab) in enumerate(zip(rows, slots, labels)):
        out["input_ids"][i, :len(r)], out["attention_mask"][i, :len(r)] = r, 1
        out["labels"][i, :len(r)], out["slot_map"][i, :len(r)] = lab, s
    return out


def answer_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] each row's summed log-probability of its answer tokens; logits [R, K, V] at `positions` (the
    positions that predict an answer token in some row: trainer/train_loop.py answer_positions)."""
    targets = labels[:, positions + 1]
    logp = logits.float().log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (logp * (targets != -100)).sum(1)


def sdpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, real: torch.Tensor | None = None):
    """S-DPO's loss and what is logged of it. policy, reference: [B, 1 + k] answer log-likelihoods, column 0
    the true item's. real: [B] bool, False for a filler (it adds nothing; a batch of only fillers gives 0
    with a graph). Returns (mean loss over real samples, sums over real samples: loss, reward margin
    beta * (r(p) - mean_j r(d_j)), p's reward above every negative's (0/1), p's log-likelihood, count)."""
    r = policy - reference
    margins = beta * (r[:, 1:] - r[:, :1])                      # [B, k]: beta * (r(d_j) - r(p))
    per_sample = F.softplus(torch.logsumexp(margins, 1))        # -log sigmoid(-x) = softplus(x)
    real = torch.ones(len(r), dtype=torch.bool, device=r.device) if real is None else real.to(r.device)
    weight = real.float()
    count = weight.sum()
    loss = (per_sample * weight).sum() / count.clamp(min=1)
    with torch.no_grad():
        stats = {"loss": float((per_sample * weight).sum()),
                 "reward_margin": float((-margins.mean(1) * weight).sum()),
                 "reward_accuracy": float(((margins < 0).all(1).float() * weight).sum()),
                 "chosen_logp": float((policy[:, 0] * weight).sum()),
                 "samples": float(count)}
    return loss, stats


def shared_prompt_logps(model, embed, batch: dict, vectors, users, answers: torch.Tensor, answer_mask: torch.Tensor,
                        device) -> torch.Tensor:
    """[B, 1 + k] answer log-likelihoods with each prompt run once: its keys and values are repeated for its
    1 + k answers (answer_rows), which run together in a second forward; the gradient reaches the prompt
    through them. A LastFM prompt is 97% of its row's tokens: this runs ~(1 + k)x fewer than whole rows."""
    B = len(batch["prompt_lens"])
    lens = torch.as_tensor(batch["prompt_lens"], device=device)
    P = int(lens.max())
    prompt_mask = (torch.arange(P, device=device)[None] < lens[:, None]).long()  # the SFT answer after it: masked
    last = torch.unique(lens - 1)  # the LM head runs at each prompt's last position only
    with embed.inject(batch["slot_map"][:, :P].to(device), vectors, users):
        out = model(input_ids=batch["input_ids"][:, :P].to(device), attention_mask=prompt_mask, use_cache=True,
                    logits_to_keep=last)
    first = out.logits[torch.arange(B, device=device), torch.searchsorted(last, lens - 1)].float().log_softmax(-1)
    r = len(answers) // B
    cache_name, cache = cache_of(out)
    cache.batch_repeat_interleave(r)
    return answers_after_prompt(model, cache_name, cache, prompt_mask.repeat_interleave(r, 0), lens.repeat_interleave(r),
                                first.repeat_interleave(r, 0), answers, answer_mask).view(B, r)


def whole_rows_logps(model, embed, rows: dict, vectors, users, B: int) -> torch.Tensor:
    """[B, 1 + k] answer log-likelihoods over the B x (1 + k) whole sequences of preference_rows (on the device)."""
    positions = (rows["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)  # the LM head runs only there
    with embed.inject(rows["slot_map"], vectors, users):
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                       logits_to_keep=positions, use_cache=False).logits
    return answer_logps(logits, rows["labels"], positions).view(B, -1)


def sdpo_step_loss(engine, embed, srec, batch: dict, start: dict, negatives: list[list[int]], answer_ids,
                   pad_token_id: int, beta: float, device, shared_prompt: bool = True) -> tuple[torch.Tensor, dict]:
    """One micro-batch of S-DPO on hybrid prompts: the reference pass (no grad, starting weights), then the
    policy's. shared_prompt: each prompt runs once for its 1 + k answers (shared_prompt_logps: two forwards
    of about one row's tokens); else both passes run the 1 + k whole rows (one forward each, and under ZeRO-3
    each forward gathers the base: train.sdpo.shared_prompt; also under activation checkpointing, which
    keeps no cache in training). Returns (loss, sdpo_loss's sums)."""
    with torch.no_grad():
        vectors = srec.item_vectors(batch["unique_items"].to(device))
        users = user_states(srec, batch, device) if embed.user_adapter is not None else None
    if shared_prompt:  # the passes' inputs, made once for both
        answers, answer_mask = (t.to(device) for t in answer_rows(batch, negatives, answer_ids, pad_token_id))
    else:
        rows = {k: v.to(device) for k, v in preference_rows(batch, negatives, answer_ids, pad_token_id).items()}

    def logps(model) -> torch.Tensor:
        if shared_prompt:
            return shared_prompt_logps(model, embed, batch, vectors, users, answers, answer_mask, device)
        return whole_rows_logps(model, embed, rows, vectors, users, len(negatives))

    with reference(engine, start):  # the module itself: a pass DeepSpeed's engine does not count as a step's
        ref = logps(engine.module)
    policy = logps(engine)
    real = (batch["labels"] != -100).any(1)  # False: a filler, learned nothing from
    return sdpo_loss(policy, ref, beta, real)


def check_objective(cfg) -> None:
    """train.objective's demands on the rest of the config (a ValueError, on the driver before Ray starts)."""
    if cfg.train.objective == "sft":  # with model.init_from: more SFT from a finished run
        return
    k, candidates = cfg.train.sdpo.negatives, cfg.data.num_candidates
    if not cfg.model.init_from:
        raise ValueError("train.objective=sdpo starts from a finished LLaRA run: set model.init_from=<its output_dir>")
    if cfg.data.task != "llara":
        raise ValueError(f"train.objective=sdpo ranks a recommendation's candidates: data.task={cfg.data.task} has none")
    if cfg.train.mode != "hybrid":
        raise ValueError(f"train.objective=sdpo trains on hybrid prompts only (S-DPO has no curriculum): "
                         f"train.mode={cfg.train.mode}, set train.mode=hybrid")
    if k > candidates - 1:
        raise ValueError(f"train.sdpo.negatives={k} but a sample has {candidates - 1} candidates besides the target "
                         f"(data.num_candidates={candidates})")
