"""EmbeddingEngine: per-feature options -> merged physical tables -> pooled embeddings.

    engine = EmbeddingEngine({"c1": EmbeddingOption(dim=8), "c2": EmbeddingOption(dim=8),
                              "hist": EmbeddingOption(dim=8, combiner="none", length=50,
                                                      shared_name="c2")})
    state = engine.init(sparse_adamw(1e-3))          # {physical table: TableState}
    # inside the jitted step:
    state, lk = engine.lookup(state, features, train=True)        # dedup + find_or_insert + gather
    def loss_fn(params, rows):                                    # rows: {table: [N, dim] f32}
        emb = engine.pool(rows, lk, features)                     # {feature: [B, dim] | ([B,L,dim], mask)}
        ...
    (loss, (g_params, g_rows)) = value_and_grad(loss_fn, argnums=(0, 1))(params, lk.rows)
    # or: emb, vjp = engine.pool_vjp(state, lk, features); ...; (g_rows,) = vjp(g_emb)
    state, stats = engine.apply_gradients(state, lk, g_rows, sparse_opt)

Features whose options agree on (dim, dtype, initializer, trainable, admission,
eviction) share
one physical table; each *logical* table (a feature, or all features with the same
`shared_name`) keeps its own table index, so (table index, id) keys stay exact. One
dedup + lookup + gather runs per physical table, not per feature.

Admission (optional, per table): an ID needs `min_count` occurrences, counted in a
count-min sketch of fixed size, before it gets a trainable row; until then it reads
zeros and gets no gradient. Eval (`train=False`) only finds: missing IDs read zeros.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_update import SegmentGrads
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.dedup import Unique, sorted_segment_sum, unique_keys
from recis_jax.embedding.eviction import EvictionPolicy, maybe_evict
from recis_jax.embedding.initializers import Initializer
from recis_jax.embedding.pooling import COMBINERS, expand, materialize, mean_of_sum, pool, pool_unique_segments
from recis_jax.features.functional import table_id_pairs
from recis_jax.ragged import Ragged


@dataclasses.dataclass(frozen=True)
class Admission:
    """Admit an ID after `min_count` occurrences (before dedup), counted in a count-min
    sketch of `depth` x `width` int32 counters. The count is never under-estimated; it
    over-estimates by more than 2.72 * N / width (N = occurrences counted so far) with
    probability at most exp(-depth)."""

    min_count: int = 2
    width: int = 1 << 16
    depth: int = 4

    def __post_init__(self):
        if self.min_count < 1 or self.width < 1 or not 1 <= self.depth <= 8:
            raise ValueError(f"Admission: need min_count >= 1, width >= 1, 1 <= depth <= 8; got {self}")

    @classmethod
    def read_only(cls) -> "Admission":
        """RecIS's AdmitHook("ReadOnly"): no new IDs get rows; existing rows still train
        (e.g. a table restored from a checkpoint and frozen in vocabulary)."""
        return cls(min_count=np.iinfo(np.int32).max, width=1, depth=1)


@dataclasses.dataclass(frozen=True)
class EmbeddingOption:
    """How one feature is embedded.

    dim: embedding width. combiner: "sum" | "mean" (sum(w e) / sum(w)) | "tile" (first
    `length` rows, zero-padded, flattened) | "none" (sequence [B, length, dim] + mask).
    use_weights: multiply rows by the Ragged's weights when present. trainable: False
    freezes the table. initializer, dtype ("float32" | "bfloat16" storage): new rows.
    shared_name: features with the same shared_name use the same logical table.
    num_rows: slab rows reserved for this logical table (merged tables add them up).
    admission: optional Admission policy.
    eviction: optional `eviction.EvictionPolicy` (stale IDs, LFU size cap), run by
      `EmbeddingEngine.evict` between steps.
    """

    dim: int
    combiner: str = "sum"
    length: int = 1
    use_weights: bool = True
    trainable: bool = True
    initializer: Initializer = Initializer()
    dtype: str = "float32"
    shared_name: str | None = None
    num_rows: int = 1 << 16
    admission: Admission | None = None
    eviction: EvictionPolicy | None = None

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"EmbeddingOption: dim must be >= 1, got {self.dim}")
        if self.combiner not in COMBINERS:
            raise ValueError(f"EmbeddingOption: combiner must be one of {COMBINERS}, got {self.combiner!r}")
        if self.combiner in ("tile", "none") and self.length < 1:
            raise ValueError("EmbeddingOption: tile/none combiners need length >= 1")
        if self.num_rows < 1:
            raise ValueError("EmbeddingOption: num_rows must be >= 1")

    def merge_key(self) -> tuple:
        return (self.dim, self.dtype, self.initializer, self.trainable, self.admission, self.eviction)


class TableState(NamedTuple):
    """One physical table: the hashtable and its admission sketch ([depth, width] int32;
    [0, 0] without admission)."""

    table: ht.HashTableState
    sketch: jax.Array


class TableLookup(NamedTuple):
    """What a physical table's lookup hands to pooling and the update.

    unique: the dedup of the table's concatenated lanes; rows int32 [N]: slab row per
    unique lane; live bool [N]: unique lanes with a row (found or inserted, admitted);
    values f32 [N, dim]: the rows' embeddings (zeros where not live) - the
    differentiable input; overflow bool: the insert ran out of rows/probes and wrote
    nothing; not_admitted int32, missing int32: counts of unique IDs without a row.
    """

    unique: Unique
    rows: jax.Array
    live: jax.Array
    overflow: jax.Array
    not_admitted: jax.Array
    missing: jax.Array
    new: jax.Array


class SparseGrad(NamedTuple):
    """A table's sparse gradient: rows int32 [K] (unique where mask), grads f32 [K, dim]
    (or a SegmentGrads giving them, from `pool_vjp(segments=True)`), mask bool [K]. K is
    the lookup's lane count, or their sum after accumulation."""

    rows: jax.Array
    grads: jax.Array
    mask: jax.Array


