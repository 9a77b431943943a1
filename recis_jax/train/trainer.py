"""Trainer: the host loop around the jitted steps.

    trainer = Trainer(task, engine, optax.adam(1e-3), sparse_adam(1e-3),
                      features=feature_engine, workdir="/tmp/run", checkpoint_every=1000)
    summary = trainer.fit(train_reader, eval_reader=eval_reader)

The loop feeds prefetched batches (the Reader decodes in threads), dispatches one
`train_step` per batch and never waits for the device on the step it just dispatched:
it fetches the previous step's small metrics (loss, overflow, non-finite counts) while
the current one runs. It
  * keeps table headroom: a host-side upper bound of each table's live rows (+ the
    batch's lanes per step) triggers `capacity.ensure_headroom` (one sync) before a
    table can run out, so inserts practically never overflow; if one does (the step
    changed nothing), the tables grow and that batch is rerun as soon as the host sees
    it - one step later, since the host looks one step behind (a deterministic order:
    a rerun of the same run overflows at the same step). Known limit: the other tables
    of an overflowed step keep that step's new rows (at their initial values, no
    update), so their count / last_seen / admission sketch see the batch twice;
  * stops on a non-finite loss or gradient with a TrainingError naming the step and
    the tables, before any checkpoint could store it;
  * logs every `log_every` steps (progress line, workdir/metrics.jsonl, TensorBoard
    when available): loss, streaming train AUC, samples/s, table sizes and
    new / evicted / overflow counts;
  * evaluates every `eval_every` steps and at the end; runs eviction policies; traces
    chosen steps with the profiler; checkpoints every `checkpoint_every` steps and at
    the end (atomic, sparse safetensors + orbax dense + reader position) and resumes
    from the latest checkpoint in workdir/checkpoints on the next run.

Determinism: data order (seeded reader), initial rows (a function of ID and seed) and
every reduction are fixed, so a run killed at any point and restarted with the same
command ends with the same parameters as an uninterrupted one, bitwise on the same
machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recis_jax import metrics as exact_metrics
from recis_jax.checkpoint import CheckpointManager
from recis_jax.embedding import capacity
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.engine import EmbeddingEngine
from recis_jax.io.reader import Batch, Reader, ReaderState
from recis_jax.metrics import streaming
from recis_jax.runtime import keep_freed_host_memory
from recis_jax.train.hooks import MetricsWriter, Profiler, ProgressLogger, Timer
from recis_jax.train.step import (TrainState, init_state, make_eval_step, make_multi_step, make_train_step,
                                  same_shapes, stack_batches)
from recis_jax.train.task import Task


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, a table that cannot grow)."""


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics the host has not looked at yet."""

    batches: list       # its batches (host trees, kept to rerun one after an overflow)
    metrics: dict       # device scalars ([S] each for a call of S > 1 steps)
    reader: ReaderState | None
    examples: int


class Trainer:
    """Trains a Task with an EmbeddingEngine on one device. See the module docstring.

    Args:
      task: the model and its labels (train/task.py).
      engine: the embedding tables' engine; sparse_opt: its optimizer (optim.sparse).
      dense_tx: the optax transformation of the dense params.
      features: a FeatureEngine run on every batch (host stage, then inside the step),
        or None when the reader's columns feed the engine directly.
      workdir: where metrics.jsonl, checkpoints/, summary.json, tb/ and profile/ go;
        None keeps nothing on disk (no checkpoints, no resume).
      seed: dense init seed (the tables' init seed is the engine's).
      log_every, eval_every, checkpoint_every: intervals in steps (None: never; the
        end of `fit` always evaluates when given an eval reader and checkpoints when
        it has a workdir).
      keep_last, keep_every: checkpoint retention.
      accum_steps: micro-batches per update (sparse gradient accumulation).
      command_buffers: XLA:GPU CUDA graphs for the step (`step.make_train_step`; the
        one-device step only).
      steps_per_call: steps dispatched as one device call (`step.make_multi_step`) when no
        log / eval / checkpoint / eviction / profile / num_steps boundary falls inside
        them (those steps go one by one), so hooks run at the same steps as with 1.
        Worth it when the host dispatches a step slower than the device runs it.
      max_rows: per-table row budget for growth ({table: rows} or one int; None: no cap).
      profile: (start, stop) steps to trace, or None.
      tensorboard: write event files when a writer is importable.
      config_hash: recorded in each checkpoint's manifest (refuses nothing; informs).
      progress: a ProgressLogger (default: stdout, a bar on a terminal).
    """

    def __init__(self, task: Task, engine: EmbeddingEngine, dense_tx: optax.GradientTransformation, sparse_opt,
                 *, features=None, workdir: str | None = None, seed: int = 0, log_every: int | None = 100,
                 eval_every: int | None = None, checkpoint_every: int | None = None, keep_last: int | None = 3,
                 keep_every: int | None = None, accum_steps: int = 1, steps_per_call: int = 1,
                 command_buffers: bool = True, max_rows: int | dict | None = None,
                 profile: tuple[int, int] | None = None, tensorboard: bool = True, config_hash: str = "",
                 progress: ProgressLogger | None = None):
        self.task, self.engine, self.features = task, engine, features
        self.dense_tx, self.sparse_opt = dense_tx, sparse_opt
        self.workdir, self.seed = workdir, seed
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.accum_steps = accum_steps
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.steps_per_call = steps_per_call
        self.max_rows = max_rows
        self.config_hash = config_hash
        self.progress = progress or ProgressLogger()
        if jax.default_backend() == "cpu":
            keep_freed_host_memory()  # XLA:CPU's per-step temporaries: no page faults (runtime.py)
        self._train_step = make_train_step(task, engine, features, dense_tx, sparse_opt, accum_steps,
                                           command_buffers=command_buffers)
        self._train_steps = make_multi_step(self._train_step, command_buffers=command_buffers)
        self._eval_step = make_eval_step(task, engine, features)
        # Multi-process runs: every process writes its own table shards into one checkpoint
        # (the workdir must be on a filesystem all processes see); metrics come from process 0.
        self.checkpoints = (CheckpointManager(os.path.join(workdir, "checkpoints"), keep_last=keep_last,
                                              keep_every=keep_every) if workdir else None)
        lead = jax.process_index() == 0
        self.writer = MetricsWriter(workdir, tensorboard) if (workdir and lead) else None
        self.profiler = Profiler(workdir, *profile) if (profile and workdir) else None
        self.state: TrainState | None = None
        self.meta: dict = {}            # host position: reader state, examples, window
        self._live_bound: dict[str, int] = {}
        self._lanes_cache: dict = {}
        self._counts = {"new": 0, "evicted": 0, "overflow": 0, "not_admitted": 0}
        self._examples = self._examples_at_start = 0

    # -- batches ------------------------------------------------------------------------
    def host_batch(self, batch: Batch) -> dict:
        """Host Batch -> host dict {"features", "mask"} (host feature stage applied)."""
        feats = self.features.host_transform(batch.features) if self.features is not None else batch.features
        return {"features": feats, "mask": batch.mask}

    def device_batch(self, batch: Batch) -> dict:
        """Host Batch -> device dict {"features", "mask"} (host feature stage applied)."""
        return self._to_device(self.host_batch(batch))

    def _to_device(self, host):
        return jax.device_put(host)

    def _micro(self, batches: Iterable[Batch]):
        """Yields (host batch or tuple of accum_steps of them, last Batch, examples)."""
        group = []
        for b in batches:
            group.append(b)
            if len(group) == self.accum_steps:
                hb = [self.host_batch(g) for g in group]
                yield (hb[0] if self.accum_steps == 1 else tuple(hb)), group[-1], sum(g.num_rows for g in group)
                group = []
        if group:  # a short tail: pad with fully masked copies (they weigh nothing)
            last = group[-1]
            while len(group) < self.accum_steps:
                group.append(Batch(last.features, np.zeros_like(last.mask), last.state))
            yield tuple(self.host_batch(g) for g in group), last, sum(g.num_rows for g in group)

    def _calls(self, units, at: Callable[[], int], num_steps: int | None, evaluating: bool):
        """Groups the (host batch, last Batch, examples) units into device calls: lists of
        steps_per_call units when no hook is due inside the call and their shapes stack,
        else single units. `at()`: the host step before the call."""
        units = iter(units)
        while True:
            s = self.steps_per_call
            if s > 1 and self._steps_to_boundary(at(), num_steps, evaluating) < s:
                s = 1
            group = list(itertools.islice(units, s))
            if not group:
                return
            if len(group) == s and (s == 1 or same_shapes([g[0] for g in group])):
                yield group
            else:  # a short tail, or a batch of other shapes: one by one
                yield from ([g] for g in group)

    def _steps_to_boundary(self, step: int, num_steps: int | None, evaluating: bool) -> int:
        """Steps from `step` to the next step after which a hook runs (log, eval,
        checkpoint, eviction, profiler start / stop, num_steps)."""
        every = [self.log_every, self.checkpoint_every, self.eval_every if evaluating else None]
        every += [p.every for p in self.engine._eviction.values() if p is not None]
        ahead = [e - step % e for e in every if e]
        points = [num_steps] + ([self.profiler.start, self.profiler.stop] if self.profiler else [])
        ahead += [p - step for p in points if p is not None and p > step]
        return min(ahead, default=self.steps_per_call)

    # -- state --------------------------------------------------------------------------
    def init(self, sample: Batch) -> TrainState:
        """A fresh state, or the latest checkpoint in workdir when there is one (then
        `self.meta` holds its reader position). Idempotent."""
        if self.state is not None:
            return self.state
        self.state = self._new_state(self.device_batch(sample))
        if self.checkpoints is not None and self.checkpoints.latest_step() is not None:
            self.restore()
        return self.state

    def _new_state(self, dev) -> TrainState:
        return init_state(self.task, self.engine, self.features, self.dense_tx, self.sparse_opt, dev, self.seed)

    def dense_params(self):
        """The dense params as the model's tree."""
        return self.state.params

    def _dense(self, state: TrainState) -> dict:
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "stats": state.stats}

    def restore(self, step: int | None = None) -> None:
        """Loads a checkpoint (default the latest) into self.state / self.meta."""
        r = self.checkpoints.restore(step, engine=self.engine, optimizer=self.sparse_opt,
                                     dense_target=self._dense(self.state), **self._restore_kwargs())
        d = r.dense
        self.state = TrainState(jnp.asarray(d["step"], jnp.int32), d["params"], d["opt_state"], r.tables,
                                d["stats"])
        self.meta = dict(r.meta)
        self._examples = int(self.meta.get("examples", 0))
        self._counts.update(self.meta.get("counts", {}))
        self._live_bound = {}
        self.progress.message(f"resumed from checkpoint step {r.step} ({self.checkpoints.root})")

    def _restore_kwargs(self) -> dict:
        return {}

    def save(self, reader: ReaderState | None, **extra_meta) -> str | None:
        """Checkpoints self.state with the reader position after the last applied batch."""
        if self.checkpoints is None:
            return None
        step = int(self.state.step)
        self.meta.update(extra_meta, reader=_all_readers(reader),
                         examples=self._examples, counts=dict(self._counts), seed=self.seed)
        return self.checkpoints.save(step, tables=self.state.tables, engine=self._table_engine(),
                                     dense=self._dense(self.state), meta=self.meta,
                                     config_hash=self.config_hash)

    def _table_engine(self):
        """The engine that made the tables (the plain one here; sharded subclasses differ)."""
        return self.engine

    # -- headroom -----------------------------------------------------------------------
    def _lanes(self, dev) -> dict[str, int]:
        """Upper bound of new IDs per table in one step: its lanes (static capacities)."""
        mb = dev if isinstance(dev, tuple) else (dev,)
        key = jax.tree.structure(mb), tuple(np.shape(x) for x in jax.tree.leaves(mb))
        if key not in self._lanes_cache:
            if self.features is not None:
                feats = jax.eval_shape(self.features.apply, mb[0]["features"])
            else:
                feats = mb[0]["features"]
            self._lanes_cache[key] = {p: len(mb) * sum(feats[m.feature].values.shape[0]
                                                       for m in self.engine.members[p])
                                      for p in self.engine.physical}
        return self._lanes_cache[key]

    def _table_max_rows(self, p: str) -> int | None:
        return self.max_rows.get(p) if isinstance(self.max_rows, dict) else self.max_rows

    def _ensure_room(self, lanes: dict[str, int], force: bool = False) -> None:
        tables = dict(self.state.tables)
        for p, n in lanes.items():
            t = tables[p].table
            bound = self._live_bound.get(p)
            if not force and bound is not None and bound + n <= t.capacity:
                self._live_bound[p] = bound + n
                continue
            try:
                new, _ = capacity.ensure_headroom(self.engine.physical[p], t, n, steps=4,
                                                  max_rows=self._table_max_rows(p))
            except ValueError as e:
                raise TrainingError(str(e)) from e
            tables[p] = tables[p]._replace(table=new)
            self._live_bound[p] = int(ht.size(new)) + n
        self.state = self.state._replace(tables=tables)

    # -- steps --------------------------------------------------------------------------
    def _check(self, pending: _Pending) -> dict:
        """Looks at a dispatched call's metrics: reruns each overflowed step's batch after
        growing (in the call's order, after the call's other steps), raises on non-finite
        values, accumulates counters. Returns the (host) metrics of the call's last step."""
        m = jax.device_get(pending.metrics)
        n = len(pending.batches)
        for j, batch in enumerate(pending.batches):
            mj = m if n == 1 else jax.tree.map(lambda x: x[j], m)  # noqa: B023
            self._check_step(self._recheck(batch, mj))
        self._examples += pending.examples
        return mj

    def _recheck(self, batch, m: dict) -> dict:
        """A step's metrics after rerunning its batch until it does not overflow."""
        attempts = 0
        while m["overflow"]:
            # The step wrote nothing: grow, then rerun the same batch.
            attempts += 1
            if attempts > 8:
                raise TrainingError(f"step {int(self.state.step)}: the tables still overflow after 8 growths")
            self._counts["overflow"] += 1
            self._grow_after_overflow(batch, m)
            self.state, metrics = self._train_step(self.state, self._to_device(batch))
            m = jax.device_get(metrics)
        return m

    def _check_step(self, m: dict) -> None:
        bad = [p for p, t in m["tables"].items() if int(t.get("nonfinite", 0)) > 0]
        if not math.isfinite(float(m["loss"])) or bad:
            step = int(self.state.step)
            raise TrainingError(
                f"step {step}: loss is {float(m['loss'])}" +
                (f"; non-finite gradients in table(s) {', '.join(repr(b) for b in bad)} "
                 f"({', '.join(str(int(m['tables'][b]['nonfinite'])) for b in bad)} rows)" if bad else "") +
                " - stopped before checkpointing; lower the learning rate or check the input data")
        for t in m["tables"].values():
            self._counts["new"] += int(t["new"])
            self._counts["not_admitted"] += int(t["not_admitted"])

    def _grow_after_overflow(self, batch, m: dict) -> None:
        """Doubles every table's index, and its rows when they could not hold the batch."""
        tables = dict(self.state.tables)
        for p, ts in tables.items():
            t = ts.table
            full = int(t.num_free) < self._lanes(batch)[p]
            tables[p] = ts._replace(table=capacity.grow(self.engine.physical[p], t,
                                                        2 * t.capacity if full else t.capacity, 2 * t.num_slots))
        self.state = self.state._replace(tables=tables)
        self._live_bound = {}

    def table_sizes(self) -> dict[str, int]:
        return {p: int(v) for p, v in jax.device_get({p: ht.size(ts.table)
                                                       for p, ts in self.state.tables.items()}).items()}

    # -- fit ----------------------------------------------------------------------------
    def _init_from(self, reader: Reader) -> None:
        """Initializes (or restores) the state from the reader's first batch's shapes."""
        if self.state is not None:
            return
        it = reader.batches()
        first = next(it, None)
        it.close()
        if first is None:
            raise TrainingError(f"no data: the reader over {len(reader.files)} file(s) yields no batch")
        self.init(first)

    def fit(self, reader: Reader, *, eval_reader: Reader | None = None, num_steps: int | None = None,
            window: int | None = None) -> dict:
        """Trains on `reader` until it ends or the state reaches `num_steps` updates,
        then evaluates (when given `eval_reader`) and checkpoints. A run restored from a
        checkpoint continues at the checkpoint's reader position (a finished reader yields
        nothing more; one with more epochs than before goes on with the next epoch).
        `window` tags checkpoints in online learning. Returns the summary dict (also
        written to workdir/summary.json)."""
        t_start = time.perf_counter()
        self._init_from(reader)
        self._examples_at_start = self._examples  # samples/s counts this run's examples only
        same = self.meta.get("window") == window
        done = num_steps is not None and int(self.state.step) >= num_steps
        start = _my_reader(self.meta.get("reader")) if same else None
        host_step = int(self.state.step)
        timer, pending, last_reader, finished = Timer(), None, start, True
        self.progress.total = num_steps
        batches = () if done else reader.batches(start)
        for call in self._calls(self._micro(batches), lambda: host_step, num_steps, eval_reader is not None):
            n, last, examples = len(call), call[-1][1], sum(u[2] for u in call)
            hosts = [u[0] for u in call]
            if self.profiler:
                self.profiler.before_step(host_step)
            self._ensure_room({p: n * k for p, k in self._lanes(hosts[0]).items()})
            if n == 1:
                self.state, metrics = self._train_step(self.state, self._to_device(hosts[0]))
            else:
                self.state, metrics = self._train_steps(self.state, self._to_device(stack_batches(hosts)))
            if pending is not None:
                self._check(pending)
            pending = _Pending(hosts, metrics, last.state, examples)
            host_step += n
            timer.examples += examples
            timer.steps += n
            if self.profiler:
                self.profiler.after_step(host_step - 1, metrics["loss"])
            self._evict(host_step)
            due = lambda every: every and host_step % every == 0  # noqa: E731
            if due(self.log_every) or due(self.checkpoint_every) or (eval_reader and due(self.eval_every)):
                self._check(pending)
                pending, last_reader = None, last.state
            if due(self.log_every):
                self._log(timer, host_step)
            if eval_reader is not None and due(self.eval_every):
                self.evaluate(eval_reader, log_step=host_step)
            if due(self.checkpoint_every):
                self.save(last.state, window=window, finished=False)
            if num_steps is not None and host_step >= num_steps:
                finished = False
                break
        if pending is not None:
            self._check(pending)
            last_reader = pending.reader
        if hasattr(batches, "close"):
            batches.close()
        host_step = int(self.state.step)
        if timer.steps:
            self._log(timer, host_step)
        eval_result = self.evaluate(eval_reader, log_step=host_step) if eval_reader is not None else {}
        if self.checkpoints is not None and (timer.steps or self.checkpoints.latest_step() != host_step):
            self.save(last_reader, window=window, finished=finished)
        return self._summary(eval_result, t_start)

    def _evict_tables(self, host_step: int):
        return self.engine.evict(self.state.tables, host_step, global_step=self.state.step)

    def _fresh_stats(self) -> streaming.StreamingState:
        """Zeroed train metrics (placed like the rest of the state)."""
        return streaming.init(self.task.num_tasks)

    def _evict(self, host_step: int) -> None:
        if all(p is None for p in self.engine._eviction.values()):
            return
        tables, counts = self._evict_tables(host_step)
        self.state = self.state._replace(tables=tables)
        if counts:
            n = sum(int(c) for c in jax.device_get(counts).values())
            self._counts["evicted"] += n
            if n:
                self._live_bound = {}  # tombstones changed the index load

    def _log(self, timer: Timer, step: int) -> None:
        secs, examples, steps = timer.lap()
        res = streaming.result(jax.device_get(self.state.stats))
        self.state = self.state._replace(stats=self._fresh_stats())
        record = {"kind": "train", "step": step, "loss": res.get("logloss"), "auc": res.get("auc"),
                  "samples_per_sec": examples / max(secs, 1e-9), "steps_per_sec": steps / max(secs, 1e-9),
                  "examples": self._examples, "table_sizes": self.table_sizes(), **self._counts}
        for k, v in res.items():
            if "/" in k:
                record[k] = v
        self.progress.log(record)
        if self.writer:
            self.writer.write(record)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, reader: Reader, log_step: int | None = None, state: TrainState | None = None) -> dict:
        """Find-only evaluation over the whole reader: exact AUC / GAUC / logloss /
        calibration from the collected predictions, and the on-device streaming
        histogram AUC beside them (`auc_hist`)."""
        if state is None:
            self._init_from(reader)
            state = self.state
        stats = streaming.init(self.task.num_tasks)
        outs = []
        for b in reader.batches():
            stats, out = self._eval_step(state, stats, self.device_batch(b))
            outs.append(out)
        outs = self._fetch(outs)
        if not outs:
            return {}
        logits = np.concatenate([o["logits"] for o in outs])
        labels = np.concatenate([o["labels"] for o in outs])
        w = np.concatenate([o["weights"] for o in outs])
        keep = w > 0
        preds = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        hist = streaming.result(jax.device_get(stats))
        res: dict[str, Any] = {"count": int(keep.sum())}
        for t, name in enumerate(self.task.labels):
            sfx = "" if t == 0 else f"/{name}"
            y, p, wt = labels[keep, t], preds[keep, t], w[keep]
            res["auc" + sfx] = exact_metrics.auc(y, p, wt)
            res["logloss" + sfx] = exact_metrics.logloss(y, p, weights=wt)
            res["calibration" + sfx] = exact_metrics.calibration(y, p, weights=wt)
            res["auc_hist" + sfx] = hist.get("auc" if t == 0 else f"auc/{t}")
            if self.task.group is not None:
                g = np.concatenate([o["group"] for o in outs])[keep]
                res["gauc" + sfx], res["gauc_groups" + sfx] = exact_metrics.gauc(y, p, g, wt)
        if log_step is not None:
            record = {"kind": "eval", "step": log_step, **res}
            self.progress.message("eval " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in res.items()))
            if self.writer:
                self.writer.write(record)
        return res

    def _fetch(self, outs):
        """Device outputs -> host numpy (sharded subclasses gather across processes)."""
        return jax.device_get(outs)

    # -- windows (online learning) ---------------------------------------------------------
    def fit_windows(self, windows: Sequence[Any], make_reader: Callable[[Any], Reader]) -> dict:
        """Online learning: for each window in order, evaluate the current model on it
        (data the model has not seen yet), then train one pass on it; a checkpoint
        closes each window. A restarted run skips finished windows and resumes inside
        the checkpoint's window at its reader position. Returns the summary with the
        per-window evaluations (on the windows they precede)."""
        results = []
        for i, w in enumerate(windows):
            reader = make_reader(w)
            self._init_from(reader)
            at = self.meta.get("window")
            if at is not None and (i < at or (i == at and self.meta.get("finished"))):
                continue  # trained before the restart
            if i > 0 and not (i == at and self.meta.get("reader")):
                pre = self.evaluate(reader)
                results.append({"window": i, **pre})
                self.progress.message(f"window {i}: auc before training on it {pre.get('auc', float('nan')):.4f}")
                if self.writer:
                    self.writer.write({"kind": "window_eval", "step": int(self.state.step), "window": i, **pre})
            self.fit(reader, window=i)
        summary = {"windows": results, "steps": int(self.state.step) if self.state else 0,
                   "examples": self._examples, "table_sizes": self.table_sizes() if self.state else {}}
        self._write_summary(summary)
        return summary

    # -- summary ------------------------------------------------------------------------
    def _summary(self, eval_result: dict, t_start: float) -> dict:
        wall = time.perf_counter() - t_start
        summary = {
            "eval": eval_result,
            "steps": int(self.state.step) if self.state is not None else 0,
            "examples": self._examples,
            "wall_seconds": wall,
            "samples_per_sec": (self._examples - self._examples_at_start) / max(wall, 1e-9),
            "table_sizes": self.table_sizes() if self.state is not None else {},
            "counts": dict(self._counts),
            "device": str(jax.devices()[0]),
        }
        self._write_summary(summary)
        return summary

    def _write_summary(self, summary: dict) -> None:
        if self.workdir and jax.process_index() == 0:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)


def _all_readers(reader: ReaderState | None):
    """The reader position to checkpoint: this process's, or in a multi-process run
    every process's (each reads its own shard of the files), as a list by process."""
    if jax.process_count() == 1:
        return reader.to_dict() if reader is not None else None
    from jax.experimental import multihost_utils

    mine = np.array([-1, 0, 0, 0] if reader is None else [reader.epoch, reader.unit, reader.row, reader.step],
                    np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), 4)
    return [None if e[0] < 0 else ReaderState(*(int(v) for v in e)).to_dict() for e in every]


def _my_reader(saved) -> ReaderState | None:
    if isinstance(saved, list):
        if len(saved) != jax.process_count():
            raise TrainingError(f"the checkpoint holds reader positions of {len(saved)} processes; this run has "
                                f"{jax.process_count()} (resume with the same number of processes, or start the "
                                f"data afresh)")
        saved = saved[jax.process_index()]
    return ReaderState.from_dict(saved) if saved else None
