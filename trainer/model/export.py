"""Export the trained parts, gathered from the ZeRO-3 partitions, in formats that load without DeepSpeed:

    <output_dir>/export/lora/                  peft save_pretrained (adapter_config.json + adapter_model.safetensors)
    <output_dir>/export/projector.safetensors  the adapter (LLaRA's projector) mapping SRec vectors into the LLM
    <output_dir>/export/user_projector.safetensors  the user-state adapter, only with data.user_token
    <output_dir>/export/trained_base.safetensors  base weights trained in full (model.unfreeze), if any
    <output_dir>/export/tokenizer/             the tokenizer with its special tokens
    <output_dir>/export/export.json            what the export was made from

`load_export` rebuilds the model in a plain process: the base LLM folder, the trained base weights,
the hybrid embedding with the projector, and the LoRA weights.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from trainer.model.build import grow_vocab
from trainer.model.hybrid_embedding import Adapter, hybrid_embedding

EXPORT_META = "export.json"


def read_export_meta(export_dir: str) -> dict:
    """What the export was made from (step, base, srec, injection, the saved names)."""
    with open(os.path.join(export_dir, EXPORT_META)) as f:
        return json.load(f)


def _gathered(model, names_params):
    """Full copies of the given parameters (ZeRO-3 gathers them; elsewhere they are whole already)."""
    params = [p for _, p in names_params]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # lazy: reads DS_ACCELERATOR on import

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in names_params}
    return {n: p.detach().clone().cpu() for n, p in names_params}


def export_model(peft_model, tokenizer, out_dir: str, rank: int, meta: dict) -> None:
    """Collective under ZeRO-3 (every rank calls it); rank 0 writes."""
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    state = _gathered(peft_model, trainable)
    if rank != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    lora = {n: t for n, t in state.items() if "lora_" in n}
    projector = {n.split("embed_tokens.adapter.", 1)[1]: t for n, t in state.items() if "embed_tokens.adapter." in n}
    user = {n.split("embed_tokens.user_adapter.", 1)[1]: t for n, t in state.items() if "embed_tokens.user_adapter." in n}
    base = {n: t for n, t in state.items()
            if n not in lora and "embed_tokens.adapter." not in n and "embed_tokens.user_adapter." not in n}
    peft_model.save_pretrained(os.path.join(out_dir, "lora"), state_dict=lora, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in projector.items()}, os.path.join(out_dir, "projector.safetensors"))
    user_file = os.path.join(out_dir, "user_projector.safetensors")
    if user:
        save_file({k: v.contiguous() for k, v in user.items()}, user_file)
    elif os.path.exists(user_file):  # a stale one from an earlier export into this folder
        os.remove(user_file)
    save_file({k: v.contiguous() for k, v in base.items()}, os.path.join(out_dir, "trained_base.safetensors"))
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    with open(os.path.join(out_dir, EXPORT_META), "w") as f:
        json.dump({**meta, "lora": sorted(lora), "projector": sorted(projector), "trained_base": sorted(base),
                   **({"user_projector": sorted(user)} if user else {})}, f, indent=1)


def load_export(export_dir: str, base_dir: str, srec_dim: int, injection: str = "fused",
                dtype: torch.dtype = torch.float32):
    """(peft model, hybrid embedding, tokenizer) from an export, in a process with no DeepSpeed, in
    `dtype` (bf16 for GPU evaluation: a 7B base is then read as 14 GB, not 28).
    The user-state adapter is rebuilt when the export has one (user_projector.safetensors)."""
    from peft import PeftModel  # lazy: heavy to import
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy to import

    tok = AutoTokenizer.from_pretrained(os.path.join(export_dir, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    grow_vocab(model, len(tok))  # LLaRA's tokens, as training added them to a stock folder
    adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype)
    adapter.load_state_dict(load_file(os.path.join(export_dir, "projector.safetensors")))
    user_adapter = None
    if os.path.exists(os.path.join(export_dir, "user_projector.safetensors")):
        user_adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype)
        user_adapter.load_state_dict(load_file(os.path.join(export_dir, "user_projector.safetensors")))
    model.set_input_embeddings(hybrid_embedding(model.get_input_embeddings(), adapter, injection, user_adapter))
    # LoRA in `dtype`, as training held it (trainer/job/precision.py), not upcast to fp32 as peft would
    peft_model = PeftModel.from_pretrained(model, os.path.join(export_dir, "lora"), autocast_adapter_dtype=False)
    base = load_file(os.path.join(export_dir, "trained_base.safetensors"))
    params = dict(peft_model.named_parameters())
    missing = [n for n in base if n not in params]
    if missing:
        raise ValueError(f"{export_dir}: trained base weights {missing[:3]} do not exist in {base_dir}")
    with torch.no_grad():
        for n, t in base.items():
            params[n].copy_(t)
    return peft_model.eval(), peft_model.get_input_embeddings(), tok
