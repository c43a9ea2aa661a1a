"""The interaction table: user, item, rating, timestamp as four numpy columns.

16 bytes an interaction as the readers build it (ids and timestamps under 2^31, ratings a float32 holds
exactly, e.g. 4 or 3.5; a column widens to 8 bytes a value when one does not fit), where a list of (user,
item, rating, timestamp) tuples takes ~150-200 (a tuple and its int and float objects): at MovieLens-25M
or Amazon scale the table is what the shard build holds besides one shard per worker (README, "Data").
Readers fill a `TableBuilder` row by row (stdlib arrays: no Python object per value); `as_table` turns a
plain list of rows into a table.
Rows read back as tuples of Python numbers, so code that loops over rows keeps working.
"""

from __future__ import annotations

from array import array

import numpy as np

INT64 = (-(2**63), 2**63)  # the range a user, item or timestamp must lie in


class Interactions:
    """Columns `user`, `item`, `timestamp` (int64, or int32 as given) and `rating` (float64 or float32 as
    given, or int64 when every rating given was an integer: a rating reads back as the kind of number it
    was given as)."""

    def __init__(self, user, item, rating, timestamp):
        self.user, self.item, self.timestamp = _ints(user), _ints(item), _ints(timestamp)
        rating = np.asarray(rating)
        self.rating = rating.astype(np.int64 if rating.dtype.kind in "iub" else
                                    rating.dtype if rating.dtype == np.float32 else np.float64, copy=False)
        if not len(self.user) == len(self.item) == len(self.rating) == len(self.timestamp):
            raise ValueError("the interaction table's columns differ in length")

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, i: int) -> tuple:
        return self.user[i].item(), self.item[i].item(), self.rating[i].item(), self.timestamp[i].item()

    def __iter__(self):
        """(user, item, rating, timestamp) tuples of Python numbers, converted 64k rows at a time."""
        for start in range(0, len(self), 65536):
            end = start + 65536
            yield from zip(self.user[start:end].tolist(), self.item[start:end].tolist(),
                           self.rating[start:end].tolist(), self.timestamp[start:end].tolist())

    def take(self, rows) -> "Interactions":
        """The rows a boolean mask or an index array selects, in that order."""
        return Interactions(self.user[rows], self.item[rows], self.rating[rows], self.timestamp[rows])


def _ints(values) -> np.ndarray:
    values = np.asarray(values)
    return values if values.dtype == np.int32 else values.astype(np.int64, copy=False)


_WIDE = {"i": "q", "f": "d"}  # int32 -> int64, float32 -> float64
_DTYPE = {"i": np.int32, "q": np.int64, "f": np.float32, "d": np.float64}


class TableBuilder:
    """Rows appended one at a time into compact arrays; table() gives the Interactions. Each column starts
    at 4 bytes a value (user, item, timestamp int32; rating float32) and is copied once into 8 (int64,
    float64) the first time a value does not fit: an id or timestamp of 2^31 or more, a rating float32
    does not hold exactly (e.g. 0.1). Typical data (MovieLens, Amazon: second timestamps, ratings 1-5)
    stays at 16 bytes an interaction, half of what 8-byte columns take (BENCHMARKS.md, "Shard build")."""

    def __init__(self):
        self.columns = [array("i"), array("i"), array("f"), array("i")]  # user, item, rating, timestamp

    def append(self, row: tuple) -> None:
        columns = self.columns
        for k, value in enumerate(row):
            try:
                columns[k].append(value)
            except OverflowError:  # an int of 2^31 or more: this column is int64 from now on
                self._widen(k).append(value)
        rating = row[2]
        if columns[2].typecode == "f" and columns[2][-1] != rating and rating == rating:  # (NaN fits)
            self._widen(2)[-1] = rating

    def _widen(self, k: int) -> array:
        self.columns[k] = array(_WIDE[self.columns[k].typecode], self.columns[k])
        return self.columns[k]

    def table(self) -> Interactions:
        user, item, rating, timestamp = (np.frombuffer(c, _DTYPE[c.typecode]) for c in self.columns)
        return Interactions(user, item, rating, timestamp)


def as_table(interactions) -> Interactions:
    """An Interactions as it is; rows of (user, item, rating, timestamp) made into one."""
    if isinstance(interactions, Interactions):
        return interactions
    rows = list(interactions)
    if not rows:
        return Interactions([], [], np.zeros(0, np.float64), [])
    user, item, rating, timestamp = zip(*rows)
    return Interactions(user, item, rating, timestamp)
