#!/usr/bin/env bash
# One GPU-machine session: kernel tests compiled on the GPU, the main job on the GPU,
# the sparse-op sections not yet timed, and a 16k-sequence training run.
#   bash benchmarks/gpu_session.sh $OUT       (repo root, PYTHONPATH=$PWD)
set -u
OUT=${1:-/tmp/gpu_session}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== kernel tests (compiled)"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_embedding_bag_kernel.py tests/test_sparse_update_kernel.py \
  tests/test_ids_partition_kernel.py tests/test_hashtable_kernel.py tests/test_bucketize_kernel.py 2>&1 | tail -4 | tee "$OUT/kernel_tests.txt"
echo "== main job (configs/deepfm.py) on the GPU"
timeout 150 python3 -m recis_jax.cli train --config configs/deepfm.py --workdir "$OUT/deepfm" \
  --config.train.checkpoint_every=0 --config.train.log_every=50 2>&1 | tail -6 | tee "$OUT/deepfm.txt"
echo "== seq_transformer:long (L = 16384) 12 steps"
timeout 140 python3 -m recis_jax.cli train --config configs/seq_transformer.py:long --workdir "$OUT/seq16k" \
  --config.data.generate.num_files=1 --config.data.generate.rows_per_file=192 --config.data.generate.eval_files=1 \
  --config.train.num_steps=12 --config.train.log_every=4 --config.train.checkpoint_every=0 2>&1 | tail -8 | tee "$OUT/seq16k.txt"
echo "== sparse ops not yet timed: fused update, ids partition"
timeout 100 python3 benchmarks/ops.py --device gpu --ops sparse --sections copy,update,partition --out "$OUT" 2>&1 | tail -25
ls "$OUT"
