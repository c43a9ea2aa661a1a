"""Readers for raw interaction logs. Each returns a `RawData`:

    interactions  Interactions (shards/interactions.py): columns user, item, rating, timestamp, raw ids as in
                  the files; its rows read back as (user, item, rating, timestamp) tuples
    items         list of (item, title, genre)              genre may be ""
    users         {user: {"gender": .., "age": .., "occupation": ..}} where the data has profiles

A malformed record raises `MalformedRecord` naming the file and the line.

Where the data has no timestamps the order used is stated by the reader:
- Last.fm hetrec2011-2k `user_artists.dat` has (user, artist, listening count) and no time. We keep
  the file's order within each user (it lists a user's artists by artist id) and use the line
  number as the timestamp, so "the last item" is the user's last-listed artist. The listening count
  is kept as the rating. There is no real temporal order: treat next-item results on it as
  set completion, as LLaRA's processed LastFM does.
- SASRec-style sequence files are in time order by construction; the line order is the time.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np

from shards.interactions import INT64, Interactions, TableBuilder
from shards.safe_unpickle import PANDAS_DATAFRAME, restricted_load


# data.source's values (shards/build.py load_source reads each): synthetic is generated (shards/synthetic.py),
# the others are read here
SOURCES = ("synthetic", "ml-100k", "ml-1m", "lastfm", "sequences", "llara", "generic")


class MalformedRecord(ValueError):
    pass


# what each source reads from data.path (a folder, or a file where the value is None): checked before anything
# starts (check_source), so that a run missing its data fails in one line, not in the data build or on a worker
SOURCE_FILES = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat"),
                "lastfm": ("user_artists.dat", "artists.dat"), "llara": (),
                "sequences": None, "generic": None}


def check_source(source: str, path: str | None, items_path: str | None = None) -> None:
    """ValueError (one line) when data.path / data.items_path lack what `source` reads."""
    if source == "synthetic":
        return
    if source not in SOURCE_FILES:
        raise ValueError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")
    wanted = SOURCE_FILES[source]
    if not path:
        what = "a file" if wanted is None else "a folder with " + (", ".join(wanted) or "LLaRA's .df files and id2name.txt")
        raise ValueError(f"data.source={source} needs data.path ({what})")
    if wanted is None:
        if not os.path.isfile(path):
            raise ValueError(f"data.path={path}: no such file (data.source={source} reads a file)")
    else:
        if not os.path.isdir(path):
            raise ValueError(f"data.path={path}: no such folder (data.source={source} reads its files there)")
        missing = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
        if source == "llara":  # titles, and at least one split
            for either in (("id2name.txt", "u.item"), ("train_data.df", "Val_data.df", "Test_data.df")):
                if not any(os.path.isfile(os.path.join(path, f)) for f in either):
                    missing.append(" or ".join(either))
        if missing:
            raise ValueError(f"data.path={path}: data.source={source} needs {', '.join(missing)} there")
    if source == "generic":
        if not items_path:
            raise ValueError("data.source=generic needs data.items_path (the items table: item, title[, genre])")
        if not os.path.isfile(items_path):
            raise ValueError(f"data.items_path={items_path}: no such file")


@dataclass
class RawData:
    interactions: Interactions
    items: list[tuple[int, str, str]]
    users: dict[int, dict] = field(default_factory=dict)
    name: str = ""


def _lines(path: str, encoding: str = "utf-8"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding=encoding, newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _fields(path, n, line, sep, count, what):
    parts = line.split(sep)
    if len(parts) < count:
        raise MalformedRecord(f"{path}:{n}: expected {what} ({count} fields separated by {sep!r}), got {line[:120]!r}")
    return parts


def _int(path, n, value, what):
    try:
        v = int(value)
    except ValueError:
        raise MalformedRecord(f"{path}:{n}: {what} must be an integer, got {value!r}") from None
    if not INT64[0] <= v < INT64[1]:
        raise MalformedRecord(f"{path}:{n}: {what} {value!r} does not fit in 64 bits")
    return v


def _float(path, n, value, what):
    try:
        return float(value)
    except ValueError:
        raise MalformedRecord(f"{path}:{n}: {what} must be a number, got {value!r}") from None


def read_movielens_100k(folder: str) -> RawData:
    """u.data (user \\t item \\t rating \\t timestamp), u.item (id|title|...|19 genre flags), u.user."""
    genres_path = os.path.join(folder, "u.genre")
    genre_names = [line.split("|")[0] for _, line in _lines(genres_path, "iso-8859-1")] if os.path.exists(genres_path) else []
    path = os.path.join(folder, "u.data")
    inter = TableBuilder()
    for n, line in _lines(path):
        u, i, r, t = _fields(path, n, line, "\t", 4, "user, item, rating, timestamp")[:4]
        inter.append((_int(path, n, u, "user"), _int(path, n, i, "item"), _float(path, n, r, "rating"), _int(path, n, t, "timestamp")))
    path = os.path.join(folder, "u.item")
    items = []
    for n, line in _lines(path, "iso-8859-1"):
        parts = _fields(path, n, line, "|", 5, "id|title|release|video release|url|genres")
        flags = parts[5:]
        genre = ", ".join(g for g, f in zip(genre_names, flags) if f == "1")
        items.append((_int(path, n, parts[0], "item id"), parts[1], genre))
    path = os.path.join(folder, "u.user")
    users = {}
    if os.path.exists(path):
        for n, line in _lines(path, "iso-8859-1"):
            uid, age, gender, occ, _zip = _fields(path, n, line, "|", 5, "id|age|gender|occupation|zip")[:5]
            users[_int(path, n, uid, "user id")] = {"age": _int(path, n, age, "age"), "gender": gender, "occupation": occ}
    return RawData(inter.table(), items, users, "ml-100k")


ML1M_AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_JOBS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
             "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
             "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
             "tradesman/craftsman", "unemployed", "writer"]


def read_movielens_1m(folder: str) -> RawData:
    """ratings.dat (user::item::rating::ts), movies.dat (id::title::genres), users.dat; ISO-8859-1."""
    path = os.path.join(folder, "ratings.dat")
    if not os.path.exists(path):
        have = ", ".join(sorted(f for f in ("movies.dat", "users.dat") if os.path.exists(os.path.join(folder, f))))
        raise FileNotFoundError(f"{path} not found: MovieLens-1M needs ratings.dat (user::item::rating::timestamp)"
                                f"{f'; the folder has only {have}' if have else ''}")
    inter = TableBuilder()
    for n, line in _lines(path, "iso-8859-1"):
        u, i, r, t = _fields(path, n, line, "::", 4, "user::item::rating::timestamp")[:4]
        inter.append((_int(path, n, u, "user"), _int(path, n, i, "item"), _float(path, n, r, "rating"), _int(path, n, t, "timestamp")))
    return RawData(inter.table(), read_movielens_1m_movies(folder), read_movielens_1m_users(folder), "ml-1m")


def read_movielens_1m_movies(folder: str) -> list[tuple[int, str, str]]:
    path = os.path.join(folder, "movies.dat")
    items = []
    for n, line in _lines(path, "iso-8859-1"):
        i, title, genres = _fields(path, n, line, "::", 3, "id::title::genres")[:3]
        items.append((_int(path, n, i, "movie id"), title, genres.replace("|", ", ")))
    return items


def read_movielens_1m_users(folder: str) -> dict[int, dict]:
    path = os.path.join(folder, "users.dat")
    users = {}
    for n, line in _lines(path, "iso-8859-1"):
        uid, gender, age, job, _zip = _fields(path, n, line, "::", 5, "user::gender::age::occupation::zip")[:5]
        age_i, job_i = _int(path, n, age, "age"), _int(path, n, job, "occupation")
        if age_i not in ML1M_AGES or not 0 <= job_i < len(ML1M_JOBS):
            raise MalformedRecord(f"{path}:{n}: age {age_i} or occupation {job_i} is not a MovieLens-1M code")
        users[_int(path, n, uid, "user id")] = {"gender": "female" if gender == "F" else "male",
                                                 "age": ML1M_AGES[age_i], "occupation": ML1M_JOBS[job_i]}
    return users


def read_lastfm(folder: str) -> RawData:
    """hetrec2011-lastfm-2k: user_artists.dat (userID \\t artistID \\t weight, with a header), artists.dat."""
    path = os.path.join(folder, "user_artists.dat")
    inter = TableBuilder()
    for n, line in _lines(path):
        if n == 1 and line.startswith("userID"):
            continue
        u, a, w = _fields(path, n, line, "\t", 3, "userID, artistID, weight")[:3]
        inter.append((_int(path, n, u, "userID"), _int(path, n, a, "artistID"), _float(path, n, w, "weight"), n))
    path = os.path.join(folder, "artists.dat")
    items = []
    for n, line in _lines(path):
        if n == 1 and line.startswith("id"):
            continue
        parts = _fields(path, n, line, "\t", 2, "id, name, url, pictureURL")
        items.append((_int(path, n, parts[0], "artist id"), parts[1], ""))
    return RawData(inter.table(), items, {}, "lastfm")


def read_sequences(path: str, titles: dict[int, str] | None = None) -> RawData:
    """SASRec-style `user item` lines in time order, or one `user item item ...` line per user (ICLRec).

    The files carry no titles: an item is titled "Item <id>" unless `titles` names it.
    """
    inter = TableBuilder()
    t = 0
    for n, line in _lines(path):
        parts = line.split()
        if len(parts) < 2:
            raise MalformedRecord(f"{path}:{n}: expected `user item [item ...]`, got {line[:120]!r}")
        user = _int(path, n, parts[0], "user")
        for v in parts[1:]:
            inter.append((user, _int(path, n, v, "item"), 1.0, t))
            t += 1
    table = inter.table()
    ids = np.unique(table.item).tolist()
    titles = titles or {}
    items = [(i, titles.get(i, f"Item {i}"), "") for i in ids]
    return RawData(table, items, {}, os.path.basename(path))


def _table(path: str):
    """Rows of a CSV (header required) or Parquet file as dicts, one at a time: (line or row number, row)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # lazy: optional, Parquet only

        n = 2
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            for row in batch.to_pylist():
                yield n, row
                n += 1
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        yield from enumerate(csv.DictReader(f), 2)


