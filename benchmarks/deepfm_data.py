"""Convert RecIS's DeepFM ORC files into one compressed .npz for the PyTorch reference.

    .venv/bin/python benchmarks/deepfm_data.py --data /work/shared/data/recis_deepfm \
        --out /tmp/deepfm_real.npz

(--data defaults to $RECIS_REAL_DATA/recis_deepfm.) Then

    /tmp/recis-torch-venv/bin/python benchmarks/torch_baseline/deepfm_reference.py \
        --npz /tmp/deepfm_real.npz --seeds 0,1,2 --out benchmarks/results/deepfm_quality_torch.json

The torch environment has no pyarrow, hence this step. Input: part-*.orc, columns
label (list<double>, one value), i1..i13 (list<double>, 0 or 1 values), c1..c26
(list<int64>, 0 or 1 values); an empty list (or null) means missing. Output arrays:

  label      [N] float32
  dense      [N, 13] float64, raw values (0 where missing)
  dense_mask [N, 13] bool, True where present
  ids        [N, 26] int64, raw IDs (0 where missing)
  id_mask    [N, 26] bool, True where present
  part       [N] int16, index of the part-K.orc file each row came from
  files      [P] str, the file names in part order

The data stays outside the repository: write the .npz somewhere like /tmp.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc

NUM_DENSE = 13
NUM_CAT = 26


def _single(col: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, present) of a list column holding 0 or 1 values per row."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths = np.where(valid, lengths, 0)
    if lengths.max(initial=0) > 1:
        raise ValueError(f"list column holds more than one value in some row (max {lengths.max()})")
    flat = arr.values.to_numpy(zero_copy_only=False)
    present = lengths == 1
    out = np.zeros(n, dtype)
    out[present] = flat[offsets[:-1][present]]
    return out, present


def convert(data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(data_dir.glob("part-*.orc"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if not files:
        raise FileNotFoundError(f"no part-*.orc in {data_dir}")
    out = {k: [] for k in ("label", "dense", "dense_mask", "ids", "id_mask", "part")}
    for k, f in enumerate(files):
        t = orc.read_table(str(f))
        n = t.num_rows
        lab, lab_ok = _single(t.column("label"), np.float32)
        if not lab_ok.all():
            raise ValueError(f"{f}: {int((~lab_ok).sum())} rows without a label")
        dense = np.zeros((n, NUM_DENSE), np.float64)
        dmask = np.zeros((n, NUM_DENSE), bool)
        for j in range(NUM_DENSE):
            dense[:, j], dmask[:, j] = _single(t.column(f"i{j + 1}"), np.float64)
        ids = np.zeros((n, NUM_CAT), np.int64)
        imask = np.zeros((n, NUM_CAT), bool)
        for j in range(NUM_CAT):
            ids[:, j], imask[:, j] = _single(t.column(f"c{j + 1}"), np.int64)
        out["label"].append(lab)
        out["dense"].append(dense)
        out["dense_mask"].append(dmask)
        out["ids"].append(ids)
        out["id_mask"].append(imask)
        out["part"].append(np.full(n, k, np.int16))
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["files"] = np.array([f.name for f in files])
    return res


def main(argv=None) -> int:
    env = os.environ.get("RECIS_REAL_DATA")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(pathlib.Path(env) / "recis_deepfm") if env else None,
                   help="directory of part-*.orc (default $RECIS_REAL_DATA/recis_deepfm)")
    p.add_argument("--out", required=True, help="output .npz (outside the repo, e.g. /tmp)")
    a = p.parse_args(argv)
    if not a.data:
        p.error("--data is required when $RECIS_REAL_DATA is not set")
    res = convert(pathlib.Path(a.data))
    np.savez_compressed(a.out, **res)
    n = len(res["label"])
    print(f"{a.out}: {n} rows from {len(res['files'])} files, positive rate "
          f"{res['label'].mean():.4f}, dense present {res['dense_mask'].mean():.3f}, "
          f"ids present {res['id_mask'].mean():.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
