"""64-bit string hashes that match RecIS, computed on the host with numpy.

RecIS turns string features into int64 IDs with one of two hashes:

* ``"farm"``: farmhash ``Fingerprint64`` (Google's farmhash; it is ``farmhashna::Hash64``).
  The string is hashed by length class: 0-16, 17-32 and 33-64 bytes each have their own
  straight-line mix, longer strings run a loop over 64-byte blocks and then mix the
  last 64 bytes (which may overlap the previous block).
* ``"murmur"``: MurmurHash64A with seed 0 (Austin Appleby's MurmurHash2, 64-bit version
  for 64-bit platforms): one multiply-xorshift round per little-endian 8-byte word, then
  the 1-7 byte tail, then a final avalanche.

Both produce an unsigned 64-bit value that RecIS stores as int64 (same bits). With a
bucket count ``b > 0`` the ID is ``uint64(h) % b``, else RecIS uses ``h & (2**63 - 1)``;
see :func:`apply_buckets` (our default keeps all 64 bits).

Why on the host: JAX has no string dtype, so strings must become integers before they
reach a jitted function. Why numpy: the GPU image has no farmhash/murmur C bindings, and
hashing in pure Python costs ~1.5 us per 8-byte string. So :func:`hash_strings` works
from an Arrow array's offsets and data buffers and runs each hash's arithmetic as uint64
numpy ops over all strings of a length class at once (numpy uint64 array multiplication
wraps modulo 2**64, exactly like the C code). Loops run only over 8-byte words / 64-byte
blocks, masked per string by sorting strings longest first, so that the strings still
active are always a prefix; the last iterations, which only a few very long strings
need, are left to the scalar code. One core does ~45-60M 8-byte strings/s and
~3-4M strings/s of 0-200 bytes (benchmarks/string_hash.py); a C loop is ~8x faster.

:func:`farmhash64` and :func:`murmurhash64a` are plain-Python scalar transcriptions of the
C code: the readable reference that the vectorised path is tested against.
:func:`murmurhash64a_u64x2` is the hash RecIS uses for a feature cross of two int64 IDs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "HASH_KINDS",
    "apply_buckets",
    "farmhash64",
    "hash_strings",
    "murmurhash64a",
    "murmurhash64a_u64x2",
]

HASH_KINDS = ("farm", "murmur")

_MASK64 = (1 << 64) - 1

# farmhash constants (farmhash.cc, "Some primes between 2^63 and 2^64").
_K0 = 0xC3A5C85C97CB3127
_K1 = 0xB492B66FBE98F273
_K2 = 0x9AE16A3B2F90404F
# MurmurHash64A constants.
_M = 0xC6A4A7935BD1E995
_R = 47


# --------------------------------------------------------------------------------------
# Scalar references (plain Python ints, masked to 64 bits after every wrap-around op).
# --------------------------------------------------------------------------------------


def _as_bytes(data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected bytes or str, got {type(data).__name__}")


def _fetch64(s: bytes, i: int) -> int:
    return int.from_bytes(s[i : i + 8], "little")


def _fetch32(s: bytes, i: int) -> int:
    return int.from_bytes(s[i : i + 4], "little")


def _rot(v: int, r: int) -> int:
    return ((v >> r) | (v << (64 - r))) & _MASK64  # r is never 0 in farmhashna


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def _hash_len16(u: int, v: int, mul: int) -> int:
    a = ((u ^ v) * mul) & _MASK64
    a ^= a >> 47
    b = ((v ^ a) * mul) & _MASK64
    b ^= b >> 47
    return (b * mul) & _MASK64


def _weak_hash_len32_with_seeds(s: bytes, i: int, a: int, b: int) -> tuple[int, int]:
    w, x, y, z = (_fetch64(s, i + 8 * k) for k in range(4))
    a = (a + w) & _MASK64
    b = _rot((b + a + z) & _MASK64, 21)
    c = a
    a = (a + x + y) & _MASK64
    b = (b + _rot(a, 44)) & _MASK64
    return (a + z) & _MASK64, (b + c) & _MASK64


def farmhash64(data: bytes) -> int:
    """farmhash Fingerprint64 of ``data`` (a str is UTF-8 encoded), as an unsigned int.

    Scalar reference: a line-by-line transcription of ``farmhashna::Hash64``.
    """
    s = _as_bytes(data)
    n = len(s)
    if n <= 16:  # HashLen0to16
        if n >= 8:
            mul = _K2 + 2 * n
            a = (_fetch64(s, 0) + _K2) & _MASK64
            b = _fetch64(s, n - 8)
            c = (_rot(b, 37) * mul + a) & _MASK64
            d = ((_rot(a, 25) + b) * mul) & _MASK64
            return _hash_len16(c, d, mul)
        if n >= 4:
            mul = _K2 + 2 * n
            return _hash_len16(n + (_fetch32(s, 0) << 3), _fetch32(s, n - 4), mul)
        if n > 0:
            y = s[0] + (s[n >> 1] << 8)
            z = n + (s[n - 1] << 2)
            return (_shift_mix(((y * _K2) ^ (z * _K0)) & _MASK64) * _K2) & _MASK64
        return _K2
    if n <= 32:  # HashLen17to32
        mul = _K2 + 2 * n
        a = (_fetch64(s, 0) * _K1) & _MASK64
        b = _fetch64(s, 8)
        c = (_fetch64(s, n - 8) * mul) & _MASK64
        d = (_fetch64(s, n - 16) * _K2) & _MASK64
        return _hash_len16(
            (_rot((a + b) & _MASK64, 43) + _rot(c, 30) + d) & _MASK64,
            (a + _rot((b + _K2) & _MASK64, 18) + c) & _MASK64,
            mul,
        )
    if n <= 64:  # HashLen33to64
        mul = _K2 + 2 * n
        a = (_fetch64(s, 0) * _K2) & _MASK64
        b = _fetch64(s, 8)
        c = (_fetch64(s, n - 8) * mul) & _MASK64
        d = (_fetch64(s, n - 16) * _K2) & _MASK64
        y = (_rot((a + b) & _MASK64, 43) + _rot(c, 30) + d) & _MASK64
        z = _hash_len16(y, (a + _rot((b + _K2) & _MASK64, 18) + c) & _MASK64, mul)
        e = (_fetch64(s, 16) * mul) & _MASK64
        f = _fetch64(s, 24)
        g = ((y + _fetch64(s, n - 32)) * mul) & _MASK64
        h = ((z + _fetch64(s, n - 24)) * mul) & _MASK64
        return _hash_len16(
            (_rot((e + f) & _MASK64, 43) + _rot(g, 30) + h) & _MASK64,
            (e + _rot((f + a) & _MASK64, 18) + g) & _MASK64,
            mul,
        )
    # Over 64 bytes: 64-byte blocks, then the last 64 bytes (possibly overlapping).
    seed = 81
    x = seed
    y = (seed * _K1 + 113) & _MASK64
    z = (_shift_mix((y * _K2 + 113) & _MASK64) * _K2) & _MASK64
    v1 = v2 = w1 = w2 = 0
    x = (x * _K2 + _fetch64(s, 0)) & _MASK64
    for i in range(0, (n - 1) // 64 * 64, 64):
        x = (_rot((x + y + v1 + _fetch64(s, i + 8)) & _MASK64, 37) * _K1) & _MASK64
        y = (_rot((y + v2 + _fetch64(s, i + 48)) & _MASK64, 42) * _K1) & _MASK64
        x ^= w2
        y = (y + v1 + _fetch64(s, i + 40)) & _MASK64
        z = (_rot((z + w1) & _MASK64, 33) * _K1) & _MASK64
        v1, v2 = _weak_hash_len32_with_seeds(s, i, (v2 * _K1) & _MASK64, (x + w1) & _MASK64)
        w1, w2 = _weak_hash_len32_with_seeds(s, i + 32, (z + w2) & _MASK64, (y + _fetch64(s, i + 16)) & _MASK64)
        z, x = x, z
    mul = _K1 + ((z & 0xFF) << 1)
    i = n - 64  # last64
    w1 = (w1 + ((n - 1) & 63)) & _MASK64
    v1 = (v1 + w1) & _MASK64
    w1 = (w1 + v1) & _MASK64
    x = (_rot((x + y + v1 + _fetch64(s, i + 8)) & _MASK64, 37) * mul) & _MASK64
    y = (_rot((y + v2 + _fetch64(s, i + 48)) & _MASK64, 42) * mul) & _MASK64
    x ^= (w2 * 9) & _MASK64
    y = (y + v1 * 9 + _fetch64(s, i + 40)) & _MASK64
    z = (_rot((z + w1) & _MASK64, 33) * mul) & _MASK64
    v1, v2 = _weak_hash_len32_with_seeds(s, i, (v2 * mul) & _MASK64, (x + w1) & _MASK64)
    w1, w2 = _weak_hash_len32_with_seeds(s, i + 32, (z + w2) & _MASK64, (y + _fetch64(s, i + 16)) & _MASK64)
    z, x = x, z
    return _hash_len16(
        (_hash_len16(v1, w1, mul) + _shift_mix(y) * _K0 + z) & _MASK64,
        (_hash_len16(v2, w2, mul) + x) & _MASK64,
        mul,
    )


def murmurhash64a(data: bytes, seed: int = 0) -> int:
    """MurmurHash64A of ``data`` (a str is UTF-8 encoded), as an unsigned int.

    Scalar reference: a transcription of Austin Appleby's ``MurmurHash64A``.
    """
    s = _as_bytes(data)
    n = len(s)
    h = (seed ^ (n * _M)) & _MASK64
    for i in range(0, n // 8 * 8, 8):
        k = (_fetch64(s, i) * _M) & _MASK64
        k ^= k >> _R
        k = (k * _M) & _MASK64
        h = ((h ^ k) * _M) & _MASK64
    if n & 7:  # the 1-7 byte tail, read as a little-endian integer
        h = ((h ^ int.from_bytes(s[n // 8 * 8 :], "little")) * _M) & _MASK64
    h ^= h >> _R
    h = (h * _M) & _MASK64
    return h ^ (h >> _R)


# --------------------------------------------------------------------------------------
# Vectorised numpy path. All arithmetic is on uint64 arrays: array ops wrap silently
# modulo 2**64 (only numpy *scalar* ops warn), which is exactly the C semantics.
# --------------------------------------------------------------------------------------


class _Bytes:
    """A padded copy of the strings' bytes, with little-endian 8-byte word loads at any offset."""

    _PAD = 64  # loads may run up to 63 bytes past a string's end (masked or unused)

    def __init__(self, data: np.ndarray):
        self.u8 = np.zeros(len(data) + self._PAD, np.uint8)
        self.u8[: len(data)] = data
        self._views: dict[int, np.ndarray] = {}

    def words(self, pos: np.ndarray, nwords: int) -> np.ndarray:
        """uint64 [nwords, k]: the ``nwords`` consecutive words starting at each byte ``pos``.

        One gather of ``8 * nwords``-byte records through a 1-byte-strided view (numpy
        handles the misalignment). Gathering a string's words together costs about the
        same as gathering one word (the cost is the cache miss), so the long-string loops
        fetch whole 64-byte blocks at once; then transpose so each word is contiguous.
        """
        view = self._views.get(nwords)
        if view is None:
            count = len(self.u8) - 8 * nwords + 1
            view = np.ndarray((count,), dtype=f"V{8 * nwords}", buffer=self.u8, strides=(1,))
            self._views[nwords] = view
        return view[pos].view("<u8").reshape(len(pos), nwords).T.copy()

    def fetch64(self, pos: np.ndarray) -> np.ndarray:
        return self.words(pos, 1)[0]

    def fetch32(self, pos: np.ndarray) -> np.ndarray:
        return self.fetch64(pos) & np.uint64(0xFFFFFFFF)

    def byte(self, pos: np.ndarray) -> np.ndarray:
        return self.u8[pos].astype(np.uint64)


