"""Columnar reader: values, sharding, shuffle, resume, and bad input."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from recis_jax.io.columns import FixedLenFeature, VarLenFeature
from recis_jax.io.files import DataError, file_info
from recis_jax.io.reader import Reader, ReaderState

FEATURES = [FixedLenFeature("x"), FixedLenFeature("v", dim=2), VarLenFeature("ids"), VarLenFeature("seq")]


def make_table(n, start=0, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.arange(start, start + n)
    ids = [list(rng.integers(-(2**62), 2**62, int(k))) + [int(r)] for k, r in zip(rng.integers(0, 3, n), rows)]
    seq = [[list(range(int(j))) for j in rng.integers(0, 3, int(k))] for k in rng.integers(0, 4, n)]
    return pa.table({
        "x": pa.array(rows.astype(np.float64)),
        "v": pa.array([[float(r), -float(r)] for r in rows], pa.list_(pa.float64())),
        "ids": pa.array(ids, pa.list_(pa.int64())),
        "seq": pa.array(seq, pa.list_(pa.list_(pa.int64()))),
    })


def write(path, table, fmt, rows_per_unit):
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=rows_per_unit)
    else:
        # ORC stripes are sized in bytes: write one stripe per batch of rows.
        with orc.ORCWriter(path, stripe_size=1) as w:
            for b in table.to_batches(max_chunksize=rows_per_unit):
                w.write(pa.Table.from_batches([b]))


@pytest.fixture(params=["parquet", "orc"])
def dataset(tmp_path, request):
    """3 files x (row counts 250, 130, 97), units of 64 rows; column x = global row id."""
    fmt = request.param
    start = 0
    for i, n in enumerate([250, 130, 97]):
        write(str(tmp_path / f"part-{i}.{fmt}"), make_table(n, start, seed=i), fmt, 64)
        start += n
    return tmp_path, fmt, start


def rows_of(batches):
    out = []
    for b in batches:
        out.extend(b.features["x"][b.mask, 0].astype(int).tolist())
    return out


def test_reads_all_rows_in_order_with_fixed_shapes(dataset):
    path, fmt, total = dataset
    r = Reader(path, FEATURES, batch_size=32, shard_index=0, shard_count=1)
    assert [len(f.unit_rows) for f in r.files] == [4, 3, 2]
    batches = list(r)
    assert rows_of(batches) == list(range(total))
    assert len(batches) == r.steps_per_epoch() == -(-total // 32)
    for b in batches:
        assert b.features["x"].shape == (32, 1) and b.features["x"].dtype == np.float32
        assert b.features["v"].shape == (32, 2)
        assert b.features["ids"].nrows == 32 and b.features["seq"].ragged_rank == 2
    assert {b.features["ids"].capacity for b in batches} <= {32, 64, 128}
    # Value spot check against the source table: ids' last entry is the row id.
    t = make_table(250, 0, seed=0)
    b0 = batches[0]
    assert b0.features["ids"].to_lists() == t.column("ids").to_pylist()[:32]
    assert b0.features["seq"].to_lists() == t.column("seq").to_pylist()[:32]
    assert b0.features["v"][5].tolist() == [5.0, -5.0]
    last = batches[-1]
    assert last.num_rows == total % 32 and not last.mask[-1]
    assert last.features["ids"].row_lengths()[last.num_rows:].sum() == 0


def test_sharding_by_file_and_by_unit(dataset):
    path, fmt, total = dataset
    for count in (2, 3, 5, 12):  # 5 and 12 > 3 files: shard by unit (9 units)
        readers = [Reader(path, FEATURES, 16, shard_index=i, shard_count=count) for i in range(count)]
        steps = {r.steps_per_epoch() for r in readers}
        assert len(steps) == 1  # all workers agree without talking
        seen = []
        for r in readers:
            batches = list(r)
            assert len(batches) == r.steps_per_epoch()
            seen.extend(rows_of(batches))
        assert sorted(seen) == list(range(total)), count  # every row exactly once


def test_filler_batches_are_fully_masked(dataset):
    path, _, _ = dataset
    readers = [Reader(path, FEATURES, 50, shard_index=i, shard_count=3) for i in range(3)]
    counts = [len(list(r)) for r in readers]
    assert len(set(counts)) == 1
    last = list(readers[2])[-1]  # 97 rows -> 2 batches of 50 needed, 250 -> 5
    assert last.num_rows == 0 and last.features["ids"].nrows == 50


def test_drop_remainder_uses_min_full_batches(dataset):
    path, _, _ = dataset
    readers = [Reader(path, FEATURES, 50, shard_index=i, shard_count=3, drop_remainder=True) for i in range(3)]
    for r in readers:
        batches = list(r)
        assert len(batches) == 1 and all(b.num_rows == 50 for b in batches)


def test_shuffle_is_seeded_per_epoch_and_complete(dataset):
    path, _, total = dataset
    a = rows_of(Reader(path, FEATURES, 40, shard_index=0, shard_count=1, shuffle=True, seed=3, num_epochs=2))
    b = rows_of(Reader(path, FEATURES, 40, shard_index=0, shard_count=1, shuffle=True, seed=3, num_epochs=2))
    c = rows_of(Reader(path, FEATURES, 40, shard_index=0, shard_count=1, shuffle=True, seed=4, num_epochs=1))
    assert a == b and a[:total] != c
    assert sorted(a[:total]) == sorted(a[total:]) == list(range(total))
    assert a[:total] != a[total:]  # epochs differ
    assert a[:total] != list(range(total))


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_unit_matches_uninterrupted_run(dataset, shuffle):
    path, _, total = dataset
    kw = dict(shard_index=0, shard_count=1, shuffle=shuffle, seed=7, num_epochs=3, num_threads=3, prefetch=2)
    full = list(Reader(path, FEATURES, 24, **kw))
    for stop_after in (1, 5, 19, 22, 41):
        r = Reader(path, FEATURES, 24, **kw)
        it = r.batches()
        head = [next(it) for _ in range(stop_after)]
        it.close()  # stop with prefetched batches in flight
        state = ReaderState.from_dict(head[-1].state.to_dict())
        rest = list(Reader(path, FEATURES, 24, **kw).batches(state))
        got = head + rest
        assert len(got) == len(full)
        for g, f in zip(got, full):
            assert np.array_equal(g.mask, f.mask)
            assert np.array_equal(g.features["x"], f.features["x"])
            assert g.features["ids"].to_lists() == f.features["ids"].to_lists()


def test_parquet_and_orc_give_identical_batches(tmp_path):
    t = make_table(300)
    write(str(tmp_path / "a.parquet"), t, "parquet", 100)
    write(str(tmp_path / "a.orc"), t, "orc", 100)
    pb = list(Reader(tmp_path / "a.parquet", FEATURES, 64, shard_index=0, shard_count=1))
    ob = list(Reader(tmp_path / "a.orc", FEATURES, 64, shard_index=0, shard_count=1))
    for p, o in zip(pb, ob):
        assert np.array_equal(p.features["v"], o.features["v"])
        assert p.features["seq"].to_lists() == o.features["seq"].to_lists()


def test_stats_report_throughput(dataset):
    path, _, total = dataset
    r = Reader(path, FEATURES, 64, shard_index=0, shard_count=1)
    list(r)
    s = r.stats()
    assert s["rows"] == total and s["rows_per_sec_per_thread"] > 0 and s["file_mb_per_sec_per_thread"] > 0


# -- column semantics ---------------------------------------------------------------


def read_one(tmp_path, table, features, **kw):
    p = str(tmp_path / "t.parquet")
    pq.write_table(table, p)
    return list(Reader(p, features, len(table), shard_index=0, shard_count=1, **kw))[0]


def test_missing_values_get_defaults_and_empty_rows(tmp_path):
    t = pa.table({
        "d": pa.array([1.0, None, 3.0]),
        "l": pa.array([[2.0], [], None], pa.list_(pa.float64())),
        "i": pa.array([7, None, -1], pa.int64()),
        "ids": pa.array([[1, 2], [], None], pa.list_(pa.int64())),
    })
    b = read_one(tmp_path, t, [FixedLenFeature("d", default=-1.0), FixedLenFeature("l", default=9.0),
                               VarLenFeature("i"), VarLenFeature("ids")])
    assert b.features["d"].ravel().tolist() == [1.0, -1.0, 3.0]
    assert b.features["l"].ravel().tolist() == [2.0, 9.0, 9.0]
    assert b.features["i"].to_lists() == [[7], [], [-1]]
    assert b.features["ids"].to_lists() == [[1, 2], [], []]


def test_uint64_ids_keep_exact_bits(tmp_path):
    big = [10000169349117863715, 2**64 - 1, 5]
    t = pa.table({"id": pa.array(big, pa.uint64())})
    b = read_one(tmp_path, t, [VarLenFeature("id")])
    got = np.asarray([v[0] for v in b.features["id"].to_lists()], np.int64).view(np.uint64)
    assert got.tolist() == big


def test_weights_column(tmp_path):
    t = pa.table({"ids": pa.array([[1, 2], [3]]), "w": pa.array([[0.5, 2.0], [1.5]])})
    b = read_one(tmp_path, t, [VarLenFeature("ids", weight_column="w")])
    r = b.features["ids"]
    assert r.weights.dtype == np.float32 and r.weights[:3].tolist() == [0.5, 2.0, 1.5]
    t2 = pa.table({"ids": pa.array([[1, 2], [3]]), "w": pa.array([[0.5], [1.5]])})
    with pytest.raises(DataError, match=r"'ids' and 'w' differ in length at row 0"):
        read_one(tmp_path, t2, [VarLenFeature("ids", weight_column="w")])


def test_nonfinite_policy(tmp_path):
    t = pa.table({"d": pa.array([1.0, float("nan"), float("inf")])})
    with pytest.raises(DataError, match=r"t.parquet: column 'd'.*non-finite value nan at row 1"):
        read_one(tmp_path, t, [FixedLenFeature("d")])
    b = read_one(tmp_path, t, [FixedLenFeature("d", default=0.5, nonfinite="default")])
    assert b.features["d"].ravel().tolist() == [1.0, 0.5, 0.5]
    b = read_one(tmp_path, t, [FixedLenFeature("d", nonfinite="keep")])
    assert np.isnan(b.features["d"][1, 0]) and np.isinf(b.features["d"][2, 0])


# -- bad input: each names the file and column ---------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.orc: no such file"):
        Reader(tmp_path / "nope.orc", FEATURES, 8, shard_index=0, shard_count=1)
    os.mkdir(tmp_path / "empty")
    with pytest.raises(DataError, match="holds no .orc/.parquet"):
        Reader(tmp_path / "empty", FEATURES, 8, shard_index=0, shard_count=1)


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_empty_truncated_and_garbage_files(tmp_path, fmt):
    p = tmp_path / f"x.{fmt}"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=rf"x.{fmt}: empty file"):
        file_info(str(p))
    write(str(p), make_table(100), fmt, 50)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"x.{fmt}: not a readable {fmt} file"):
        Reader(p, FEATURES, 8, shard_index=0, shard_count=1)
    g = tmp_path / "garbage.bin"
    g.write_bytes(os.urandom(1000))
    with pytest.raises(DataError, match="garbage.bin: unknown format"):
        file_info(str(g))


def test_file_with_zero_rows_is_skipped(tmp_path):
    write(str(tmp_path / "a.parquet"), make_table(10), "parquet", 64)
    pq.write_table(make_table(10).slice(0, 0), tmp_path / "b.parquet")
    r = Reader(tmp_path, FEATURES, 4, shard_index=0, shard_count=1)
    assert rows_of(r) == list(range(10))


@pytest.mark.parametrize("table,feature,msg", [
    (pa.table({"a": [1.0]}), FixedLenFeature("b"), r"column 'b' \(feature 'b'\) not in file"),
    (pa.table({"s": ["x"]}), FixedLenFeature("s"), "a string column where numbers are expected"),
    (pa.table({"s": ["12"]}), VarLenFeature("s"), "a string column; set hash_type"),
    (pa.table({"f": [[1.5]]}), VarLenFeature("f"), "float values cannot be IDs"),
    (pa.table({"l": [[1.0, 2.0], [3.0]]}), FixedLenFeature("l", dim=2), "row 1 has 1 values, expected 2"),
    (pa.table({"l": pa.array([[1, None]])}), VarLenFeature("l"), "1 null values inside lists"),
    (pa.table({"n": pa.array([[[[1]]]])}), VarLenFeature("n"), "at most lists of lists"),
    (pa.table({"i": [1]}), VarLenFeature("i", dtype="bytes"), "dtype='bytes' needs a string column"),
])
def test_bad_columns_name_file_and_column(tmp_path, table, feature, msg):
    with pytest.raises(DataError, match=msg) as e:
        read_one(tmp_path, table, [feature])
    assert "t.parquet" in str(e.value)


def test_schema_mismatch_in_second_file(tmp_path):
    pq.write_table(pa.table({"a": [1.0]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "2.parquet")
    with pytest.raises(DataError, match="2.parquet: column 'a'"):
        Reader(tmp_path, [FixedLenFeature("a")], 1, shard_index=0, shard_count=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be"):
        FixedLenFeature("a", dim=0)
    with pytest.raises(ValueError, match="hash_type"):
        VarLenFeature("a", hash_type="md5")
    with pytest.raises(ValueError, match="unique"):
        Reader([], [FixedLenFeature("a"), FixedLenFeature("a")], 1, shard_index=0, shard_count=1)


# -- real data ----------------------------------------------------------------------

RECIS_FEATURES = ([FixedLenFeature("label")] + [FixedLenFeature(f"i{i}") for i in range(1, 14)]
                  + [VarLenFeature(f"c{i}") for i in range(1, 27)])


def test_recis_deepfm_orc_files(real_data):
    files = sorted((real_data / "recis_deepfm").glob("part-*.orc"))
    assert len(files) == 8
    r = Reader(real_data / "recis_deepfm", RECIS_FEATURES, 4096, shard_index=0, shard_count=1)
    assert r.num_rows == 80_000 and r.steps_per_epoch() == 20
    batches = list(r)
    assert sum(b.num_rows for b in batches) == 80_000
    # Spot-check the first rows of part-0 against a direct pyarrow read.
    t = orc.ORCFile(str(files[0])).read(columns=["label", "i1", "c1", "c26"])
    b0 = batches[0]
    for k in range(50):
        i1 = t.column("i1")[k].as_py()
        assert b0.features["i1"][k, 0] == (i1[0] if i1 else 0.0)
        assert b0.features["label"][k, 0] == t.column("label")[k].as_py()[0]
    assert b0.features["c1"].to_lists()[:50] == t.column("c1").to_pylist()[:50]
    assert b0.features["c26"].to_lists()[:50] == t.column("c26").to_pylist()[:50]
    labels = np.concatenate([b.features["label"][b.mask, 0] for b in batches])
    assert set(np.unique(labels)) <= {0.0, 1.0}


def test_string_columns_hash_to_recis_values(tmp_path):
    t = pa.table({"s": pa.array(["hello", None, ""]), "l": pa.array([["hello", ""], [], None])})
    h = read_one(tmp_path, t, [VarLenFeature("s", hash_type="farm", hash_bucket=None),
                               VarLenFeature("l", hash_type="murmur", hash_bucket=None),
                               VarLenFeature("sb", column="s", hash_type="farm", hash_bucket=1000),
                               VarLenFeature("sm", column="s", hash_type="farm"),
                               VarLenFeature("raw", column="s", dtype="bytes")])
    farm_hello, farm_empty = -5436999610281751320, -7286425919675154353
    assert h.features["s"].to_lists() == [[farm_hello], [], [farm_empty]]
    assert h.features["l"].to_lists() == [[2191231550387646743, 0], [], []]
    assert h.features["sb"].to_lists() == [[farm_hello % 2**64 % 1000], [], [farm_empty % 2**64 % 1000]]
    assert h.features["sm"].to_lists() == [[farm_hello & (2**63 - 1)], [], [farm_empty & (2**63 - 1)]]
    assert h.features["raw"].to_lists() == [[b"hello"], [], [b""]]


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_converted_deepctr_samples_read_back(real_data, tmp_path, fmt):
    """Raw Criteo / Avazu / MovieLens text -> convert -> Reader: counts and values."""
    import csv

    from recis_jax.features.string_hash import hash_strings
    from recis_jax.io.convert import convert

    samples = real_data / "deepctr_samples"

    def text(name):
        with open(samples / name, newline="") as f:
            rows = list(csv.reader(f))
        return rows[0], rows[1:]

    # Criteo: label + 13 numeric (empty = missing) + 26 hex strings hashed on the host.
    header, rows = text("criteo_sample.txt")
    dst = tmp_path / f"criteo.{fmt}"
    convert(str(samples / "criteo_sample.txt"), str(dst), format=fmt, schema="criteo")
    feats = ([FixedLenFeature("label"), FixedLenFeature("I2", default=-99.0)]
             + [VarLenFeature(c, hash_type="farm", hash_bucket=None) for c in ("C1", "C26")])
    batches = list(Reader(dst, feats, 64, shard_index=0, shard_count=1))
    assert sum(b.num_rows for b in batches) == len(rows)
    got_i2 = np.concatenate([b.features["I2"][b.mask, 0] for b in batches])
    col = header.index("I2")
    assert got_i2.tolist() == [float(r[col]) if r[col] else -99.0 for r in rows]
    c1 = sum((b.features["C1"].to_lists()[: b.num_rows] for b in batches), [])
    assert c1 == [[int(h)] if r[header.index("C1")] else [] for r, h in
                  zip(rows, hash_strings([r[header.index("C1")] for r in rows], "farm"))]
    c26 = sum((b.features["C26"].to_lists()[: b.num_rows] for b in batches), [])
    assert sum(len(x) == 0 for x in c26) == sum(1 for r in rows if not r[-1])

    # Avazu: the 20-digit id stays exact (uint64 bits in an int64), hex columns hash.
    header, rows = text("avazu_sample.txt")
    dst = tmp_path / f"avazu.{fmt}"
    convert(str(samples / "avazu_sample.txt"), str(dst), format=fmt)
    feats = [VarLenFeature("id"), VarLenFeature("site_id", hash_type="murmur"), FixedLenFeature("click")]
    batches = list(Reader(dst, feats, 32, shard_index=0, shard_count=1))
    assert sum(b.num_rows for b in batches) == len(rows)
    ids = [v[0] for b in batches for v in b.features["id"].to_lists()[: b.num_rows]]
    assert np.asarray(ids, np.int64).view(np.uint64).tolist() == [int(r[0]) for r in rows]
    assert max(int(r[0]) for r in rows) > 2**63  # the sample does hold IDs beyond int64

    # MovieLens: genres is a '|'-separated string list -> hashed list feature.
    header, rows = text("movielens_sample.txt")
    dst = tmp_path / f"ml.{fmt}"
    convert(str(samples / "movielens_sample.txt"), str(dst), format=fmt, list_columns=["genres"])
    feats = [VarLenFeature("genres", hash_type="farm", hash_bucket=1000), VarLenFeature("movie_id")]
    batches = list(Reader(dst, feats, 50, shard_index=0, shard_count=1))
    assert sum(b.num_rows for b in batches) == len(rows)
    genres = [g for b in batches for g in b.features["genres"].to_lists()[: b.num_rows]]
    gcol = header.index("genres")
    expect = [[int(h) % 1000 if h >= 0 else (int(h) + 2**64) % 1000 for h in hash_strings(r[gcol].split("|"), "farm")]
              for r in rows]
    assert genres == expect
