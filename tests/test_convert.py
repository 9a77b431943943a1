"""recis_jax.io.convert: CSV/TSV -> ORC/Parquet, type inference, errors, CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.orc as porc
import pyarrow.parquet as pq
import pytest

from recis_jax import cli
from recis_jax.io.convert import CRITEO_NAMES, ConvertError, convert


def read(path):
    path = str(path)
    return porc.read_table(path) if path.endswith(".orc") else pq.read_table(path)


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def text_rows(path, delimiter=","):
    """(header, rows) of a text file, parsed independently with the csv module."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    return rows[0], rows[1:]


def no_temp_files(directory):
    return not [p for p in directory.rglob(".*tmp*")]


# --------------------------------------------------------------------------- real samples


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_criteo_schema(real_data, tmp_path, fmt):
    src = real_data / "deepctr_samples" / "criteo_sample.txt"
    header, rows = text_rows(src)
    assert header == CRITEO_NAMES  # the sample has a header with the criteo names
    stats = convert(src, tmp_path / f"c.{fmt}", format=fmt, schema="criteo")
    assert stats["rows"] == len(rows) == 200
    t = read(tmp_path / f"c.{fmt}")
    assert t.column_names == CRITEO_NAMES
    assert t.schema.field("label").type == pa.int64()
    assert all(t.schema.field(f"I{i}").type == pa.float64() for i in range(1, 14))
    assert all(t.schema.field(f"C{i}").type == pa.string() for i in range(1, 27))
    got = t.to_pylist()
    for row, rec in zip(rows, got):
        assert rec["label"] == int(row[0])
        for i in range(1, 14):
            assert rec[f"I{i}"] == (float(row[i]) if row[i] else None)  # empty = null, not 0
        for i in range(1, 27):
            assert rec[f"C{i}"] == (row[13 + i] or None)
    assert got[0]["I3"] == 260.0 and got[0]["I1"] is None and got[0]["C1"] == "05db9164"
    assert got[1]["I2"] == -1.0


def test_criteo_infer(real_data, tmp_path):
    src = real_data / "deepctr_samples" / "criteo_sample.txt"
    _, rows = text_rows(src)
    stats = convert(src, tmp_path / "c.parquet")
    t = read(tmp_path / "c.parquet")
    assert stats["rows"] == t.num_rows == len(rows)
    types = dict(zip(t.column_names, t.schema.types))
    assert types["label"] == pa.int64()
    assert types["I3"] == pa.float64()  # 260.0
    assert types["I2"] == pa.int64()  # 3, -1, ...: integers only
    assert all(types[f"C{i}"] == pa.string() for i in range(1, 27))  # hex never parsed as hex
    got = t.to_pylist()
    for row, rec in zip(rows, got):
        for i in range(1, 14):
            assert rec[f"I{i}"] == (float(row[i]) if row[i] else None)


def test_criteo_raw_tsv_without_header(real_data, tmp_path):
    src = real_data / "deepctr_samples" / "criteo_sample.txt"
    _, rows = text_rows(src)
    raw = tmp_path / "day_0"  # raw Criteo: TSV, no header, no extension
    raw.write_text("".join("\t".join(r) + "\n" for r in rows[:50]))
    stats = convert(raw, tmp_path / "out.orc", format="orc", schema="criteo")
    assert stats["rows"] == 50
    t = read(tmp_path / "out.orc")
    assert t.column_names == CRITEO_NAMES
    assert t.column("C1").to_pylist() == [r[14] or None for r in rows[:50]]


def test_avazu_exact_ids(real_data, tmp_path):
    src = real_data / "deepctr_samples" / "avazu_sample.txt"
    header, rows = text_rows(src)
    stats = convert(src, tmp_path / "a.parquet")
    t = read(tmp_path / "a.parquet")
    assert stats["rows"] == t.num_rows == len(rows) == 100
    assert t.schema.field("id").type == pa.uint64()
    ids = t.column("id").to_pylist()
    assert ids == [int(r[0]) for r in rows]  # exact, never through float
    assert 10000169349117863715 in ids
    assert t.schema.field("hour").type == pa.int64()
    assert t.column("hour").to_pylist() == [int(r[2]) for r in rows]
    for name in ("site_id", "site_domain", "app_id", "device_id", "device_ip", "device_model"):
        assert t.schema.field(name).type == pa.string()
        assert t.column(name).to_pylist() == [r[header.index(name)] for r in rows]
    assert t.schema.field("C20").type == pa.int64()  # holds -1
    # ORC: no unsigned types, the same 64 bits as int64.
    stats = convert(src, tmp_path / "a.orc", format="orc")
    assert stats["columns"]["id"] == "uint64" and stats["uint64_as_int64"] == ["id"]
    t = read(tmp_path / "a.orc")
    assert t.schema.field("id").type == pa.int64()
    assert t.column("id").to_numpy().view(np.uint64).tolist() == [int(r[0]) for r in rows]


