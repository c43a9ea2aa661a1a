"""The interaction table: user, item, rating, timestamp as four numpy columns.

About 32 bytes an interaction, where a list of (user, item, rating, timestamp) tuples takes ~150-200
(a tuple and its int and float objects): at MovieLens-25M or Amazon scale the table is what the shard
build holds besides one shard per worker (README, "Data"). Readers fill a `TableBuilder` row by row
(stdlib arrays: no Python object per value); `as_table` turns a plain list of rows into a table.
Rows read back as tuples of Python numbers, so code that loops over rows keeps working.
"""

from __future__ import annotations

from array import array

import numpy as np

INT64 = (-(2**63), 2**63)  # the range a user, item or timestamp must lie in


class Interactions:
    """Columns `user`, `item`, `timestamp` (int64) and `rating` (float64, or int64 when every rating
    given was an integer: a rating reads back as the kind of number it was given as)."""

    def __init__(self, user, item, rating, timestamp):
        self.user = np.asarray(user, dtype=np.int64)
        self.item = np.asarray(item, dtype=np.int64)
        rating = np.asarray(rating)
        self.rating = rating.astype(np.int64 if rating.dtype.kind in "iub" else np.float64, copy=False)
        self.timestamp = np.asarray(timestamp, dtype=np.int64)
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


class TableBuilder:
    """Rows appended one at a time into compact arrays; table() gives the Interactions."""

    def __init__(self):
        self.user, self.item, self.timestamp = array("q"), array("q"), array("q")
        self.rating = array("d")

    def append(self, row: tuple) -> None:
        user, item, rating, timestamp = row
        self.user.append(user)
        self.item.append(item)
        self.rating.append(rating)
        self.timestamp.append(timestamp)

    def table(self) -> Interactions:
        return Interactions(np.frombuffer(self.user, np.int64), np.frombuffer(self.item, np.int64),
                            np.frombuffer(self.rating, np.float64), np.frombuffer(self.timestamp, np.int64))


def as_table(interactions) -> Interactions:
    """An Interactions as it is; rows of (user, item, rating, timestamp) made into one."""
    if isinstance(interactions, Interactions):
        return interactions
    rows = list(interactions)
    if not rows:
        return Interactions([], [], np.zeros(0, np.float64), [])
    user, item, rating, timestamp = zip(*rows)
    return Interactions(user, item, rating, timestamp)
