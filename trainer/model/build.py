"""Load the LLM and its tokenizer from a Hugging Face folder, put the hybrid embedding in place,
and wrap it with peft LoRA. The adapter stays trainable next to the LoRA weights."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shards.prompts import PLACEHOLDERS, USER_EMB
from trainer.model.hybrid_embedding import Adapter, HybridEmbedding


def load_tokenizer(model_dir: str, user_token: bool = False):
    tok = AutoTokenizer.from_pretrained(model_dir)
    needed = [*PLACEHOLDERS, USER_EMB] if user_token else list(PLACEHOLDERS)
    missing = [t for t in needed if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"tokenizer in {model_dir} lacks the special tokens {missing}")
    return tok


def build_llara_model(model_dir: str, srec_dim: int, lora_cfg: dict, unfreeze=(), dtype: torch.dtype = torch.float32,
                      seed: int = 0, injection: str = "fused", user_token: bool = False):
    """Return (peft model, hybrid embedding). Build it outside deepspeed.zero.Init (see notes).

    Trainable: the LoRA weights, the adapter, and every parameter whose name contains one of the
    strings in `unfreeze` (e.g. "lm_head"; the embedded default's tiny Llama is untrained, so it
    trains its embeddings, norms and head too; for a real checkpoint leave it empty, as LLaRA does).
    With user_token, a second adapter for the SRec's user states (trainable too).
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(seed)
    adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype)
    # made after the item adapter, only when on: the default's initial weights stay as they were
    user_adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype) if user_token else None
    model.set_input_embeddings(HybridEmbedding(model.get_input_embeddings(), adapter, injection, user_adapter))
    peft_model = get_peft_model(model, LoraConfig(
        r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"], lora_dropout=lora_cfg["dropout"],
        target_modules=list(lora_cfg["target_modules"]), task_type="CAUSAL_LM",
    ))
    embed = peft_model.get_input_embeddings()
    assert isinstance(embed, HybridEmbedding)
    embed.adapter.requires_grad_(True)
    if embed.user_adapter is not None:
        embed.user_adapter.requires_grad_(True)
    for name, p in peft_model.named_parameters():
        if any(u in name for u in unfreeze):
            p.requires_grad_(True)
    return peft_model, embed
