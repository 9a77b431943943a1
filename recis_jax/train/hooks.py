"""Host-side hooks of the training loop: progress, metrics files, profiling.

Each hook sees plain Python numbers (already fetched from the device by the trainer at
a log step); none of them touches device arrays, so they never add a sync.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


class ProgressLogger:
    """One line per log step: a live progress bar (step/total, samples/s, loss, ETA)
    when stdout is a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, total_steps: int | None = None, stream=None, tty: bool | None = None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._open_line = False

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        for key, fmt in (("loss", "{:.4f}"), ("auc", "{:.4f}"), ("samples_per_sec", "{:,.0f}/s")):
            v = record.get(key)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                parts.append(f"{key.replace('samples_per_sec', 'rate')} " + fmt.format(v))
        rate = record.get("steps_per_sec")
        if self.total and rate:
            parts.append(f"eta {_duration((self.total - step) / rate)}")
        line = "  ".join(parts)
        if self.tty:
            bar = ""
            if self.total:
                done = int(30 * min(step / self.total, 1.0))
                bar = "[" + "#" * done + "." * (30 - done) + "] "
            self.stream.write("\r" + bar + line + " " * 4)
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()


def _duration(secs: float) -> str:
    secs = max(0, int(secs))
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


class MetricsWriter:
    """`workdir/metrics.jsonl` (one JSON object per record, appended, flushed) and,
    when a TensorBoard writer can be imported, event files under `workdir/tb`."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._f = open(self.path, "a")
        self._tb = _tensorboard_writer(os.path.join(workdir, "tb")) if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=_json_default) + "\n")
        self._f.flush()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for key, value in _flatten(record):
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb(f"{prefix}/{key}", float(value), int(record["step"]))

    def close(self) -> None:
        self._f.close()


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield prefix + k, v


def _json_default(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)


def _tensorboard_writer(logdir: str):
    """A `scalar(tag, value, step)` callable, or None when no writer is installed
    (tensorboardX, or torch's writer, both optional)."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            writer = mod.SummaryWriter(logdir)
        except Exception:  # noqa: BLE001 - an optional dependency, any failure means "absent"
            continue

        def scalar(tag, value, step, _w=writer):
            _w.add_scalar(tag, value, step)
            _w.flush()

        return scalar
    return None


class Profiler:
    """A jax.profiler trace of steps [start, stop) into `workdir/profile`
    (open it with TensorBoard's profile plugin or Perfetto)."""

    def __init__(self, workdir: str, start: int, stop: int):
        if not 0 <= start < stop:
            raise ValueError(f"profile steps must satisfy 0 <= start < stop, got {start}, {stop}")
        self.dir, self.start, self.stop = os.path.join(workdir, "profile"), start, stop
        self.active = False

    def before_step(self, step: int) -> None:
        if step == self.start and not self.active:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, step: int, sync) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False


class Timer:
    """Wall time and examples between log steps."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.examples = 0
        self.steps = 0

    def lap(self) -> tuple[float, int, int]:
        now = time.perf_counter()
        out = (now - self.last, self.examples, self.steps)
        self.last, self.examples, self.steps = now, 0, 0
        return out
