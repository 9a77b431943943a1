"""Training on a device mesh (and across processes): the Trainer over a
ShardedEmbeddingEngine.

    trainer = ShardedTrainer(task, engine, dense_tx, sparse_opt, mesh=make_mesh(8), features=fe, ...)
    trainer.fit(reader)        # same loop, logs, checkpoints and resume as Trainer

Every embedding table is row-sharded over the mesh's "data" axis (owner = hash(table,
id) mod n; see sharding/sharded_engine.py); dense params and their optimizer state are
replicated and their gradients all-reduced (data parallel). The global batch is the
reader's batch (one process) or the concatenation of every process's batch
(`jax.distributed`: each process reads its own shard of the files, `Reader`'s default),
split into equal row blocks, one per device. Loss and metrics are global: the loss is
the weighted mean over all devices' rows, so for the same global batch the step matches
the one-device Trainer up to float summation order; the streaming train metrics and the
evaluation are all-reduced / gathered over the mesh.

Differences from the one-device Trainer: sharded tables grow only after an insert
overflow (the step wrote nothing; rows per shard double, host-staged, and the batch is
rerun; in a multi-process run the rows are staged through a directory under the workdir,
which must be on a filesystem all processes see, and every process makes the same
growth, so all re-jit the same program), the bucket capacity is measured over the first
steps (1.25 x the largest fill; `_calibrate_buckets`), a bucket overflow doubles that table's bucket
capacity and reruns the step, eviction runs per shard (the LFU cap as max_rows / n per
shard), and admission is not available on sharded tables yet.
Checkpoints store the live rows by ID, so they load onto any device count, sharded or
not; in a multi-process run every process writes its own shards into one checkpoint
(the workdir must be on a filesystem all processes see).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax.flatten_util import ravel_pytree

from recis_jax.embedding.engine import EmbeddingEngine, TableState
from recis_jax.metrics import streaming
from recis_jax.models.losses import sigmoid_bce_with_logits
from recis_jax.ragged import Ragged, capacity_bucket
from recis_jax.sharding.mesh import AXIS, local_shards, put, put_process_local, split_features, squeeze, unsqueeze
from recis_jax.sharding.sharded_engine import ShardedEmbeddingEngine
from recis_jax.train.step import TrainState, _first_id, _forward
from recis_jax.train.task import Task
from recis_jax.train.trainer import Trainer, TrainingError


def _global_loss(task: Task, logits, labels, weights, wsum):
    """sum over this device's rows of w * loss / (global sum of w): the psum over the
    mesh is the global weighted mean (per task, then task-weighted)."""
    tw = task.task_weights or [1.0] * task.num_tasks
    total = jnp.float32(0)
    for t in range(task.num_tasks):
        per = sigmoid_bce_with_logits(logits[:, t], labels[:, t], weights, reduction="sum")
        total = total + jnp.float32(tw[t]) * per / jnp.maximum(wsum, jnp.float32(1e-12))
    return total


class ZeroLayout:
    """ZeRO-3 layout of the dense side: the params as one float32 vector, padded to a
    multiple of n and sharded over the mesh, so each device stores 1/n of the params and
    of every optimizer-state vector. The step all-gathers the params, and reduce-scatters
    the gradients so each device updates its own slice. Checkpoints hold the ordinary
    (unflattened) trees, so they load with or without ZeRO and on any device count.
    The dense optax transformation must be elementwise (Adam, AdamW, Adagrad, SGD, ...):
    one that reduces over all params, like clip_by_global_norm, would see a slice only."""

    def __init__(self, params_template, n: int):
        flat, self._unravel = ravel_pytree(params_template)
        if flat.dtype != jnp.float32:
            raise ValueError(f"ZeRO needs float32 params, got {flat.dtype}")
        self.size = flat.shape[0]
        self.padded = -(-self.size // n) * n

    def flatten(self, tree) -> jax.Array:
        flat = ravel_pytree(tree)[0].astype(jnp.float32)
        return jnp.pad(flat, (0, self.padded - self.size))

    def unflatten(self, flat: jax.Array):
        return self._unravel(flat[:self.size])

    def is_flat(self, leaf) -> bool:
        return np.shape(leaf) == (self.padded,)

    def specs(self, opt_state):
        """shard_map specs of an optimizer state over the flat params."""
        return jax.tree.map(lambda x: P(AXIS) if self.is_flat(x) else P(), opt_state)

    def opt_to_trees(self, opt_state):
        return jax.tree.map(lambda x: self.unflatten(x) if self.is_flat(x) else x, opt_state)

    def opt_from_trees(self, template, trees):
        """Inverse of opt_to_trees; `template` is a flat optimizer state (a prefix of `trees`)."""
        return jax.tree.map(lambda t, sub: self.flatten(sub) if self.is_flat(t) else sub, template, trees)


def make_sharded_steps(task: Task, sharded: ShardedEmbeddingEngine, features, dense_tx: optax.GradientTransformation,
                       sparse_opt, zero: ZeroLayout | None = None, opt_template=None):
    """(train_step, eval_step) over `sharded.mesh`, with the Trainer's signatures:
    train_step(state, batch) -> (state, metrics); eval_step(state, stats, batch) ->
    (stats, outputs). state.tables are `sharded.init`'s stacked tables; batch leaves are
    [n, B/n, ...] sharded over "data". With `zero` (and `opt_template`, a flat optimizer
    state) the params and optimizer state are ZeroLayout slices."""
    mesh = sharded.mesh

    def full_params(params):
        if zero is None:
            return params
        return zero.unflatten(jax.lax.all_gather(params, AXIS, tiled=True))

    def forward(hts, batch, step, train):
        """This device's tables (a [0, 0] sketch: unused when sharded) and batch slice
        through the shared step's feature ops + lookup (the sharded engine has the
        EmbeddingEngine's lookup signature)."""
        tables = {p: TableState(t, jnp.zeros((0, 0), jnp.int32)) for p, t in squeeze(hts).items()}
        return _forward(task, sharded, features, tables, squeeze(batch), step, train)

    def train_dev(step, params, opt_state, stats, hts, batch):
        tables, lk, feats, labels, weights = forward(hts, batch, step, True)
        batch = squeeze(batch)
        wsum = jax.lax.psum(jnp.sum(weights), AXIS)

        def loss_fn(p, rows):
            logits = task.logits(p, sharded.pool(rows, lk, feats), feats)
            return _global_loss(task, logits, labels, weights, wsum), logits

        (loss, logits), (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            full_params(params), lk.local.rows)
        loss = jax.lax.psum(loss, AXIS)
        if zero is None:
            g_params = jax.lax.psum(g_params, AXIS)
        else:  # the sum over devices, each keeping its own slice
            g_params = jax.lax.psum_scatter(zero.flatten(g_params), AXIS, tiled=True)
        skip = lk.overflow | (wsum == 0)
        updates, new_opt = dense_tx.update(g_params, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt, opt_state)
        grads = sharded.exchange_grads(lk, g_rows, skip)
        tables, upd = sharded.apply_sparse(tables, grads, sparse_opt, lr_step=step.astype(jnp.float32))
        delta = streaming.update(streaming.init(task.num_tasks, stats.pos.shape[-1]), logits, labels,
                                 batch["mask"], weights)
        stats = jax.tree.map(keep, streaming.merge(stats, jax.lax.psum(delta, AXIS)), stats)
        live = jax.lax.psum(jnp.sum(weights > 0, dtype=jnp.int32), AXIS)
        metrics = {"loss": loss, "skipped": skip, "overflow": lk.overflow, "live": live, "tables": {}}
        for p in sharded.engine.physical:
            s = lk.stats[p]
            metrics["tables"][p] = dict(upd.get(p, {}), new=s["new"], missing=jax.lax.psum(
                lk.local.tables[p].missing, AXIS), not_admitted=jnp.int32(0), bucket_overflow=s["bucket_overflow"],
                insert_overflow=s["insert_overflow"], bucket_fill=s["bucket_fill"],
                bucket_capacity=s["bucket_capacity"])
        new_step = step + (~skip).astype(jnp.int32)
        return new_step, params, opt_state, stats, unsqueeze({p: ts.table for p, ts in tables.items()}), metrics

    pspec = P() if zero is None else P(AXIS)
    ospec = P() if zero is None else zero.specs(opt_template)
    train_sm = jax.shard_map(train_dev, mesh=mesh, in_specs=(P(), pspec, ospec, P(), P(AXIS), P(AXIS)),
                             out_specs=(P(), pspec, ospec, P(), P(AXIS), P()),
                             # As sharding.make_train_step: the hashtable loops start from
                             # device-invariant constants; the P() outputs come from psums.
                             check_vma=False)

    def train_step(state: TrainState, batch):
        # Only the hashtables cross the shard_map boundary (a zero-size [n, 0, 0] sketch
        # output crashes XLA:CPU's compiler on jax 0.11.2).
        hts = {p: ts.table for p, ts in state.tables.items()}
        step, params, opt_state, stats, hts, metrics = train_sm(state.step, state.params, state.opt_state,
                                                                state.stats, hts, batch)
        tables = {p: state.tables[p]._replace(table=hts[p]) for p in state.tables}
        return TrainState(step, params, opt_state, tables, stats), metrics

    def eval_dev(step, params, stats, hts, batch):
        _, lk, feats, labels, weights = forward(hts, batch, step, False)
        batch = squeeze(batch)
        logits = task.logits(full_params(params), sharded.pool(lk.local.rows, lk, feats), feats)
        delta = streaming.update(streaming.init(task.num_tasks, stats.pos.shape[-1]), logits, labels,
                                 batch["mask"], weights)
        out = {"logits": logits, "labels": labels, "weights": weights}
        if task.group is not None:
            out["group"] = _first_id(feats[task.group])
        return streaming.merge(stats, jax.lax.psum(delta, AXIS)), unsqueeze(out)

    eval_sm = jax.shard_map(eval_dev, mesh=mesh, in_specs=(P(), pspec, P(), P(AXIS), P(AXIS)),
                            out_specs=(P(), P(AXIS)), check_vma=False)

    def eval_step(state: TrainState, stats, batch):
        hts = {p: ts.table for p, ts in state.tables.items()}
        stats, out = eval_sm(state.step, state.params, stats, hts, batch)
        # [n, B/n, ...] -> [B, ...] in global row order.
        return stats, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


