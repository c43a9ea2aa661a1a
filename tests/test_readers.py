"""Readers on the real data sets in ../shared/data (skipped, saying which folder, when absent) and on
small malformed files made here."""

import os
import pickle

import pytest

from conftest import SHARED_DATA
from shards.readers import (MalformedRecord, read_generic, read_lastfm, read_llara_processed, read_movielens_1m,
                            read_movielens_1m_movies, read_movielens_1m_users, read_movielens_100k, read_sequences)
from shards.safe_unpickle import UnsafePickle


def _need(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (real data sets live in ../shared/data, see its INDEX.md)")
    return path


def test_movielens_100k_counts():
    raw = read_movielens_100k(_need("ml-100k"))
    assert len(raw.interactions) == 100_000
    assert len({u for u, *_ in raw.interactions}) == 943
    assert len(raw.items) == 1682 and len(raw.users) == 943
    assert raw.items[0][:2] == (1, "Toy Story (1995)") and "Comedy" in raw.items[0][2]
    assert raw.users[1] == {"age": 24, "gender": "M", "occupation": "technician"}


def test_movielens_1m_movies_users_iso_8859_1():
    folder = _need("ml-1m")
    movies = read_movielens_1m_movies(folder)
    users = read_movielens_1m_users(folder)
    assert len(movies) == 3883 and len(users) == 6040
    titles = {i: t for i, t, _ in movies}
    assert any("é" in t for t in titles.values())  # decoded as ISO-8859-1, not mangled
    assert users[1] == {"gender": "female", "age": "under 18", "occupation": "K-12 student"}
    if not os.path.exists(os.path.join(folder, "ratings.dat")):
        with pytest.raises(FileNotFoundError, match="ratings.dat not found"):
            read_movielens_1m(folder)


def test_lastfm_counts_and_order():
    raw = read_lastfm(_need("hetrec2011-lastfm-2k"))
    assert len(raw.interactions) == 92_834 and len(raw.items) == 17_632
    assert len({u for u, *_ in raw.interactions}) == 1892
    ts = [t for *_, t in raw.interactions]
    assert ts == sorted(ts)  # the file's order is the order


@pytest.mark.parametrize("folder,file,users,items,n", [("sasrec-amazon-video", "Video.txt", 31_013, 23_715, 287_107),
                                                       ("iclrec-beauty", "Beauty.txt", 22_363, 12_101, 198_502)])
def test_sequence_files(folder, file, users, items, n):
    raw = read_sequences(_need(folder, file))
    assert len(raw.interactions) == n and len(raw.items) == items
    assert len({u for u, *_ in raw.interactions}) == users


def test_llara_processed_with_restricted_unpickler():
    items, splits = read_llara_processed(_need("llara-data", "lastfm"))
    assert len(items) == 4606
    assert {k: len(v) for k, v in splits.items()} == {"train": 50_800, "val": 122, "test": 122}
    assert splits["test"][0]["history"] == [392, 225, 234, 576, 577, 272] and splits["test"][0]["target"] == 578
    items, splits = read_llara_processed(_need("llara-data", "movielens"))  # (item, rating) tuples, u.item titles
    assert len(items) == 1682 and items[0] == (0, "Toy Story (1995)", "")
    assert len(splits["test"]) == 95 and all(len(s["history"]) <= 10 for s in splits["test"])


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "id2name.txt").write_text("0::a\n1::b\n")
    with open(tmp_path / "Test_data.df", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(UnsafePickle, match=r"Test_data.df: the pickle names .*system, which is not on the allow-list"):
        read_llara_processed(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_malformed_records_name_file_and_line(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("1\t2\t3\t100\n1\t3\tfive\t200\n")
    (d / "u.item").write_text("2|A (1990)|x||u|0\n3|B (1991)|x||u|0\n")
    with pytest.raises(MalformedRecord, match=r"u.data:2: rating must be a number, got 'five'"):
        read_movielens_100k(str(d))
    (d / "u.data").write_text("1\t2\t3\t100\n1 3 4 200\n")
    with pytest.raises(MalformedRecord, match=r"u.data:2: expected user, item, rating, timestamp"):
        read_movielens_100k(str(d))
    seq = tmp_path / "seq.txt"
    seq.write_text("1 2\n1 3\n7\n")
    with pytest.raises(MalformedRecord, match=r"seq.txt:3: expected `user item"):
        read_sequences(str(seq))


def test_generic_csv_and_parquet(tmp_path):
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp,rating\n1,10,5,4\n1,11,6,\n2,10,1,3\n")
    items = tmp_path / "items.csv"
    items.write_text("item,title,genre\n10,Ten,Drama\n11,Eleven,\n")
    raw = read_generic(str(inter), str(items))
    assert list(raw.interactions) == [(1, 10, 4.0, 5), (1, 11, 1.0, 6), (2, 10, 3.0, 1)]
    assert raw.interactions[1] == (1, 11, 1.0, 6) and type(raw.interactions[1][0]) is int
    assert raw.items == [(10, "Ten", "Drama"), (11, "Eleven", "")]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user": [1], "item": [10], "timestamp": [3]}), tmp_path / "i.parquet")
    assert list(read_generic(str(tmp_path / "i.parquet"), str(items)).interactions) == [(1, 10, 1.0, 3)]
    inter.write_text("user,item,timestamp\n1,,5\n")
    with pytest.raises(MalformedRecord, match=r"inter.csv:2: missing item"):
        read_generic(str(inter), str(items))
    inter.write_text("user,item,timestamp\n1,10,5\n1,99999999999999999999,6\n")  # held in 64-bit columns
    with pytest.raises(MalformedRecord, match=r"inter.csv:3: item '99999999999999999999' does not fit in 64 bits"):
        read_generic(str(inter), str(items))
