"""Check a model.base folder before anything starts: it exists, it is a Hugging Face model folder, and
every weight file it holds is whole (each safetensors file's header is read and its tensors' byte
ranges must lie inside the file; a sharded checkpoint's index must name files that exist).

A cut-short file otherwise fails on every worker, after Ray started and the data were built, with
safetensors' "incomplete metadata"; a folder that does not exist is read by transformers as a Hub
repository id. Neither is worth more than one line.
"""

from __future__ import annotations

import json
import os
import struct

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_safetensors(path: str) -> None:
    """ValueError unless `path` is a whole safetensors file (header readable, every tensor's bytes present)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, not a safetensors file (cut short?)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(f"{path}: cut short ({size} bytes; its header alone says {8 + header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: its header is not JSON (not a safetensors file, or damaged)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is not a JSON object")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise ValueError(f"{path}: cut short ({size} bytes; its tensors need {needed})")


def check_base_folder(folder: str, option: str = "model.base") -> None:
    """ValueError naming `option` unless `folder` is a model folder with whole weight files."""
    if not os.path.isdir(folder):
        what = "a file" if os.path.exists(folder) else "no such folder"
        raise ValueError(f"{option}={folder}: {what}; give a Hugging Face model folder on disk (config.json and weights; "
                         "Hub ids are not downloaded)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{option}={folder}: no config.json there, not a Hugging Face model folder")
    names = sorted(os.listdir(folder))
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise ValueError(f"{option}={folder}: no weight files there (*.safetensors or *.bin)")
    for index in (n for n in names if n.endswith(".index.json")):
        with open(os.path.join(folder, index)) as f:
            try:
                shards = set(json.load(f)["weight_map"].values())
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise ValueError(f"{option}={folder}: {index} is not a weight index (no weight_map)") from None
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(folder, s)))
        if missing:
            raise ValueError(f"{option}={folder}: {index} names {len(missing)} file(s) that are not there, e.g. {missing[0]}")
    for name in weights:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            check_safetensors(path)
        elif os.path.getsize(path) == 0:
            raise ValueError(f"{path}: empty file")
