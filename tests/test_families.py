"""The hybrid embedding keeps every base's own embedding (trainer/model/hybrid_embedding.py), over the
causal-LM families transformers ships that users fine-tune, each a tiny random config made here:

- with no behaviour tokens in a batch the model's logits equal the unmodified base's, bit for bit;
- with behaviour tokens, every position without a slot holds the base's own embedding output, bit
  for bit, and every slot the adapter's row (Gemma 3 scales its looked-up rows: the hybrid keeps that);
- a family whose input embedding is not an nn.Embedding is refused, naming its class.
"""

import pytest
import torch
import torch.nn as nn

from trainer.model.hybrid_embedding import Adapter, HybridEmbedding, hybrid_embedding

# families users fine-tune as recommenders' LLMs (LLaRA: Llama-2; its successors: Llama-3, Mistral, Qwen,
# Gemma, Phi; older bases: GPT-2, OPT, BLOOM, Falcon, GPT-NeoX/Pythia, GPT-J), by transformers' model_type
FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "falcon", "gpt_neox", "gpt2", "gptj", "opt", "bloom", "starcoder2",
            "olmo", "olmo2", "cohere", "stablelm", "granite", "glm", "smollm3", "gpt_bigcode", "codegen", "nemotron"]

TINY = {"hidden_size": 32, "n_embd": 32, "d_model": 32, "word_embed_proj_dim": 32, "intermediate_size": 64,
        "n_inner": 64, "ffn_dim": 64, "ffn_hidden_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "num_attention_heads": 4, "n_head": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64,
        "n_ctx": 64, "rotary_dim": 4, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
        "partial_rotary_factor": 0.5}
VOCAB, SREC_DIM = 128, 16


def tiny(model_type: str):
    """A random model of the family, small enough that building it costs nothing (checked on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    for key, value in TINY.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except AttributeError:  # a value the config derives (Falcon's head_dim)
                pass
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # inside the tiny vocabulary
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= VOCAB:
            setattr(config, key, 0)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert size < 2_000_000, f"{model_type}: {size} parameters: a size key of its config is not set small"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_hybrid_embedding_keeps_the_bases_own_embedding(model_type):
    model = tiny(model_type)
    own = model.get_input_embeddings()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        base_rows = own(ids)
    torch.manual_seed(2)
    hybrid = hybrid_embedding(own, Adapter(SREC_DIM, own.embedding_dim))
    model.set_input_embeddings(hybrid)
    assert isinstance(model.get_input_embeddings(), HybridEmbedding) and hybrid.weight is own.weight
    slots = torch.full((2, 12), -1)
    slots[0, 3], slots[1, 0], slots[1, 7] = 0, 1, 0
    vectors = torch.randn(2, SREC_DIM, generator=g)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)  # nothing armed: the base, bit for bit
        with hybrid.inject(slots, vectors):
            rows = hybrid(ids)
            hybrid_logits = model(input_ids=ids).logits
        behaviour = hybrid.adapter(vectors)
    keep = slots < 0
    assert torch.equal(rows[keep], base_rows[keep])  # every other position: the base's own embedding output
    assert torch.equal(rows[~keep], behaviour[slots[~keep]].to(rows.dtype))
    assert not torch.equal(hybrid_logits, base_logits)  # and the behaviour tokens reach the logits


def test_the_scaled_embedding_of_gemma3_is_kept_where_a_plain_lookup_would_lose_it():
    """Gemma 3's embedding multiplies the looked-up rows by sqrt(hidden): a plain lookup of the same weight
    (what the hybrid embedding did before) gives other inputs than the base was trained on."""
    model = tiny("gemma3_text")
    own = model.get_input_embeddings()
    ids = torch.randint(3, VOCAB, (1, 6))
    hybrid = hybrid_embedding(own, Adapter(SREC_DIM, own.embedding_dim))
    with torch.no_grad():
        assert torch.equal(hybrid(ids), own(ids)) and not hybrid.plain
        assert not torch.allclose(nn.functional.embedding(ids, own.weight), own(ids))  # the scale


def test_an_embedding_that_is_not_an_nn_embedding_is_refused_naming_its_class():
    class Factorised(nn.Module):  # e.g. ALBERT-like factorised embeddings: a lookup then a projection
        def __init__(self):
            super().__init__()
            self.lookup, self.project = nn.Embedding(10, 4), nn.Linear(4, 8)

    with pytest.raises(ValueError, match=r"is a .*Factorised, not a torch.nn.Embedding: .* not supported"):
        hybrid_embedding(Factorised(), Adapter(SREC_DIM, 8))