def _vrot(v: np.ndarray, r: int) -> np.ndarray:
    return (v >> r) | (v << (64 - r))


def _vshift_mix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> 47)


def _vhash_len16(u: np.ndarray, v: np.ndarray, mul) -> np.ndarray:
    a = (u ^ v) * mul
    a ^= a >> 47
    b = (v ^ a) * mul
    b ^= b >> 47
    return b * mul


def _vweak_hash_len32_with_seeds(w, x, y, z, a, b):
    a = a + w
    b = _vrot(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _vrot(a, 44)
    return a + z, b + c


# Loop iterations that only a few very long strings still need are not worth numpy's
# per-call overhead (~30 us per 64-byte block, whatever the array size, against ~6 us
# in the scalar reference): fewer than this many strings left -> scalar reference.
_FEW_LONG = 8


def _longest_first(counts: np.ndarray):
    """Order strings by a loop count, descending, so the active ones always form a prefix.

    Args:
      counts: int64 [n] loop iterations per string.

    Returns:
      (order, sorted counts, active, n_scalar): ``order`` int64 [n], or None when no
      reordering is needed; ``active[j]`` = number of strings with more than ``j``
      iterations, for the iterations worth vectorising; the first ``n_scalar`` strings
      (the longest, fewer than ``_FEW_LONG``) need more and go to the scalar reference.
    """
    order = None
    top = int(counts.max()) if len(counts) else 0
    if len(counts) and counts.min() != top:
        key = top - counts
        # A small unsigned key makes numpy's stable sort a radix sort (~10x faster).
        small = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int64
        order = np.argsort(key.astype(small), kind="stable")
        counts = counts[order]
    active = np.searchsorted(-counts, -np.arange(top), side="left")
    cut = int(np.count_nonzero(active >= _FEW_LONG))  # active is non-increasing
    n_scalar = int(active[cut]) if cut < top else 0
    return order, counts, active[:cut], n_scalar


def _scalar_fill(h: np.ndarray, b: _Bytes, s: np.ndarray, n: np.ndarray, count: int, fn) -> None:
    """Overwrite h[:count] with the scalar reference ``fn`` of those strings."""
    for i in range(count):
        start = int(s[i])
        h[i] = fn(b.u8[start : start + int(n[i])].tobytes())


def _unsort(h: np.ndarray, order) -> np.ndarray:
    if order is None:
        return h
    out = np.empty_like(h)
    out[order] = h
    return out


# Farmhash length classes: len 0 | 1-3 | 4-7 | 8-16 | 17-32 | 33-64 | >64.
_FARM_CLASS_STARTS = np.array([1, 4, 8, 17, 33, 65])


def _farm_0(b, s, n):
    return np.full(len(s), _K2, np.uint64)


def _farm_1to3(b, s, n):
    y = b.byte(s) + (b.byte(s + (n >> 1).astype(np.int64)) << 8)
    z = n + (b.byte(s + n.astype(np.int64) - 1) << 2)
    return _vshift_mix((y * np.uint64(_K2)) ^ (z * np.uint64(_K0))) * np.uint64(_K2)


def _farm_4to7(b, s, n):
    mul = np.uint64(_K2) + n * 2
    return _vhash_len16(n + (b.fetch32(s) << 3), b.fetch32(s + n.astype(np.int64) - 4), mul)


def _farm_8to16(b, s, n):
    mul = np.uint64(_K2) + n * 2
    a = b.fetch64(s) + np.uint64(_K2)
    bb = b.fetch64(s + n.astype(np.int64) - 8)
    c = _vrot(bb, 37) * mul + a
    d = (_vrot(a, 25) + bb) * mul
    return _vhash_len16(c, d, mul)


def _farm_17to32(b, s, n):
    mul = np.uint64(_K2) + n * 2
    w0, w1 = b.words(s, 2)  # bytes 0-15
    e16, e8 = b.words(s + n.astype(np.int64) - 16, 2)  # the last 16 bytes
    a = w0 * np.uint64(_K1)
    c = e8 * mul
    d = e16 * np.uint64(_K2)
    return _vhash_len16(_vrot(a + w1, 43) + _vrot(c, 30) + d, a + _vrot(w1 + np.uint64(_K2), 18) + c, mul)


def _farm_33to64(b, s, n):
    mul = np.uint64(_K2) + n * 2
    w0, w1, w2, w3 = b.words(s, 4)  # bytes 0-31
    e32, e24, e16, e8 = b.words(s + n.astype(np.int64) - 32, 4)  # the last 32 bytes
    a = w0 * np.uint64(_K2)
    c = e8 * mul
    d = e16 * np.uint64(_K2)
    y = _vrot(a + w1, 43) + _vrot(c, 30) + d
    z = _vhash_len16(y, a + _vrot(w1 + np.uint64(_K2), 18) + c, mul)
    e = w2 * mul
    f = w3
    g = (y + e32) * mul
    h = (z + e24) * mul
    return _vhash_len16(_vrot(e + f, 43) + _vrot(g, 30) + h, e + _vrot(f + a, 18) + g, mul)


def _farm_over64(b, s, n):
    blocks = ((n - 1) // 64).astype(np.int64)  # 64-byte blocks before the last 64 bytes
    order, blocks, active, n_scalar = _longest_first(blocks)
    if order is not None:
        s, n = s[order], n[order]
    k1 = np.uint64(_K1)
    x = np.full(len(s), 81, np.uint64)  # seed
    y = x * k1 + np.uint64(113)
    z = _vshift_mix(y * np.uint64(_K2) + np.uint64(113)) * np.uint64(_K2)
    v1, v2, w1, w2 = (np.zeros(len(s), np.uint64) for _ in range(4))
    x = x * np.uint64(_K2) + b.fetch64(s)
    # Strings still looping are the prefix [:k]; update that prefix of the state in place.
    # (The < _FEW_LONG strings that loop beyond `active` are redone by the scalar code.)
    for j, k in enumerate(active):
        f = b.words(s[:k] + 64 * j, 8)
        X, Y, Z, V1, V2, W1, W2 = x[:k], y[:k], z[:k], v1[:k], v2[:k], w1[:k], w2[:k]
        nx = _vrot(X + Y + V1 + f[1], 37) * k1
        ny = _vrot(Y + V2 + f[6], 42) * k1
        nx ^= W2
        ny += V1 + f[5]
        nz = _vrot(Z + W1, 33) * k1
        nv1, nv2 = _vweak_hash_len32_with_seeds(f[0], f[1], f[2], f[3], V2 * k1, nx + W1)
        nw1, nw2 = _vweak_hash_len32_with_seeds(f[4], f[5], f[6], f[7], nz + W2, ny + f[2])
        x[:k], y[:k], z[:k] = nz, ny, nx  # std::swap(z, x)
        v1[:k], v2[:k], w1[:k], w2[:k] = nv1, nv2, nw1, nw2
    mul = k1 + ((z & np.uint64(0xFF)) << 1)
    f = b.words(s + n.astype(np.int64) - 64, 8)  # the last 64 bytes
    w1 = w1 + ((n - 1) & np.uint64(63))
    v1 = v1 + w1
    w1 = w1 + v1
    x = _vrot(x + y + v1 + f[1], 37) * mul
    y = _vrot(y + v2 + f[6], 42) * mul
    x ^= w2 * np.uint64(9)
    y += v1 * np.uint64(9) + f[5]
    z = _vrot(z + w1, 33) * mul
    v1, v2 = _vweak_hash_len32_with_seeds(f[0], f[1], f[2], f[3], v2 * mul, x + w1)
    w1, w2 = _vweak_hash_len32_with_seeds(f[4], f[5], f[6], f[7], z + w2, y + f[2])
    z, x = x, z
    h = _vhash_len16(
        _vhash_len16(v1, w1, mul) + _vshift_mix(y) * np.uint64(_K0) + z,
        _vhash_len16(v2, w2, mul) + x,
        mul,
    )
    _scalar_fill(h, b, s, n, n_scalar, farmhash64)
    return _unsort(h, order)


_FARM_CLASSES = (_farm_0, _farm_1to3, _farm_4to7, _farm_8to16, _farm_17to32, _farm_33to64, _farm_over64)


def _farm_vec(b: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    cls = np.searchsorted(_FARM_CLASS_STARTS, n, side="right")
    counts = np.bincount(cls, minlength=len(_FARM_CLASSES))
    out = np.empty(len(s), np.uint64)
    for c, fn in enumerate(_FARM_CLASSES):
        if counts[c] == len(s):  # one class only (e.g. fixed-width IDs): no gather/scatter
            return fn(b, s, n)
        if counts[c]:
            idx = np.flatnonzero(cls == c)
            out[idx] = fn(b, s[idx], n[idx])
    return out


def _murmur_vec(b: _Bytes, s: np.ndarray, n: np.ndarray, seed: int = 0) -> np.ndarray:
    m = np.uint64(_M)
    words = (n // 8).astype(np.int64)
    order, words, active, n_scalar = _longest_first(words)
    if order is not None:
        s, n = s[order], n[order]
    h = np.uint64(seed) ^ (n * m)
    # Fetch up to 8 words (64 bytes) per gather; word j is mixed into the prefix of
    # strings that have more than j words.
    for j0 in range(0, len(active), 8):
        block = b.words(s[: active[j0]] + 8 * j0, min(8, len(active) - j0))
        for i, k in enumerate(active[j0 : j0 + 8]):
            kk = block[i, :k] * m
            kk ^= kk >> _R
            kk *= m
            h[:k] ^= kk
            h[:k] *= m
    rem = n & np.uint64(7)  # the 1-7 byte tail, a little-endian word with the rest masked off
    tail = b.fetch64(s + 8 * words) & ((np.uint64(1) << (rem * 8)) - np.uint64(1))
    h = np.where(rem != 0, (h ^ tail) * m, h)
    h ^= h >> _R
    h *= m
    h ^= h >> _R
    _scalar_fill(h, b, s, n, n_scalar, lambda data: murmurhash64a(data, seed))
    return _unsort(h, order)


def _arrow_chunks(values) -> list[pa.Array]:
    """Normalise the accepted inputs to Arrow (large_)binary/string arrays without nulls."""
    if isinstance(values, pa.ChunkedArray):
        chunks = list(values.chunks)
        type_ = values.type
    elif isinstance(values, pa.Array):
        chunks = [values]
        type_ = values.type
    elif isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"hash_strings expects a 1-D array, got shape {values.shape}")
        if values.dtype.kind == "U":
            # Through string: pyarrow 25 garbles numpy 'U' converted straight to binary.
            chunks = [pa.array(values, pa.large_string())]
        elif values.dtype.kind == "S":
            chunks = [pa.array(values, pa.large_binary())]  # numpy's S drops trailing NUL bytes
        elif values.dtype.kind == "O":
            chunks = [_from_python(values)]
        else:
            raise TypeError(
                f"hash_strings expects bytes or str values, got a numpy array of dtype {values.dtype}"
            )
        type_ = chunks[0].type
    elif isinstance(values, (list, tuple)):
        chunks = [_from_python(values)]
        type_ = chunks[0].type
    else:
        raise TypeError(
            "hash_strings expects a list/tuple/numpy array of bytes or str, or a pyarrow "
            f"string/binary array, got {type(values).__name__}"
        )
    if pa.types.is_string_view(type_) or pa.types.is_binary_view(type_):
        chunks = [c.cast(pa.large_binary()) for c in chunks]
    elif not (
        pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
    ):
        raise TypeError(f"hash_strings expects a pyarrow string or binary array, got type {type_}")
    nulls = sum(c.null_count for c in chunks)
    if nulls:
        raise ValueError(
            f"hash_strings got {nulls} null value(s); drop or fill them first "
            "(e.g. pyarrow.compute.fill_null(values, '') or drop_null)"
        )
    return chunks


def _from_python(values) -> pa.Array:
    try:
        return pa.array(values, pa.large_binary(), from_pandas=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid, TypeError):
        pass
    # Name the first offending element (a slow scan, on the error path only).
    for i, v in enumerate(values):
        if not isinstance(v, (bytes, str, bytearray, memoryview)) and v is not None:
            raise TypeError(f"hash_strings expects bytes or str values, got {type(v).__name__} at index {i}")
    raise TypeError("hash_strings could not convert the values to bytes")


def _bytes_starts_lengths(arr: pa.Array) -> tuple[_Bytes, np.ndarray, np.ndarray]:
    """Padded bytes, start offsets (int64 [n]) and lengths (uint64 [n]) of an Arrow binary array."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int64 if large else np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, np.uint8)[lo:hi] if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1] - lo  # rebase: only the slice's bytes are copied into _Bytes
    return _Bytes(data), starts, np.diff(offsets).astype(np.uint64)


def hash_strings(values, kind: str = "farm") -> np.ndarray:
    """Hash strings to int64 IDs exactly like RecIS.

    Args:
      values: [n] strings: a list/tuple/1-D numpy array of ``bytes`` or ``str`` (str is
        UTF-8 encoded), or a pyarrow String/LargeString/Binary/LargeBinary array or a
        ChunkedArray of those. No nulls.
      kind: ``"farm"`` (farmhash Fingerprint64) or ``"murmur"`` (MurmurHash64A, seed 0).

    Returns:
      int64 [n]: the unsigned 64-bit hashes reinterpreted as int64 (about half are
      negative). Use :func:`apply_buckets` for RecIS's bucketed / 63-bit forms.

    Raises:
      ValueError: unknown ``kind``, or nulls in ``values``.
      TypeError: values that are not strings/bytes.
    """
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown hash kind {kind!r}; expected one of {', '.join(map(repr, HASH_KINDS))}")
    fn = _farm_vec if kind == "farm" else _murmur_vec
    outs = []
    with np.errstate(over="ignore"):
        for chunk in _arrow_chunks(values):
            if len(chunk):
                outs.append(fn(*_bytes_starts_lengths(chunk)))
    if not outs:
        return np.zeros(0, np.int64)
    return (outs[0] if len(outs) == 1 else np.concatenate(outs)).view(np.int64)


def apply_buckets(h: np.ndarray, buckets: int | None) -> np.ndarray:
    """Turn int64 hashes into IDs the way RecIS does.

    Args:
      h: int64 [...] hashes (from :func:`hash_strings`); uint64 is reinterpreted.
      buckets: ``None``: return ``h`` unchanged (all 64 bits; our default).
        ``0``: ``h & (2**63 - 1)`` (RecIS's form without buckets: drops the sign bit).
        ``b > 0``: ``int64(uint64(h) % b)``, in ``[0, b)`` (negative hashes are taken as
        unsigned, as in RecIS, not Python's floor modulo).

    Returns:
      int64, same shape as ``h``.
    """
    h = np.asarray(h)
    if h.dtype == np.uint64:
        h = h.view(np.int64)
    elif h.dtype.kind in "iu":
        h = h.astype(np.int64)
    else:
        raise TypeError(f"apply_buckets expects integer hashes, got dtype {h.dtype}")
    if buckets is None:
        return h
    buckets = int(buckets)
    if buckets < 0:
        raise ValueError(f"buckets must be None, 0 or positive, got {buckets}")
    if buckets == 0:
        return h & np.int64(2**63 - 1)
    return (h.view(np.uint64) % np.uint64(buckets)).astype(np.int64)


def murmurhash64a_u64x2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MurmurHash64A (seed 0) of the 16 bytes ``le64(x) || le64(y)``, elementwise.

    RecIS's feature-cross ID for a pair of int64 IDs. Numpy reference for the in-jit
    version.

    Args:
      x, y: integer arrays of the same (or broadcastable) shape; taken as int64 bits.

    Returns:
      int64, the broadcast shape of ``x`` and ``y``.
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(y, np.int64))
    m = np.uint64(_M)
    with np.errstate(over="ignore"):
        h = np.full(x.shape, (16 * _M) & _MASK64, np.uint64)  # seed ^ (len * m), seed 0
        for word in (x.astype(np.uint64), y.astype(np.uint64)):  # no 1-7 byte tail at 16 bytes
            k = word * m
            k ^= k >> _R
            k *= m
            h ^= k
            h *= m
        h ^= h >> _R
        h *= m
        h ^= h >> _R
    return h.view(np.int64)
