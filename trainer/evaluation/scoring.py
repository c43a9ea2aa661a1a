"""Scoring instead of generating: two evaluation modes that read the model's probabilities.

- Candidate scoring (LLaRA's task): rank a sample's candidates by the log-likelihood of
  " <title>\\n" after the prompt. The prompt runs once; its KV cache is repeated for a few candidates
  at a time (eval.candidates_per_pass), which run together in one more forward. Every answer is
  valid; HR@1, HR@5 and NDCG@5 follow.
- CTR (ReLLa): P(yes) = softmax over the "Yes" and "No" logits at the answer position.

Both see the prompt as training does: behaviour tokens injected (hybrid) or placeholders as [PH].
The candidates' ranks and HR/NDCG: trainer/evaluation/ranking.py, as for the baselines.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch

from shards.prompts import CTR_ANSWERS, llara_answer
from trainer.data.loader import collate, meta, user_states


def prompt_inputs(embed, srec, batch: dict, ph_id: int, device, hybrid: bool):
    """(input ids, context manager) for a collated batch: inside the context the model's forward over
    those ids gets the behaviour tokens (hybrid), or the ids have every placeholder as [PH] (text)."""
    ids = batch["input_ids"].to(device)
    slot_map = batch["slot_map"].to(device)
    if not hybrid:
        return torch.where(slot_map >= 0, torch.full_like(ids, ph_id), ids), contextlib.nullcontext()
    vectors = srec.item_vectors(batch["unique_items"].to(device))
    users = user_states(srec, batch, device) if getattr(embed, "user_adapter", None) is not None else None
    return ids, embed.inject(slot_map, vectors, users)


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def candidate_logliks(model, embed, srec, samples: list[dict], tokenizer, titles: list[str], hybrid: bool,
                      device, candidates_per_pass: int = 5) -> torch.Tensor:
    """[B, C] summed log-probabilities of each candidate's " <title>\\n" after the sample's prompt.

    The prompt runs once; its KV cache is then copied for candidates_per_pass candidates at a time,
    so at most that many copies of a long prompt's cache exist at once (all C at once held tens of
    GB at 7B: 16 prompts x 20 candidates x 400 tokens)."""
    batch = collate(samples, tokenizer.pad_token_id, left_pad=True, prompt_only=True)
    ids, ctx = prompt_inputs(embed, srec, batch, tokenizer.convert_tokens_to_ids("[PH]"), device, hybrid)
    attn = batch["attention_mask"].to(device)
    with ctx:
        out = model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), use_cache=True,
                    logits_to_keep=1)  # the LM head at the last prompt position only
    first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]: the first answer token
    cand_ids, cand_mask = _candidate_tokens(samples, tokenizer, titles)  # [B, C, L]
    B, C, L = cand_ids.shape
    cache_name, prompt_cache = cache_of(out)
    scores = torch.empty(B, C)
    for lo in range(0, C, candidates_per_pass):
        k = min(candidates_per_pass, C - lo)
        ids_k = cand_ids[:, lo:lo + k].reshape(B * k, L).to(device)
        mask_k = cand_mask[:, lo:lo + k].reshape(B * k, L).to(device)
        cache = copy.deepcopy(prompt_cache) if lo + k < C else prompt_cache  # the last pass takes the original
        cache.batch_repeat_interleave(k)  # the prompt's keys and values, once per candidate of this pass
        logps = answers_after_prompt(model, cache_name, cache, attn.repeat_interleave(k, 0),
                                     attn.sum(1).repeat_interleave(k, 0), first.repeat_interleave(k, 0), ids_k, mask_k)
        scores[:, lo:lo + k] = logps.view(B, k).cpu()
    return scores


def cache_of(out) -> tuple[str, object]:
    """(the keyword, the cache) of a forward's output with use_cache: transformers 5.24 renamed
    past_key_values to cache (the old name warns, and goes in 5.40)."""
    name = "cache" if "cache" in out else "past_key_values"
    return name, out[name]


def answers_after_prompt(model, cache_name: str, cache, prompt_mask: torch.Tensor, next_pos: torch.Tensor,
                         first: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R] each row's summed log-probability of its answer ids [R, L] (mask: its real tokens), run in one
    forward after the prompts whose keys and values `cache` holds (one copy per row). prompt_mask [R, P]:
    the prompts' real positions (padding on either side); next_pos [R]: each row's first answer position;
    first [R, V]: the log-probabilities of the first answer token (the prompt's last logits). Gradients,
    where enabled, reach the prompt through the cache (S-DPO's shared-prompt pass)."""
    positions = next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], 1), position_ids=positions,
                   **{cache_name: cache}).logits
    logp = logits.float().log_softmax(-1)  # [R, L, V]: token j+1 given the prompt and tokens <= j
    lp = torch.cat([first.gather(1, ids[:, :1]), logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)], 1)
    return (lp * mask).sum(1)


