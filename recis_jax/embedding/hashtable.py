"""Collision-free dynamic hashtable: int64 IDs -> rows of a preallocated slab.

The table is *state*, a pytree of arrays passed into and returned from the jitted step
(donated, so updates happen in place). Two parts:

  index (S slots, S a power of two, load kept <= ~0.5 by the host):
    slot_keys int64 [S], slot_tables int32 [S] - the exact key (table index, id)
    slot_rows int32 [S] - the slab row of a live slot
    slot_state int8 [S] - EMPTY / LIVE / TOMBSTONE (occupancy lives apart from keys, so
                          every int64, -1 and INT64_MIN included, is a valid ID)
  rows (R rows, fixed at creation from a memory budget; never copied to grow):
    embedding [R, dim] (float32 or bfloat16), optimizer slots {name: [R, ...]} and
    their initial row values slot_defaults {name: [...]},
    row_keys int64 [R], row_tables int32 [R], row_slot int32 [R], row_live bool [R],
    last_seen int32 [R] (step of the last lookup), count int64 [R] (occurrences),
    free_rows int32 [R] (a stack; free_rows[:num_free] are free), num_free, num_tombstones,
    step int32 (this table's optimizer step counter)

Open addressing with linear probing from a splitmix64 hash of (table, id). Lookups and
inserts are vectorised `while_loop`s over the batch's lanes, bounded by `max_probes`,
that carry only [N] arrays; the index is written by one scatter per array after the
loop: work per call is proportional to the batch, never to S or R. Inserts place keys
in rounds; when several lanes want one free slot, the lowest lane wins (a sort), so
placement is deterministic. Row ids come from the free stack in lane
order. If the rows or the probes run out, *nothing* is written (claimed slots are
never written) and the call reports overflow; the host grows the index (`rebuild_index`) or
evicts, then reruns the step.

On a GPU, `find`, the index insert of `find_or_insert` and `rebuild_index` run the
Pallas-Triton kernels of `pallas_kernels.hashtable` instead (dispatch: RECIS_KERNELS =
auto | reference | pallas | interpret; the code above is their reference). Same arrays,
hash and probing, so states are interchangeable. One difference: the kernel claims slots
with atomics, so *which slot* a new key gets (slot_*, row_slot) can vary between GPU runs;
row ids are still allocated in lane order outside the kernel, so rows, embedding values
and every lookup result are identical. Near max_probes the two paths can disagree about
probe overflow (placement-dependent); either way nothing is written on overflow. The
kernel keeps a claim bit in the sign of slot_rows during a call: row ids must stay in
[0, 2^31), which they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels import hashtable as ph
from recis_jax.embedding.initializers import Initializer, write_initial_rows
from recis_jax.sorting import sort_u64

EMPTY, LIVE, TOMBSTONE = 0, 1, 2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """Static description of one physical table (hashable: a jit static argument).

    name: table name; dim: embedding width; dtype: storage ("float32" | "bfloat16",
    optimizer math is float32 either way); initializer, seed: new-row values;
    max_probes: longest probe sequence before an insert reports overflow.
    stream_ids: per table index, the id of its initializer stream (default: the index).
      Merged tables pass a stable hash of each logical table's name, so a row starts at
      the same value whether or not its table is merged with others.
    """

    name: str
    dim: int
    dtype: str = "float32"
    initializer: Initializer = Initializer()
    seed: int = 0
    max_probes: int = 128
    stream_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"table {self.name!r}: dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_probes < 1:
            raise ValueError(f"table {self.name!r}: max_probes must be >= 1")


class HashTableState(NamedTuple):
    """See the module docstring for every field."""

    slot_keys: jax.Array
    slot_tables: jax.Array
    slot_rows: jax.Array
    slot_state: jax.Array
    embedding: jax.Array
    slots: dict
    slot_defaults: dict
    row_keys: jax.Array
    row_tables: jax.Array
    row_slot: jax.Array
    row_live: jax.Array
    last_seen: jax.Array
    count: jax.Array
    free_rows: jax.Array
    num_free: jax.Array
    num_tombstones: jax.Array
    step: jax.Array

    @property
    def capacity(self) -> int:
        """Slab rows R (static)."""
        return self.embedding.shape[0]

    @property
    def num_slots(self) -> int:
        """Index slots S (static)."""
        return self.slot_keys.shape[0]


def bytes_per_row(dim: int, dtype: str = "float32", slot_floats_per_row: int = 0, slots_per_row: float = 2.0) -> float:
    """Device bytes per slab row: embedding + optimizer slot floats + row metadata
    (key 8, table 4, slot 4, live 1, last_seen 4, count 8, free 4) + index slots per row
    (key 8, table 4, row 4, state 1 = 17 bytes each)."""
    emb = dim * (2 if dtype == "bfloat16" else 4)
    return emb + 4 * slot_floats_per_row + 33 + 17 * slots_per_row


def create(config: TableConfig, num_rows: int, num_slots: int | None = None, slot_init: dict | None = None
           ) -> HashTableState:
    """An empty table with R = num_rows slab rows and S index slots (default the power of
    two >= 2R, load <= 0.5 when full).

    slot_init: optimizer slots for the whole slab, {name: [R, ...]} (from the sparse
    optimizer's `init`), or None. Their row 0 is kept as the value a reused row's
    slots are reset to.
    """
    if num_rows < 1:
        raise ValueError(f"table {config.name!r}: num_rows must be >= 1")
    s = _pow2(num_slots if num_slots is not None else 2 * num_rows)
    dt = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return HashTableState(
        slot_keys=jnp.zeros(s, jnp.int64),
        slot_tables=jnp.zeros(s, jnp.int32),
        slot_rows=jnp.zeros(s, jnp.int32),
        slot_state=jnp.zeros(s, jnp.int8),
        embedding=jnp.zeros((num_rows, config.dim), dt),
        slots=dict(slot_init or {}),
        slot_defaults={name: v[0] for name, v in (slot_init or {}).items()},
        row_keys=jnp.zeros(num_rows, jnp.int64),
        row_tables=jnp.zeros(num_rows, jnp.int32),
        row_slot=jnp.zeros(num_rows, jnp.int32),
        row_live=jnp.zeros(num_rows, bool),
        last_seen=jnp.zeros(num_rows, jnp.int32),
        count=jnp.zeros(num_rows, jnp.int64),
        # Popped from the top: rows are handed out 0, 1, 2, ... in a fresh table.
        free_rows=jnp.arange(num_rows - 1, -1, -1, dtype=jnp.int32),
        num_free=jnp.asarray(num_rows, jnp.int32),
        num_tombstones=jnp.asarray(0, jnp.int32),
        step=jnp.asarray(0, jnp.int32),
    )


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def home_slot(tables: jax.Array, keys: jax.Array, num_slots: int) -> jax.Array:
    """int32 [N] first probe position: splitmix64(id ^ table * golden) mod S."""
    x = jax.lax.bitcast_convert_type(keys.astype(jnp.int64), jnp.uint64)
    x = x ^ (tables.astype(jnp.uint64) * _GOLDEN)
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> 31)
    return (x & np.uint64(num_slots - 1)).astype(jnp.int32)


class FindResult(NamedTuple):
    """rows int32 [N] (0 where not found), found bool [N], slot int32 [N] (-1 if not)."""

    rows: jax.Array
    found: jax.Array
    slot: jax.Array


def find(state: HashTableState, tables: jax.Array, keys: jax.Array, valid: jax.Array,
         max_probes: int = 128) -> FindResult:
    """Read-only lookup of (tables [N] int32, keys [N] int64) where valid [N].

    Dispatches (pallas_kernels.dispatch, env RECIS_KERNELS): the Pallas-Triton probe
    kernel of pallas_kernels.hashtable on GPU, `_find_xla` elsewhere."""
    which = dispatch.resolve()
    if which == "reference":
        return _find_xla(state, tables, keys, valid, max_probes)
    r = ph.find_pallas(ph.Index.of(state), tables, keys, valid, max_probes=max_probes,
                       interpret=(which == "interpret"))
    return FindResult(r.rows, r.found, r.slot)


def _find_xla(state, tables: jax.Array, keys: jax.Array, valid: jax.Array, max_probes: int = 128) -> FindResult:
    """The XLA find (the reference of the kernel): a vectorised while_loop over the lanes.
    `state`: a HashTableState or pallas_kernels.hashtable.Index.

    Most lanes end in the first round or two while the longest chain sets the number of
    rounds, so once at most N / 8 lanes are active the rest run over those compacted, and
    so on (`_tiers`)."""
    s = state.num_slots
    n = keys.shape[0]

    def rounds(c, keys, tables, more_than):
        """Probe rounds over c's lanes while more than `more_than` are active."""

        def body(c):
            i, pos, active, slot, row, found = c
            st = state.slot_state[pos]
            hit = active & (st == LIVE) & (state.slot_keys[pos] == keys) & (state.slot_tables[pos] == tables)
            # Rows are read inside the loop: a read after it would not be ordered before a
            # later in-place write of slot_rows, and XLA would copy the [S] array to be safe.
            row = jnp.where(hit, state.slot_rows[pos], row)
            # An empty slot ends the chain; tombstones are stepped over.
            active = active & ~hit & (st != EMPTY)
            return i + 1, (pos + 1) & (s - 1), active, jnp.where(hit, pos, slot), row, found | hit

        return jax.lax.while_loop(lambda c: (c[0] < max_probes) & (jnp.sum(c[2], dtype=jnp.int32) > more_than),
                                  body, c)

    tiers = _tiers(n)
    init = (jnp.int32(0), home_slot(tables, keys, s), valid, jnp.full(n, -1, jnp.int32), jnp.zeros(n, jnp.int32),
            jnp.zeros(n, bool))
    i, pos, active, slot, rows, found = rounds(init, keys, tables, tiers[1] if len(tiers) > 1 else 0)
    lanes = None  # the lanes of the current tier (None: all)
    for j, m in enumerate(tiers[1:], 1):
        lanes, tgt, c = _next_tier(lanes, n, m, i, pos, active)
        c = c + (jnp.full(m, -1, jnp.int32), jnp.zeros(m, jnp.int32), jnp.zeros(m, bool))
        i, pos, active, sub_slot, sub_rows, sub_found = rounds(
            c, keys[lanes], tables[lanes], tiers[j + 1] if j + 1 < len(tiers) else 0)
        rows, found = rows.at[tgt].set(sub_rows, mode="drop"), found.at[tgt].set(sub_found, mode="drop")
        slot = slot.at[tgt].set(sub_slot, mode="drop")
    return FindResult(rows, found, slot)


def _tiers(n: int) -> list[int]:
    """Lane counts of the rounds of `_find_xla` / `_claim_slots`: all N lanes, then the
    still active ones compacted into N / 8 lanes once at most that many are, then N / 64,
    ... (down to 64 lanes or fewer). A claim round sorts all its lanes: after the first
    round of a DeepFM step (106k lanes) a few thousand are active for 5-10 more rounds,
    which sorted 13k lanes each with one compaction and now sort 1.7k or 208."""
    tiers = [n]
    while tiers[-1] > 64:
        tiers.append(-(-tiers[-1] // 8))
    return tiers


def _next_tier(lanes, n: int, m: int, i, pos, active):
    """The active lanes of a tier compacted into the next one's m (`_tiers`): (lanes [m]
    the next tier's lanes among all n (clipped), tgt [m] the same with n for padding, the
    loop carry (i, pos [m], active [m])). Compacts the tier's own arrays (not all n lanes:
    a cumsum and a scatter over 106k lanes cost ~0.7 ms on a 2-core CPU)."""
    sub, subc, live = _compact(active, m)
    lanes = subc if lanes is None else lanes[subc]
    return lanes, jnp.where(live, lanes, n), (i, pos[subc], live)


def _compact(active: jax.Array, m: int):
    """The (at most m) active lanes in lane order: (sub [m] lane indices, n for padding;
    subc [m] the same clipped into range; live [m] not padding)."""
    n = active.shape[0]
    rank = jnp.cumsum(active, dtype=jnp.int32) - 1
    sub = jnp.full(m, n, jnp.int32).at[jnp.where(active, rank, m)].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return sub, jnp.minimum(sub, n - 1), sub < n


class InsertResult(NamedTuple):
    """rows int32 [N] for valid lanes (found or new), found bool [N] (was already
    there), is_new bool [N] (inserted now), overflow bool (nothing was written),
    num_new int32 (inserted; 0 on overflow)."""

    rows: jax.Array
    found: jax.Array
    is_new: jax.Array
    overflow: jax.Array
    num_new: jax.Array


def find_or_insert(config: TableConfig, state: HashTableState, tables: jax.Array, keys: jax.Array,
                   valid: jax.Array, counts: jax.Array | None = None, admit: jax.Array | None = None,
                   found: FindResult | None = None, now: jax.Array | None = None,
                   agree: Callable[[jax.Array], jax.Array] | None = None
                   ) -> tuple[HashTableState, InsertResult]:
    """Finds keys and inserts the missing ones, all on the device.

    Args:
      tables [N] int32, keys [N] int64: the keys, unique among valid lanes (dedup first,
        e.g. with `embedding.dedup.unique_keys`); ordering the lanes (as the dedup does)
        makes placement deterministic.
      valid [N] bool: lanes to process.
      counts [N] int: occurrences per key this step (LFU counts; default 1).
      admit [N] bool: missing keys that may get a row (admission); others are left out
        and reported as not found (rows 0, is_new False). Default: all.
    Marks every found or inserted row as seen at `state.step` and adds its count. On
    overflow (rows or probes exhausted) returns the state unchanged.
    """
    n = keys.shape[0]
    found = find(state, tables, keys, valid, config.max_probes) if found is None else found
    need = valid & ~found.found
    if admit is not None:
        need = need & admit
    num_new = jnp.sum(need, dtype=jnp.int32)
    rows_overflow = num_new > state.num_free
    need = need & ~rows_overflow
    rank = jnp.cumsum(need, dtype=jnp.int32) - 1
    new_rows = state.free_rows[jnp.clip(state.num_free - 1 - rank, 0, state.capacity - 1)]

    def decide(probe_overflow):
        overflow = rows_overflow | probe_overflow
        return agree(overflow) if agree is not None else overflow

    # Index insert (dispatched: XLA rounds, or the Pallas claim kernel on GPU, which may
    # place keys in other slots; rows, values and lookups are the same either way).
    ins = ph.insert(ph.Index.of(state), tables, keys, new_rows, need, max_probes=config.max_probes,
                    decide=decide)
    placed, tomb, overflow = ins.placed, ins.was_tombstone, ins.overflow
    ok = need & ~overflow  # on overflow nothing below writes: the state comes back unchanged
    reused_tombstones = jnp.sum(ok & tomb, dtype=jnp.int32)
    state = state._replace(**ins.index._asdict(), num_tombstones=state.num_tombstones - reused_tombstones)

    # Row writes: new rows only, out-of-range target for masked lanes (dropped).
    r = state.capacity
    tgt = jnp.where(ok, new_rows, r)
    streams = jnp.asarray(config.stream_ids, jnp.int32)[tables] if config.stream_ids else tables
    slots = {name: v.at[tgt].set(jnp.broadcast_to(state.slot_defaults[name], (n,) + v.shape[1:]), mode="drop")
             for name, v in state.slots.items()}
    state = state._replace(
        embedding=write_initial_rows(config.initializer, state.embedding, tgt, streams, keys, ok, config.seed),
        slots=slots,
        row_keys=state.row_keys.at[tgt].set(keys, mode="drop"),
        row_tables=state.row_tables.at[tgt].set(tables, mode="drop"),
        row_slot=state.row_slot.at[tgt].set(placed, mode="drop"),
        row_live=state.row_live.at[tgt].set(True, mode="drop"),
        num_free=state.num_free - jnp.where(overflow, 0, num_new),
    )
    rows = jnp.where(found.found, found.rows, jnp.where(ok, new_rows, 0))
    seen = (found.found | ok) & ~overflow
    tgt = jnp.where(seen, rows, r)
    c = jnp.ones(n, jnp.int64) if counts is None else counts.astype(jnp.int64)
    c = jnp.where(ok, c, state.count[jnp.where(seen, rows, 0)] + c)  # new rows: no stale count
    stamp = state.step if now is None else jnp.asarray(now, jnp.int32)
    state = state._replace(
        last_seen=state.last_seen.at[tgt].set(stamp, mode="drop"),
        count=state.count.at[tgt].set(c, mode="drop"),
    )
    return state, InsertResult(rows, found.found, ok, overflow, jnp.where(overflow, 0, num_new))


def _claim_slots(state, tables, keys, need, max_probes):
    """Finds a free (EMPTY or TOMBSTONE) slot for each `need` lane, lowest lane first.

    Reads the index but does not write it: the probe loop carries only [N] arrays
    (carrying the [S] index through a while loop made XLA copy it every call, O(S)
    work per step). Each round sorts one key per lane for its slot of interest: the slot
    it placed earlier in this call (key 2 * slot: it blocks the slot) or the non-LIVE
    slot it probes while active (2 * slot + 1), then the lane. Per slot the placed lane
    sorts first, then the active lanes in lane order: the head of a run holds the slot
    (a new winner if it is active). Every lane lands within `max_probes` slots of home,
    where `find` looks.

    Most lanes are placed in the first round or two, while the longest probe chain sets
    the number of rounds (10-20), so once at most N / 8 lanes are active the rest run
    over those lanes compacted (in lane order: the same winners), and again at N / 64, ...
    (`_tiers`); the slots taken in a finished tier are the run heads of its last round's
    sorted keys, looked up by binary search.

    Returns (placed int32 [N]: slot per lane or -1, was_tombstone bool [N]: the placed
    slot held a tombstone, overflow: a need lane found none).
    """
    s = state.num_slots
    n = keys.shape[0]
    if s > (1 << 31):
        raise ValueError(f"the XLA insert handles up to 2^31 index slots, got {s}")
    # One uint64 per lane, (2 * slot + active) << 32 | lane: distinct, so a plain sort of
    # one array (on the CPU ~1.7x faster than a stable sort of a key and a lane array).
    none = jnp.uint64(np.iinfo(np.uint64).max)
    u64 = lambda x: x.astype(jnp.uint64)  # noqa: E731

    def rounds(c, more_than, blocked):
        """Probe rounds over c's lanes while more than `more_than` are active."""
        lane = jnp.arange(c[1].shape[0], dtype=jnp.int32)

        def body(c):
            i, pos, active, placed, tomb, _ = c
            st = state.slot_state[pos]
            cand = active & (st != LIVE) & ~blocked(pos)
            slot_key = jnp.where(placed >= 0, u64(placed) << 33, u64(pos) << 33 | jnp.uint64(1 << 32))
            key = sort_u64(jnp.where((placed >= 0) | cand, slot_key | u64(lane), none))
            by_lane = (key & jnp.uint64(0xFFFFFFFF)).astype(jnp.int32)
            first = jnp.concatenate([jnp.ones(1, bool), (key[1:] >> 33) != (key[:-1] >> 33)])
            head_wins = first & (key != none) & ((key >> 32) & jnp.uint64(1) == 1)
            won = jnp.zeros(lane.shape, bool).at[jnp.where(key != none, by_lane, lane.shape[0])].set(
                head_wins, mode="drop")
            active = active & ~won
            return (i + 1, jnp.where(active, (pos + 1) & (s - 1), pos), active, jnp.where(won, pos, placed),
                    tomb | (won & (st == TOMBSTONE)), key)

        return jax.lax.while_loop(lambda c: (c[0] < max_probes) & (jnp.sum(c[2], dtype=jnp.int32) > more_than),
                                  body, c)

    def taken_in(taken, earlier):
        """Blocked slots: those of earlier tiers, and the run heads of `taken`, a tier's
        last sorted keys (a slot with a run there was placed in that tier)."""
        def blocked(p):
            head = taken[jnp.minimum(jnp.searchsorted(taken, u64(p) << 33), taken.shape[0] - 1)]
            return earlier(p) | ((head != none) & ((head >> 33) == u64(p)))
        return blocked

    tiers = _tiers(n)
    blocked = lambda p: jnp.zeros(p.shape, bool)  # noqa: E731
    init = (jnp.int32(0), home_slot(tables, keys, s), need, jnp.full(n, -1, jnp.int32), jnp.zeros(n, bool),
            jnp.full(n, none))
    i, pos, active, placed, tomb, taken = rounds(init, tiers[1] if len(tiers) > 1 else 0, blocked)
    lanes, lost = None, jnp.asarray(False)
    for j, m in enumerate(tiers[1:], 1):
        blocked = taken_in(taken, blocked)
        lost = lost | (jnp.sum(active, dtype=jnp.int32) > m)  # out of probes with more active
        lanes, tgt, c = _next_tier(lanes, n, m, i, pos, active)
        c = c + (jnp.full(m, -1, jnp.int32), jnp.zeros(m, bool), jnp.full(m, none))
        i, pos, active, sub_placed, sub_tomb, taken = rounds(c, tiers[j + 1] if j + 1 < len(tiers) else 0, blocked)
        placed = placed.at[tgt].set(sub_placed, mode="drop")
        tomb = tomb.at[tgt].set(sub_tomb, mode="drop")
    return placed, tomb, lost | (jnp.sum(active) > 0)


def _write_slots(state, ok, placed, tables, keys, rows) -> dict:
    """Index arrays with lanes `ok` written LIVE at their `placed` slots (one scatter
    each, in place under donation)."""
    tgt = jnp.where(ok, placed, state.num_slots)
    return dict(
        slot_keys=state.slot_keys.at[tgt].set(keys, mode="drop"),
        slot_tables=state.slot_tables.at[tgt].set(tables, mode="drop"),
        slot_rows=state.slot_rows.at[tgt].set(rows, mode="drop"),
        slot_state=state.slot_state.at[tgt].set(jnp.int8(LIVE), mode="drop"),
    )


def insert(config: TableConfig, state: HashTableState, tables: jax.Array, keys: jax.Array, valid: jax.Array,
           embedding: jax.Array | None = None, slots: dict | None = None
           ) -> tuple[HashTableState, InsertResult]:
    """find_or_insert, then (optionally) overwrite the rows of all valid keys with given
    values: embedding [N, dim], slots {name: [N, ...]} (e.g. restoring a checkpoint)."""
    state, res = find_or_insert(config, state, tables, keys, valid)
    tgt = jnp.where(valid & ~res.overflow, res.rows, state.capacity)
    if embedding is not None:
        state = state._replace(embedding=state.embedding.at[tgt].set(embedding.astype(state.embedding.dtype),
                                                                     mode="drop"))
    if slots:
        state = state._replace(slots={k: v.at[tgt].set(slots[k].astype(v.dtype), mode="drop") if k in slots else v
                                      for k, v in state.slots.items()})
    return state, res


def delete(config: TableConfig, state: HashTableState, tables: jax.Array, keys: jax.Array, valid: jax.Array
           ) -> tuple[HashTableState, jax.Array]:
    """Removes keys (unique among valid lanes); returns (state, deleted bool [N]).
    Their slots become tombstones and their rows go back on the free stack."""
    f = find(state, tables, keys, valid, config.max_probes)
    return _free(state, f.found, f.rows, f.slot), f.found


def delete_rows(state: HashTableState, rows: jax.Array, valid: jax.Array) -> HashTableState:
    """Removes the live rows `rows` [N] (unique among valid lanes) - eviction's entry."""
    valid = valid & state.row_live[rows]
    return _free(state, valid, rows, state.row_slot[rows])


def _free(state, ok, rows, slot):
    n_del = jnp.sum(ok, dtype=jnp.int32)
    rank = jnp.cumsum(ok, dtype=jnp.int32) - 1
    r, s = state.capacity, state.num_slots
    return state._replace(
        slot_state=state.slot_state.at[jnp.where(ok, slot, s)].set(jnp.int8(TOMBSTONE), mode="drop"),
        row_live=state.row_live.at[jnp.where(ok, rows, r)].set(False, mode="drop"),
        free_rows=state.free_rows.at[jnp.where(ok, state.num_free + rank, r)].set(rows, mode="drop"),
        num_free=state.num_free + n_del,
        num_tombstones=state.num_tombstones + n_del,
    )


def size(state: HashTableState) -> jax.Array:
    """Live rows (a device scalar)."""
    return state.capacity - state.num_free


def rebuild_index(state: HashTableState, num_slots: int, max_probes: int = 128) -> tuple[HashTableState, jax.Array]:
    """Rehashes every live row into a fresh index of `num_slots` slots (a power of two;
    larger to grow, equal to drop tombstones). Rows are untouched. Runs on the device
    (jit it with num_slots static); call it between steps, work is O(R + S).
    Every key lands within `max_probes` slots of home (what `find` searches; use the
    table's config value). Returns (state, overflow): overflow means some key did not,
    and the caller must retry with more slots."""
    s = _pow2(num_slots)
    fresh = state._replace(
        slot_keys=jnp.zeros(s, jnp.int64), slot_tables=jnp.zeros(s, jnp.int32),
        slot_rows=jnp.zeros(s, jnp.int32), slot_state=jnp.zeros(s, jnp.int8),
        num_tombstones=jnp.asarray(0, jnp.int32))
    rows = jnp.arange(state.capacity, dtype=jnp.int32)
    # Dispatched like find_or_insert. On overflow the XLA path still writes the placed
    # keys, the kernel path leaves the fresh index empty: either way the caller retries.
    ins = ph.insert(ph.Index.of(fresh), state.row_tables, state.row_keys, rows, state.row_live,
                    max_probes=max_probes, decide=lambda po: jnp.asarray(False))
    out = fresh._replace(**ins.index._asdict(), row_slot=jnp.where(state.row_live, ins.placed, state.row_slot))
    placed_all = jnp.sum(state.row_live & (ins.placed < 0), dtype=jnp.int32) == 0
    return out, ~placed_all


def export(state: HashTableState) -> dict[str, np.ndarray]:
    """Host copy of every live row, sorted by (table, id): ids int64 [L], tables int32
    [L], embedding [L, dim], slot_<name> [L, ...], last_seen, count."""
    live = np.asarray(state.row_live)
    idx = np.flatnonzero(live)
    keys, tables = np.asarray(state.row_keys)[idx], np.asarray(state.row_tables)[idx]
    order = np.lexsort((keys, tables))
    idx = idx[order]
    out = {"ids": keys[order], "tables": tables[order],
           "embedding": np.asarray(state.embedding)[idx],
           "last_seen": np.asarray(state.last_seen)[idx], "count": np.asarray(state.count)[idx]}
    for name, v in state.slots.items():
        out[f"slot_{name}"] = np.asarray(v)[idx]
    return out