def test_movielens_list_column(real_data, tmp_path):
    src = real_data / "deepctr_samples" / "movielens_sample.txt"
    header, rows = text_rows(src)
    stats = convert(src, tmp_path / "m.orc", format="orc", list_columns=["genres"])
    t = read(tmp_path / "m.orc")
    assert stats["rows"] == t.num_rows == len(rows) == 200
    assert t.schema.field("genres").type == pa.list_(pa.string())
    assert t.schema.field("title").type == pa.string()
    assert t.column("genres").to_pylist() == [r[header.index("genres")].split("|") for r in rows]
    titles = t.column("title").to_pylist()
    assert titles == [r[header.index("title")] for r in rows]
    assert "Bridges of Madison County, The (1995)" in titles  # quoted comma
    assert t.schema.field("rating").type == pa.int64()
    assert t.schema.field("zip").type == pa.string()  # "02136-1522", leading zeros


# --------------------------------------------------------------------------- inference


def test_infer_types(tmp_path):
    src = write(tmp_path, "x.csv",
                "i,u,big,f,h,s,e,z,neg\n"
                "1,18446744073709551615,99999999999999999999,260.0,05db9164,abc,,02134,-5\n"
                "-2,3,1,nan,ad4b77ff,x y,,00001,7\n"
                ",10000169349117863715,,1e3,,,,,\n"
                "9223372036854775807,0,2,inf,68fd1e64,q,,12345,\n")
    stats = convert(src, tmp_path / "x.parquet")
    t = read(tmp_path / "x.parquet")
    types = dict(zip(t.column_names, map(str, t.schema.types)))
    assert types == {"i": "int64", "u": "uint64", "big": "string", "f": "double", "h": "string",
                     "s": "string", "e": "string", "z": "string", "neg": "int64"}
    assert stats["columns"] == types
    assert t.column("i").to_pylist() == [1, -2, None, 9223372036854775807]
    assert t.column("u").to_pylist() == [18446744073709551615, 3, 10000169349117863715, 0]
    assert t.column("big").to_pylist() == ["99999999999999999999", "1", None, "2"]
    f = t.column("f").to_pylist()
    assert f[0] == 260.0 and math.isnan(f[1]) and f[2] == 1000.0 and f[3] == math.inf
    assert t.column("e").null_count == 4  # empty is missing
    assert t.column("z").to_pylist() == ["02134", "00001", None, "12345"]  # zeros kept


def test_infer_unifies_across_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write(d, "a.csv", "x,y,z\n1,5,7\n2,6,8\n")
    write(d, "b.csv", "x,y,z\n1.5,10000169349117863715,\n3,7,\n")
    stats = convert(d, tmp_path / "out", format="parquet")
    assert [f["rows"] for f in stats["files"]] == [2, 2]
    ta, tb = read(tmp_path / "out" / "a.parquet"), read(tmp_path / "out" / "b.parquet")
    assert ta.schema == tb.schema
    assert [str(t) for t in ta.schema.types] == ["double", "uint64", "int64"]
    assert tb.column("y").to_pylist() == [10000169349117863715, 7]
    assert tb.column("z").null_count == 2


def test_list_columns(tmp_path):
    src = write(tmp_path, "l.csv", "a,b,c\n1|2|3,x;y,1.5|2\n,z,\n4||5,,3\n")
    convert(src, tmp_path / "l.parquet", list_columns={"a": "|", "b": ";", "c": "|"})
    t = read(tmp_path / "l.parquet")
    assert t.schema.field("a").type == pa.list_(pa.int64())
    assert t.schema.field("b").type == pa.list_(pa.string())
    assert t.schema.field("c").type == pa.list_(pa.float64())
    assert t.column("a").to_pylist() == [[1, 2, 3], [], [4, 5]]  # empty field = empty list
    assert t.column("a").null_count == 0
    assert t.column("b").to_pylist() == [["x", "y"], ["z"], []]
    assert t.column("c").to_pylist() == [[1.5, 2.0], [], [3.0]]


def test_uint64_list(tmp_path):
    src = write(tmp_path, "l.tsv", "10000169349117863715|1\t7\n\t8\n")
    convert(src, tmp_path / "l.parquet", list_columns=["f0"])
    t = read(tmp_path / "l.parquet")
    assert t.column_names == ["f0", "f1"]  # no header: generated names
    assert t.schema.field("f0").type == pa.list_(pa.uint64())
    assert t.column("f0").to_pylist() == [[10000169349117863715, 1], []]


