"""LLaRA's evaluation: greedy generation through the injected embeddings, first line of the output.

ValidRatio: the share of outputs that name exactly one candidate title.
HitRatio@1: as LLaRA's public code defines it, correct / valid ("hr@1_of_valid"), and also
correct / all ("hr@1_of_all"); both are reported and labelled.
"""

from __future__ import annotations

import torch

from trainer.data import collate


def first_line(text: str) -> str:
    text = text.lstrip()
    return text.split("\n", 1)[0].strip()


def judge(output: str, candidate_titles: list[str], target_title: str) -> tuple[bool, bool]:
    """(valid, correct): valid when exactly one candidate title occurs in the output's first line."""
    line = first_line(output)
    named = [t for t in candidate_titles if t in line]
    valid = len(named) == 1
    return valid, valid and named[0] == target_title


def llara_metrics(judgements: list[tuple[bool, bool]]) -> dict:
    n = len(judgements)
    valid = sum(v for v, _ in judgements)
    correct = sum(c for _, c in judgements)
    return {"samples": n, "valid_ratio": valid / n if n else 0.0,
            "hr@1_of_valid": correct / valid if valid else 0.0, "hr@1_of_all": correct / n if n else 0.0}


@torch.no_grad()
def generate(model, embed, srec, samples: list[dict], tokenizer, max_new_tokens: int, hybrid: bool,
             synced_gpus: bool, device) -> list[str]:
    """Greedy generation for a batch of samples (left-padded prompts); returns the decoded continuations."""
    from trainer.scoring import prompt_inputs

    batch = collate(samples, tokenizer.pad_token_id, left_pad=True, prompt_only=True)
    # hybrid: behaviour tokens injected; text: every placeholder, [UserEmb] included, becomes [PH]
    ids, ctx = prompt_inputs(embed, srec, batch, tokenizer.convert_tokens_to_ids("[PH]"), device, hybrid)
    with ctx:
        out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
