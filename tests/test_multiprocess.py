"""2 processes x 2 CPU devices (jax.distributed, gloo) train the sharded step and match
the 1-device EmbeddingEngine step on the same global batches."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.mp_worker import NUM_PROCESSES, OPT, STEPS
from tests.test_sharding import make_batches, reference_run, zipf_ids

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "mp_worker.py"), str(i), str(port), str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(NUM_PROCESSES)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        pytest.fail("workers timed out:\n" + _report(procs, outs))
    if any(p.returncode for p in procs):
        pytest.fail("a worker failed:\n" + _report(procs, outs))

    parts = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(NUM_PROCESSES)]
    ref_losses, ref, ref_params = reference_run(make_batches(STEPS, 11, zipf_ids), OPT)
    for part in parts:  # every process sees the same replicated loss and dense params
        np.testing.assert_allclose(part["losses"], ref_losses, rtol=1e-6)
        np.testing.assert_allclose(part["params_w1"], ref_params["w1"], rtol=1e-5, atol=1e-6)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "tables", "embedding", "slot_m", "slot_v",
                                                                  "shard")}
    order = np.lexsort((merged["ids"], merged["tables"]))
    merged = {k: v[order] for k, v in merged.items()}
    # Process i holds shards {2i, 2i + 1}; together every row, once.
    assert sorted(set(parts[0]["shard"].tolist()) | set(parts[1]["shard"].tolist())) == [0, 1, 2, 3]
    assert not set(parts[0]["shard"].tolist()) & set(parts[1]["shard"].tolist())
    np.testing.assert_array_equal(merged["tables"], ref["tables"])
    np.testing.assert_array_equal(merged["ids"], ref["ids"])
    for k in ("embedding", "slot_m", "slot_v"):
        np.testing.assert_allclose(merged[k], ref[k], rtol=1e-5, atol=1e-6)


def _report(procs, outs) -> str:
    return "\n".join(f"--- worker {i} rc={p.returncode}\nstdout:\n{o[-4000:]}\nstderr:\n{e[-8000:]}"
                     for i, (p, (o, e)) in enumerate(zip(procs, outs)))
