"""FeatureEngine: runs declarative features over a batch dict, in two stages.

    engine = FeatureEngine([Feature("user", [SelectField("user"), Mod(10**6)]), ...])
    batch = engine.host_transform(batch)   # host: Hash on string columns (numpy)
    out = jax.jit(engine)(batch)           # device: everything else, no host callbacks
    out = engine.transform(batch)          # both (the device stage jitted and cached)

A batch is a dict of column -> dense array [B, ...] or `Ragged`. The output dict holds
one entry per feature (IDMultiHash: `{feature}_{prefix}_{j}`), and every input column
that no feature overwrites passes through unchanged (as in RecIS). If a FeatureCross
has a fixed capacity, `out[OVERFLOW_KEY]` maps its feature to the pair count the
exact cross needs (int64 scalar): overflow iff that exceeds the capacity.

Execution follows RecIS: step k runs the k-th op of every feature. With `fuse=True`,
elementwise ops of one kind (and input dtype) in a step run as one call over the
concatenated values with per-value parameters; with `fuse=False` each feature runs its
own op inside the same jit; `fuse=None` (the default) fuses only the kinds measured
faster that way. benchmarks/features.py measures all three (results in
benchmarks/results/features_cpu.md): per-feature wins for Mod, IDMultiHash and the
numeric ops, because XLA already fuses each feature's elementwise chain and constant
parameters (a remainder by a constant compiles to vector multiplies, no divide
instruction) beat per-value parameter arrays plus the concatenation. Fused Bucketize
is faster than per-feature, but only because its branchless search over a padded
boundary table beats the searchsorted of the per-feature kernel reference; fusion
itself gains nothing measurable there. On the H100 every kind runs faster fused
(0.77x the per-feature time for the Criteo shape, benchmarks/results/features_gpu.md):
there the many small per-feature kernels cost more than the concatenation. So the
default is decided per backend: everything fused on GPU, Bucketize only on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from recis_jax.features.ops import (
    Context,
    Feature,
    FeatureCross,
    Hash,
    Op,
    SelectField,
    SelectFields,
    ValueOp,
    is_string_dtype,
    value_dtype,
)

OVERFLOW_KEY = "__overflow__"
HOST_PREFIX = "__host__/"  # batch keys for host-hashed columns, consumed by the device stage


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One feature, split into its stages."""

    name: str
    ctx: Context
    selects: tuple[SelectField, ...]
    multi: bool  # SelectFields: the value is a list
    host: Hash | None
    device_ops: tuple[Op, ...]


def _plan(feature: Feature) -> _Plan:
    feature.finish()
    first, rest = feature.ops[0], list(feature.ops[1:])
    multi = isinstance(first, SelectFields)
    selects = first.input_list if multi else (first,)
    host = rest.pop(0) if rest and isinstance(rest[0], Hash) else None
    return _Plan(feature.name, Context(feature.name, feature.inputs), tuple(selects), multi, host, tuple(rest))


