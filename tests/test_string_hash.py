"""String hashing (recis_jax.features.string_hash): RecIS-exact farm/murmur hashes.

The vectorised numpy path is checked against the plain-Python scalar references, which
are pinned to known values (and, when pyfarmhash is installed, to Google's C farmhash).
"""

import random

import numpy as np
import pyarrow as pa
import pytest

from recis_jax.features.string_hash import (
    apply_buckets,
    farmhash64,
    hash_strings,
    murmurhash64a,
    murmurhash64a_u64x2,
)

PINNED = [  # (kind, input, int64 hash)
    ("farm", "hello", -5436999610281751320),
    ("murmur", "hello", 2191231550387646743),
    ("farm", "", -7286425919675154353),
    ("murmur", "", 0),
    ("farm", b"a", -5528939962900187677),
    ("murmur", b"hello world", -3190198453633110066),
]
SCALAR = {"farm": farmhash64, "murmur": murmurhash64a}


def _i64(u: int) -> int:
    """An unsigned 64-bit Python int as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _reference(values, kind):
    return np.array([_i64(SCALAR[kind](v)) for v in values], np.int64)


def _random_bytes(rng: random.Random, length: int) -> bytes:
    # Mix in all-zero and all-0xff strings: zero bytes must not be confused with padding,
    # and 0xff catches sign-extension mistakes when bytes are widened.
    style = rng.randrange(4)
    if style == 0:
        return bytes(length)
    if style == 1:
        return b"\xff" * length
    return bytes(rng.randrange(256) for _ in range(length))


@pytest.fixture(scope="module")
def every_length():
    """Two random strings of every length 0..300 (all farmhash length classes, the
    64-byte block boundaries and every MurmurHash tail length), in shuffled order."""
    rng = random.Random(0)
    values = [_random_bytes(rng, n) for n in range(301) for _ in range(2)]
    rng.shuffle(values)
    return values


# ----------------------------------------------------------------------------- pinned values


@pytest.mark.parametrize("kind,value,expected", PINNED)
def test_scalar_reference_pinned(kind, value, expected):
    assert _i64(SCALAR[kind](value)) == expected


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_vectorised_pinned(kind):
    cases = [(v, e) for k, v, e in PINNED if k == kind]
    values = [v for v, _ in cases]
    expected = np.array([e for _, e in cases], np.int64)
    np.testing.assert_array_equal(hash_strings(values, kind), expected)
    # bytes and str give the same hash (str is UTF-8 encoded)
    as_bytes = [v.encode() if isinstance(v, str) else v for v in values]
    np.testing.assert_array_equal(hash_strings(as_bytes, kind), expected)


def test_default_kind_is_farm():
    np.testing.assert_array_equal(hash_strings(["hello"]), [-5436999610281751320])


# ---------------------------------------------------------------- vectorised vs reference


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_every_length_matches_reference(kind, every_length):
    got = hash_strings(every_length, kind)
    assert got.dtype == np.int64 and got.shape == (len(every_length),)
    np.testing.assert_array_equal(got, _reference(every_length, kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 33, 63, 64, 65, 127, 128, 129, 200, 1000])
def test_uniform_length_batches(kind, length):
    # All strings in one length class / loop count: the paths that skip gather and sort.
    rng = random.Random(length)
    values = [_random_bytes(rng, length) for _ in range(20)]
    np.testing.assert_array_equal(hash_strings(values, kind), _reference(values, kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_long_strings_among_short_ones(kind):
    # Long strings loop many more times than the rest; results must come back in order.
    rng = random.Random(1)
    values = [_random_bytes(rng, rng.choice([3, 70, 5000, 130, 12, 2049])) for _ in range(40)]
    np.testing.assert_array_equal(hash_strings(values, kind), _reference(values, kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
@pytest.mark.parametrize("num_long", [1, 7, 8, 9, 20])
def test_few_very_long_strings(kind, num_long):
    # The loop iterations only < 8 strings need are left to the scalar reference; check
    # both sides of that cut (and strings that loop past it) give the reference hash.
    rng = random.Random(num_long)
    values = [_random_bytes(rng, rng.randrange(0, 300)) for _ in range(30)]
    values += [_random_bytes(rng, rng.randrange(3000, 20_000)) for _ in range(num_long)]
    rng.shuffle(values)
    np.testing.assert_array_equal(hash_strings(values, kind), _reference(values, kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_unicode_str(kind):
    values = ["é", "日本語", "🙂 emoji", "naïve café" * 9, "Ünïcödé" * 20, "\x00nul", "plain"]
    encoded = [v.encode("utf-8") for v in values]
    got = hash_strings(values, kind)
    np.testing.assert_array_equal(got, _reference(encoded, kind))
    np.testing.assert_array_equal(got, hash_strings(encoded, kind))
    np.testing.assert_array_equal(got, hash_strings(pa.array(values, pa.string()), kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_input_containers_agree(kind):
    values = ["a", "bb", "", "ccc" * 30, "dddd", "é" * 40]
    encoded = [v.encode() for v in values]
    expected = _reference(encoded, kind)
    inputs = [
        values,
        tuple(values),
        encoded,
        ["a", b"bb", "", b"ccc" * 30, "dddd", "é".encode() * 40],  # mixed str and bytes
        np.array(values, dtype=object),
        np.array(values),  # numpy unicode 'U'
        np.array(encoded),  # numpy bytes 'S' (no trailing NULs here: 'S' would drop them)
        pa.array(values, pa.string()),
        pa.array(values, pa.large_string()),
        pa.array(encoded, pa.binary()),
        pa.array(encoded, pa.large_binary()),
        pa.array(values, pa.string_view()),
        pa.array(encoded, pa.binary_view()),
    ]
    for x in inputs:
        np.testing.assert_array_equal(hash_strings(x, kind), expected, err_msg=f"{type(x)} {getattr(x, 'type', '')}")


@pytest.mark.parametrize("kind", ["farm", "murmur"])
@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string(), pa.binary(), pa.large_binary()])
def test_sliced_arrow_arrays(kind, arrow_type, every_length):
    values = every_length[:100]
    if arrow_type in (pa.string(), pa.large_string()):
        values = [v.hex().encode() for v in values]  # valid UTF-8
    arr = pa.array(values, arrow_type)
    full = _reference(values, kind)
    for start, stop in [(0, 100), (7, 100), (13, 14), (50, 50), (99, 100), (1, 60)]:
        sliced = arr.slice(start, stop - start)
        assert sliced.offset == start
        np.testing.assert_array_equal(hash_strings(sliced, kind), full[start:stop])


@pytest.mark.parametrize("kind", ["farm", "murmur"])
def test_chunked_arrays(kind, every_length):
    values = every_length[:90]
    chunked = pa.chunked_array(
        [
            pa.array(values[:40], pa.binary()),
            pa.array([], pa.binary()),
            pa.array(values[40:90], pa.binary()).slice(0, 50),
        ]
    )
    np.testing.assert_array_equal(hash_strings(chunked, kind), _reference(values, kind))
    # A chunk sliced from a bigger array (non-zero offset inside a chunked array).
    big = pa.array(values, pa.large_binary())
    chunked = pa.chunked_array([big.slice(5, 10), big.slice(60, 30)])
    np.testing.assert_array_equal(hash_strings(chunked, kind), _reference(values[5:15] + values[60:90], kind))


@pytest.mark.parametrize("kind", ["farm", "murmur"])
@pytest.mark.parametrize(
    "empty",
    [[], (), np.array([], dtype=object), pa.array([], pa.string()), pa.chunked_array([], pa.binary())],
    ids=["list", "tuple", "numpy", "arrow", "chunked"],
)
def test_empty_input(kind, empty):
    got = hash_strings(empty, kind)
    assert got.shape == (0,) and got.dtype == np.int64


# ---------------------------------------------------------------------------------- errors


def test_nulls_are_rejected():
    with pytest.raises(ValueError, match=r"1 null.*drop or fill"):
        hash_strings(["a", None, "b"])
    with pytest.raises(ValueError, match=r"2 null"):
        hash_strings(pa.array(["a", None, None], pa.string()))
    with pytest.raises(ValueError, match=r"3 null"):
        hash_strings(pa.chunked_array([pa.array([None, "x"]), pa.array([None, None], pa.string())]))
    with pytest.raises(ValueError, match=r"1 null"):
        hash_strings(np.array(["a", None], dtype=object), "murmur")


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"'farm'.*'murmur'"):
        hash_strings(["a"], "city")


@pytest.mark.parametrize(
    "bad,name",
    [
        ([1, 2], "int"),
        (["a", 2.5], "float"),
        (np.array([1, 2]), "int64"),
        (np.array([1.0]), "float64"),
        (pa.array([1, 2]), "int64"),
        (pa.chunked_array([pa.array([1.5])]), "double"),
        ("abc", "str"),
        (b"abc", "bytes"),
        ({"a": 1}, "dict"),
    ],
)
def test_wrong_types(bad, name):
    with pytest.raises(TypeError, match=name):
        hash_strings(bad)


def test_two_dimensional_numpy_rejected():
    with pytest.raises(ValueError, match="1-D"):
        hash_strings(np.array([["a", "b"]], dtype=object))


# --------------------------------------------------------------------------- apply_buckets


def test_apply_buckets():
    h = np.array([0, 1, -1, -5436999610281751320, 2**63 - 1, -(2**63), 12345], np.int64)
    unsigned = [int(v) % 2**64 for v in h]

    np.testing.assert_array_equal(apply_buckets(h, None), h)

    no_bucket = apply_buckets(h, 0)
    np.testing.assert_array_equal(no_bucket, [u & (2**63 - 1) for u in unsigned])
    assert (no_bucket >= 0).all()

    for b in [1, 7, 1000, 2**31 - 1, 2**40 + 3, 2**63 + 5]:
        got = apply_buckets(h, b)
        assert got.dtype == np.int64
        # uint64 modulo (RecIS), not Python's floor modulo of the negative int64
        np.testing.assert_array_equal(got, [_i64(u % b) for u in unsigned])
        if b < 2**63:
            assert ((got >= 0) & (got < b)).all()
    # The negative hash of "hello" is taken as unsigned:
    assert apply_buckets(np.array([-5436999610281751320]), 10)[0] == (2**64 - 5436999610281751320) % 10

    with pytest.raises(ValueError, match="positive"):
        apply_buckets(h, -3)


def test_apply_buckets_accepts_uint64_and_keeps_shape():
    h = np.array([[2**64 - 1, 5]], np.uint64)
    got = apply_buckets(h, 3)
    assert got.shape == (1, 2) and got.dtype == np.int64
    np.testing.assert_array_equal(got, [[(2**64 - 1) % 3, 2]])
    np.testing.assert_array_equal(apply_buckets(h, None), h.view(np.int64))


# ------------------------------------------------------------------ feature-cross hash


def test_murmurhash64a_u64x2():
    assert murmurhash64a_u64x2(np.array([1001]), np.array([1]))[0] == -7808879811642834040
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64, endpoint=True)
    y = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64, endpoint=True)
    x[:3], y[:3] = [0, -1, 2**63 - 1], [0, -1, -(2**63)]

    def le64(v) -> bytes:
        return int(v).to_bytes(8, "little", signed=True)

    expected = [_i64(murmurhash64a(le64(a) + le64(b))) for a, b in zip(x, y)]
    got = murmurhash64a_u64x2(x, y)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    # Same as hashing the 16-byte strings through the string path.
    blobs = [a.tobytes() + b.tobytes() for a, b in zip(x.astype("<i8"), y.astype("<i8"))]
    np.testing.assert_array_equal(hash_strings(blobs, "murmur"), expected)
    assert murmurhash64a_u64x2(x.reshape(20, 10), y.reshape(20, 10)).shape == (20, 10)


# ----------------------------------------------------- optional cross-check against C farmhash


def test_farm_matches_google_farmhash(every_length):
    farmhash = pytest.importorskip("farmhash", reason="pyfarmhash (Google's C farmhash bindings) not installed")
    expected = np.array([_i64(farmhash.fingerprint64(v)) for v in every_length], np.int64)
    np.testing.assert_array_equal(_reference(every_length, "farm"), expected)
    np.testing.assert_array_equal(hash_strings(every_length, "farm"), expected)
