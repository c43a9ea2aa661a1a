"""Sequential recommenders behind the behaviour tokens: build, save, load (safetensors + JSON)."""

from __future__ import annotations

import hashlib
import json
import os

from safetensors.torch import load_file, save_file
import inspect

from trainer.model.srec.caser import Caser
from trainer.model.srec.common import SRec, left_pad
from trainer.model.srec.gru4rec import GRU4Rec
from trainer.model.srec.llara_sasrec import LlaraSASRec
from trainer.model.srec.sasrec import SASRec

ARCHS = {"sasrec": SASRec, "gru4rec": GRU4Rec, "caser": Caser, "llara_sasrec": LlaraSASRec}


def build_srec(arch: str, num_items: int, **kwargs) -> SRec:
    if arch not in ARCHS:
        raise ValueError(f"srec.arch={arch!r}: expected one of {', '.join(ARCHS)}")

    accepted = inspect.signature(ARCHS[arch].__init__).parameters
    return ARCHS[arch](num_items, **{k: v for k, v in kwargs.items() if k in accepted})


def save_srec(model: SRec, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=1)


def load_srec(path: str) -> SRec:
    """A saved SRec folder (config.json + model.safetensors), in eval mode."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} is not an SRec folder (no config.json); import LLaRA's .pt files with "
                                "launch/pretrain_srec.py --import-llara")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model = build_srec(cfg.pop("arch"), **cfg)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval()


def srec_hash(path: str) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


__all__ = ["SRec", "SASRec", "GRU4Rec", "Caser", "LlaraSASRec", "ARCHS", "build_srec", "save_srec", "load_srec",
           "srec_hash", "left_pad"]