class FeatureEngine:
    """Runs a list of `Feature`s: `host_transform` (host), `apply` / `__call__` (jit)."""

    def __init__(self, features: Sequence[Feature], *, fuse: bool | None = None):
        """Args:
          features: the features; names must be unique, and so must output names.
          fuse: True runs same-kind elementwise ops of a step as one concatenated call,
            False runs every feature's op separately, None (default) fuses the kinds
            measured faster fused (`ValueOp.fuse_by_default`: Bucketize on float
            inputs) and runs the rest per feature.
        """
        self.features = tuple(features)
        self.fuse = fuse if fuse is None else bool(fuse)
        self._plans = tuple(_plan(f) for f in self.features)
        self._depth = max((len(p.device_ops) for p in self._plans), default=0)
        seen: dict[str, str] = {}
        for f, p in zip(self.features, self._plans):
            for out in self._output_names(f, p):
                if out in seen:
                    raise ValueError(f"feature {f.name!r}: output name {out!r} is already produced by "
                                     f"feature {seen[out]!r}")
                seen[out] = f.name
        self._jitted = None

    @classmethod
    def from_config(cls, config: Any, **kwargs) -> "FeatureEngine":
        """From a ConfigDict / dict with `features` (a list of `Feature.from_config`
        dicts) and optional `fuse`, or from the list itself."""
        if isinstance(config, Mapping) or hasattr(config, "features"):
            specs = config["features"]
            if "fuse" in config and "fuse" not in kwargs:
                kwargs["fuse"] = config["fuse"]
        else:
            specs = config
        return cls([s if isinstance(s, Feature) else Feature.from_config(s) for s in specs], **kwargs)

    @staticmethod
    def _output_names(feature: Feature, plan: _Plan) -> list[str]:
        last = plan.device_ops[-1] if plan.device_ops else None
        if isinstance(last, ValueOp) and last.output_names():
            return [f"{feature.name}_{n}" for n in last.output_names()]
        return [feature.name]

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the feature outputs (pass-through columns not included)."""
        return tuple(n for f, p in zip(self.features, self._plans) for n in self._output_names(f, p))

    # -- host stage -------------------------------------------------------------------------
    def host_transform(self, batch: Mapping[str, Any]) -> dict:
        """Runs the host ops (Hash on string columns) and returns a new batch.

        Each hashed feature's int64 result is stored under `HOST_PREFIX + feature` for
        the device stage; a string column consumed only by Hash ops is removed (it
        cannot enter jit). Other columns pass through. Idempotent.
        """
        out = dict(batch)
        device_cols = {s.name for p in self._plans if p.host is None for s in p.selects}
        consumed = set()
        for p in self._plans:
            if p.host is None or HOST_PREFIX + p.name in batch:
                continue
            col = p.selects[0].name
            if col not in batch:
                raise KeyError(f"{p.ctx}: input column {col!r} is not in the batch (columns: {sorted(batch)})")
            out[HOST_PREFIX + p.name] = p.host.host_apply(batch[col], p.ctx)
            consumed.add(col)
        for col in consumed - device_cols:
            out.pop(col, None)
        return out

    # -- device stage -------------------------------------------------------------------------
    def _select(self, batch: Mapping[str, Any], p: _Plan):
        if p.host is not None:
            if HOST_PREFIX + p.name not in batch:
                raise TypeError(f"{p.ctx}: Hash runs on the host: call engine.host_transform(batch) before the "
                                f"device stage (or use engine.transform)")
            return jax.tree.map(jnp.asarray, batch[HOST_PREFIX + p.name])
        vals = []
        for s in p.selects:
            if s.name not in batch:
                raise KeyError(f"{p.ctx}: input column {s.name!r} is not in the batch (columns: {sorted(batch)})")
            v = batch[s.name]
            s.check(v, p.ctx)
            if is_string_dtype(value_dtype(v)):
                raise TypeError(f"{p.ctx}: column {s.name!r} holds strings; add Hash(...) right after "
                                f"SelectField and run engine.host_transform on the batch")
            vals.append(jax.tree.map(jnp.asarray, v))
        return vals if p.multi else vals[0]

    def apply(self, batch: Mapping[str, Any]) -> dict:
        """The jit-compatible stage: every op except Hash. Returns the output dict
        (features by name, pass-through columns, and OVERFLOW_KEY when needed)."""
        values = {p.name: self._select(batch, p) for p in self._plans}
        overflow = {}
        for step in range(self._depth):
            groups: dict[Any, list[_Plan]] = {}
            for p in self._plans:
                if step >= len(p.device_ops):
                    continue
                op = p.device_ops[step]
                fuse = isinstance(op, ValueOp) and (self._fuse_by_default(op) if self.fuse is None else self.fuse)
                key = op.fuse_key(values[p.name]) if fuse else None
                if key is None:
                    values[p.name] = self._run_one(op, values[p.name], p, overflow)
                else:
                    groups.setdefault(key, []).append(p)
            for members in groups.values():
                ops = [p.device_ops[step] for p in members]
                if len(members) == 1:
                    values[members[0].name] = ops[0].apply(values[members[0].name], members[0].ctx)
                    continue
                outs = type(ops[0]).apply_fused(ops, [values[p.name] for p in members], [p.ctx for p in members])
                for p, o in zip(members, outs):
                    values[p.name] = o
        out = {k: v for k, v in batch.items() if not k.startswith(HOST_PREFIX)}
        for p in self._plans:
            v = values[p.name]
            if isinstance(v, dict):  # IDMultiHash
                out.update({f"{p.name}_{k}": o for k, o in v.items()})
            else:
                out[p.name] = v
        if overflow:
            out[OVERFLOW_KEY] = overflow
        return out

    __call__ = apply

    @staticmethod
    def _run_one(op: Op, value, p: _Plan, overflow: dict):
        if isinstance(op, FeatureCross):
            result, needed = op.apply(value, p.ctx)
            if needed is not None:
                overflow[p.name] = needed
            return result
        return op.apply(value, p.ctx)

    def transform(self, batch: Mapping[str, Any]) -> dict:
        """host_transform then the device stage, jitted once per input structure."""
        if self._jitted is None:
            self._jitted = jax.jit(self.apply)
        return self._jitted(self.host_transform(batch))

    @staticmethod
    def _fuse_by_default(op) -> bool:
        """`fuse=None`: fuse every op kind on GPU, only the CPU-measured kinds elsewhere."""
        return op.fuse_by_default or dispatch.on_gpu()

    def __repr__(self) -> str:
        return f"FeatureEngine({len(self.features)} features, fuse={self.fuse})"
