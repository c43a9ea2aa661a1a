"""A restricted unpickler: only an allow-list of classes and functions may be named by the pickle.

A pickle runs code by naming a callable (GLOBAL / STACK_GLOBAL) and calling it (REDUCE). Refusing
every name outside the allow-list means the only callables a file can reach are the data
constructors listed here; anything else (os.system, eval, a user's class) is refused with a clear
message before it is imported.
"""

from __future__ import annotations

import importlib
import io
import pickle
import warnings


class UnsafePickle(pickle.UnpicklingError):
    pass


# The names a pandas DataFrame pickle (LLaRA's *.df files) uses, with numpy's old and new module names.
PANDAS_DATAFRAME = {
    ("builtins", "slice"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: set[tuple[str, str]], source: str, remap: dict | None = None):
        super().__init__(file)
        self.allowed, self.source, self.remap = allowed, source, remap or {}

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # Python 2 name, used by protocol-2 pickles such as torch's
            module = "builtins"
        if (module, name) in self.remap:
            return self.remap[(module, name)]
        if (module, name) not in self.allowed:
            raise UnsafePickle(f"{self.source}: the pickle names {module}.{name}, which is not on the allow-list; "
                               "refusing to load it (a pickle can run code through such names)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(importlib.import_module(module), name)


def restricted_load(path: str, allowed: set[tuple[str, str]], remap: dict | None = None):
    with open(path, "rb") as f:
        data = f.read()
    return RestrictedUnpickler(io.BytesIO(data), allowed, path, remap).load()
