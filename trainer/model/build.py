"""Load the LLM and its tokenizer from a Hugging Face folder, put the hybrid embedding in place,
and wrap it with peft LoRA. The adapter stays trainable next to the LoRA weights."""

from __future__ import annotations

import contextlib

import torch

from shards.prompts import PLACEHOLDERS, USER_EMB, check_placeholder_tokens
from trainer.model.hybrid_embedding import Adapter, HybridEmbedding, hybrid_embedding


ATTENTIONS = ("sdpa", "eager", "flash_attention_2")  # transformers' attention kernels, model.attn_implementation
PAD = "[PAD]"  # the pad token added to a tokenizer that has none (LLaRA's choice too; why: prepare_tokenizer)


def prepare_tokenizer(base_dir: str, out_dir: str, user_token: bool = False):
    """The run's tokenizer for a stock model folder, saved to out_dir: the base's own, plus LLaRA's
    placeholders ([PH], [HistoryEmb], [CansEmb], [ItemEmb]; [UserEmb] with data.user_token) as special
    tokens (never split, never merged with a neighbour) and, when it has none (Llama-2, Mistral), a
    pad token. The pad is a new "[PAD]", as LLaRA adds, not eos: padded positions are masked out of
    attention and loss either way, but with pad = eos a collator or a user's code that masks labels by
    id would also mask the answer's real eos. Tokens the base already has are kept as they are."""
    from transformers import AutoTokenizer  # lazy: heavy to import

    tok = AutoTokenizer.from_pretrained(base_dir)
    wanted = [*PLACEHOLDERS, USER_EMB] if user_token else list(PLACEHOLDERS)
    added = [t for t in wanted if t not in tok.get_vocab()]
    tok.add_tokens(added, special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
        added.append(PAD)
    tok.save_pretrained(out_dir)
    return tok, added


def load_tokenizer(tokenizer_dir: str, user_token: bool = False):
    """The run's tokenizer; refused (a ValueError naming the pieces) when it lacks LLaRA's tokens."""
    from transformers import AutoTokenizer  # lazy: heavy to import

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_placeholder_tokens(tok, user_token, tokenizer_dir)
    return tok


def partitioned_loading(ds_config: dict):
    """For ZeRO stage 3: an object that, while it lives, makes transformers' from_pretrained build the
    model under deepspeed.zero.Init and load it partition by partition (rank 0 reads the weight files,
    memory-mapped, one module at a time; the other ranks read only shapes), so that no worker ever
    holds the whole model in host memory. None for other stages (each rank then holds the model)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig  # lazy: heavy to import

    return HfDeepSpeedConfig(ds_config)


def _whole(params):
    """Within the block the parameters are whole, and what rank 0 writes reaches every rank's partition
    (ZeRO-3, deepspeed.zero.GatheredParameters); elsewhere nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # lazy: reads DS_ACCELERATOR on import

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
    return contextlib.nullcontext()


def grow_vocab(model, vocab_size: int) -> int:
    """Give the tokens the run's tokenizer added rows in the input and output embeddings (tied ones
    stay tied), each new row the mean of the old rows: a plain `resize_token_embeddings(n,
    mean_resizing=False)` followed by that mean reproduces it (README, "Export"). Nothing when the
    embedding already has the rows (Qwen2's is padded past its tokenizer). Returns the rows added."""
    old = model.get_input_embeddings().num_embeddings  # the weight's shape is (0,) when partitioned
    if vocab_size <= old:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)  # gathers and re-partitions under ZeRO-3
    weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    with _whole(weights.values()), torch.no_grad():
        for weight in weights.values():  # one when tied
            weight[old:] = weight[:old].mean(0)
    return vocab_size - old


def build_llara_model(model_dir, srec_dim: int, lora_cfg: dict, unfreeze=(), dtype: torch.dtype = torch.float32,
                      seed: int = 0, injection: str = "fused", user_token: bool = False, vocab_size: int | None = None,
                      attn_implementation: str = "sdpa", activation_checkpointing: bool = False):
    """Return (peft model, hybrid embedding). Build it outside deepspeed.zero.Init (see notes).

    Trainable: the LoRA weights, the adapter, and every parameter whose name contains one of the
    strings in `unfreeze` (e.g. "lm_head"; the embedded default's tiny Llama is untrained, so it
    trains its embeddings, norms and head too; for a real checkpoint leave it empty, as LLaRA does).
    With user_token, a second adapter for the SRec's user states (trainable too). vocab_size: the run
    tokenizer's length; the embeddings grow to it (grow_vocab) before anything else sees the model.
    model_dir may also be a transformers config: the model is then built from it with random weights
    (e.g. under `with torch.device("meta")`, a 7B's shape without its memory). attn_implementation:
    transformers' attention kernel (model.attn_implementation). activation_checkpointing: the decoder
    layers' activations are recomputed in backward (non-reentrant: works with frozen inputs, LoRA and
    ZeRO-3's parameter hooks; the injection runs before the first layer, outside the recomputation).
    """
    # imported here: launch/train.py's config check reads ATTENTIONS and should not pay for peft (~4 s)
    from peft import LoraConfig, get_peft_model  # lazy: heavy to import
    from transformers import AutoModelForCausalLM, PretrainedConfig  # lazy: heavy to import

    if isinstance(model_dir, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    if activation_checkpointing:
        non_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    if vocab_size is not None:
        grow_vocab(model, vocab_size)
    torch.manual_seed(seed)
    adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype)
    # made after the item adapter, only when on: the default's initial weights stay as they were
    user_adapter = Adapter(srec_dim, model.config.hidden_size).to(dtype) if user_token else None
    model.set_input_embeddings(hybrid_embedding(model.get_input_embeddings(), adapter, injection, user_adapter))
    peft_model = get_peft_model(model, LoraConfig(
        r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"], lora_dropout=lora_cfg["dropout"],
        target_modules=list(lora_cfg["target_modules"]), task_type="CAUSAL_LM",
    ), autocast_adapter_dtype=False)  # LoRA in `dtype` too: the dtype policy (module docstring)
    embed = peft_model.get_input_embeddings()
    assert isinstance(embed, HybridEmbedding)
    embed.adapter.requires_grad_(True)
    if embed.user_adapter is not None:
        embed.user_adapter.requires_grad_(True)
    for name, p in peft_model.named_parameters():
        if any(u in name for u in unfreeze):
            p.requires_grad_(True)
    return peft_model, embed
