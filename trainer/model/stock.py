"""Stock-shaped Hugging Face model folders, made here with random weights, for tests and benchmarks.

A downloaded Llama-2-7B, Mistral-7B or Qwen2 folder differs from the project's tiny Llama in the ways
that break a trainer: its tokenizer has none of LLaRA's tokens and (Llama-2, Mistral) no pad token;
Qwen2 has no bos token, a byte-level BPE with its own pre-tokenizer, pad = eos and, in its small
sizes, tied input and output embeddings. `stock_folder` writes a folder with those conventions:

    kind      tokenizer (transformers' own class for that family)        model
    llama2    LlamaTokenizer: <unk> <s> </s> + byte fallback, bos added,  LlamaForCausalLM, untied
              no pad token, SentencePiece-style "▁" pieces
    mistral   as llama2                                                  MistralForCausalLM, untied
    qwen2     Qwen2Tokenizer: byte-level BPE, <|endoftext|> = eos = pad,  Qwen2ForCausalLM, tied embeddings
              no bos token, <|im_start|> <|im_end|>

The vocabularies are trained on a small corpus (the real ones have 32,000 / 151,936 entries); the
architectures are the real classes at any size, e.g. bench/bench_scale.py's ~0.5B Llama.
"""

from __future__ import annotations

import json
import os

import torch

KINDS = ("llama2", "mistral", "qwen2")
_CORPUS = ("This user has watched Silver Harbor, Golden River and Lost Tower. "
           "Based on the watch history, please predict the user's preference for the next movie. "
           "The user watched the following movies in order and gave these ratings: 1. Heat (4 stars). "
           "Will the user like Casino? Answer Yes or No. Answer: Yes. No. 0123456789").split(". ")


def _bpe(corpus: list[str], vocab_size: int, byte_level: bool, special: list[str]) -> tuple[dict, list]:
    """(vocab, merges) of a BPE trained on corpus: byte-level (Qwen2, GPT-2) or SentencePiece-style
    pieces with "▁" and byte fallback (Llama-2, Mistral)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        special = special + [f"<0x{b:02X}>" for b in range(256)]  # Llama-2's ids 3..258
        alphabet = []
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def stock_tokenizer(kind: str, corpus: list[str], vocab_size: int = 1000):
    """A tokenizer with the conventions of `kind`'s released one (module docstring)."""
    from transformers import LlamaTokenizer, Qwen2Tokenizer  # lazy: heavy to import

    if kind == "qwen2":
        vocab, merges = _bpe(corpus, vocab_size, True, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return Qwen2Tokenizer(vocab=vocab, merges=merges)  # bos None, eos = pad = unk = <|endoftext|>
    vocab, merges = _bpe(corpus, vocab_size, False, ["<unk>", "<s>", "</s>"])
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # no pad token


def stock_config(kind: str, tokenizer, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, max_position_embeddings: int = 2048):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config  # lazy: heavy to import

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, eos_token_id=tokenizer.eos_token_id)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, bos_token_id=None)
    cls = MistralConfig if kind == "mistral" else LlamaConfig
    return cls(**common, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)  # no pad_token_id


def stock_folder(out_dir: str, kind: str = "llama2", corpus: list[str] | None = None, vocab_size: int = 1000,
                 hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                 intermediate_size: int = 172, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """Write a `kind`-shaped folder (config.json, safetensors weights, tokenizer) with random weights."""
    from transformers import AutoModelForCausalLM  # lazy: heavy to import

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    tokenizer = stock_tokenizer(kind, list(corpus or []) + list(_CORPUS), vocab_size)
    config = stock_config(kind, tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