class ShardedTrainer(Trainer):
    """`Trainer` over a device mesh. Extra args: mesh (from `sharding.make_mesh`),
    rows_per_shard / bucket_capacity (see ShardedEmbeddingEngine), zero (shard the dense
    params and optimizer state over the mesh, ZeroLayout, instead of replicating them).
    The reader's batch size must be divisible by the number of local devices."""

    def __init__(self, task: Task, engine: EmbeddingEngine, dense_tx, sparse_opt, *, mesh,
                 rows_per_shard=None, bucket_capacity=None, zero: bool = False, **kwargs):
        self.mesh = mesh
        self.sharded = ShardedEmbeddingEngine(engine, mesh, rows_per_shard, bucket_capacity)
        self._calibrating = bucket_capacity is None  # measure the bucket capacity (see _calibrate_buckets)
        self._fills: dict[str, int] = {}
        self._calibration_steps = 0
        self.zero: ZeroLayout | None = None
        self._zero_requested = zero
        super().__init__(task, engine, dense_tx, sparse_opt, **kwargs)
        if self.accum_steps != 1:
            raise ValueError("gradient accumulation is not supported by the sharded trainer yet")
        if self.steps_per_call != 1:
            raise ValueError("steps_per_call > 1 is not supported by the sharded trainer yet")
        self._build_steps()

    def _build_steps(self) -> None:
        template = self.dense_tx.init(jnp.zeros(self.zero.padded, jnp.float32)) if self.zero else None
        self._train_step, self._eval_step = make_sharded_steps(self.task, self.sharded, self.features,
                                                               self.dense_tx, self.sparse_opt, self.zero, template)

    # -- batches: split the global batch into one row block per device ---------------------
    def _to_device(self, host) -> dict:
        feats = host["features"]
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        k = len(local)
        b = len(host["mask"])
        if b % k:
            raise ValueError(f"batch size {b} is not divisible by the {k} local devices of the mesh")
        ragged = {n: v for n, v in feats.items() if isinstance(v, Ragged)}
        caps = {n: capacity_bucket(max(int(v.row_splits[(i + 1) * (b // k)] - v.row_splits[i * (b // k)])
                                       for i in range(k))) for n, v in ragged.items()}
        if jax.process_count() > 1:  # every process must build the same global shapes
            from jax.experimental import multihost_utils

            names = sorted(caps)
            agreed = multihost_utils.process_allgather(np.array([caps[n] for n in names], np.int64)).max(0)
            caps = dict(zip(names, (int(c) for c in agreed)))
        parts = split_features(ragged, k, caps) if ragged else [dict() for _ in range(k)]
        for name, v in feats.items():
            if not isinstance(v, Ragged):
                v = np.asarray(v)
                for i in range(k):
                    parts[i][name] = v[i * (b // k):(i + 1) * (b // k)]
        mask = np.asarray(host["mask"])
        per_device = [{"features": parts[i], "mask": mask[i * (b // k):(i + 1) * (b // k)]} for i in range(k)]
        if jax.process_count() > 1:
            return put_process_local(self.mesh, per_device)
        return put(self.mesh, per_device)

    # -- state ------------------------------------------------------------------------------
    def _new_state(self, dev) -> TrainState:
        tables = self.sharded.init(self.sparse_opt)
        # One device's block (this process holds it) is enough for the param shapes.
        one = jax.tree.map(lambda x: next(iter(local_shards(x).values())), dev)

        def init_params(one):
            plain = self.engine.init(None)
            feats = self.features.apply(one["features"]) if self.features is not None else one["features"]
            _, lk = self.engine.lookup(plain, feats, train=False)
            emb = self.engine.pool(lk.rows, lk, feats)
            return self.task.module.init(jax.random.key(self.seed), **self.task.inputs(emb, feats))["params"]

        params = jax.jit(init_params)(one)
        rep = NamedSharding(self.mesh, P())
        if self._zero_requested:
            self.zero = ZeroLayout(params, self.sharded.n)
            self._build_steps()
            params, opt_state = self._zero_place(params, self.dense_tx.init(params))
        else:
            params = jax.device_put(params, rep)
            opt_state = jax.device_put(self.dense_tx.init(params), rep)
        stats = self._fresh_stats()
        return TrainState(jax.device_put(jnp.zeros((), jnp.int32), rep), params, opt_state, tables, stats)

    def _zero_place(self, params, opt_trees):
        """Param / optimizer-state trees -> their ZeroLayout slices on the mesh."""
        z = self.zero
        template = self.dense_tx.init(jnp.zeros(z.padded, jnp.float32))
        flat_p, flat_o = jax.device_get((z.flatten(params), z.opt_from_trees(template, opt_trees)))
        place = lambda x: jax.device_put(x, NamedSharding(self.mesh, P(AXIS) if z.is_flat(x) else P()))  # noqa: E731
        return place(flat_p), jax.tree.map(place, flat_o)

    def _gather(self, x):
        """A ZeRO-sliced vector replicated on every device (an all-gather)."""
        return jax.device_put(x, NamedSharding(self.mesh, P())) if self.zero.is_flat(x) else x

    def dense_params(self):
        """The dense params as the model's tree (gathered from the ZeRO slices)."""
        return self.zero.unflatten(self._gather(self.state.params)) if self.zero else self.state.params

    def _dense(self, state: TrainState) -> dict:
        # Checkpoints hold ordinary trees (with or without ZeRO, on any device count).
        if self.zero is None:
            return super()._dense(state)
        return {"step": state.step, "params": self.zero.unflatten(self._gather(state.params)),
                "opt_state": self.zero.opt_to_trees(jax.tree.map(self._gather, state.opt_state)),
                "stats": state.stats}

    def _evict_tables(self, host_step: int):
        return self.sharded.evict(self.state.tables, host_step, self.state.step)

    def _fresh_stats(self):
        """Replicated over the mesh: in a multi-process run a host-local array could be
        neither an input of the step nor checkpointed by orbax."""
        return jax.device_put(streaming.init(self.task.num_tasks), NamedSharding(self.mesh, P()))

    def _restore_kwargs(self) -> dict:
        return {"sharded": self.sharded}

    def _table_engine(self):
        return self.sharded

    def restore(self, step=None) -> None:
        super().restore(step)
        rep = NamedSharding(self.mesh, P())
        if self.zero is None:
            params, opt_state = (jax.device_put(self.state.params, rep), jax.device_put(self.state.opt_state, rep))
        else:
            params, opt_state = self._zero_place(self.state.params, self.state.opt_state)
        self.state = self.state._replace(step=jax.device_put(self.state.step, rep), params=params,
                                         opt_state=opt_state, stats=jax.device_put(self.state.stats, rep))

    # -- capacity -------------------------------------------------------------------------------
    def _ensure_room(self, lanes, force: bool = False) -> None:
        """Sharded tables do not grow between steps (yet): nothing to do here."""

    def _lanes(self, dev) -> dict[str, int]:
        return {p: 0 for p in self.engine.physical}

    CALIBRATE_AFTER = 4  # checked steps whose bucket fills set the measured capacity

    def _check(self, pending) -> dict:
        m = super()._check(pending)
        if self._calibrating:
            self._calibrate_buckets(m)
        return m

    def _calibrate_buckets(self, m: dict) -> None:
        """The engine's default bucket capacity is a safe bound (every lane a distinct
        ID): owners then sort and probe ~2x the lanes a device has, which cost 30-45% of
        weak-scaling efficiency on 2-4 H100s (benchmarks/results/sharding_scaling_h100x4.md).
        After CALIBRATE_AFTER steps the capacity becomes 1.25 x the largest fill they
        saw (rounded up to 64) and the steps re-jit once; a later, larger batch
        overflows, grows the capacity and is rerun (never dropped). The fills are
        reduced over the mesh, so every process makes the same choice."""
        for p, t in m["tables"].items():
            self._fills[p] = max(self._fills.get(p, 0), int(t["bucket_fill"]))
        self._calibration_steps += 1
        if self._calibration_steps < self.CALIBRATE_AFTER:
            return
        self._calibrating = False
        current = {p: int(t["bucket_capacity"]) for p, t in m["tables"].items()}
        want = {p: min(current[p], max(64, -(-int(1.25 * self._fills[p]) // 64) * 64)) for p in current}
        if want != current:
            self.sharded._bucket_capacity = want
            self._build_steps()

    def _grow_after_overflow(self, batch, m: dict) -> None:
        """An insert overflow doubles the table's rows per shard; a bucket overflow
        doubles its bucket capacity (the steps re-jit for the new shapes)."""
        full = [p for p, t in m["tables"].items() if t["insert_overflow"]]
        if full:
            self._grow_tables(full)
        caps = dict(self.sharded._bucket_capacity) if isinstance(self.sharded._bucket_capacity, dict) else {}
        for p, t in m["tables"].items():
            if t["bucket_overflow"]:
                lanes = max(int(t["bucket_fill"]), 1)
                caps[p] = 1 << (2 * lanes - 1).bit_length()
        if caps:
            self.sharded._bucket_capacity = caps
            self._build_steps()

    def _grow_tables(self, names: list[str]) -> None:
        """Doubles the rows per shard of `names`: their live rows go out in the
        checkpoint's sparse format and come back into larger slabs, each row on its owner
        (IDs, values, optimizer slots, last_seen and count carried exactly; row numbers
        are new, nothing depends on them). Host-staged, through a temporary directory
        (`_stage_multiprocess` in a multi-process run)."""
        import tempfile

        from recis_jax.checkpoint.sparse import load_sparse, save_sparse

        new_rows = {p: 2 * self.sharded.rows_per_shard[p] for p in names}
        old = {p: self.state.tables[p] for p in names}

        def load(directory, entries):
            return load_sparse(directory, {"tables": entries}, self.engine, self.sparse_opt, tables=names,
                               sharded=self.sharded, num_rows=new_rows)

        if jax.process_count() > 1:
            grown = self._stage_multiprocess(names, old, load)
        else:
            with tempfile.TemporaryDirectory(prefix="recis-grow.") as tmp:
                grown = load(tmp, save_sparse(tmp, old, self.sharded))
        for leaf in jax.tree.leaves(old):  # as after a donated call: the old slabs are gone
            leaf.delete()
        self.state = self.state._replace(tables={**self.state.tables, **grown})
        self.progress.message(f"grew sharded table(s) {', '.join(names)} to "
                              f"{', '.join(str(self.sharded.rows_per_shard[p]) for p in names)} rows per shard")

    def _stage_multiprocess(self, names: list[str], old: dict, load) -> dict:
        """`_grow_tables`' round trip in a `jax.distributed` run, as the multi-process
        checkpoint save does it: every process writes the live rows of the shards it
        holds into one directory under the workdir (which all processes see), then every
        process reads all of them back (`load`), keeping the new shards of its own
        devices. Every process decides the same growth (the overflow flags are reduced
        over the mesh) and builds the same shapes, so all re-jit the same program."""
        import os
        import shutil

        from jax.experimental import multihost_utils

        from recis_jax.checkpoint.manager import read_parts, write_part
        from recis_jax.checkpoint.sparse import save_sparse

        step = int(self.state.step)
        if not self.workdir:
            raise TrainingError(
                f"step {step}: sharded table(s) {', '.join(repr(p) for p in names)} ran out of rows or probes "
                f"({', '.join(str(self.sharded.rows_per_shard[p]) for p in names)} rows per shard); nothing was "
                f"written. Growing them in a multi-process run stages the rows through the workdir: give the "
                f"trainer a workdir on a filesystem every process sees (`--workdir`, ShardedTrainer(workdir=...)), "
                f"or size the tables with embedding.rows_per_shard")
        me = jax.process_index()
        tmp = os.path.join(self.workdir, f".recis-grow.{step}")
        parts = os.path.join(tmp, "parts")
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted run
            os.makedirs(parts)
        try:
            multihost_utils.sync_global_devices(f"recis-jax grow {step}: begin")
            os.makedirs(parts, exist_ok=True)  # exists unless the workdir is not shared (checked below)
            write_part(parts, save_sparse(tmp, old, self.sharded, local_only=True))
            multihost_utils.sync_global_devices(f"recis-jax grow {step}: written")
            grown = load(tmp, read_parts(parts))
            multihost_utils.sync_global_devices(f"recis-jax grow {step}: loaded")
        finally:
            if me == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        return grown

    def table_sizes(self) -> dict[str, int]:
        local = {p: sum(v.values()) for p, v in self.sharded.shard_sizes(self.state.tables).items()}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            names = sorted(local)
            tot = multihost_utils.process_allgather(np.array([local[n] for n in names], np.int64)).sum(0)
            local = dict(zip(names, (int(x) for x in tot)))
        return local

    def _fetch(self, outs):
        if jax.process_count() == 1:
            return jax.device_get(outs)
        from jax.experimental import multihost_utils

        return [multihost_utils.process_allgather(o, tiled=True) for o in outs]
