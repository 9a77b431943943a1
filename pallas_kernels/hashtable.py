"""Hashtable index probes: `find` and the insert of missing keys, as Pallas-Triton kernels.

Both work on the index arrays of `recis_jax.embedding.hashtable.HashTableState`, unchanged:

    slot_keys int64 [S], slot_tables int32 [S], slot_rows int32 [S], slot_state int8 [S]
    (EMPTY 0 / LIVE 1 / TOMBSTONE 2), S a power of two,

with the same slot hash (splitmix64 of id ^ table * golden, mod S) and the same linear
probing bounded by `max_probes`, so an index written by one implementation is read by the
other. Public functions dispatch (`pallas_kernels.dispatch`): the kernel on GPU, the XLA
code of `recis_jax.embedding.hashtable` (the reference, `*_reference`) elsewhere.

    find(index, tables, keys, valid)                        -> FindResult(rows, found, slot)
    insert(index, tables, keys, rows, need, decide=...)     -> InsertResult(index, placed,
                                                               was_tombstone, overflow)
    find_or_insert(index, tables, keys, valid, free_rows, num_free)
                                                            -> (index, FindOrInsertResult)

Kernel design (jax 0.11.2 Pallas-Triton; see docs/ARCHITECTURE.md "toolchain"):

* 1-D grid over blocks of lanes (a power-of-two block, the last block masked). The index
  arrays are passed whole (S is a power of two) and read with masked vector gathers.
* find: per lane a vector `while_loop` (cond written as a sum; it ends when every lane of
  the block is done or after max_probes) over consecutive slots: load the state byte, for
  LIVE slots the key, and only where the key matches the table id; an EMPTY slot ends
  the chain, tombstones are stepped over. The row is loaded once after the loop.
* insert (of deduplicated misses, rows allocated by the caller in lane order):
  claiming a slot needs an atomic, and Triton has none on int8 (the state byte), while
  XLA's bitcast of int8 [S] to int32 [S/4] is an elementwise pass over S, not a view.
  The claim word is therefore `slot_rows` (int32), whose values are row ids in
  [0, 2^31) in every slot, live or not (create zero-fills them). Sign bit = "claimed in
  this call": a lane that sees a non-LIVE state byte does
  `prev = atomic_xchg(slot_rows[pos], INT32_MIN | lane)`; prev >= 0 means it is the first
  and owns the slot; the sign stays set until the call ends, so every later claimer
  loses and probes on. The kernel writes nothing else. After it, XLA decides overflow
  (a lane found no slot within max_probes, or the caller's `decide` says so, e.g. rows
  exhausted or another shard overflowed) and then either commits (scatter keys,
  tables, rows and LIVE to the owned slots, which also clears the sign) or undoes
  (scatter each owner's `prev` back): on overflow the returned index is bitwise the
  input. All scatters and the kernel are in place when the caller donates the state.
* Config.width > 1 (opt-in, interpret-tested, not yet compiled on a GPU): each probe
  step examines `width` consecutive slots ([block, width] gathers; the state bytes share
  a sector), so long chains (load 0.8) cost fewer dependent round trips. Keys are
  loaded only for LIVE slots before the first EMPTY one; the insert claims the first
  free slot of the window and, if it loses, goes on after it.
* Measured on an H100 (benchmarks/results/ops_hashtable_h100.md, 64M-slot 1.14 GB
  index, 4M lanes): find 5.4e9 keys/s at load 0.5 (XLA 1.8e8), 4.2e9 at 0.8 (XLA
  2.3e7); the index find_or_insert 2.2e9 (half new keys) at 0.5 (XLA 1.6e7), 9.7e8 at
  0.8 (XLA 1.9e6). The limit is random-sector throughput: a hit reads 4 sectors of 4
  separate arrays (state, key, table, row) and the GPU did 2.4e10 random 4-byte
  gathers/s from 1 GB, so find <= 6e9 hits/s with this layout (reached 90%); an
  insert adds an atomic and 4 scattered writes.
* Rejected after measuring (H100): loading the key beside the state and the row beside
  the table ("spec": hits unchanged, misses 25% slower) and writing key/table/state
  from the claim kernel instead of XLA scatters ("write": 3x slower; the acq_rel
  xchg that Pallas emits serialises the stores after it).
* Interpret mode (CPU tests) implements neither atomic_xchg nor masked atomics, and a
  vector store with duplicate indices is not atomic there; grid steps do run in
  sequence. Its claim is exact instead by construction: a [block, block] comparison
  finds, per slot, the lowest candidate lane of the block, and every lane that points
  at that slot stores the same value (the owner's tag), so duplicates agree.

Differences from the XLA path (documented, tested): the XLA insert places keys in rounds
where the lowest lane wins a contested slot, so placement is deterministic; the kernel's
placement depends on which atomic lands first. Slots are internal: the rows (allocated
in lane order outside the kernel), the embedding values and every lookup result are the
same, but `slot_*`, `row_slot` and the `slot` of a find can differ between runs on a
GPU. Whether a lane exceeds max_probes can depend on placement, so near the probe bound
the two paths can disagree about overflow (never about correctness: on overflow
nothing is written).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch

EMPTY, LIVE, TOMBSTONE = 0, 1, 2  # == recis_jax.embedding.hashtable (checked in tests)
_I64 = lambda v: np.uint64(v).view(np.int64)  # noqa: E731  uint64 constant as int64 bits
_GOLDEN = _I64(0x9E3779B97F4A7C15)
_M1 = _I64(0xBF58476D1CE4E5B9)
_M2 = _I64(0x94D049BB133111EB)
_CLAIMED = np.int32(np.iinfo(np.int32).min)  # sign bit of a slot_rows word


class Index(NamedTuple):
    """The index part of a HashTableState (same arrays, same meaning)."""

    slot_keys: jax.Array
    slot_tables: jax.Array
    slot_rows: jax.Array
    slot_state: jax.Array

    @property
    def num_slots(self) -> int:
        return self.slot_keys.shape[0]

    @classmethod
    def of(cls, state) -> "Index":
        """The index arrays of a HashTableState (or anything with slot_* fields)."""
        return cls(state.slot_keys, state.slot_tables, state.slot_rows, state.slot_state)


class FindResult(NamedTuple):
    """rows int32 [N] (0 where not found), found bool [N], slot int32 [N] (-1 if not);
    the field order of recis_jax.embedding.hashtable.FindResult."""

    rows: jax.Array
    found: jax.Array
    slot: jax.Array


class InsertResult(NamedTuple):
    """index: the new index (bitwise the input on overflow); placed int32 [N]: the slot a
    need lane was given, -1 for others (on overflow: the tentative slot, nothing
    written there); was_tombstone bool [N]: that slot held a tombstone; overflow: bool
    scalar, nothing was written."""

    index: Index
    placed: jax.Array
    was_tombstone: jax.Array
    overflow: jax.Array


class FindOrInsertResult(NamedTuple):
    """rows int32 [N] (found or new; 0 for invalid lanes and on overflow for new ones),
    found bool [N], is_new bool [N], overflow bool, num_new int32 (0 on overflow)."""

    rows: jax.Array
    found: jax.Array
    is_new: jax.Array
    overflow: jax.Array
    num_new: jax.Array


class Config(NamedTuple):
    """Static launch configuration. block: lanes per program (a power of two); width:
    slots examined per probe step (a power of two; 1 = one slot per step). With
    width > 1 a step loads the state bytes of `width` consecutive slots at once (they
    share a 32-byte sector), so a long chain costs fewer dependent round trips."""

    block: int = 128
    num_warps: int = 4
    width: int = 1


# Defaults measured on an H100 (benchmarks/results/ops_hashtable_h100.md); width > 1 is
# tested in interpret mode only so far (not yet compiled on a GPU): opt in per call.
FIND_CONFIG = Config(block=64, num_warps=2, width=1)
CLAIM_CONFIG = Config(block=128, num_warps=4, width=1)


# ----------------------------------------------------------------------------- hash

def home_slot(tables: jax.Array, keys: jax.Array, num_slots: int) -> jax.Array:
    """int32 [N] first probe slot: splitmix64(id ^ table * golden) mod S, in int64
    arithmetic (logical shifts) so that the same code runs inside a Triton kernel; equal
    to recis_jax.embedding.hashtable.home_slot."""
    x = keys.astype(jnp.int64) ^ (tables.astype(jnp.int64) * _GOLDEN)
    x = (x ^ lax.shift_right_logical(x, jnp.int64(30))) * _M1
    x = (x ^ lax.shift_right_logical(x, jnp.int64(27))) * _M2
    x = x ^ lax.shift_right_logical(x, jnp.int64(31))
    return (x & jnp.int64(num_slots - 1)).astype(jnp.int32)


# ----------------------------------------------------------------------------- references

def _ht():
    # The XLA implementation lives with the table state; imported lazily because
    # recis_jax.embedding.hashtable dispatches to this module.
    from recis_jax.embedding import hashtable  # noqa: PLC0415

    return hashtable


def find_reference(index: Index, tables, keys, valid, *, max_probes: int = 128) -> FindResult:
    """XLA `find` (recis_jax.embedding.hashtable._find_xla)."""
    r = _ht()._find_xla(index, tables, keys, valid, max_probes)
    return FindResult(r.rows, r.found, r.slot)


def insert_reference(index: Index, tables, keys, rows, need, *, max_probes: int = 128,
                     decide: Callable[[jax.Array], jax.Array] | None = None) -> InsertResult:
    """XLA insert: places every `need` lane (keys unique among need lanes and absent
    from the index) in a free slot within max_probes of home, lowest lane first, with
    row `rows[lane]`. overflow = decide(probe_overflow) (default: probe_overflow); on
    overflow nothing is written."""
    ht = _ht()
    placed, tomb, probe_overflow = ht._claim_slots(index, tables, keys, need, max_probes)
    overflow = decide(probe_overflow) if decide is not None else probe_overflow
    ok = need & ~overflow
    new = Index(**ht._write_slots(index, ok, placed, tables, keys, rows))
    return InsertResult(new, placed, tomb, overflow)


# ----------------------------------------------------------------------------- kernels

def _lanes(block: int, n: int):
    """Global lane ids of this program [block] and the in-bounds mask (None if every
    block is full)."""
    offs = pl.program_id(0) * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
    return offs, (offs < n) if n % block else None


def _load(ref, mask, other):
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=other)


def _store(ref, val, mask):
    if mask is None:
        plgpu.store(ref, val)
    else:
        plgpu.store(ref, val, mask=mask)


def _window(pos, width, s):
    """Slots pos .. pos + width - 1 (mod S) of each lane: [block, width] int32, and the
    offsets 0 .. width - 1 [width]."""
    j = lax.broadcasted_iota(jnp.int32, (width,), 0)
    return (pos[:, None] + j[None, :]) & (s - 1), j


def _first(mask, j, width):
    """Per row, the first offset where mask [block, width] holds, or width."""
    return jnp.min(jnp.where(mask, j[None, :], width), axis=1)


def _find_kernel(t_ref, k_ref, v_ref, sk_ref, st_ref, sr_ref, ss_ref, rows_ref, found_ref, slot_ref,
                 *, n, s, block, max_probes, width):
    # t_ref/k_ref/v_ref: [block] lanes (tables i32, keys i64, valid i8); s*_ref: [S] index.
    _, inb = _lanes(block, n)
    t = _load(t_ref, inb, jnp.int32(0))                                   # [block] i32
    k = _load(k_ref, inb, jnp.int64(0))                                   # [block] i64
    v = _load(v_ref, inb, jnp.int8(0)) != 0                               # [block] bool
    if inb is not None:
        v = v & inb

    def cond(c):
        i, _, active, _ = c
        return (i < max_probes) & (jnp.sum(active.astype(jnp.int32)) > 0)

    def body1(c):  # one slot per step
        i, pos, active, slot = c
        st = plgpu.load(ss_ref.at[pos], mask=active, other=jnp.int8(EMPTY))    # [block] i8
        live = active & (st == LIVE)
        kk = plgpu.load(sk_ref.at[pos], mask=live, other=jnp.int64(0))          # [block] i64
        km = live & (kk == k)
        tt = plgpu.load(st_ref.at[pos], mask=km, other=jnp.int32(0))            # [block] i32
        hit = km & (tt == t)
        slot = jnp.where(hit, pos, slot)
        # An empty slot ends the chain; tombstones are stepped over.
        active = active & ~hit & (st != EMPTY)
        return i + 1, (pos + 1) & (s - 1), active, slot

    def body_w(c):  # `width` consecutive slots per step (state bytes share a sector)
        i, pos, active, slot = c
        p, j = _window(pos, width, s)                                     # [block, width]
        a2 = active[:, None] & ((i + j)[None, :] < max_probes)
        st = plgpu.load(ss_ref.at[p], mask=a2, other=jnp.int8(EMPTY))    # [block, width] i8
        end = _first(st == EMPTY, j, width)                               # [block] chain end
        live = a2 & (st == LIVE) & (j[None, :] < end[:, None])
        kk = plgpu.load(sk_ref.at[p], mask=live, other=jnp.int64(0))      # [block, width] i64
        km = live & (kk == k[:, None])
        tt = plgpu.load(st_ref.at[p], mask=km, other=jnp.int32(0))        # [block, width] i32
        jh = _first(km & (tt == t[:, None]), j, width)                    # [block]
        hit = active & (jh < width)
        slot = jnp.where(hit, (pos + jh) & (s - 1), slot)
        active = active & ~hit & (end == width)
        return i + width, (pos + width) & (s - 1), active, slot

    init = (jnp.int32(0), home_slot(t, k, s), v, jnp.full((block,), -1, jnp.int32))
    _, _, _, slot = lax.while_loop(cond, body1 if width == 1 else body_w, init)
    found = slot >= 0
    rows = plgpu.load(sr_ref.at[jnp.maximum(slot, 0)], mask=found, other=jnp.int32(0))
    _store(rows_ref, rows, inb)
    _store(found_ref, found.astype(jnp.int8), inb)
    _store(slot_ref, slot, inb)


def _claim_kernel(t_ref, k_ref, need_ref, ss_ref, _sr_in_ref, placed_ref, prev_ref, tomb_ref, lost_ref,
                  sr_ref, *, n, s, block, max_probes, interpret, width):
    # Lanes [block]: tables i32, keys i64, need i8. ss_ref: [S] state (read only).
    # sr_ref: [S] slot_rows, the output aliased to the input _sr_in_ref; all reads and
    # writes go through the output (in interpret mode the input ref keeps the old values).
    offs, inb = _lanes(block, n)
    lane = lax.broadcasted_iota(jnp.int32, (block,), 0)
    t = _load(t_ref, inb, jnp.int32(0))
    k = _load(k_ref, inb, jnp.int64(0))
    need = _load(need_ref, inb, jnp.int8(0)) != 0
    if inb is not None:
        need = need & inb
    tag = _CLAIMED | offs                                                 # [block] i32, < 0
    base = pl.program_id(0) * block  # read outside the loop (interpret mode needs that)

    def claim_atomic(pos, cand):
        prev = plgpu.atomic_xchg(sr_ref, (pos,), tag, mask=cand)         # [block] i32
        return cand & (prev >= 0), prev

    def claim_interpret(pos, cand):
        cur = sr_ref[pos]                                                 # [block] i32
        cand = cand & (cur >= 0)
        match = (pos[:, None] == pos[None, :]) & cand[None, :]             # [block, block]
        first = jnp.min(jnp.where(match, lane[None, :], block), axis=1)   # [block]
        owner = cand & (first == lane)
        # Every lane pointing at a slot writes the same value: duplicates agree.
        sr_ref[pos] = jnp.where(first < block, _CLAIMED | (base + first), cur)
        return owner, cur

    claim = claim_interpret if interpret else claim_atomic

    def cond1(c):
        i, _, active, *_ = c
        return (i < max_probes) & (jnp.sum(active.astype(jnp.int32)) > 0)

    def body1(c):  # one slot per step
        i, pos, active, placed, prev, tomb = c
        st = plgpu.load(ss_ref.at[pos], mask=active, other=jnp.int8(LIVE))     # [block] i8
        owner, old = claim(pos, active & (st != LIVE))
        placed = jnp.where(owner, pos, placed)
        prev = jnp.where(owner, old, prev)
        tomb = jnp.where(owner, st == TOMBSTONE, tomb)
        active = active & ~owner
        return i + 1, jnp.where(active, (pos + 1) & (s - 1), pos), active, placed, prev, tomb

    def cond_w(c):
        _, _, active, *_ = c
        return jnp.sum(active.astype(jnp.int32)) > 0

    def body_w(c):  # scan `width` state bytes, claim the first free slot among them
        used, pos, active, placed, prev, tomb = c                         # used: [block] probes spent
        p, j = _window(pos, width, s)                                     # [block, width]
        a2 = active[:, None] & ((used[:, None] + j[None, :]) < max_probes)
        st = plgpu.load(ss_ref.at[p], mask=a2, other=jnp.int8(LIVE))     # [block, width] i8
        jf = _first(st != LIVE, j, width)                                 # [block]
        cand = active & (jf < width)
        cpos = (pos + jnp.minimum(jf, width - 1)) & (s - 1)
        cst = jnp.sum(jnp.where(j[None, :] == jf[:, None], st.astype(jnp.int32), 0), axis=1)
        owner, old = claim(cpos, cand)
        placed = jnp.where(owner, cpos, placed)
        prev = jnp.where(owner, old, prev)
        tomb = jnp.where(owner, cst == TOMBSTONE, tomb)
        # A lane that lost goes on after the slot it tried; one with no free slot in the
        # window, after the window.
        adv = jnp.where(cand, jf + 1, width)
        used = used + adv
        active = active & ~owner & (used < max_probes)
        return used, (pos + adv) & (s - 1), active, placed, prev, tomb

    zeros = jnp.zeros((block,), jnp.int32)
    init = (zeros if width > 1 else jnp.int32(0), home_slot(t, k, s), need,
            jnp.full((block,), -1, jnp.int32), zeros, jnp.zeros((block,), jnp.bool_))
    loop = (cond1, body1) if width == 1 else (cond_w, body_w)
    _, _, _, placed, prev, tomb = lax.while_loop(*loop, init)
    _store(placed_ref, placed, inb)
    _store(prev_ref, prev, inb)
    _store(tomb_ref, tomb.astype(jnp.int8), inb)
    _store(lost_ref, (need & (placed < 0)).astype(jnp.int8), inb)


def _lane_spec(block):
    return pl.BlockSpec((block,), lambda i: (i,))


def _whole_spec(s):
    return pl.BlockSpec((s,), lambda i: (0,))


@functools.partial(jax.jit, static_argnames=("max_probes", "config", "interpret"))
def _find_call(slot_keys, slot_tables, slot_rows, slot_state, tables, keys, valid, *, max_probes, config,
               interpret):
    n, s, block = keys.shape[0], slot_keys.shape[0], config.block
    kernel = functools.partial(_find_kernel, n=n, s=s, block=block, max_probes=max_probes,
                               width=min(config.width, s))
    rows, found, slot = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int8),
                   jax.ShapeDtypeStruct((n,), jnp.int32)),
        grid=(pl.cdiv(n, block),),
        in_specs=[_lane_spec(block)] * 3 + [_whole_spec(s)] * 4,
        out_specs=(_lane_spec(block),) * 3,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="hashtable_find",
    )(tables.astype(jnp.int32), keys.astype(jnp.int64), valid.astype(jnp.int8),
      slot_keys, slot_tables, slot_rows, slot_state)
    return FindResult(rows, found != 0, slot)


@functools.partial(jax.jit, static_argnames=("max_probes", "config", "interpret"))
def _claim_call(slot_state, slot_rows, tables, keys, need, *, max_probes, config, interpret):
    n, s, block = keys.shape[0], slot_state.shape[0], config.block
    kernel = functools.partial(_claim_kernel, n=n, s=s, block=block, max_probes=max_probes,
                               interpret=interpret, width=min(config.width, s))
    placed, prev, tomb, lost, claimed_rows = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32),
                   jax.ShapeDtypeStruct((n,), jnp.int8), jax.ShapeDtypeStruct((n,), jnp.int8),
                   jax.ShapeDtypeStruct((s,), jnp.int32)),
        grid=(pl.cdiv(n, block),),
        in_specs=[_lane_spec(block)] * 3 + [_whole_spec(s)] * 2,
        out_specs=(_lane_spec(block),) * 4 + (_whole_spec(s),),
        input_output_aliases={4: 4},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="hashtable_claim",
    )(tables.astype(jnp.int32), keys.astype(jnp.int64), need.astype(jnp.int8), slot_state, slot_rows)
    return placed, prev, tomb != 0, lost, claimed_rows


def _config(config, default, interpret, n):
    cfg = config or default
    if interpret:  # interpret-mode claim builds [block, block]; keep it small
        cfg = cfg._replace(block=min(cfg.block, 128))
    # no more lanes per program than the (power-of-two rounded) batch
    return cfg._replace(block=max(16, min(cfg.block, 1 << max(n - 1, 0).bit_length())))


def find_pallas(index: Index, tables, keys, valid, *, max_probes: int = 128, interpret: bool = False,
                config: Config | None = None) -> FindResult:
    """The kernel path of `find` (compiled on GPU, or interpret mode)."""
    n = keys.shape[0]
    if n == 0:
        return FindResult(jnp.zeros(0, jnp.int32), jnp.zeros(0, bool), jnp.zeros(0, jnp.int32))
    cfg = _config(config, FIND_CONFIG, interpret, n)
    return _find_call(*index, tables, keys, valid, max_probes=int(max_probes), config=cfg,
                      interpret=interpret)


def insert_pallas(index: Index, tables, keys, rows, need, *, max_probes: int = 128,
                  decide: Callable[[jax.Array], jax.Array] | None = None, interpret: bool = False,
                  config: Config | None = None) -> InsertResult:
    """The kernel path of `insert`; see `insert_reference` for the contract and the
    module docstring for the claim protocol and how placement differs."""
    n, s = keys.shape[0], index.num_slots
    if n == 0:
        po = jnp.asarray(False)
        return InsertResult(index, jnp.zeros(0, jnp.int32), jnp.zeros(0, bool),
                            decide(po) if decide is not None else po)
    cfg = _config(config, CLAIM_CONFIG, interpret, n)
    placed, prev, tomb, lost, claimed_rows = _claim_call(index.slot_state, index.slot_rows, tables, keys,
                                                         need, max_probes=int(max_probes), config=cfg,
                                                         interpret=interpret)
    # Counted from the kernel's own flag, not from `need & (placed < 0)`: XLA made that
    # reduction the root of a multi-output fusion with dozens of lane-wise siblings
    # reading `need` / `placed`, all under the reduction's few blocks (47% of an H200
    # DeepFM step, benchmarks/results/trace_deepfm_h200.md).
    probe_overflow = jnp.max(lost) > 0
    overflow = decide(probe_overflow) if decide is not None else probe_overflow
    has = placed >= 0
    commit = jnp.where(has & ~overflow, placed, s)
    # Owned slots' rows: the new row (commit) or the pre-claim value (undo); both clear
    # the claim bit. Other arrays are written only on commit.
    slot_rows = claimed_rows.at[jnp.where(has, placed, s)].set(
        jnp.where(overflow, prev, rows.astype(jnp.int32)), mode="drop")
    new = Index(
        slot_keys=index.slot_keys.at[commit].set(keys.astype(jnp.int64), mode="drop"),
        slot_tables=index.slot_tables.at[commit].set(tables.astype(jnp.int32), mode="drop"),
        slot_rows=slot_rows,
        slot_state=index.slot_state.at[commit].set(jnp.int8(LIVE), mode="drop"),
    )
    return InsertResult(new, placed, tomb, overflow)


# ----------------------------------------------------------------------------- public ops

def find(index: Index, tables, keys, valid, *, max_probes: int = 128, impl: str | None = None) -> FindResult:
    """Read-only lookup of (tables [N] int32, keys [N] int64) where valid [N] bool, within
    max_probes slots of home. Duplicate keys in a batch are fine."""
    which = dispatch.resolve(impl)
    if which == "reference":
        return find_reference(index, tables, keys, valid, max_probes=max_probes)
    return find_pallas(index, tables, keys, valid, max_probes=max_probes, interpret=(which == "interpret"))


def insert(index: Index, tables, keys, rows, need, *, max_probes: int = 128,
           decide: Callable[[jax.Array], jax.Array] | None = None, impl: str | None = None) -> InsertResult:
    """Inserts the `need` lanes (keys unique among them and absent from the index, e.g.
    the misses of a deduplicated `find`) with rows `rows` [N] int32. See
    `insert_reference`; on overflow nothing is written (the index comes back bitwise
    unchanged, in place under donation)."""
    which = dispatch.resolve(impl)
    if which == "reference":
        return insert_reference(index, tables, keys, rows, need, max_probes=max_probes, decide=decide)
    return insert_pallas(index, tables, keys, rows, need, max_probes=max_probes, decide=decide,
                         interpret=(which == "interpret"))


def find_or_insert(index: Index, tables, keys, valid, free_rows, num_free, *, max_probes: int = 128,
                   impl: str | None = None) -> tuple[Index, FindOrInsertResult]:
    """Index-only find_or_insert (what HashTable.find_or_insert does to the index): find,
    then insert the misses with rows popped from the free stack `free_rows[:num_free]`
    in lane order (row ids do not depend on slot placement). Keys unique among valid
    lanes. The caller pops: num_free -= num_new. Overflow (rows or probes exhausted):
    index unchanged, num_new 0."""
    which = dispatch.resolve(impl)
    f = find(index, tables, keys, valid, max_probes=max_probes, impl=which)
    need = valid & ~f.found
    num_new = jnp.sum(need, dtype=jnp.int32)
    rows_overflow = num_new > num_free
    need = need & ~rows_overflow
    rank = jnp.cumsum(need, dtype=jnp.int32) - 1
    new_rows = free_rows[jnp.clip(num_free - 1 - rank, 0, free_rows.shape[0] - 1)]
    ins = insert(index, tables, keys, new_rows, need, max_probes=max_probes,
                 decide=lambda po: po | rows_overflow, impl=which)
    ok = need & ~ins.overflow
    rows = jnp.where(f.found, f.rows, jnp.where(ok, new_rows, 0))
    return ins.index, FindOrInsertResult(rows, f.found, ok, ins.overflow, jnp.where(ins.overflow, 0, num_new))
