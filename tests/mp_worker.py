"""One process of the 2-process sharded training test (launched by test_multiprocess.py).

    python tests/mp_worker.py PROCESS_ID PORT OUT_DIR

Each process has 2 CPU devices (gloo collectives); the mesh spans the 4 devices of both
processes. Every process builds the same global batches (seeded), feeds only the rows
of its own devices, trains a few sharded steps and writes its losses and the table rows
its shards own to OUT_DIR/worker{PROCESS_ID}.npz.
"""

import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# Imported by the test for these constants: configure jax only when run as a script.
NUM_PROCESSES, STEPS, OPT = 2, 3, "adam"


def configure():
    """2 CPU devices per process, gloo collectives, x64 (before any jax use)."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)


def replicate(mesh, tree):
    """Host values -> global arrays replicated over the mesh (every process passes the same)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def main(process_id: int, port: int, out_dir: str):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=process_id)
    from recis_jax.sharding import make_mesh, put_process_local, split_features
    from tests.test_sharding import CAP, OPTS, init_params, make_batches, sharded_step, zipf_ids

    n = jax.device_count()
    assert n == 2 * NUM_PROCESSES and jax.local_device_count() == 2, (n, jax.local_device_count())
    sharded, step = sharded_step(n, OPT)
    assert sharded.mesh.devices.tolist() == make_mesh().devices.tolist()
    mine = [i for i, d in enumerate(sharded.mesh.devices.flat) if d.process_index == jax.process_index()]
    sparse_opt, dense_tx = OPTS[OPT]
    params = replicate(sharded.mesh, init_params())
    opt_state = replicate(sharded.mesh, dense_tx.init(init_params()))
    tables = sharded.init(sparse_opt)
    losses = []
    for t, b in enumerate(make_batches(STEPS, 11, zipf_ids)):
        feats = split_features(b["features"], n, capacity=CAP)
        labels = np.split(b["labels"], n)
        batch = put_process_local(sharded.mesh, [{"features": feats[i], "labels": labels[i]} for i in mine])
        params, opt_state, tables, m = step(params, opt_state, tables, batch, replicate(sharded.mesh, np.int32(t)))
        losses.append(float(m["loss"]))
        assert not bool(m["skipped"])
    (pname,) = tables
    ex = sharded.export(tables)[pname]
    np.savez(os.path.join(out_dir, f"worker{process_id}.npz"), losses=np.array(losses, np.float32),
             params_w1=np.asarray(params["w1"]), **ex)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.pop("XLA_FLAGS", None)  # the test process forces 8 devices; we want 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    configure()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
