"""recis_jax.io.synthetic: schema, determinism, Zipf skew, planted signal, AUC, CLI."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.orc as porc
import pyarrow.parquet as pq
import pytest

from recis_jax import cli
from recis_jax.io import synthetic as S

SMALL = dict(num_files=2, rows_per_file=3000, num_dense=4, num_sparse=5, vocab_size=1000)


def read_all(d, meta):
    reader = porc.read_table if meta["args"]["format"] == "orc" else pq.read_table
    return [reader(str(d / f["path"])) for f in meta["files"]]


# --------------------------------------------------------------------------- AUC helpers


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def brute_expected_auc(p, s):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(p)), 2):
        w = p[i] * (1 - p[j])
        den += w
        num += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 300)
        s = rng.integers(0, 20, 300).astype(float)  # many ties
        assert S.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert S.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert S.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert S.auc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(S.auc([1, 1], [0.1, 0.2]))


def test_expected_auc_matches_brute_force():
    rng = np.random.default_rng(1)
    p = rng.random(40)
    s = np.round(p, 1)  # ties
    assert S.expected_auc(p, s) == pytest.approx(brute_expected_auc(p, s), abs=1e-12)
    assert S.expected_auc(p) == pytest.approx(brute_expected_auc(p, p), abs=1e-12)
    assert S.expected_auc(np.full(10, 0.3)) == pytest.approx(0.5)


# --------------------------------------------------------------------------- dataset


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_schema_and_row_counts(tmp_path, fmt):
    d = tmp_path / "data"
    meta = S.generate(d, format=fmt, multi_hot=(1, 3), **SMALL)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", f"part-00000.{fmt}", f"part-00001.{fmt}"]
    assert json.loads((d / "meta.json").read_text()) == meta == S.load_meta(d)
    assert meta["num_rows"] == 6000 and [f["rows"] for f in meta["files"]] == [3000, 3000]
    expected = pa.schema([("label", pa.float64())] + [(f"i{j}", pa.float64()) for j in range(1, 5)]
                         + [(f"c{f}", pa.list_(pa.int64())) for f in range(1, 6)])
    for t in read_all(d, meta):
        assert t.schema.equals(expected, check_metadata=False)
        assert t.num_rows == 3000
        assert set(np.unique(t["label"].to_numpy())) <= {0.0, 1.0} and t["label"].null_count == 0
        x = t["i1"].to_numpy(zero_copy_only=False)
        assert np.nanmin(x) >= 0 and np.all(np.isnan(x) | (x == np.floor(x)))
        lens = pa.compute.list_value_length(t["c1"]).to_numpy()
        assert lens.min() == 0 and lens.max() == 3  # empty = missing; multi-hot up to 3
    assert meta["schema"] == {f.name: str(f.type) for f in expected}


def test_row_groups(tmp_path):
    meta = S.generate(tmp_path / "d", row_group_size=1200, **SMALL)
    md = pq.ParquetFile(tmp_path / "d" / meta["files"][0]["path"]).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [1200, 1200, 600]
    # ORC stripes are exact uncompressed; compressed, tiny ones merge (see convert's doc).
    meta = S.generate(tmp_path / "o", row_group_size=1200, format="orc", compression="none", **SMALL)
    f = porc.ORCFile(str(tmp_path / "o" / meta["files"][0]["path"]))
    assert [f.read_stripe(i).num_rows for i in range(f.nstripes)] == [1200, 1200, 600]
    meta = S.generate(tmp_path / "z", num_files=1, rows_per_file=30000, row_group_size=8192,
                      format="orc", num_dense=2, num_sparse=2)
    f = porc.ORCFile(str(tmp_path / "z" / meta["files"][0]["path"]))
    sizes = [f.read_stripe(i).num_rows for i in range(f.nstripes)]
    assert sum(sizes) == 30000 and len(sizes) >= 2
    assert all(n % 8192 == 0 for n in sizes[:-1])  # boundaries on row-group boundaries


def test_deterministic(tmp_path):
    m1 = S.generate(tmp_path / "a", seed=7, **SMALL)
    m2 = S.generate(tmp_path / "b", seed=7, **SMALL)
    assert m1 == m2
    for t1, t2 in zip(read_all(tmp_path / "a", m1), read_all(tmp_path / "b", m2)):
        assert t1.equals(t2)
    m3 = S.generate(tmp_path / "c", seed=8, **SMALL)
    t1, t3 = read_all(tmp_path / "a", m1)[0], read_all(tmp_path / "c", m3)[0]
    assert not t1.equals(t3)
    assert not np.array_equal(t1["c1"].combine_chunks().values, t3["c1"].combine_chunks().values)
    # Files are independent: file 1 of a 2-file run == file 1 of a 3-file run.
    m4 = S.generate(tmp_path / "e", seed=7, **{**SMALL, "num_files": 3})
    assert read_all(tmp_path / "e", m4)[1].equals(read_all(tmp_path / "a", m1)[1])


def test_model_seed_shares_ids(tmp_path):
    # Held-out data: another sampling seed, the same planted model and ID hashes.
    ma = S.generate(tmp_path / "a", seed=1, model_seed=5, **SMALL)
    mb = S.generate(tmp_path / "b", seed=2, model_seed=5, **SMALL)
    assert ma["planted"] == mb["planted"]

    def top_id(meta, d):
        v = read_all(d, meta)[0]["c1"].combine_chunks().values.to_numpy()
        ids, counts = np.unique(v, return_counts=True)
        return ids[np.argmax(counts)]

    assert top_id(ma, tmp_path / "a") == top_id(mb, tmp_path / "b")


def test_zipf_skew_and_hashed_ids(tmp_path):
    meta = S.generate(tmp_path / "d", num_files=1, rows_per_file=20000, num_dense=0, num_sparse=2,
                      vocab_size=1000, zipf_a=1.2, empty_rate=0.0)
    ids = read_all(tmp_path / "d", meta)[0]["c1"].combine_chunks().values.to_numpy()
    _, counts = np.unique(ids, return_counts=True)
    counts = np.sort(counts)[::-1]
    share = counts / counts.sum()
    zipf = np.arange(1, 1001, dtype=float) ** -1.2
    zipf /= zipf.sum()
    assert share[0] == pytest.approx(zipf[0], abs=0.02)  # ~23% on the top ID
    assert share[:10].sum() == pytest.approx(zipf[:10].sum(), abs=0.03)
    assert len(counts) > 300 and counts[-1] <= 3  # a long tail
    # IDs look like 64-bit hashes: both signs, large magnitudes.
    assert (ids < 0).any() and (ids > 0).any()
    assert np.median(np.abs(ids.astype(float))) > 2.0**60


def test_bayes_auc_and_recomputation(tmp_path):
    d = tmp_path / "d"
    meta = S.generate(d, seq_len=6, multi_hot=[(1, 2)] * 5, **SMALL)
    assert 0.6 < meta["bayes_auc"] < 0.95
    assert meta["expected_bayes_auc"] == pytest.approx(meta["bayes_auc"], abs=0.03)
    assert 0.05 < meta["label_mean"] < 0.5
    tables = read_all(d, meta)
    t = pa.concat_tables(tables)
    p = S.planted_probability(t, meta)
    y = t["label"].to_numpy()
    assert S.auc(y, p) == meta["bayes_auc"]  # the true probabilities, recomputed bitwise
    assert S.expected_auc(p) == meta["expected_bayes_auc"]
    assert y.mean() == pytest.approx(meta["label_mean"])
    assert abs(p.mean() - y.mean()) < 0.03  # labels follow the probabilities
    # Works on any subset of rows (e.g. one file).
    p1 = S.planted_probability(tables[1], meta)
    np.testing.assert_array_equal(p1, p[len(p) - tables[1].num_rows:])
    lens = pa.compute.list_value_length(t["seq"]).to_numpy()
    assert lens.max() == 6 and lens.min() == 0
    assert t.schema.field("target_item").type == pa.int64() and t["target_item"].null_count == 0


def test_signal_scale(tmp_path):
    flat = S.generate(tmp_path / "a", signal_scale=0.0, **SMALL)
    assert flat["bayes_auc"] == 0.5 and flat["expected_bayes_auc"] == pytest.approx(0.5)
    strong = S.generate(tmp_path / "b", signal_scale=2.0, **SMALL)
    weak = S.generate(tmp_path / "c", signal_scale=0.5, **SMALL)
    assert strong["expected_bayes_auc"] > weak["expected_bayes_auc"] > 0.55


def test_empty_rate(tmp_path):
    meta = S.generate(tmp_path / "d", empty_rate=0.2, **SMALL)
    t = pa.concat_tables(read_all(tmp_path / "d", meta))
    assert t["i2"].null_count / t.num_rows == pytest.approx(0.2, abs=0.03)
    empty = (pa.compute.list_value_length(t["c3"]).to_numpy() == 0).mean()
    assert empty == pytest.approx(0.2, abs=0.03)
    assert t["c3"].null_count == 0  # missing = empty list, never null


def test_overwrite(tmp_path):
    d = tmp_path / "d"
    S.generate(d, seed=1, **SMALL)
    with pytest.raises(ValueError, match="not empty"):
        S.generate(d, seed=2, **SMALL)
    meta = S.generate(d, seed=2, overwrite=True, **{**SMALL, "num_files": 1})
    assert meta["args"]["seed"] == 2
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "part-00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no meta.json"):
        S.generate(other, overwrite=True, **SMALL)
    assert (other / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    S.generate(tmp_path / "empty", **SMALL)  # an empty directory is fine


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="csv"), "unknown format"),
    (dict(zipf_a=0.0), "zipf_a"),
    (dict(multi_hot=(3, 1)), "multi_hot"),
    (dict(vocab_size=[10, 20]), "vocab_size"),
    (dict(empty_rate=1.0), "empty_rate"),
    (dict(rows_per_file=0), "rows_per_file"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        S.generate(tmp_path / "d", **{**SMALL, **kwargs})
    assert not (tmp_path / "d").exists()


def test_speed_100k_rows(tmp_path):
    t0 = time.perf_counter()
    meta = S.generate(tmp_path / "d", num_files=1, rows_per_file=100_000)
    assert time.perf_counter() - t0 < 15.0  # ~1 s on 2 cores; generous for a busy machine
    assert meta["num_rows"] == 100_000 and meta["bayes_auc"] > 0.6


def test_cli(tmp_path, capsys):
    d = tmp_path / "d"
    argv = ["gen-data", str(d), "--num-files", "2", "--rows-per-file", "500", "--format", "orc",
            "--seed", "3", "--vocab-size", "50", "--zipf-a", "1.1", "--seq-len", "4",
            "--multi-hot", "1,2", "--num-sparse", "3", "--num-dense", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1000 rows" in out and "Bayes AUC" in out
    meta = S.load_meta(d)
    assert meta["args"]["format"] == "orc" and meta["args"]["vocab_size"] == 50
    assert meta["args"]["multi_hot"] == [1, 2] and meta["args"]["seq_len"] == 4
    assert porc.ORCFile(str(d / "part-00001.orc")).nrows == 500
    assert cli.main(argv) == 2  # exists: refused without --overwrite
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert cli.main(["gen-data", str(tmp_path / "x"), "--format", "csv"]) == 2
