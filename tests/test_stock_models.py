"""A stock Hugging Face folder (Llama-2-, Mistral- and Qwen2-shaped: no LLaRA tokens, no pad token or
pad = eos, bos or none, tied embeddings) as model.base: prepare, the model, training, eval, export."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL

STOCK_SMALL = [*SMALL, "model.unfreeze=[]", "data.max_len=512"]  # LoRA + adapter only, as LLaRA on Llama-2-7B


@pytest.fixture(scope="module")
def stock_folders(tmp_path_factory):
    """{kind: folder}: tokenizers trained on the small synthetic set's titles and LLaRA's templates,
    so that prompts are about as long in tokens as with a real vocabulary."""
    from shards.build import load_source
    from shards.prompts import templates
    from configs.schema import load_config, to_dict
    from trainer.model.stock import stock_folder

    cfg = load_config(None, SMALL)
    items, _, _ = load_source(cfg.data, cfg.seed)
    corpus = [" " + title for _, title, _ in items] * 4 + list(templates(False, "movie"))
    root = tmp_path_factory.mktemp("stock")
    return {kind: stock_folder(str(root / kind), kind, corpus, vocab_size=600) for kind in ("llama2", "mistral", "qwen2")}


@pytest.mark.parametrize("kind", ["llama2", "mistral", "qwen2"])
def test_prepare_adds_llaras_tokens_and_a_pad_and_the_model_grows_to_match(kind, stock_folders, tmp_path):
    from transformers import AutoTokenizer

    from shards.build import load_manifest
    from shards.prompts import PLACEHOLDERS
    from configs.schema import load_config
    from trainer.model.build import build_llara_model, load_tokenizer
    from trainer.data.prepare import prepare, prepared_paths

    base = stock_folders[kind]
    stock = AutoTokenizer.from_pretrained(base)
    assert not any(t in stock.get_vocab() for t in PLACEHOLDERS)
    assert (stock.pad_token is None) == (kind != "qwen2") and (stock.bos_token is None) == (kind == "qwen2")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.base={base}", *STOCK_SMALL])
    paths = prepare(cfg)
    assert paths.llm == base and paths.tokenizer == str(tmp_path / "assets" / "tokenizer")
    assert prepared_paths(str(tmp_path)) == paths  # what launch/eval.py reads back from the run folder
    tok = load_tokenizer(paths.tokenizer)
    added = len(PLACEHOLDERS) + (kind != "qwen2")  # [PAD] only where there was no pad
    assert len(tok) == len(stock) + added
    assert tok.pad_token == ("[PAD]" if kind != "qwen2" else stock.pad_token)
    assert stock.get_vocab().items() <= tok.get_vocab().items()  # every old token keeps its id
    manifest = load_manifest(paths.data)
    assert manifest["stats"]["train_samples"] > 0  # every sample found its placeholders
    model, embed = build_llara_model(base, 64, dict(cfg.model.lora), unfreeze=[], vocab_size=len(tok))
    inner = model.get_base_model()
    emb, head = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == inner.config.vocab_size
    assert (emb.data_ptr() == head.data_ptr()) == (kind == "qwen2")  # Qwen2's small sizes tie them; still tied
    old = len(stock)
    assert torch.allclose(emb[old:], emb[:old].mean(0).expand(added, -1))  # new rows: the mean of the old ones
    assert embed.weight is emb  # the hybrid embedding reads the grown table
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".adapter." in n for n in trainable)


def test_shards_built_with_the_stock_tokenizer_name_the_split_placeholder(stock_folders, tmp_path):
    from shards.build import load_source, write_shards
    from configs.schema import load_config, to_dict

    cfg = load_config(None, STOCK_SMALL)
    items, splits, _ = load_source(cfg.data, cfg.seed)
    with pytest.raises(ValueError, match=r"has no \[PH\] token \(it splits it into \[.*\]\)"):
        write_shards(items, splits, stock_folders["llama2"], str(tmp_path), num_candidates=20, max_len=512,
                     samples_per_shard=100, seed=0, workers=1)


@pytest.mark.parametrize("kind", ["llama2", "qwen2"])
def test_the_tokenizer_a_ray_task_gets_as_files_tokenizes_as_the_folder(kind, stock_folders):
    """The shard build's Ray tasks load the tokenizer from its files sent through the object store
    (shards/build.py tokenizer_files, tokenizer_folder), not from a path: a stock folder's files (its
    SentencePiece or BPE files, not its weights) give the same tokens, specials and pad as the folder."""
    from transformers import AutoTokenizer

    from shards.build import tokenizer_files, tokenizer_folder

    files = tokenizer_files(stock_folders[kind])
    assert "tokenizer_config.json" in files and not any(n.endswith(".safetensors") for n in files)
    assert any(n in files for n in ("tokenizer.model", "tokenizer.json"))
    folder = tokenizer_folder(files)
    here, there = AutoTokenizer.from_pretrained(stock_folders[kind]), AutoTokenizer.from_pretrained(folder)
    shutil.rmtree(folder)  # as the Ray task does once it has loaded the tokenizer: what follows needs no file
    text = "The user watched: Toy Story (1995), Heat (1995). Which one is next? <s></s>"
    assert there(text).input_ids == here(text).input_ids and len(there) == len(here)
    assert (there.bos_token, there.eos_token, there.pad_token, there.unk_token) == \
        (here.bos_token, here.eos_token, here.pad_token, here.unk_token)


def test_a_7b_shaped_build_trains_llaras_parameter_count(tmp_path):
    """Llama-2-7B's shape on the meta device (no weights): LoRA r=8 on the seven projections plus the
    adapter (64 -> 4096 -> 4096) is LLaRA's 37,036,032 trainable parameters, and the vocabulary grows
    by the added tokens."""
    from transformers import LlamaConfig

    from trainer.model.build import build_llara_model
    from trainer.model.stock import stock_tokenizer

    tok = stock_tokenizer("llama2", ["a b c"], vocab_size=300)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, bos_token_id=1, eos_token_id=2)
    lora = {"r": 8, "alpha": 32, "dropout": 0.1,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    with torch.device("meta"):
        model, embed = build_llara_model(config, 64, lora, unfreeze=[], vocab_size=32000 + 5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 37_036_032
    inner = model.get_base_model()
    assert inner.get_input_embeddings().weight.shape == (32005, 4096) == inner.get_output_embeddings().weight.shape
    assert inner.get_input_embeddings().weight.device.type == "meta" and len(tok) > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind, stage", [("llama2", 2), ("qwen2", 3)])
def test_train_eval_export_on_a_stock_folder(kind, stage, stock_folders, tmp_path):
    """launch/train.py with model.base = the folder, 2 Ray workers, LoRA only, in the GPU's precision (bf16 on
    DeepSpeed's CPU accelerator) at ZeRO stage 2 and 3 (with its end-of-run evaluation, the evaluation code
    launch/eval.py runs); then the export reloaded with plain transformers + peft (docs/runs.md's lines) gives the
    trained model's scores. (launch/eval.py reads a run's base and tokenizer from its stamp,
    trainer/data/prepare.py prepared_paths, checked for every family above.)"""
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"model.base={stock_folders[kind]}", *STOCK_SMALL, "train.num_workers=2",
            f"train.zero_stage={stage}", "train.precision=bf16", "train.max_steps=4", "train.checkpoint_every=2",
            "eval.max_samples=8", "eval.batch_size=4", "eval.max_new_tokens=4"]
    r = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    ds = json.loads((out / "logs" / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == stage
    metrics = json.loads((out / "eval" / "final_test" / "metrics.json").read_text())
    assert metrics["samples"] == 8 and "score_hybrid" in metrics  # the end-of-run evaluation read this folder's model
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts", "plain_peft_reload.py"), str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-4, report
