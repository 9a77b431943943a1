"""Row-sharded embedding tables over a 1-D device mesh, and a sharded training step.

    mesh = make_mesh(4)
    sharded = ShardedEmbeddingEngine(EmbeddingEngine(options), mesh)
    tables = sharded.init(sparse_opt)               # {table: TableState}, leaves [n, ...]
    step = make_train_step(sharded, loss_fn, sparse_opt, dense_tx)
    params, opt_state, tables, metrics = step(params, opt_state, tables, batch, global_step)

Ownership. Each physical table of the wrapped `EmbeddingEngine` is split by rows: the
key (table index, id) lives only on shard `owner_of(table, id, n)`, in that shard's own
`HashTableState`. Initial rows are f(logical table name, id, seed), so a row starts
bitwise identical on any device count.

Forward (per device, inside `jax.shard_map`, on its slice of the global batch):
  local dedup -> owner per unique key -> bucketed send buffer [n, cap]
  -> all_to_all of (table, id, valid, count) -> owner dedups what it received (the same
  key may come from several devices) -> find_or_insert in its own table -> gather rows
  -> all_to_all rows back -> each device reads its unique rows, then expands and pools
  locally exactly as `EmbeddingEngine.pool` does.

Backward: done explicitly, not through a custom VJP. `jax.grad` w.r.t. the local
unique rows (`lookup.local.rows`) gives per-device, per-unique-key gradients; then
`exchange_grads` sends them along the same route (all_to_all of [n, cap, dim]) and each
owner sums the gradients of each of its keys with a sorted-segment sum over the
received lanes in (source device, source lane) order - deterministic, no float atomics -
and `apply_sparse` runs the sparse optimizer on its own rows only.

Overflow (never a silent drop). A bucket overflow (more unique keys for one owner than
`cap`) on any device, or an insert overflow (rows or probes exhausted) on any owner,
is agreed over the mesh (psum) *before* anything is written: then no shard writes
anything for that table (state unchanged), the step's updates are skipped and
`metrics["skipped"]` is set, so the host can grow and rerun. The insert pre-check is an
`agree` hook of `find_or_insert`, which reduces the overflow flag over the mesh before
the insert writes anything.

Dense params are replicated (data parallel): the per-device loss is the local mean / n,
so psum of its gradients is the gradient of the global mean. (The trainer's step,
recis_jax/train/sharded.py, also offers ZeRO-3 sharding of the dense side.)

Batches: every leaf carries a leading device axis [n, ...]; `mesh.split_features` cuts a
global host batch into n row blocks with one static capacity, `mesh.put` places them
(single process), `mesh.put_process_local` places this process's blocks (multi-process,
`jax.distributed`; see tests/mp_worker.py).

Not yet: admission on sharded tables (rejected at construction); eviction runs per
shard (`evict`). The
trainer over this engine (growth after an overflow, ZeRO, checkpoints that reshard on
load) is recis_jax/train/sharded.py.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import dispatch
from pallas_kernels.ids_partition import ids_partition
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.dedup import Unique, sorted_segment_sum, unique_keys
from recis_jax.embedding.engine import EmbeddingEngine, Lookup, SparseGrad, TableLookup, TableState
from recis_jax.sharding import exchange as ex
from recis_jax.sharding.mesh import AXIS, local_shards, owner_of, squeeze, unsqueeze


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# The ids-partition kernel (owner hash + counts + ranks in one pass) beat the sort-based
# `exchange.plan` on an H100 at 8 shards (0.27 ms vs 1.1 ms for 4M IDs) but not at 64
# (5.0 ms vs 1.6 ms; benchmarks/results/ops_sparse_update_h100.md): used up to this many.
PARTITION_KERNEL_MAX_SHARDS = 16


def _route(u: Unique, n: int, cap: int) -> ex.Route:
    """This device's unique lanes bucketed by owner (the Pallas partition on GPU for
    small meshes, else owner hash + sort)."""
    if n <= PARTITION_KERNEL_MAX_SHARDS and dispatch.resolve() != "reference":
        p = ids_partition(u.tables.astype(jnp.int32), u.keys, u.valid, n)
        return ex.plan_from_partition(p.owner, p.rank, p.counts, u.valid, n, cap)
    return ex.plan(owner_of(u.tables, u.keys, n), u.valid, n, cap)


def _any(x: jax.Array) -> jax.Array:
    """True on every device if x (bool []) is True on any device."""
    return jax.lax.psum(x.astype(jnp.int32), AXIS) > 0


class OwnerSide(NamedTuple):
    """One physical table's owner-side lookup state (per device).

    route: where this device's unique lanes went (local lanes -> [n, cap] buffer);
    unique: dedup of the M = n * cap lanes this device received, as the owner;
    rows int32 [M]: slab rows of unique's lanes in this device's table;
    live bool [M]: unique lanes with a row (the ones the optimizer may update).
    """

    route: ex.Route
    unique: Unique
    rows: jax.Array
    live: jax.Array


class ShardedLookup(NamedTuple):
    """local: an `engine.Lookup` over this device's unique keys (`local.rows` [N, dim]
    float32 is the differentiable input; `EmbeddingEngine.pool` accepts it);
    owner: {table: OwnerSide}; overflow bool []: some table overflowed on some device
    (agreed over the mesh; nothing was written); stats: {table: {...}} mesh-wide
    bucket_fill (largest bucket wanted), bucket_overflow, insert_overflow, new rows."""

    local: Lookup
    owner: dict
    overflow: jax.Array
    stats: dict


class ShardedEmbeddingEngine:
    """An `EmbeddingEngine` whose physical tables are row-sharded over `mesh` ("data").

    Args:
      engine: defines the features, tables and pooling (its own state is not used).
      mesh: a 1-D mesh with axis "data" (`mesh.make_mesh`).
      rows_per_shard: slab rows per shard, an int or {table: int}; default per table
        min(R, next power of two >= 2 R / n) with R = `engine.num_rows[table]`.
      bucket_capacity: keys one device may send to one owner per step, an int or
        {table: int}; default min(N, next power of two >= 2 N / n), N = the table's
        lanes per device (2x the mean per-owner count at worst, all lanes unique).
    Admission policies are not supported yet (ValueError); eviction runs per shard
    (`evict`, host side between steps, as for the plain engine).
    """

    def __init__(self, engine: EmbeddingEngine, mesh: jax.sharding.Mesh,
                 rows_per_shard: int | dict[str, int] | None = None,
                 bucket_capacity: int | dict[str, int] | None = None):
        if mesh.axis_names != (AXIS,):
            raise ValueError(f"mesh must have the single axis {AXIS!r}, got {mesh.axis_names}")
        for p in engine.physical:
            if engine._admission[p] is not None:
                raise ValueError(f"table {p!r}: admission is not supported on a sharded engine yet")
        self.engine, self.mesh, self.n = engine, mesh, mesh.size
        self.rows_per_shard = {}
        for p, r in engine.num_rows.items():
            given = rows_per_shard.get(p) if isinstance(rows_per_shard, dict) else rows_per_shard
            self.rows_per_shard[p] = int(given) if given is not None else min(r, _pow2(-(-2 * r // self.n)))
        self._bucket_capacity = bucket_capacity

    def bucket_capacity(self, pname: str, lanes: int) -> int:
        """Static bucket capacity of table `pname` for `lanes` local lanes."""
        c = self._bucket_capacity
        c = c.get(pname) if isinstance(c, dict) else c
        return int(c) if c is not None else max(1, min(lanes, _pow2(-(-2 * lanes // self.n))))

    # -- state --------------------------------------------------------------------------
    def init(self, optimizer=None) -> dict[str, TableState]:
        """Empty sharded tables: {table: TableState} whose leaves have a leading axis n
        sharded over "data" (created on the devices, so it also works multi-process)."""
        def make():
            out = {}
            for p, cfg in self.engine.physical.items():
                r = self.rows_per_shard[p]
                dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
                trainable = optimizer is not None and self.engine._trainable[p]
                slots = optimizer.init(r, cfg.dim, dt) if trainable else None
                ts = TableState(ht.create(cfg, r, slot_init=slots), jnp.zeros((0, 0), jnp.int32))
                out[p] = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (self.n,) + x.shape), ts)
            return out

        return jax.jit(make, out_shardings=NamedSharding(self.mesh, P(AXIS)))()

    # -- forward (inside shard_map, per device) ------------------------------------------
    def lookup(self, state: dict[str, TableState], features: dict, train: bool = True,
               step: jax.Array | None = None) -> tuple[dict[str, TableState], ShardedLookup]:
        """Per-device lookup through the owners. `state`: this device's tables (leading
        axis squeezed), `features`: this device's slice of the batch. `train` static;
        `step`: last_seen stamp (default each table's step counter)."""
        n = self.n
        new_state, tables, rows, owner, stats = dict(state), {}, {}, {}, {}
        overflow = jnp.asarray(False)
        for p, cfg in self.engine.physical.items():
            t_idx, ids, valid = self.engine._lanes(p, features)
            u = unique_keys(t_idx, ids, valid)
            cap = self.bucket_capacity(p, ids.shape[0])
            m = n * cap
            route = _route(u, n, cap)
            bucket_ovf = _any(route.overflow)
            route = ex.mask(route, ~bucket_ovf, n, cap)  # all or nothing: send nothing on overflow

            def swap(x):
                return ex.all_to_all(ex.send(route, x, n, cap)).reshape((m,) + x.shape[1:])

            r_tables, r_keys, r_valid, r_counts = swap(u.tables), swap(u.keys), swap(u.valid), swap(u.counts)
            ou = unique_keys(r_tables, r_keys, r_valid)  # one key may come from several devices
            tbl = state[p].table
            f = ht.find(tbl, ou.tables, ou.keys, ou.valid, cfg.max_probes)
            if train:
                counts = sorted_segment_sum(r_counts[ou.order], ou.sorted_segment, m)
                # `agree` makes the overflow mesh-wide before any write: all owners commit or none does.
                tbl, res = ht.find_or_insert(cfg, tbl, ou.tables, ou.keys, ou.valid, counts, None, f, step, agree=_any)
                insert_ovf = res.overflow
                ok = ~insert_ovf
                live_o = ou.valid & ok & (res.found | res.is_new)
                row_ids, new = res.rows, jax.lax.psum(res.num_new, AXIS)
                new_state[p] = state[p]._replace(table=tbl)
            else:
                insert_ovf, live_o, row_ids, new = jnp.asarray(False), f.found, f.rows, jnp.asarray(0, jnp.int32)
            emb = tbl.embedding[jnp.where(live_o, row_ids, 0)].astype(jnp.float32)
            emb = jnp.where(live_o[:, None], emb, jnp.float32(0))  # [M, dim], per owner unique lane
            # Back to every received lane, then to its sender.
            # (Padding lanes carry zeros: their inverse is 0, a real key's index.)
            back_rows = ex.all_to_all(jnp.where(r_valid[:, None], emb[ou.inverse], 0).reshape(n, cap, -1))
            back_live = ex.all_to_all((live_o[ou.inverse] & r_valid).reshape(n, cap))
            values = ex.receive(route, back_rows)  # [N, dim]
            live = ex.receive(route, back_live) & u.valid
            tbl_ovf = bucket_ovf | insert_ovf
            overflow = overflow | tbl_ovf
            missing = jnp.sum(u.valid & ~live, dtype=jnp.int32)
            # rows: the local lanes have no slab rows of their own (the owner holds them).
            tables[p] = TableLookup(u, jnp.zeros_like(u.inverse), live, tbl_ovf, jnp.asarray(0, jnp.int32),
                                    missing, new)
            rows[p] = values
            owner[p] = OwnerSide(route, ou, row_ids, live_o)
            stats[p] = {"bucket_fill": jax.lax.pmax(route.max_fill, AXIS), "bucket_capacity": jnp.int32(cap),
                        "bucket_overflow": bucket_ovf, "insert_overflow": insert_ovf, "new": new}
        return new_state, ShardedLookup(Lookup(tables, rows), owner, overflow, stats)

    def pool(self, rows: dict[str, jax.Array], lookup: ShardedLookup, features: dict) -> dict:
        """`EmbeddingEngine.pool` on this device's batch slice and unique rows."""
        return self.engine.pool(rows, lookup.local, features)

    # -- backward / update (inside shard_map) -------------------------------------------
    def exchange_grads(self, lookup: ShardedLookup, row_grads: dict[str, jax.Array],
                       skip: jax.Array | None = None) -> dict[str, SparseGrad]:
        """Sends d loss / d `lookup.local.rows` ({table: [N, dim]}) to the owners and sums
        them per owned key. Returns {trainable table: SparseGrad} over the owner's M
        lanes (rows of this device's slab). skip (bool []) or an overflow masks all."""
        skip = lookup.overflow if skip is None else (skip | lookup.overflow)
        out = {}
        for p, o in lookup.owner.items():
            if not self.engine._trainable[p]:
                continue
            n = self.n
            cap = o.unique.keys.shape[0] // n  # the owner received M = n * cap lanes
            g = ex.all_to_all(ex.send(o.route, row_grads[p].astype(jnp.float32), n, cap))
            g = g.reshape(n * cap, -1)
            g_sum = sorted_segment_sum(g[o.unique.order], o.unique.sorted_segment, n * cap)
            out[p] = SparseGrad(o.rows, g_sum, o.live & ~skip)
        return out

    def apply_sparse(self, state: dict[str, TableState], grads: dict[str, SparseGrad], optimizer,
                     lr_step: jax.Array | None = None) -> tuple[dict[str, TableState], dict]:
        """The sparse optimizer on each shard's own touched rows. A table's step counter
        advances on every shard when any shard has touched rows, so the Adam bias
        correction and the last_seen clock agree with the unsharded engine."""
        out, stats = dict(state), {}
        for p, g in grads.items():
            tbl = state[p].table
            touched = jax.lax.psum(jnp.sum(g.mask, dtype=jnp.int32), AXIS)
            step = tbl.step + (touched > 0).astype(jnp.int32)
            emb, slots, nonfinite = optimizer.apply(tbl.embedding, tbl.slots, g.rows, g.grads, g.mask, step,
                                                    lr_step=lr_step, count_nonfinite=True)
            out[p] = state[p]._replace(table=tbl._replace(embedding=emb, slots=slots, step=step))
            stats[p] = {"touched": touched, "nonfinite": jax.lax.psum(nonfinite, AXIS)}
        return out, stats

    # -- host views ---------------------------------------------------------------------
    def export(self, state: dict[str, TableState]) -> dict[str, dict[str, np.ndarray]]:
        """Host copy of the live rows this process holds, per table, in `ht.export`'s
        format (ids, tables, embedding, slot_<name>, last_seen, count) plus `shard`,
        sorted by (table, id)."""
        out = {}
        for p, ts in state.items():
            leaves, treedef = jax.tree_util.tree_flatten(ts.table)
            per_leaf = [local_shards(x) for x in leaves]
            parts = []
            for i in sorted(per_leaf[0]):
                e = ht.export(jax.tree_util.tree_unflatten(treedef, [d[i] for d in per_leaf]))
                e["shard"] = np.full(len(e["ids"]), i, np.int32)
                parts.append(e)
            merged = {k: np.concatenate([e[k] for e in parts]) for k in parts[0]}
            order = np.lexsort((merged["ids"], merged["tables"]))
            out[p] = {k: v[order] for k, v in merged.items()}
        return out

    def evict(self, state: dict[str, TableState], step: int, global_step: jax.Array | int
              ) -> tuple[dict[str, TableState], dict[str, jax.Array]]:
        """Each table's eviction policy on every shard (vmapped over the device axis),
        when `step % policy.every == 0`. Stale rows (max_age) go exactly as on one
        device; the LFU size cap applies per shard as ceil(max_rows / n) (rows are spread
        evenly by the owner hash). Returns (state, {table: evicted over all shards})."""
        out, counts = dict(state), {}
        for p, policy in self.engine._eviction.items():
            if policy is None or step % policy.every:
                continue
            table, n = _evict_shards(policy, self.n, state[p].table, jnp.asarray(global_step, jnp.int32))
            out[p] = state[p]._replace(table=table)
            counts[p] = n
        return out, counts

    def shard_sizes(self, state: dict[str, TableState]) -> dict[str, dict[int, int]]:
        """{table: {shard: live rows}} for the shards this process holds."""
        return {p: {i: self.rows_per_shard[p] - int(v) for i, v in local_shards(ts.table.num_free).items()}
                for p, ts in state.items()}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _evict_shards(policy, n: int, stacked: ht.HashTableState, current_step: jax.Array):
    from recis_jax.embedding.eviction import evict_lfu, evict_stale

    def one(t):
        total = jnp.zeros((), jnp.int32)
        if policy.max_age is not None:
            t, k = evict_stale(t, current_step, policy.max_age)
            total = total + k
        if policy.max_rows is not None:
            t, k = evict_lfu(t, -(-policy.max_rows // n))
            total = total + k
        return t, total

    tables, counts = jax.vmap(one)(stacked)
    return tables, jnp.sum(counts)


LossFn = Callable[[Any, dict, Any], jax.Array]


def make_train_step(sharded: ShardedEmbeddingEngine, loss_fn: LossFn, sparse_opt,
                    dense_tx: optax.GradientTransformation, donate: bool = True):
    """A jitted data-parallel training step over `sharded.mesh`.

    loss_fn(params, pooled, batch) -> float32 []: the mean loss over this device's
      examples (pooled: `EmbeddingEngine.pool`'s output for them; batch: this device's
      slice of the batch, leading axis squeezed). Every device must hold B / n examples.
    Returns step(params, opt_state, tables, batch, global_step) -> (params, opt_state,
      tables, metrics): params / opt_state replicated; tables from `sharded.init`
      (donated); batch a pytree whose leaves are [n, ...] sharded over "data", holding
      at least batch["features"] ({feature: Ragged}); global_step int32 [] (schedules).
      metrics: loss (global mean, float32), skipped (overflow: nothing changed), and per
      table touched / nonfinite / bucket stats, all mesh-wide.
    """
    n = sharded.n

    def per_device(params, opt_state, hts, batch, global_step):
        hts, batch = squeeze(hts), squeeze(batch)
        tables = {p: TableState(t, jnp.zeros((0, 0), jnp.int32)) for p, t in hts.items()}
        feats = batch["features"]
        tables, lk = sharded.lookup(tables, feats)

        def loss(p, rows):
            # local mean / n: summed over devices, it is the global mean (B/n per device).
            return loss_fn(p, sharded.pool(rows, lk, feats), batch) / n

        l, (g_params, g_rows) = jax.value_and_grad(loss, argnums=(0, 1))(params, lk.local.rows)
        l, g_params = jax.lax.psum(l, AXIS), jax.lax.psum(g_params, AXIS)
        skip = lk.overflow
        updates, new_opt_state = dense_tx.update(g_params, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
        grads = sharded.exchange_grads(lk, g_rows, skip)
        tables, stats = sharded.apply_sparse(tables, grads, sparse_opt, lr_step=jnp.asarray(global_step, jnp.float32))
        metrics = {"loss": l, "skipped": skip,
                   "tables": {p: dict(stats.get(p, {}), **lk.stats[p]) for p in lk.stats}}
        return params, opt_state, unsqueeze({p: ts.table for p, ts in tables.items()}), metrics

    fn = jax.shard_map(per_device, mesh=sharded.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P()),
                       out_specs=(P(), P(), P(AXIS), P()),
                       # The hashtable's while loops start from device-invariant constants
                       # (check_vma would demand pcasts inside embedding/); replication of
                       # the P() outputs holds by construction: they come from psums.
                       check_vma=False)

    def step(params, opt_state, tables, batch, global_step):
        # Only the hashtables cross the shard_map boundary: a zero-size output (the
        # [n, 0, 0] admission sketch, unused here) crashes XLA:CPU's compiler (jax 0.11.2).
        hts = {p: ts.table for p, ts in tables.items()}
        params, opt_state, hts, metrics = fn(params, opt_state, hts, batch, global_step)
        return params, opt_state, {p: tables[p]._replace(table=hts[p]) for p in tables}, metrics

    return jax.jit(step, donate_argnums=(2,) if donate else ())