def test_delimiter_and_header_detection(tmp_path):
    tsv = write(tmp_path, "t.tsv", "a\tb\n1\t2,3\n")
    convert(tsv, tmp_path / "t.parquet")
    t = read(tmp_path / "t.parquet")
    assert t.column_names == ["a", "b"] and t.column("b").to_pylist() == ["2,3"]
    # --no-header keeps an identifier-looking first line as data.
    convert(tsv, tmp_path / "n.parquet", header=False)
    t = read(tmp_path / "n.parquet")
    assert t.column_names == ["f0", "f1"] and t.column("f0").to_pylist() == ["a", "1"]
    # --header with an explicit delimiter.
    semi = write(tmp_path, "s.txt", "x;y\n1;2\n")
    convert(semi, tmp_path / "s.parquet", delimiter=";", header=True)
    assert read(tmp_path / "s.parquet").to_pylist() == [{"x": 1, "y": 2}]


def test_json_schema(tmp_path):
    schema = write(tmp_path, "schema.json", json.dumps(
        {"label": "int64", "price": "float64", "id": "uint64", "tags": "list<int64>", "name": "string"}))
    src = write(tmp_path, "d.csv", "1,2,3,4|5,007\n0,,18446744073709551615,,x\n")
    convert(src, tmp_path / "d.orc", format="orc", schema=str(schema))
    t = read(tmp_path / "d.orc")
    assert t.column_names == ["label", "price", "id", "tags", "name"]
    # ORC has no unsigned types: uint64 is stored as int64 with the same bits.
    assert [str(x) for x in t.schema.types] == ["int64", "double", "int64", "list<item: int64>", "string"]
    assert t.to_pylist()[0] == {"label": 1, "price": 2.0, "id": 3, "tags": [4, 5], "name": "007"}
    assert t.to_pylist()[1]["id"] == -1 and t.to_pylist()[1]["tags"] == []


