"""Import LLaRA's released SASRec checkpoints without running any code from them.

LLaRA's `rec_model/*.pt` files are whole pickled modules (`__main__.SASRec` with
`SASRecModules_ori` submodules). `torch.load(weights_only=True)` refuses them, and
`weights_only=False` would let the file run arbitrary code. Here the zip archive is opened
directly and `data.pkl` is read with a restricted unpickler:

- every module class it names (LLaRA's three classes and torch.nn's) becomes an inert record of
  its pickled state; nothing is constructed or imported from the file's names;
- tensors are rebuilt from the archive's raw storages with torch.frombuffer;
- only the other names a checkpoint needs are allowed (OrderedDict, set, torch.device, the float
  storage type, numpy scalars and dtypes, codecs.encode); any other name is refused with a clear
  message, so a file that tries to call os.system (or anything else) fails before it can.

Plain state_dict files (`*.state_dict.pt`) are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import io
import json
import zipfile

import torch

from shards.safe_unpickle import RestrictedUnpickler, UnsafePickle
from trainer.model.srec.llara_sasrec import LlaraSASRec

MODULE_CLASSES = {
    ("__main__", "SASRec"), ("SASRecModules_ori", "MultiHeadAttention"), ("SASRecModules_ori", "PositionwiseFeedForward"),
    ("torch.nn.modules.dropout", "Dropout"), ("torch.nn.modules.sparse", "Embedding"),
    ("torch.nn.modules.normalization", "LayerNorm"), ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.activation", "Softmax"), ("torch.nn.modules.conv", "Conv1d"),
}
_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
           "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "BoolStorage": torch.bool, "ByteStorage": torch.uint8}


class _Record:
    """An inert stand-in for a pickled module: it only keeps the state it is given."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_state": state}


class _StorageType:
    def __init__(self, name):
        self.dtype = _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *args):
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


def _device(*args):
    return str(args[0]) if args else "cpu"


def _remap() -> dict:
    m = {key: type(key[1], (_Record,), {}) for key in MODULE_CLASSES}
    m.update({("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
              ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
              ("torch", "device"): _device})
    m.update({("torch", name): _StorageType(name) for name in _DTYPES})
    return m


_ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


def read_llara_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state_dict, hparams) of a LLaRA `rec_model/*.pt`, without running code from it."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnsafePickle(f"{path}: not a torch zip checkpoint; legacy pickles are not imported") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise UnsafePickle(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        root = pkl[0][: -len("data.pkl")]

        def persistent_load(pid):
            kind, storage_type, key, _location, numel = pid[:5]
            if kind != "storage" or not isinstance(storage_type, _StorageType):
                raise UnsafePickle(f"{path}: unexpected persistent id {pid!r}")
            raw = bytearray(archive.read(f"{root}data/{key}"))
            return torch.frombuffer(raw, dtype=storage_type.dtype)[:numel] if raw else torch.empty(0, dtype=storage_type.dtype)

        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), _ALLOWED, path, _remap())
        unpickler.persistent_load = persistent_load
        obj = unpickler.load()
    if type(obj).__name__ != "SASRec" or not isinstance(obj, _Record):
        raise UnsafePickle(f"{path}: the checkpoint holds a {type(obj).__name__}, not LLaRA's SASRec")
    state: dict[str, torch.Tensor] = collections.OrderedDict()

    def walk(rec, prefix):
        for name, t in rec.state.get("_parameters", {}).items():
            if t is not None:
                state[prefix + name] = t
        for name, t in rec.state.get("_buffers", {}).items():
            if t is not None:
                state[prefix + name] = t
        for name, child in rec.state.get("_modules", {}).items():
            if isinstance(child, _Record):
                walk(child, prefix + name + ".")

    walk(obj, "")
    s = obj.state
    heads = s["_modules"]["mh_attn"].state.get("num_heads", 1)
    hparams = {"num_items": int(s["item_num"]), "hidden": int(s["hidden_size"]), "max_len": int(s["state_size"]),
               "heads": int(heads), "dropout": float(s["_modules"]["dropout"].state.get("p", 0.1))}
    return state, hparams


def load_llara_sasrec(path: str, hparams_path: str | None = None) -> LlaraSASRec:
    """A LlaraSASRec from LLaRA's original `.pt` (restricted import) or from a plain
    `.state_dict.pt` + its `.hparams.json` (torch.load with weights_only=True)."""
    if path.endswith(".state_dict.pt"):
        hparams_path = hparams_path or path.replace(".state_dict.pt", ".hparams.json")
        with open(hparams_path) as f:
            h = json.load(f)
        hparams = {"num_items": h["item_num"], "hidden": h["hidden_size"], "max_len": h["state_size"],
                   "heads": h["num_heads"], "dropout": h["dropout"]}
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state, hparams = read_llara_checkpoint(path)
    model = LlaraSASRec(**hparams)
    model.load_state_dict(state)
    return model.eval()
