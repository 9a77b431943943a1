"""DeepFM quality on RecIS's real data: recis-jax vs a PyTorch DeepFM, same run.

    RECIS_REAL_DATA=../shared/data .venv/bin/python benchmarks/deepfm_quality.py \
        [--torch-python /tmp/recis-torch-venv/bin/python] [--seeds 0,1,2]

Both train on parts 0-6 of ../shared/data/recis_deepfm (70k rows) for 2 epochs with
batch 1000 and evaluate on part 7 (10k rows): same features (26 categorical dim-8 +
dim-1 bias tables, 13 log1p numerics), TruncNormal(0.001) init, SparseAdam 1e-3 on the
tables, Adam(W, decay 0) 1e-3 dense, float32. recis-jax runs `configs/deepfm.py:recis`
through `train_and_evaluate` (the `recis-jax train` path); PyTorch runs
benchmarks/torch_baseline/deepfm_reference.py in its own Python 3.11 environment.
The issue's bar: recis-jax's mean AUC >= PyTorch's - 0.005.

Results: benchmarks/results/deepfm_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-python", default="/tmp/recis-torch-venv/bin/python")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    data = pathlib.Path(os.environ.get("RECIS_REAL_DATA", ROOT.parent / "shared" / "data")) / "recis_deepfm"
    os.environ["RECIS_REAL_DATA"] = str(data.parent)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="deepfm_quality."))

    # PyTorch first (its own process and Python).
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deepfm_data.py"), "--data", str(data),
                    "--out", str(tmp / "real.npz")], check=True)
    torch_json = tmp / "torch.json"
    subprocess.run([a.torch_python, str(ROOT / "benchmarks" / "torch_baseline" / "deepfm_reference.py"),
                    "--npz", str(tmp / "real.npz"), "--seeds", a.seeds, "--out", str(torch_json)], check=True)
    torch_res = json.load(open(torch_json))

    from recis_jax.train import main as train_main

    ours = []
    for seed in seeds:
        cfg = train_main.load_config(str(ROOT / "configs" / "deepfm.py") + ":recis", [f"--config.seed={seed}"])
        t0 = time.perf_counter()
        s = train_main.train_and_evaluate(cfg, str(tmp / f"jax_{seed}"))
        ours.append({"seed": seed, "auc": s["eval"]["auc"], "logloss": s["eval"]["logloss"],
                     "calibration": s["eval"]["calibration"], "wall_s": time.perf_counter() - t0,
                     "steps": s["steps"]})
    auc = np.array([r["auc"] for r in ours])
    summary = {
        "recis_jax": {"auc_mean": float(auc.mean()), "auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
                      "logloss_mean": float(np.mean([r["logloss"] for r in ours]))},
        "pytorch": {k: torch_res["summary"][k] for k in ("auc_mean", "auc_std", "logloss_mean")},
    }
    summary["difference"] = summary["recis_jax"]["auc_mean"] - summary["pytorch"]["auc_mean"]
    summary["meets_bar"] = summary["difference"] >= -0.005
    result = {"benchmark": "deepfm_quality", "seeds": seeds, "recis_jax_runs": ours,
              "pytorch_runs": torch_res["runs"], "summary": summary, "pytorch_config": torch_res["config"],
              "env": common.env_info(), "pytorch_env": torch_res.get("env")}
    out = pathlib.Path(a.out)
    common.write_json(out / "deepfm_quality.json", result)
    rows = [{"framework": "recis-jax (configs/deepfm.py:recis)", "seed": r["seed"], "auc": f"{r['auc']:.4f}",
             "logloss": f"{r['logloss']:.4f}"} for r in ours]
    rows += [{"framework": "PyTorch reference", "seed": r["seed"], "auc": f"{r['epochs'][-1]['eval_auc']:.4f}",
              "logloss": f"{r['epochs'][-1]['eval_logloss']:.4f}"} for r in torch_res["runs"]]
    md = ["# DeepFM on RecIS's DeepFM data (parts 0-6 x 2 epochs, eval part 7)\n",
          f"{result['env'].get('date_utc')}, {result['env'].get('cpu')}; jax {result['env']['versions'].get('jax')}, "
          f"torch {(torch_res.get('env') or {}).get('torch')}\n",
          common.md_table(rows, ["framework", "seed", "auc", "logloss"]),
          f"\nrecis-jax AUC {summary['recis_jax']['auc_mean']:.4f} +- {summary['recis_jax']['auc_std']:.4f}, "
          f"PyTorch {summary['pytorch']['auc_mean']:.4f} +- {summary['pytorch']['auc_std']:.4f} "
          f"(sample std over seeds): difference {summary['difference']:+.4f} "
          f"({'meets' if summary['meets_bar'] else 'misses'} the >= -0.005 bar).\n"]
    (out / "deepfm_quality.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