def test_parquet_row_groups_and_compression(tmp_path):
    src = write(tmp_path, "r.csv", "a,b\n" + "".join(f"{i},{i * 0.5}\n" for i in range(1000)))
    convert(src, tmp_path / "r.parquet", row_group_size=300, compression="snappy")
    md = pq.ParquetFile(tmp_path / "r.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [300, 300, 300, 100]
    assert md.row_group(0).column(0).compression == "SNAPPY"
    convert(src, tmp_path / "r.orc", format="orc", row_group_size=300, compression="none")
    f = porc.ORCFile(tmp_path / "r.orc")
    assert [f.read_stripe(i).num_rows for i in range(f.nstripes)] == [300, 300, 300, 100]
    assert f.compression == "UNCOMPRESSED"
    assert f.read().equals(read(tmp_path / "r.parquet"))


def test_outputs_into_directory(tmp_path):
    a = write(tmp_path, "a.csv", "x\n1\n")
    b = write(tmp_path, "b.txt", "x\n2\n")
    stats = convert([a, b], tmp_path / "out", format="orc")
    assert [f["dst"] for f in stats["files"]] == [str(tmp_path / "out" / "a.orc"), str(tmp_path / "out" / "b.orc")]
    assert stats["rows"] == 2
    assert read(tmp_path / "out" / "b.orc").column("x").to_pylist() == [2]
    assert no_temp_files(tmp_path)


def test_header_only_file_gives_empty_table(tmp_path):
    src = write(tmp_path, "h.csv", "a,b\n")
    assert convert(src, tmp_path / "h.parquet")["rows"] == 0
    assert read(tmp_path / "h.parquet").column_names == ["a", "b"]


# --------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path):
    with pytest.raises(ConvertError, match="nope.csv: no such file"):
        convert(tmp_path / "nope.csv", tmp_path / "o.parquet")


def test_error_empty_file(tmp_path):
    for name, text in [("empty.csv", ""), ("blank.csv", "\n \n\n")]:
        with pytest.raises(ConvertError, match=f"{name}: empty file"):
            convert(write(tmp_path, name, text), tmp_path / "o.parquet")


def test_error_binary(tmp_path):
    nul = write(tmp_path, "nul.csv", b"a,b\n\x00\x01\x02garbage\n", mode="wb")
    with pytest.raises(ConvertError, match="nul.csv: binary data"):
        convert(nul, tmp_path / "o.parquet")
    bad = write(tmp_path, "latin.csv", b"a,b\n\xff\xfe\xfd,1\n", mode="wb")
    with pytest.raises(ConvertError, match="latin.csv: not UTF-8"):
        convert(bad, tmp_path / "o.parquet")
    # Invalid bytes past the sniffed prefix are caught by the reader, still naming the file.
    late = write(tmp_path, "late.csv", b"a,b\n" + b"x,1\n" * 40000 + b"\xff\xfe,2\n", mode="wb")
    with pytest.raises(ConvertError, match="late.csv: not UTF-8"):
        convert(late, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists() and no_temp_files(tmp_path)


def test_error_ragged_rows(tmp_path):
    src = write(tmp_path, "r.csv", "a,b\n1,2\n3,4\n5\n6,7\n")
    with pytest.raises(ConvertError, match=r"r.csv: line 4: expected 2 fields, got 1"):
        convert(src, tmp_path / "o.parquet")
    long = write(tmp_path, "l.tsv", "1\t2\n1\t2\t3\n")
    with pytest.raises(ConvertError, match=r"l.tsv: line 2: expected 2 fields, got 3"):
        convert(long, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists() and no_temp_files(tmp_path)


def test_error_criteo_column_count(tmp_path):
    src = write(tmp_path, "c.tsv", "0\t1\t2\n")
    with pytest.raises(ConvertError, match=r"c.tsv: line 1: expected 40 fields, got 3"):
        convert(src, tmp_path / "o.parquet", schema="criteo")


def test_error_value_does_not_fit_schema(tmp_path):
    good = ["0", "1", "2.0"] + [""] * 11 + ["05db9164"] * 26
    bad = list(good)
    bad[5] = "abc"  # I5
    src = write(tmp_path, "c.tsv", "\t".join(good) + "\n" + "\t".join(good) + "\n" + "\t".join(bad) + "\n")
    with pytest.raises(ConvertError, match=r"c.tsv: line 3, column 'I5': value 'abc' is not a valid double"):
        convert(src, tmp_path / "o.parquet", schema="criteo")
    schema = write(tmp_path, "s.json", json.dumps({"a": "int64", "b": "list<uint64>"}))
    src = write(tmp_path, "d.csv", "a,b\n1,2|3\n2,4|-5\n")
    with pytest.raises(ConvertError, match=r"d.csv: line 3, column 'b': value '-5' is not a valid uint64"):
        convert(src, tmp_path / "o.parquet", schema=str(schema))
    assert not (tmp_path / "o.parquet").exists() and no_temp_files(tmp_path)


def test_error_bad_arguments(tmp_path):
    src = write(tmp_path, "a.csv", "a,b\n1,2\n")
    with pytest.raises(ConvertError, match="unknown format 'csv'"):
        convert(src, tmp_path / "o.csv", format="csv")
    with pytest.raises(ConvertError, match="unknown compression 'xz'"):
        convert(src, tmp_path / "o.parquet", compression="xz")
    with pytest.raises(ConvertError, match="list column 'c' is not a column"):
        convert(src, tmp_path / "o.parquet", list_columns=["c"])
    with pytest.raises(ConvertError, match="no such file"):
        convert(src, tmp_path / "o.parquet", schema=str(tmp_path / "missing.json"))
    bad_type = write(tmp_path, "t.json", json.dumps({"a": "int32", "b": "int64"}))
    with pytest.raises(ConvertError, match="unknown column type 'int32'"):
        convert(src, tmp_path / "o.parquet", schema=str(bad_type))
    other = write(tmp_path, "o.json", json.dumps({"a": "int64", "c": "int64"}))
    with pytest.raises(ConvertError, match="do not match"):
        convert(src, tmp_path / "o.parquet", schema=str(other))


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, message", [
    (["nope.csv", "o.parquet"], "no such file"),
    (["empty.csv", "o.parquet"], "empty file"),
    (["bin.csv", "o.parquet"], "binary data"),
    (["ragged.csv", "o.parquet"], "line 3: expected 2 fields, got 3"),
    (["ragged.csv", "o.parquet", "--format", "xlsx"], "unknown format"),
    (["crit.tsv", "o.parquet", "--schema", "criteo"], "line 1, column 'I1': value 'abc'"),
])
def test_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "empty.csv", "")
    write(tmp_path, "bin.csv", b"\x00\x01\x02\x03", mode="wb")
    write(tmp_path, "ragged.csv", "a,b\n1,2\n1,2,3\n")
    write(tmp_path, "crit.tsv", "\t".join(["1", "abc"] + [""] * 38) + "\n")
    assert cli.main(["convert", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_subprocess(tmp_path):
    src = write(tmp_path, "m.csv", "id,tags\n10000169349117863715,a|b\n1,\n")
    out = subprocess.run(
        [sys.executable, "-m", "recis_jax.cli", "convert", str(src), str(tmp_path / "m.orc"),
         "--list-columns", "tags", "--row-group-size", "1000"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "id: uint64" in out.stdout and "2 rows" in out.stdout
    t = read(tmp_path / "m.orc")  # format from the extension
    assert "stored as int64" in out.stdout
    ids = np.array(t.column("id").to_pylist(), np.int64).view(np.uint64)
    assert ids.tolist() == [10000169349117863715, 1]
    assert t.column("tags").to_pylist() == [["a", "b"], []]
    bad = subprocess.run([sys.executable, "-m", "recis_jax.cli", "convert", str(tmp_path / "x.csv"),
                          str(tmp_path / "x.parquet")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
