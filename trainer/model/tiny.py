"""The embedded default's language model: a byte-level BPE tokenizer trained locally and a tiny Llama
built from a `LlamaConfig`, both saved as an ordinary Hugging Face model folder.

Nothing is downloaded. The folder is then loaded back with `from_pretrained`, exactly as a real
checkpoint (e.g. Llama-2-7B) would be, so the rest of the trainer cannot tell the difference.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shards.prompts import PLACEHOLDERS, USER_EMB

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def build_tokenizer(corpus: list[str], vocab_size: int, out_dir: str, user_token: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and save it with LLaRA's special tokens to `out_dir`.

    With user_token, [UserEmb] is one more special token (after LLaRA's). Without it the tokenizer is
    exactly LLaRA-only: adding the token always would shift the BPE vocabulary of the default run."""
    placeholders = [*PLACEHOLDERS, USER_EMB] if user_token else list(PLACEHOLDERS)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [PAD, BOS, EOS, *placeholders]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=placeholders,
    )
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_llama(tokenizer, out_dir: str, hidden_size: int, num_layers: int, num_heads: int,
                     intermediate_size: int, max_position_embeddings: int, seed: int) -> None:
    """Initialise a small Llama with Hugging Face's own init and save it (safetensors) to `out_dir`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
