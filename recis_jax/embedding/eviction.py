"""Eviction: freeing rows of IDs that are stale (RecIS GlobalStepFilter) or rare (LFU).

Both rules scan the whole slab (O(R), plus an O(R log R) sort for LFU), so they run
between steps, every K steps, never inside the per-step path. Evicted rows go back on
the table's free stack through `hashtable.delete_rows` (their index slots become
tombstones); a later insert reuses them with a fresh deterministic initial value and
fresh optimizer slots, so eviction never needs the table to grow. Each evicted key
leaves a tombstone in the index until the next rebuild; `capacity.ensure_headroom`
(run after eviction) rebuilds the index at the same size once tombstones crowd it.

Clock. `find_or_insert` stamps a row's `last_seen` with `now`: the global step when the
caller passes it (`EmbeddingEngine.lookup(..., step=global_step)`, RecIS's
GlobalStepFilter semantics), else the table's own step counter `state.step`. Pass the
same clock as `current_step` to `maybe_evict` (default `state.step`).

Counts. `count` accumulates occurrences before dedup (`find_or_insert(...,
counts=unique.counts)`); a new row starts from its own count. Evicted rows' `count` and
`last_seen` are zeroed here so exports and LFU never see stale values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from recis_jax.embedding import hashtable as ht


def evict_rows(state: ht.HashTableState, evict: jax.Array) -> tuple[ht.HashTableState, jax.Array]:
    """Frees the live rows where evict [R] bool is True.

    Returns (state, num_evicted int32 scalar). Rows are pushed on the free stack in
    ascending row order (deterministic); their count and last_seen are zeroed.
    """
    evict = evict & state.row_live
    rows = jnp.arange(state.capacity, dtype=jnp.int32)
    state = ht.delete_rows(state, rows, evict)
    state = state._replace(count=jnp.where(evict, 0, state.count).astype(state.count.dtype),
                           last_seen=jnp.where(evict, 0, state.last_seen).astype(state.last_seen.dtype))
    return state, jnp.sum(evict, dtype=jnp.int32)


def evict_stale(state: ht.HashTableState, current_step: jax.Array | int, max_age: jax.Array | int
                ) -> tuple[ht.HashTableState, jax.Array]:
    """RecIS GlobalStepFilter: evicts rows not seen for more than `max_age` steps,
    i.e. live rows with `current_step - last_seen > max_age` (int32 arithmetic).

    current_step: on the clock `last_seen` is stamped with (normally `state.step`).
    Jit-able (with the state donated); returns (state, num_evicted int32 scalar).
    """
    age = jnp.asarray(current_step, jnp.int32) - state.last_seen  # [R]
    return evict_rows(state, state.row_live & (age > jnp.asarray(max_age, jnp.int32)))


def evict_lfu(state: ht.HashTableState, max_rows: jax.Array | int) -> tuple[ht.HashTableState, jax.Array]:
    """Size cap: keeps the `max_rows` live rows with the largest `count` and evicts the
    rest. Ties keep the smaller ID (signed int64 order), then the smaller table index.

    Jit-able (with the state donated); returns (state, num_evicted int32 scalar) -
    max(0, live - max_rows).
    """
    r = state.capacity
    rows = jnp.arange(r, dtype=jnp.int32)
    dead = (~state.row_live).astype(jnp.int8)  # free rows sort last
    # count >= 0, so its negation cannot overflow; the sort is stable and total.
    *_, order = jax.lax.sort((dead, -state.count, state.row_keys, state.row_tables, rows), num_keys=4)
    rank = jnp.zeros(r, jnp.int32).at[order].set(rows, unique_indices=True)  # [R] row -> its rank
    return evict_rows(state, rank >= jnp.asarray(max_rows, jnp.int32))


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    """When and what to evict (hashable: a jit static argument).

    max_age: evict rows not seen for more than this many steps (GlobalStepFilter);
      None disables the rule.
    every: run the rules on steps where `step % every == 0` (K).
    max_rows: keep at most this many live rows, the most frequent (LFU); None disables.
    The age rule runs first, then the size cap on what is left.
    """

    max_age: int | None = None
    every: int = 1
    max_rows: int | None = None

    def __post_init__(self):
        if self.max_age is not None and self.max_age < 1:
            raise ValueError(f"EvictionPolicy: max_age must be >= 1 (or None), got {self.max_age}")
        if self.every < 1:
            raise ValueError(f"EvictionPolicy: every must be >= 1, got {self.every}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"EvictionPolicy: max_rows must be >= 1 (or None), got {self.max_rows}")


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _apply_policy(policy: EvictionPolicy, state: ht.HashTableState, current_step: jax.Array | None
                  ) -> tuple[ht.HashTableState, jax.Array]:
    # None (no pytree leaves) reads the clock from the donated state itself; passing
    # state.step as a second argument would hand a donated buffer in twice.
    current_step = state.step if current_step is None else current_step
    total = jnp.zeros((), jnp.int32)
    if policy.max_age is not None:
        state, n = evict_stale(state, current_step, policy.max_age)
        total = total + n
    if policy.max_rows is not None:
        state, n = evict_lfu(state, policy.max_rows)
        total = total + n
    return state, total


def maybe_evict(policy: EvictionPolicy, state: ht.HashTableState, step: int,
                current_step: jax.Array | int | None = None) -> tuple[ht.HashTableState, jax.Array]:
    """Runs the policy's rules when `step % policy.every == 0` (step: the host's int
    step counter), on the device, with the state donated (use the returned one).

    current_step: the clock ages are measured on; default `state.step`, the counter
    `last_seen` is stamped with. Returns (state, num_evicted int32 scalar; 0 when
    nothing ran).
    """
    if step % policy.every != 0 or (policy.max_age is None and policy.max_rows is None):
        return state, jnp.zeros((), jnp.int32)
    current = None if current_step is None else jnp.asarray(current_step, jnp.int32)
    return _apply_policy(policy, state, current)