def accumulate(a: dict[str, SparseGrad] | None, b: dict[str, SparseGrad]) -> dict[str, SparseGrad]:
    """Sums two micro-steps' sparse gradients, staying sparse: per table the lanes are
    concatenated and rows appearing in both are merged by a deterministic sorted-segment
    sum (K grows by each micro-step's lane count; nothing is [R, dim])."""
    if a is None:
        return b
    out = {}
    for p in b:
        rows = jnp.concatenate([a[p].rows, b[p].rows])
        grads = jnp.concatenate([materialize(a[p].grads), materialize(b[p].grads)])
        mask = jnp.concatenate([a[p].mask, b[p].mask])
        u = unique_keys(jnp.zeros_like(rows), rows.astype(jnp.int64), mask)
        summed = sorted_segment_sum(grads[u.order], u.sorted_segment, rows.shape[0])
        out[p] = SparseGrad(u.keys.astype(jnp.int32), summed, u.valid)
    return out


class Lookup(NamedTuple):
    """Per physical table lookups, and the embedding inputs (differentiable) per table."""

    tables: dict
    rows: dict


@dataclasses.dataclass(frozen=True)
class _Member:
    feature: str
    table_index: int  # logical table index inside the physical table
    option: EmbeddingOption


class EmbeddingEngine:
    """Groups features into physical tables and runs lookup / pool / update on them."""

    def __init__(self, options: dict[str, EmbeddingOption], seed: int = 0, merge: bool = True,
                 max_probes: int = 128):
        if not options:
            raise ValueError("EmbeddingEngine needs at least one feature")
        self.options = dict(options)
        logical: dict[str, EmbeddingOption] = {}
        for name, opt in self.options.items():
            key = opt.shared_name or name
            if key in logical and logical[key].merge_key() != opt.merge_key():
                raise ValueError(f"feature {name!r} shares table {key!r} but its dim/dtype/initializer/"
                                 f"trainable/admission/eviction differ from the table's: {opt} vs {logical[key]}")
            logical.setdefault(key, opt)
        groups: dict[tuple, list[str]] = {}
        for key, opt in logical.items():
            groups.setdefault(opt.merge_key() if merge else (key,), []).append(key)
        self.physical: dict[str, ht.TableConfig] = {}
        self.members: dict[str, list[_Member]] = {}
        self.num_rows: dict[str, int] = {}
        self._admission: dict[str, Admission | None] = {}
        self._eviction: dict[str, EvictionPolicy | None] = {}
        self._trainable: dict[str, bool] = {}
        for i, keys in enumerate(groups.values()):
            opt = logical[keys[0]]
            pname = keys[0] if len(keys) == 1 else f"merged_{i}_dim{opt.dim}"
            streams = tuple(stream_id(k) for k in keys)
            self.physical[pname] = ht.TableConfig(pname, opt.dim, opt.dtype, opt.initializer, seed, max_probes,
                                                  streams)
            self.num_rows[pname] = sum(logical[k].num_rows for k in keys)
            self._admission[pname] = opt.admission
            self._eviction[pname] = opt.eviction
            self._trainable[pname] = opt.trainable
            self.members[pname] = [_Member(f, keys.index(o.shared_name or f), o)
                                   for f, o in self.options.items() if (o.shared_name or f) in keys]

    # -- state --------------------------------------------------------------------------
    def init(self, optimizer=None) -> dict[str, TableState]:
        """Empty tables; optimizer slots from `optimizer.init(rows, dim, dtype)`."""
        out = {}
        for pname, cfg in self.physical.items():
            r = self.num_rows[pname]
            dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
            slots = optimizer.init(r, cfg.dim, dt) if optimizer is not None and self._trainable[pname] else None
            adm = self._admission[pname]
            sketch = jnp.zeros((adm.depth, adm.width) if adm else (0, 0), jnp.int32)
            out[pname] = TableState(ht.create(cfg, r, slot_init=slots), sketch)
        return out

    # -- forward ------------------------------------------------------------------------
    def lookup(self, state: dict[str, TableState], features: dict[str, Ragged], train: bool = True,
               step: jax.Array | None = None) -> tuple[dict[str, TableState], Lookup]:
        """Dedups each physical table's IDs, finds (eval) or finds-or-inserts (train)
        them, and gathers their rows. Runs inside jit; `train` is static. `step` (the
        global step, int32) is stamped as the rows' last_seen, the eviction clock;
        default each table's own step counter."""
        new_state, tables, rows = {}, {}, {}
        for pname, cfg in self.physical.items():
            t_idx, ids, valid = self._lanes(pname, features)
            u = unique_keys(t_idx, ids, valid)
            ts = state[pname]
            f = ht.find(ts.table, u.tables, u.keys, u.valid, cfg.max_probes)
            if train:
                admit, sketch = self._admit(pname, ts.sketch, u, u.valid & ~f.found)
                tstate, res = ht.find_or_insert(cfg, ts.table, u.tables, u.keys, u.valid, u.counts, admit, f, step)
                live = u.valid & ~res.overflow & (res.found | res.is_new)
                row_ids, overflow, new = res.rows, res.overflow, res.num_new
                not_admitted = jnp.sum(u.valid & ~res.found & ~admit, dtype=jnp.int32)
                # An overflowed step is rerun: its sketch counts must not stick either.
                sketch = jnp.where(overflow, ts.sketch, sketch)
                new_state[pname] = TableState(tstate, sketch)
            else:
                live, row_ids, overflow, new = f.found, f.rows, jnp.asarray(False), jnp.asarray(0, jnp.int32)
                not_admitted = jnp.asarray(0, jnp.int32)
                new_state[pname] = ts
            missing = jnp.sum(u.valid & ~live, dtype=jnp.int32)
            emb = new_state[pname].table.embedding[jnp.where(live, row_ids, 0)].astype(jnp.float32)
            rows[pname] = jnp.where(live[:, None], emb, jnp.float32(0))
            tables[pname] = TableLookup(u, row_ids, live, overflow, not_admitted, missing, new)
        return new_state, Lookup(tables, rows)

    def _lanes(self, pname, features):
        """The table's features' values concatenated, keyed on the exact (table index,
        id) pair: (table index int32, id int64, valid) [N]."""
        members = self.members[pname]
        p = table_id_pairs({m.feature: _ragged(features, m.feature) for m in members},
                           {m.feature: m.table_index for m in members})
        return p.table, p.ids.astype(jnp.int64), p.mask

    def _admit(self, pname, sketch, u: Unique, missing):
        """(admit bool [N], sketch): counts the missing IDs' occurrences in the sketch
        and admits those whose estimate reaches min_count."""
        adm = self._admission[pname]
        if adm is None:
            return jnp.ones_like(u.valid), sketch
        h = _sketch_hash(u.tables, u.keys, adm.depth, adm.width)  # [depth, N]
        d = jnp.arange(adm.depth)[:, None]
        # Only IDs without a row are counted here; a row counts its own occurrences.
        c = jnp.where(missing, u.counts, 0)
        sketch = sketch.at[d, h].add(c[None, :])
        est = jnp.min(sketch[d, h], axis=0)
        return est >= adm.min_count, sketch

    def pool(self, rows: dict[str, jax.Array], lookup: Lookup, features: dict[str, Ragged], dtype=None) -> dict:
        """{feature: pooled output} from the per-table rows ([N, dim] float32, the
        differentiable input). Output shapes follow each feature's combiner; float
        outputs are float32, or `dtype` (e.g. the bfloat16 a model computes in: sum
        pools round their float32 sums to it once, in the kernel). A table whose
        features all sum or mean pools straight from its unique rows (`pool_unique`);
        others expand to per-occurrence rows first."""
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        out = {}
        for pname in self.members:
            out.update(self._pool_table(pname, rows[pname], lookup, features, dtype))
        return out

    def pool_vjp(self, state: dict[str, TableState], lookup: Lookup, features: dict[str, Ragged], dtype=None,
                 segments: bool = False):
        """(pooled, vjp): `jax.vjp(lambda rows: self.pool(rows, lookup, features, dtype),
        lookup.rows)`, where the sum/mean tables (float32 storage) pool straight from the
        table rows: lookup.rows is then only the gradient's point and XLA drops its
        [N, dim] gather (the same values, so the same results). `state` must be the
        tables `lookup` returned (after its inserts), so the rows read are the rows
        lookup.rows holds. vjp(g_pooled) -> ({table: [N, dim] float32},); with
        `segments`, a sum/mean table's gradient is a `SegmentGrads` instead (the bag
        gradients and which lanes sum into each row: the sparse optimizer sums them
        where it updates the rows, and the [N, dim] gradient is never written)."""
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        out, backs = {}, {}
        for pname in self.members:
            if self._pools_unique(pname):
                pooled, back = self._pool_unique_table(pname, lookup.rows[pname], lookup, features, dtype, state)
            else:
                pooled, vjp = jax.vjp(lambda r, p=pname: self._pool_table(p, r, lookup, features, dtype),
                                      lookup.rows[pname])
                back = lambda g, vjp=vjp: vjp(g)[0]  # noqa: E731
            out.update(pooled)
            backs[pname] = (tuple(pooled), back)

        def vjp(g_out):
            grads = {}
            for pname, (names, back) in backs.items():
                g = back({f: g_out[f] for f in names})
                grads[pname] = g if segments else materialize(g)
            return (grads,)

        return out, vjp

    def _pools_unique(self, pname) -> bool:
        """Whether the table's features all sum or mean (pooled from its unique rows)."""
        return all(m.option.combiner in ("sum", "mean") for m in self.members[pname])

    def _pool_table(self, pname, rows, lookup, features, dtype) -> dict:
        """{feature: pooled output} of one table's features (differentiable in rows)."""
        if self._pools_unique(pname):
            return self._pool_unique_table(pname, rows, lookup, features, dtype)[0]
        u = lookup.tables[pname].unique
        members = self.members[pname]
        layouts = [_ragged(features, m.feature) for m in members]
        occ = expand(rows, u.inverse, u.order, u.sorted_segment)
        out = {}
        # lax.split: its transpose is one concatenate (slices would transpose to a sum of pads).
        for m, r, sl in zip(members, layouts, jax.lax.split(occ, [r.capacity for r in layouts])):
            w = r.weights if (m.option.use_weights and r.weights is not None) else None
            out[m.feature] = jax.tree.map(lambda x: _cast(x, dtype), pool(sl, r.row_splits, r.value_rowids(), w,
                                                                          m.option.combiner, m.option.length))
        return out

    def _pool_unique_table(self, pname, rows, lookup, features, dtype, state=None):
        """(pooled, back) of a sum/mean table: its bags straight from the unique rows (no
        [N, dim] occurrence rows), differentiable in rows; back(g_pooled) -> SegmentGrads.
        With `state` (float32 storage), the bags read the table's rows themselves."""
        lk = lookup.tables[pname]
        u = lk.unique
        members = self.members[pname]
        layouts = [_ragged(features, m.feature) for m in members]
        ws = [r.weights if (m.option.use_weights and r.weights is not None) else None
              for m, r in zip(members, layouts)]
        rowids = [r.value_rowids() for r in layouts]
        table = None
        if state is not None and state[pname].table.embedding.dtype == jnp.float32:
            table = (state[pname].table.embedding, lk.rows, lk.live)
        # A mean divides the float32 sum before rounding.
        sum_dtype = dtype if all(m.option.combiner == "sum" for m in members) else jnp.float32
        sums, segments = pool_unique_segments(rows, u.inverse, u.order, u.splits,
                                              [(r.row_splits, rid, w) for r, rid, w in zip(layouts, rowids, ws)],
                                              table, dtype=sum_dtype)

        def finish(sums):
            return {m.feature: _cast(mean_of_sum(s, rid, w) if m.option.combiner == "mean" else s, dtype)
                    for m, rid, w, s in zip(members, rowids, ws, sums)}

        pooled, finish_vjp = jax.vjp(finish, sums)
        return pooled, lambda g: segments(finish_vjp(g)[0])

    # -- backward / update --------------------------------------------------------------
    def sparse_grads(self, lookup: Lookup, row_grads: dict[str, jax.Array], skip: jax.Array | None = None
                     ) -> dict[str, "SparseGrad"]:
        """{trainable table: SparseGrad} from gradients w.r.t. `lookup.rows` ([N, dim],
        already summed over occurrences by the expand backward). skip (bool scalar, and
        any table's overflow) masks everything: the step will be rerun."""
        skip = self.overflow(lookup) if skip is None else (skip | self.overflow(lookup))
        return {p: SparseGrad(lk.rows, _f32(row_grads[p]), lk.live & ~skip)
                for p, lk in lookup.tables.items() if self._trainable[p]}

    def apply_sparse(self, state: dict[str, TableState], grads: dict[str, "SparseGrad"], optimizer,
                     lr_step: jax.Array | None = None) -> tuple[dict[str, TableState], dict]:
        """Applies the sparse optimizer to the touched rows of each trainable table.

        Each table's step counter advances when it has touched rows (the Adam bias
        correction uses it); schedules take `lr_step` (the global step). Rows with
        non-finite gradients are left unchanged and counted. Returns (state, stats) with
        per-table `touched` and `nonfinite` counts."""
        out, stats = dict(state), {}
        for pname, g in grads.items():
            tbl = state[pname].table
            touched = jnp.sum(g.mask, dtype=jnp.int32)
            step = tbl.step + (touched > 0).astype(jnp.int32)
            emb, slots, nonfinite = optimizer.apply(tbl.embedding, tbl.slots, g.rows, g.grads, g.mask, step,
                                                    lr_step=lr_step, count_nonfinite=True)
            out[pname] = state[pname]._replace(table=tbl._replace(embedding=emb, slots=slots, step=step))
            stats[pname] = {"touched": touched, "nonfinite": nonfinite}
        return out, stats

    def apply_gradients(self, state: dict[str, TableState], lookup: Lookup, row_grads: dict[str, jax.Array],
                        optimizer, lr_step: jax.Array | None = None, skip: jax.Array | None = None
                        ) -> tuple[dict[str, TableState], dict]:
        """`apply_sparse(sparse_grads(lookup, row_grads, skip))` in one call."""
        return self.apply_sparse(state, self.sparse_grads(lookup, row_grads, skip), optimizer, lr_step)

    def evict(self, state: dict[str, TableState], step: int, global_step: jax.Array | int | None = None
              ) -> tuple[dict[str, TableState], dict[str, jax.Array]]:
        """Runs each table's eviction policy when `step % policy.every == 0` (host side,
        between steps; the tables are donated). `global_step`: the clock `last_seen` was
        stamped with (the `step` passed to `lookup`); default each table's step counter.
        Returns (state, {table: num_evicted})."""
        out, counts = dict(state), {}
        for pname, policy in self._eviction.items():
            if policy is None:
                continue
            tbl, n = maybe_evict(policy, state[pname].table, step, global_step)
            out[pname] = state[pname]._replace(table=tbl)
            counts[pname] = n
        return out, counts

    @staticmethod
    def overflow(lookup: Lookup) -> jax.Array:
        """True if any table's insert overflowed (the step must be rerun after growing)."""
        return jnp.any(jnp.stack([lk.overflow for lk in lookup.tables.values()]))