def read_generic(interactions_path: str, items_path: str) -> RawData:
    """Interactions as CSV/Parquet with columns user, item, timestamp[, rating]; items with item, title[, genre].
    Read row by row into the compact table (shards/interactions.py)."""
    inter = TableBuilder()
    for n, row in _table(interactions_path):
        missing = [c for c in ("user", "item", "timestamp") if row.get(c) in (None, "")]
        if missing:
            raise MalformedRecord(f"{interactions_path}:{n}: missing {', '.join(missing)}")
        rating = row.get("rating")
        inter.append((_int(interactions_path, n, row["user"], "user"), _int(interactions_path, n, row["item"], "item"),
                      _float(interactions_path, n, rating, "rating") if rating not in (None, "") else 1.0,
                      _int(interactions_path, n, row["timestamp"], "timestamp")))
    items = []
    for n, row in _table(items_path):
        if row.get("item") in (None, "") or row.get("title") in (None, ""):
            raise MalformedRecord(f"{items_path}:{n}: an item row needs `item` and `title`")
        items.append((_int(items_path, n, row["item"], "item"), str(row["title"]), str(row.get("genre") or "")))
    return RawData(inter.table(), items, {}, os.path.basename(interactions_path))


def _llara_id(x):
    """LLaRA's MovieLens rows hold (item, rating) tuples, LastFM and Steam rows plain ids."""
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def read_llara_processed(folder: str) -> tuple[list[tuple[int, str, str]], dict[str, list[dict]]]:
    """LLaRA's released sets: {train_data,Val_data,Test_data}.df with id2name.txt (id::name) or u.item.

    The .df files are pandas pickles. They are read with a restricted unpickler that allows only the
    numpy/pandas data constructors a DataFrame needs and refuses anything else, so no code in the
    file can run. Returns (items, splits); ids are LLaRA's (0-based, padding = item count); a row
    with an empty history (LLaRA's first row of each user) is kept out and counted by the caller.
    """
    names = os.path.join(folder, "id2name.txt")
    items = []
    if os.path.exists(names):
        for n, line in _lines(names):
            i, name = _fields(names, n, line, "::", 2, "id::name")[:2]
            items.append((_int(names, n, i, "id"), name, ""))
    elif os.path.exists(os.path.join(folder, "u.item")):
        items = [(i - 1, t, g) for i, t, g in read_movielens_100k_items(os.path.join(folder, "u.item"))]
    else:
        raise FileNotFoundError(f"{folder}: neither id2name.txt nor u.item is there")
    pad = len(items)
    splits: dict[str, list[dict]] = {}
    for split, fname in (("train", "train_data.df"), ("val", "Val_data.df"), ("test", "Test_data.df")):
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            continue
        df = restricted_load(path, PANDAS_DATAFRAME)
        for col in ("seq", "len_seq", "next"):
            if col not in df.columns:
                raise MalformedRecord(f"{path}: column {col!r} is missing (columns: {list(df.columns)})")
        rows = []
        for n, (seq, length, nxt) in enumerate(zip(df["seq"], df["len_seq"], df["next"])):
            history = [h for h in (_llara_id(x) for x in list(seq)[: int(length)]) if h != pad]
            rows.append({"user": n, "history": history, "target": _llara_id(nxt), "position": n})
        splits[split] = rows
    return items, splits


def read_movielens_100k_items(path: str) -> list[tuple[int, str, str]]:
    items = []
    for n, line in _lines(path, "iso-8859-1"):
        parts = _fields(path, n, line, "|", 5, "id|title|release|video release|url|genres")
        items.append((_int(path, n, parts[0], "item id"), parts[1], ""))
    return items


def read_profiles(source: str, folder: str | None) -> dict[int, dict]:
    """User profiles by raw user id where the data has them (ml-100k u.user, ml-1m users.dat), else {}.
    Used for ReLLa's CTR prompts (shards/ctr.py)."""
    if source == "ml-1m":
        return read_movielens_1m_users(folder)
    if source == "ml-100k" and os.path.exists(os.path.join(folder, "u.user")):
        path, users = os.path.join(folder, "u.user"), {}
        for n, line in _lines(path, "iso-8859-1"):
            uid, age, gender, occ, _zip = _fields(path, n, line, "|", 5, "id|age|gender|occupation|zip")[:5]
            users[_int(path, n, uid, "user id")] = {"age": _int(path, n, age, "age"), "gender": gender, "occupation": occ}
        return users
    return {}