def _candidate_tokens(samples: list[dict], tokenizer, titles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, C, L] ids of each candidate's " <title>\\n", right-padded; the same shape's mask)."""
    cands = [meta(s)["candidates"] for s in samples]
    C = len(cands[0])
    if any(len(c) != C for c in cands):
        raise ValueError("candidate scoring needs the same number of candidates in every sample of a batch")
    toks = [tokenizer(llara_answer(titles[c]), add_special_tokens=False)["input_ids"] for cs in cands for c in cs]
    L = max(map(len, toks))
    cand_ids = torch.full((len(toks), L), tokenizer.pad_token_id, dtype=torch.long)
    cand_mask = torch.zeros((len(toks), L), dtype=torch.long)
    for i, t in enumerate(toks):
        cand_ids[i, :len(t)] = torch.as_tensor(t)
        cand_mask[i, :len(t)] = 1
    return cand_ids.view(len(samples), C, L), cand_mask.view(len(samples), C, L)


@torch.no_grad()
def yes_probability(model, embed, srec, samples: list[dict], tokenizer, hybrid: bool, device) -> torch.Tensor:
    """[B] P(yes): softmax over the "Yes" and "No" logits at the answer position (ReLLa's CTR score).

    With a tokenizer that splits " Yes." and " No." after a common first piece (e.g. a lone space in
    a small BPE), that piece is appended to the prompt and the first differing tokens are compared."""
    batch = collate(samples, tokenizer.pad_token_id, left_pad=True, prompt_only=True)
    prefix, yes, no = answer_token_ids(tokenizer)
    if prefix:
        extra = torch.as_tensor(prefix)[None].expand(len(samples), -1)
        batch["input_ids"] = torch.cat([batch["input_ids"], extra], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1)
        batch["slot_map"] = torch.cat([batch["slot_map"], torch.full_like(extra, -1)], 1)
    ids, ctx = prompt_inputs(embed, srec, batch, tokenizer.convert_tokens_to_ids("[PH]"), device, hybrid)
    attn = batch["attention_mask"].to(device)
    with ctx:
        out = model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), logits_to_keep=1)
    logits = out.logits[:, -1].float()
    return logits[:, [yes, no]].softmax(-1)[:, 0].cpu()


def answer_token_ids(tokenizer) -> tuple[list[int], int, int]:
    """(common prefix, yes token, no token): where the token sequences of the answers " Yes." and
    " No." (shards.prompts.CTR_ANSWERS) first differ, and the tokens before that point."""
    a, b = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in CTR_ANSWERS)
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k == min(len(a), len(b)):
        raise ValueError(f"the tokenizer cannot tell {CTR_ANSWERS[0]!r} from {CTR_ANSWERS[1]!r} by one token")
    for ids, answer in ((a, CTR_ANSWERS[0]), (b, CTR_ANSWERS[1])):
        if not tokenizer.decode(ids[:k + 1]).strip():  # e.g. " Yes" split as " " + "Yes": the logit of " " means nothing
            raise ValueError(f"the tokenizer splits {answer!r} as {tokenizer.convert_ids_to_tokens(ids)}: the first token "
                             "that tells the answers apart does not start the answer word, so its logit is no Yes/No score")
    return a[:k], a[k], b[k]


# ---- metrics


def target_positions(metas: list[dict]) -> torch.Tensor:
    """Each sample's target's index among its candidates (sample metas: trainer.data.meta)."""
    out = []
    for m in metas:
        if m["target"] not in m["candidates"]:
            raise ValueError(f"user {m.get('user')}: target {m['target']} is not among the sample's candidates")
        out.append(m["candidates"].index(m["target"]))
    return torch.as_tensor(out, dtype=torch.long)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each group of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def ctr_metrics(labels, p_yes) -> dict:
    labels, p = np.asarray(labels, dtype=np.float64), np.clip(np.asarray(p_yes, dtype=np.float64), 1e-7, 1 - 1e-7)
    n = len(labels)
    return {"samples": n, "auc": auc(labels, p),
            "log_loss": float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()) if n else math.nan,
            "accuracy": float(((p > 0.5) == (labels > 0.5)).mean()) if n else math.nan}