def stream_id(table_name: str) -> int:
    """A stable 31-bit id of a logical table's name: its rows' initializer stream."""
    return zlib.crc32(table_name.encode()) & 0x7FFFFFFF


def _f32(g):
    """A gradient in float32 (SegmentGrads: summed in float32 where they are read)."""
    return g if isinstance(g, SegmentGrads) else g.astype(jnp.float32)


def _cast(x, dtype):
    """Float32 outputs in `dtype` (sequence masks and other dtypes as they are)."""
    return x.astype(dtype) if x.dtype == jnp.float32 and dtype != jnp.float32 else x


def _ragged(features, name) -> Ragged:
    if name not in features:
        raise KeyError(f"embedding feature {name!r} missing from the batch (have {sorted(features)})")
    r = features[name]
    if not isinstance(r, Ragged) or r.ragged_rank != 1:
        raise TypeError(f"embedding feature {name!r} must be a 1-level Ragged of int64 IDs, got {type(r).__name__}")
    if not jnp.issubdtype(r.values.dtype, jnp.integer):
        raise TypeError(f"embedding feature {name!r}: IDs must be integers, got {r.values.dtype}")
    return r


def _sketch_hash(tables, keys, depth, width):
    rows = [ht.home_slot(tables + 7919 * (j + 1), keys, 1 << 62) for j in range(depth)]
    return jnp.stack(rows) % width
