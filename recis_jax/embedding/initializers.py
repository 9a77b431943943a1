"""Deterministic row initializers: a new row's value is f(table, ID, seed, initializer).

The value does not depend on which slab row the ID lands in or on insertion order, so
runs are reproducible and a table sharded over any number of devices starts with the
same rows. Each row draws from its own splitmix64 stream of (seed, table, id).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("constant", "uniform", "normal", "truncated_normal", "xavier_uniform", "xavier_normal")


@dataclasses.dataclass(frozen=True)
class Initializer:
    """How new rows start. Hashable, so it can be part of a static table config.

    kind: one of KINDS.
      constant: every entry `value`.
      uniform: U[minval, maxval).
      normal: N(mean, std).
      truncated_normal: N(mean, std) truncated to [mean + a*std, mean + b*std]
        (RecIS's TruncNormalInitializer(mean, std, a, b); a, b in units of std).
      xavier_uniform / xavier_normal: Glorot with fan_in = `fan_in` (default 1: a
        dynamic table has no fixed vocabulary) and fan_out = dim.
    """

    kind: str = "truncated_normal"
    value: float = 0.0
    minval: float = -0.05
    maxval: float = 0.05
    mean: float = 0.0
    std: float = 0.01
    a: float = -2.0
    b: float = 2.0
    fan_in: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Initializer kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "uniform" and not self.minval < self.maxval:
            raise ValueError(f"uniform initializer needs minval < maxval, got {self.minval}, {self.maxval}")
        if self.kind in ("normal", "truncated_normal") and self.std < 0:
            raise ValueError(f"{self.kind} initializer needs std >= 0, got {self.std}")
        if self.kind == "truncated_normal" and not self.a < self.b:
            raise ValueError(f"truncated_normal initializer needs a < b, got {self.a}, {self.b}")


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: jax.Array) -> jax.Array:
    """splitmix64's finalizer: a bijection of uint64 that mixes every bit into every other."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_streams(tables: jax.Array, ids: jax.Array, seed: int) -> jax.Array:
    """uint64 [N]: one random stream per (table, id) (distinct ids of a table: distinct
    streams, since each mix is a bijection)."""
    start = jnp.uint64((int(seed) * int(_GOLDEN) + 1) % (1 << 64))
    base = _mix64(start + tables.astype(jnp.uint64))
    return _mix64(_mix64(base) ^ jax.lax.bitcast_convert_type(ids.astype(jnp.int64), jnp.uint64))


def stream_bits(streams: jax.Array, count: int) -> jax.Array:
    """uint32 [N, count]: word i of each stream, from splitmix64 (the stream advanced by
    the golden gamma, then mixed; two words per 64-bit output). Integer ops only, one
    fused elementwise kernel (threefry's rolled loop on the CPU cost ~25% of a DeepFM step)."""
    half = -(-count // 2)
    x = _mix64(streams[:, None] + (jnp.arange(1, half + 1, dtype=jnp.uint64) * _GOLDEN)[None])
    words = jnp.stack([x.astype(jnp.uint32), (x >> np.uint64(32)).astype(jnp.uint32)], axis=-1)
    return words.reshape(streams.shape[0], 2 * half)[:, :count]


# Candidates drawn per value for the truncated normal (first one inside [a, b] wins).
TRUNCATION_DRAWS = 8


# Largest number of random words drawn at once by `write_initial_rows`.
INIT_CHUNK_ELEMS = 1 << 25


def initial_rows(init: Initializer, tables: jax.Array, ids: jax.Array, dim: int, seed: int) -> jax.Array:
    """[N, dim] float32 initial values for (tables [N] int32, ids [N] int64).

    Bitwise stable across programs: the same (table, id) gets the same bits whatever the
    batch shape, device count or surrounding step. On GPU, XLA may contract `a * b + c`
    into an FMA in one program and not in another (fusion choices differ), so the draws
    use no multiply-add at all: uniforms come from the stream's bits by bit operations
    (exact), normals by Box-Muller `sqrt(-2 log u1) * cos|sin(2 pi u2)` (products
    of correctly rounded library calls), and optimization barriers keep the final
    `shift + scale * z` in separate fusions.

    The truncated normal takes, per value, the first of TRUNCATION_DRAWS normal draws
    inside [a, b]; if none is (probability (1 - P[a <= z <= b])**8, about 1e-11 for
    RecIS's default a, b = -2, 2), the last draw is clipped into [a, b].
    """
    if init.kind == "constant":
        return jnp.full((ids.shape[0], dim), init.value, jnp.float32)
    return _initial_rows(init, tables, ids, dim, seed)


def write_initial_rows(init: Initializer, embedding: jax.Array, targets: jax.Array, tables: jax.Array,
                       ids: jax.Array, new: jax.Array, seed: int, chunk_elems: int = INIT_CHUNK_ELEMS
                       ) -> jax.Array:
    """Writes `initial_rows` of the `new` lanes into `embedding[targets]`.

    embedding [R, dim]; targets [N] int32 rows; tables [N] int32, ids [N] int64; new [N]
    bool. Returns the updated embedding; other rows are untouched.

    The initializer is the costliest part of a lookup step when computed for every lane
    (8 random words per value for the truncated normal, and 14M lanes x 128 dims in a
    DLRM-dcnv2 step on the GPU), yet once a job has run a while most lanes are known IDs.
    So the new lanes are compacted to the front and the initializer runs over them in
    chunks of m lanes: zero iterations when nothing is new, and at most `chunk_elems`
    random words live at once (the candidates of a whole step's lanes would be
    [N, 8, dim] uint32, 14 GB for 3.5M lanes at dim 128). Each value
    depends on its own (table, id) only, so chunking changes no bit.

    On the GPU a step small enough for one chunk computes every lane instead, with no loop:
    a data-dependent loop costs a device -> host round trip per iteration, which in a
    DeepFM-sized step (~2 ms, latency-bound) is worth more than the initializer's work.
    """
    n, dim = ids.shape[0], embedding.shape[1]
    r = embedding.shape[0]
    per_lane = dim * (TRUNCATION_DRAWS if init.kind == "truncated_normal" else 1)
    if n * per_lane <= chunk_elems and jax.default_backend() != "cpu":
        rows = initial_rows(init, tables, ids, dim, seed)
        return embedding.at[jnp.where(new, targets, r)].set(rows.astype(embedding.dtype), mode="drop")
    # Chunks of ~1/8 of the lanes: a step with a few new IDs computes 1/8 of the work.
    m = max(1, min(n, chunk_elems // per_lane, max(1024, -(-n // 8))))
    k = -(-n // m)
    rank = jnp.cumsum(new, dtype=jnp.int32) - 1
    order = jnp.full(k * m, n, jnp.int32).at[jnp.where(new, rank, k * m)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")  # new lanes first, then n (padding)
    num_chunks = -(-jnp.sum(new, dtype=jnp.int32) // m)

    def chunk(c, emb):
        lanes = jax.lax.dynamic_slice(order, (c * m,), (m,))
        live = lanes < n
        lanes = jnp.where(live, lanes, 0)
        rows = initial_rows(init, tables[lanes], ids[lanes], dim, seed)
        return emb.at[jnp.where(live, targets[lanes], r)].set(rows.astype(emb.dtype), mode="drop")

    return jax.lax.fori_loop(0, num_chunks, chunk, embedding)


def _initial_rows(init: Initializer, tables: jax.Array, ids: jax.Array, dim: int, seed: int) -> jax.Array:
    streams = row_streams(tables, ids, seed)
    if init.kind in ("uniform", "xavier_uniform"):
        lim = math.sqrt(6.0 / (init.fan_in + dim))
        lo, hi = (init.minval, init.maxval) if init.kind == "uniform" else (-lim, lim)
        z = _unit(stream_bits(streams, dim))
        shift, scale = lo, hi - lo
    elif init.kind == "truncated_normal":
        draws = _normal(streams, (TRUNCATION_DRAWS, dim))  # [N, K, dim]
        inside = (draws >= init.a) & (draws <= init.b)
        first = jnp.argmax(inside, axis=1)  # [N, dim]; 0 when none is inside
        any_inside = jnp.any(inside, axis=1)
        picked = jnp.take_along_axis(draws, first[:, None, :], axis=1)[:, 0]
        z = jnp.where(any_inside, picked, jnp.clip(draws[:, -1], _f32(init.a), _f32(init.b)))
        shift, scale = init.mean, init.std
    else:  # normal, xavier_normal
        z = _normal(streams, (dim,))
        shift, scale = (init.mean, init.std) if init.kind == "normal" else (0.0, math.sqrt(2.0 / (init.fan_in + dim)))
    z = jax.lax.optimization_barrier(z)
    scaled = jax.lax.optimization_barrier(_f32(scale) * z)
    return scaled + _f32(shift)


def _unit(bits: jax.Array) -> jax.Array:
    """uint32 bits -> float32 uniform in [0, 1), exactly: 23 random mantissa bits."""
    one_to_two = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    return one_to_two - _f32(1.0)


def _normal(streams: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[N, *shape] standard normals by Box-Muller, with no multiply-add to contract.

    Each pair of uniforms gives two independent normals, r cos(t) and r sin(t): the
    first half of the values are the cosines, the second half the sines."""
    total = math.prod(shape)
    half = -(-total // 2)
    bits = stream_bits(streams, 2 * half)
    u1 = _f32(1.0) - _unit(bits[:, :half])  # (0, 1]: log is finite
    t = _f32(2.0 * math.pi) * _unit(bits[:, half:])
    r = jnp.sqrt(_f32(-2.0) * jnp.log(u1))
    if jax.default_backend() == "cpu":
        # XLA:CPU fuses the concatenation per output element, recomputing the log and
        # the sqrt for the sine half (9 -> 6 ms for 106k new rows of dim 9, same bits).
        r, t = jax.lax.optimization_barrier((r, t))
    z = jnp.concatenate([r * jnp.cos(t), r * jnp.sin(t)], axis=1)[:, :total]
    return z.reshape((streams.shape[0],) + shape)


def _f32(x: float) -> jax.Array:
    # Python floats become float64 constants under x64; keep the init math float32.
    return jnp.asarray(x, jnp.float32)
