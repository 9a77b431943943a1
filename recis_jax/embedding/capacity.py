"""Growing a hashtable between steps (host side).

A table's slab rows R and index slots S are static shapes: the jitted step cannot
grow them. The host keeps headroom instead (free rows and index slots for several
steps of worst-case new IDs) and grows the table between steps:

    state, grew = ensure_headroom(cfg, state, max_new_per_step)   # every K steps
    state, res = step(state, batch)                               # donated
    if res.overflow:                  # the step wrote nothing (see hashtable.py)
        state = grow(cfg, state, 2 * state.capacity)
        state, res = step(state, batch)                           # rerun

Sizes are powers of two, so a table grown from 8 rows to 8M recompiles the step ~20
times at most, not once per growth of a few rows.

Growing never holds two full copies of the rows in device memory: `grow` copies the
rows into larger host (numpy) arrays, frees the old device buffers, uploads the larger
arrays and rebuilds the index on the device. The caller's old state is invalid
afterwards (its buffers are deleted), exactly as after a donated call.

Determinism: existing rows keep their row ids, and the new rows go to the *bottom* of
the free stack, so the old free rows are handed out first and then R, R+1, ... in
ascending order. That is the order a table created with the larger size from the
start hands rows out in, so a run that grew (at any points) and a run that started
big assign every ID the same row and the same values: the rows part of the state is
bit-identical (the index may place keys in other slots; lookups agree).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from recis_jax.embedding import hashtable as ht

_MAX_ROWS = np.iinfo(np.int32).max  # row ids are int32
# How many times `grow`/`rebuild` doubles S when a rebuilt probe chain would be longer
# than the table's max_probes (find would stop short of the key); at load <= 0.5 once
# is already astronomically rare.
_MAX_INDEX_DOUBLINGS = 4


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# The input state is donated: a rebuild reads only the rows, so a retry after an
# overflowed attempt starts from intact rows.
_rebuild = functools.partial(jax.jit, static_argnames=("num_slots", "max_probes"), donate_argnums=0)(
    ht.rebuild_index)


@jax.jit
def _occupancy(state: ht.HashTableState) -> tuple[jax.Array, jax.Array]:
    """(num_free, num_tombstones) int32 scalars, fetched together in one sync."""
    return state.num_free, state.num_tombstones


def rebuild(config: ht.TableConfig, state: ht.HashTableState, num_slots: int | None = None
            ) -> ht.HashTableState:
    """Rehashes the live rows into a fresh index of `num_slots` slots (default: the
    current S), on the device: drops tombstones (same size) or grows the index. Rows
    are untouched. The input state is donated (invalid afterwards).

    S is doubled (up to 4 times) if a probe chain would exceed `config.max_probes`;
    raises RuntimeError if that still fails.
    """
    s = next_pow2(state.num_slots if num_slots is None else num_slots)
    live = state.capacity - int(state.num_free)
    if s < live:
        raise ValueError(f"table {config.name!r}: {s} index slots cannot hold {live} live rows")
    return _rebuild_until_fits(config, state, s)


def _rebuild_until_fits(config, state, s):
    for _ in range(_MAX_INDEX_DOUBLINGS + 1):
        state, overflow = _rebuild(state, num_slots=s, max_probes=config.max_probes)
        if not bool(overflow):
            return state
        s *= 2
    raise RuntimeError(f"table {config.name!r}: could not rebuild the index within max_probes="
                       f"{config.max_probes} even with {s // 2} slots for {state.capacity} rows")


def grow(config: ht.TableConfig, state: ht.HashTableState, num_rows: int, num_slots: int | None = None
         ) -> ht.HashTableState:
    """A larger table holding everything `state` holds.

    Args:
      config: the table's static config.
      state: the table; its device buffers are deleted (the caller's state is invalid
        afterwards, as after a donated call).
      num_rows: the new slab rows R' >= R (a power of two keeps recompiles rare).
      num_slots: the new index slots S' (rounded up to a power of two); default the
        larger of the current S and the power of two >= 2R' (load <= 0.5 when full).

    Returns the new state: every live (table, id) keeps its row id, embedding row,
    optimizer slot rows, last_seen and count; slot_defaults, the free stack (new rows
    R..R'-1 below the old free rows, so they are handed out after them, in ascending
    order), num_free (+R'-R) and the step counter carry over. New rows hold zeros and
    the slot defaults (what `hashtable.create` gives). The index is rebuilt (no
    tombstones); S' may be doubled if a probe chain would exceed max_probes.
    """
    r_old = state.capacity
    if num_rows < r_old:
        raise ValueError(f"table {config.name!r}: grow cannot shrink the slab ({r_old} -> {num_rows} rows)")
    if num_rows > _MAX_ROWS:
        raise ValueError(f"table {config.name!r}: {num_rows} rows exceed int32 row ids")
    s_new = next_pow2(num_slots) if num_slots is not None else max(state.num_slots, next_pow2(2 * num_rows))
    if s_new < num_rows:
        raise ValueError(f"table {config.name!r}: {s_new} index slots cannot hold {num_rows} rows")
    extra = num_rows - r_old

    # Stage through the host: read every leaf into its final (larger) numpy array.
    def pad(a, fill=0):
        a = np.asarray(a)
        out = np.empty((num_rows,) + a.shape[1:], a.dtype)
        out[:r_old] = a
        out[r_old:] = fill
        return out

    # Upload the way the old table lived: committed arrays to the same sharding,
    # uncommitted ones uncommitted (jit caches key on it, so this avoids a recompile).
    sharding = state.embedding.sharding if state.embedding.committed else None
    num_free = int(state.num_free)
    host = state._replace(
        # The index is rebuilt from the rows on the device: no need to carry it over.
        slot_keys=np.zeros(0, np.int64), slot_tables=np.zeros(0, np.int32),
        slot_rows=np.zeros(0, np.int32), slot_state=np.zeros(0, np.int8),
        embedding=pad(state.embedding),
        slots={k: pad(v, np.asarray(state.slot_defaults[k])) for k, v in state.slots.items()},
        slot_defaults={k: np.array(v) for k, v in state.slot_defaults.items()},
        row_keys=pad(state.row_keys), row_tables=pad(state.row_tables), row_slot=pad(state.row_slot),
        row_live=pad(state.row_live), last_seen=pad(state.last_seen), count=pad(state.count),
        # Popped from the top: the old free rows first, then R, R+1, ..., R'-1.
        free_rows=np.concatenate([np.arange(num_rows - 1, r_old - 1, -1, dtype=np.int32),
                                  np.asarray(state.free_rows)]),
        num_free=np.asarray(num_free + extra, np.int32),
        num_tombstones=np.array(state.num_tombstones),
        step=np.array(state.step),
    )
    # Free the old device buffers before uploading the new ones.
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            leaf.delete()
    new = jax.device_put(host, sharding)
    return _rebuild_until_fits(config, new, s_new)


def ensure_headroom(config: ht.TableConfig, state: ht.HashTableState, max_new_per_step: int, steps: int = 4,
                    max_load: float = 0.5, growth: float = 2.0, max_rows: int | None = None
                    ) -> tuple[ht.HashTableState, bool]:
    """Makes room for `steps` steps of up to `max_new_per_step` new IDs each.

    Call it between steps, every K steps (it syncs with the device once to read the
    free-row and tombstone counts). Let need = steps * max_new_per_step:
      * rows: fewer than `need` free rows -> grow R to a power of two >= max(growth * R,
        live + need) (capped at `max_rows` if that still leaves `need` free);
      * index: (live + tombstones + need) / S > max_load -> rebuild it, at the same size
        when dropping the tombstones is enough, else at the power of two >= R / max_load.
        A row growth always rebuilds the index, at least that large.

    Args:
      max_rows: the memory budget in rows; needing more raises ValueError naming the
        table and the numbers.

    Returns (state, grew): grew is True when R or S changed (the step recompiles for the
    new shapes). Always use the returned state: a rebuild donates the input.
    """
    if max_new_per_step < 0 or steps < 1 or growth <= 1.0 or not 0.0 < max_load <= 1.0:
        raise ValueError(f"ensure_headroom: need max_new_per_step >= 0, steps >= 1, growth > 1, "
                         f"0 < max_load <= 1; got {max_new_per_step}, {steps}, {growth}, {max_load}")
    num_free, tombstones = (int(x) for x in jax.device_get(_occupancy(state)))
    r, s = state.capacity, state.num_slots
    live = r - num_free
    need = steps * max_new_per_step

    if num_free < need:
        r_new = next_pow2(max(math.ceil(growth * r), live + need))
        if max_rows is not None and r_new > max_rows:
            if max_rows - live < need:
                raise ValueError(
                    f"table {config.name!r}: needs {live + need} rows ({live} live + {need} headroom for "
                    f"{steps} steps of {max_new_per_step} new IDs) but max_rows is {max_rows}: "
                    f"enable eviction or raise the budget")
            r_new = max(max_rows, r)
        if r_new > r:
            s_new = max(s, next_pow2(math.ceil(r_new / max_load)))
            return grow(config, state, r_new, s_new), True

    if (live + tombstones + need) / s > max_load:
        # Same size when dropping the tombstones is enough, else sized for a full slab.
        s_new = s if (live + need) / s <= max_load else max(2 * s, next_pow2(math.ceil(r / max_load)))
        state = rebuild(config, state, s_new)
        return state, state.num_slots != s
    return state, False
